"""LoRA+ (Hayou, Ghosh & Yu 2024, arXiv:2402.12354) inside the depth groups: which tensor is LoRA+'s "A", "B"
or "embedding", the rate factor it gets on top of its depth's scale, and whether it decays.

The rules are those of peft's ``create_loraplus_optimizer`` (checked tensor by tensor in
``tests/test_loraplus.py``), stated per tensor:

* **embedding**: the tensor lives in a container (``lora_embedding_A``/``_B``, ``base_layer``) directly under a
  peft LoRA ``Embedding`` layer. Rate ``loraplus_lr_embedding`` (an absolute rate, as in peft; default 1e-6);
  it decays.
* **B**: otherwise, ``lora_B`` in its name, or any 1-D trainable tensor (biases and norm weights too, as in
  peft; a ZeRO-3 partition counts by its full shape, ``ds_shape``, where peft would see a flat tensor). Rate
  ``loraplus_lr_ratio x lr``; it decays only if the run's decay rule says so (Trainer's, by default).
* **A**: every other tensor (``lora_A``, a trainable classifier, ...). Rate ``lr``; it decays.

The weight decay of the decaying tensors is ``loraplus_weight_decay`` when given, else the run's
``weight_decay``. The groups builder (:func:`llrd.param_groups`) multiplies each tensor's depth scale by its
factor, so at ``layer_decay=1.0`` the rates are peft's and with decay every B stays ``ratio x`` its A.

Example:
    >>> plus = LoraPlus(16.0)
    >>> plus.factor("B", lr=1e-4), plus.factor("A", lr=1e-4)
    (16.0, 1.0)
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from torch import nn

__all__ = ["LoraPlus", "KINDS", "check_loraplus"]

logger = logging.getLogger(__name__)

#: The LoRA+ kinds in group order (A first: a depth's plain group stays where it was).
KINDS = ("A", "B", "embedding")

#: Default rate of LoRA embedding tensors: peft's ``loraplus_lr_embedding`` default.
DEFAULT_LR_EMBEDDING = 1e-6


def _number(value: Any, setting: str, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) or math.isinf(value):
        raise ValueError(f"{setting}={value!r} is not a finite number; {what}")
    return float(value)


def check_loraplus(
    lr_ratio: Any, lr_embedding: Any = DEFAULT_LR_EMBEDDING, weight_decay: Any = None
) -> tuple[float | None, float, float | None]:
    """The three LoRA+ settings as floats (``lr_ratio`` may be ``None``: off), or a ``ValueError`` naming the first
    bad one and its value.

    Example:
        >>> check_loraplus(16, 1e-6, None)
        (16.0, 1e-06, None)
    """
    ratio = None if lr_ratio is None else _number(lr_ratio, "loraplus_lr_ratio", "pass the B/A rate ratio, e.g. 16.")
    if ratio is not None and ratio <= 0:
        raise ValueError(
            f"loraplus_lr_ratio={lr_ratio!r} must be > 0: LoRA's B matrices train at loraplus_lr_ratio x lr "
            "(the paper uses 2-16); leave it unset (None) for plain LoRA."
        )
    emb = _number(lr_embedding, "loraplus_lr_embedding", "pass an absolute rate, e.g. 1e-6 (peft's default).")
    if emb < 0:
        raise ValueError(f"loraplus_lr_embedding={lr_embedding!r} must be >= 0 (an absolute rate, peft: 1e-6).")
    if weight_decay is not None:
        weight_decay = _number(weight_decay, "loraplus_weight_decay", "pass e.g. 0.01, or None for weight_decay.")
        if weight_decay < 0:
            raise ValueError(f"loraplus_weight_decay={weight_decay!r} must be >= 0 (None: the run's weight_decay).")
    return ratio, emb, weight_decay


def _ndim(param: nn.Parameter) -> int:
    """The tensor's own number of dimensions, also for a ZeRO-3 partition (whose local data is flat)."""
    return len(getattr(param, "ds_shape", param.shape))


def _lora_embedding_class() -> type | None:
    try:
        from peft.tuners.lora.layer import Embedding
    except ImportError:  # no peft, so no LoRA embedding layer
        return None
    return Embedding


@dataclass(frozen=True)
class LoraPlus:
    """The LoRA+ settings of one run (see the module docstring); validated on creation.

    Example:
        >>> LoraPlus(16.0).kinds(peft_model, [n for n, _ in peft_model.named_parameters()])  # doctest: +SKIP
        {'base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.default.weight': 'A', ...}
    """

    lr_ratio: float
    lr_embedding: float = DEFAULT_LR_EMBEDDING
    weight_decay: float | None = None

    def __post_init__(self) -> None:
        ratio, emb, wd = check_loraplus(self.lr_ratio, self.lr_embedding, self.weight_decay)
        object.__setattr__(self, "lr_ratio", ratio)
        object.__setattr__(self, "lr_embedding", emb)
        object.__setattr__(self, "weight_decay", wd)

    def kinds(self, model: nn.Module, raw_names: Iterable[str]) -> dict[str, str]:
        """The LoRA+ kind (``"A"``, ``"B"``, ``"embedding"``) of each of ``raw_names`` (names in
        ``model.named_parameters()``), or a ``ValueError`` when none is a LoRA tensor."""
        params = dict(model.named_parameters())
        embedding = _lora_embedding_class()
        modules = dict(model.named_modules()) if embedding is not None else {}
        out = {}
        for raw in raw_names:
            owner = raw.rsplit(".", 2)[0] if raw.count(".") >= 2 else None  # holder of the tensor's container
            if embedding is not None and owner is not None and isinstance(modules.get(owner), embedding):
                out[raw] = "embedding"
            elif "lora_B" in raw or _ndim(params[raw]) == 1:
                out[raw] = "B"
            else:
                out[raw] = "A"
        lora = [n for n, k in out.items() if k == "embedding" or "lora_B" in n]
        if not lora:
            raise ValueError(
                f"loraplus_lr_ratio={self.lr_ratio:g} is set, but {type(model).__name__} has no trainable LoRA tensor "
                "(none named 'lora_B', no peft LoRA Embedding): LoRA+ would only multiply the rates of its 1-D "
                f"tensors (biases, norms) by {self.lr_ratio:g}. Wrap the model with peft's get_peft_model(model, "
                "LoraConfig(...)) first, or leave loraplus_lr_ratio unset."
            )
        counts = {k: sum(v == k for v in out.values()) for k in KINDS}
        logger.info(
            "LoRA+ (loraplus_lr_ratio=%g): %d A tensors at their depth's rate, %d B at %g x (%d of them 1-D tensors "
            "without lora_B in the name, as peft), %d LoRA embedding tensors at %g x their depth's scale",
            self.lr_ratio, counts["A"], counts["B"], self.lr_ratio,
            sum(k == "B" and "lora_B" not in n for n, k in out.items()), counts["embedding"], self.lr_embedding,
        )  # fmt: skip
        return out

    def factor(self, kind: str, lr: float) -> float:
        """Rate of a tensor of this kind relative to the base ``lr`` (before its depth scale)."""
        if kind == "B":
            return self.lr_ratio
        if kind == "embedding":
            return self.lr_embedding / lr if lr else 0.0
        return 1.0

    @staticmethod
    def decays(kind: str, in_decay_names: bool) -> bool:
        """Whether a tensor of this kind gets weight decay: A and embedding tensors always, B tensors only if the
        run's decay rule lists them (peft's rule)."""
        return in_decay_names if kind == "B" else True

    def decay_value(self, weight_decay: float) -> float:
        """The weight decay of the decaying tensors."""
        return weight_decay if self.weight_decay is None else self.weight_decay

"""Build an optimizer on LLRD's param groups: ``llrd.create_optimizer`` for your own loop, and the one place
where ``LLRDMixin`` turns groups into an optimizer.

Example:
    >>> opt = create_optimizer(model, torch.optim.AdamW, {"lr": 1e-4, "betas": (0.9, 0.98)}, layer_decay=0.8)
    >>> trainer = Trainer(model=model, args=args, optimizers=(opt, None))   # doctest: +SKIP
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .discovery import LayerMap
from .groups import param_groups

__all__ = ["create_optimizer", "build_optimizer", "check_optimizer", "apply_rate_mapping"]

logger = logging.getLogger(__name__)

# Keys of Trainer's optimizer kwargs that replace the param groups with the optimizer's own structure.
OWN_STRUCTURE = ("params", "model", "optimizer_dict")


def check_optimizer(optimizer_cls: Any, optimizer_kwargs: Mapping[str, Any]) -> None:
    """Refuse optimizers that build their own parameter structure (GaLore, APOLLO, LOMO, layer-wise variants,
    optimizer factories such as Muon's): they cannot carry per-layer learning rates."""
    own = [k for k in OWN_STRUCTURE if k in optimizer_kwargs]
    from transformers.trainer_optimizer import is_optimizer_factory

    if own or is_optimizer_factory(optimizer_cls):
        raise ValueError(
            f"optimizer {getattr(optimizer_cls, '__name__', optimizer_cls)!r} builds its own parameter structure "
            f"({own or 'a factory, not an Optimizer class'}), which cannot carry per-layer learning rates. Use "
            "adamw_torch, adamw_torch_fused, adafactor, sgd, an 8-bit AdamW, ... or turn LLRD off (every LLRD "
            "setting at its default)."
        )


def build_optimizer(
    optimizer_cls: type, optimizer_kwargs: Mapping[str, Any], groups: list[dict[str, Any]], lr: float
) -> torch.optim.Optimizer:
    """``optimizer_cls(groups, **optimizer_kwargs)`` with ``lr`` as the default rate (the head's), refusing
    optimizers that build their own parameter structure (:func:`check_optimizer`)."""
    check_optimizer(optimizer_cls, optimizer_kwargs)
    # defaults["lr"] stays the head's rate: HF's min-lr schedulers divide by it
    return optimizer_cls(groups, **{**optimizer_kwargs, "lr": lr})


def apply_rate_mapping(
    groups: list[dict[str, Any]], mapping: Mapping[str, float] | None, lr: float, layer_map: LayerMap
) -> list[dict[str, Any]]:
    """Give the parameters whose name matches a regex of ``mapping`` exactly that absolute rate.

    This is the meaning of sentence-transformers' ``learning_rate_mapping``: a matched parameter leaves its
    depth's group for a group of its own at that rate (``lr_scale = rate / lr``, so the scheduler still moves it
    with the rest), one such group per depth, so that what acts per depth (gradual unfreezing, adaptive rates,
    per-depth norms) still applies to it. The first matching regex wins; a regex that matches nothing is an
    error, as it is in sentence-transformers. Names are searched in the raw names of the optimized module (the
    loss module for sentence-transformers) and in the clean names.

    Example:
        >>> apply_rate_mapping(groups, {r"\\.classifier\\.": 1e-3}, 1e-4, layer_map)   # doctest: +SKIP
    """
    if not mapping:
        return groups
    raw_of = {clean: raw for raw, clean in layer_map.raw_names.items()}
    rules = [(re.compile(rx), float(rate), rx) for rx, rate in mapping.items()]
    used: set[str] = set()
    moved: dict[tuple, dict[str, Any]] = {}  # (regex, stack, depth, decays) -> its group
    kept = []
    for group in groups:
        stay_params, stay_names = [], []
        for param, name in zip(group["params"], group["param_names"], strict=True):
            rule = next((r for r in rules if r[0].search(raw_of.get(name, name)) or r[0].search(name)), None)
            if rule is None:
                stay_params.append(param)
                stay_names.append(name)
                continue
            used.add(rule[2])
            decays = group["weight_decay"] > 0
            depth = group.get("layer_id")
            target = moved.setdefault(
                (rule[2], group.get("stack"), depth, decays),
                {
                    **{k: v for k, v in group.items() if k not in ("params", "param_names")},
                    "params": [],
                    "param_names": [],
                    "lr": rule[1],
                    "lr_scale": rule[1] / lr,
                    "group_name": f"mapped/{rule[2]}/depth_{depth}/{'decay' if decays else 'no_decay'}",
                },
            )
            target["params"].append(param)
            target["param_names"].append(name)
        if stay_params:
            kept.append({**group, "params": stay_params, "param_names": stay_names})
    unused = [rx for rx in mapping if rx not in used]
    if unused:
        raise ValueError(
            f"learning_rate_mapping pattern(s) {unused} match no trainable parameter; list the names with "
            "`[n for n, _ in trainer.loss.named_parameters()]` (sentence-transformers searches the loss module)."
        )
    return kept + list(moved.values())  # the head's group stays first: Trainer logs group 0's rate


def create_optimizer(
    model: nn.Module,
    optimizer_cls: type[torch.optim.Optimizer],
    optimizer_kwargs: Mapping[str, Any],
    *,
    layer_decay: float = 1.0,
    weight_decay: float | None = None,
    **group_options: Any,
) -> torch.optim.Optimizer:
    """One call from a model to an optimizer with per-layer rates, in the shape of PEFT's
    ``create_loraplus_optimizer``.

    Args:
        model: the model (bare or wrapped: DDP, ``torch.compile``, PEFT).
        optimizer_cls: a ``torch.optim.Optimizer`` class (``AdamW``, ``SGD``, bitsandbytes' ``AdamW8bit``, ...).
        optimizer_kwargs: its keyword arguments; ``lr`` (required) is the head's rate, ``weight_decay`` (default
            0) applies to the parameters ``Trainer`` would decay (not biases and norms).
        layer_decay: decay per depth, in (0, 1].
        weight_decay: overrides ``optimizer_kwargs["weight_decay"]``.
        **group_options: any other :func:`llrd.param_groups` keyword (``head_lr_scale``, ``stack_decay``,
            ``lr_multipliers``, ``layer_decay_min_scale``, ``freeze_below_scale``, ``block_pattern``,
            ``depth_overrides``, ``include_frozen``, ``per_depth``, ...).

    Returns:
        The optimizer; use it with ``Trainer(optimizers=(opt, None))``, in an Accelerate loop, or anywhere.

    Example:
        >>> opt = create_optimizer(model, torch.optim.AdamW, {"lr": 1e-4, "weight_decay": 0.01}, layer_decay=0.8)
    """
    kwargs = dict(optimizer_kwargs)
    if "lr" not in kwargs:
        raise ValueError("optimizer_kwargs needs 'lr': the head's learning rate (lower depths get lr * decay**k).")
    lr = float(kwargs.pop("lr"))
    wd = float(kwargs.pop("weight_decay", 0.0) if weight_decay is None else weight_decay)
    kwargs.pop("weight_decay", None)
    groups = param_groups(model, lr=lr, layer_decay=layer_decay, weight_decay=wd, **group_options)
    return build_optimizer(optimizer_cls, kwargs, groups, lr)

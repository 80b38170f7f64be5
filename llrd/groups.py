"""Turn depths into optimizer param groups.

Each group holds the parameters of one (stack, depth, weight-decay) bucket and carries an explicit ``lr``
(so any torch or HF scheduler keeps the per-layer ratios) plus metadata: ``lr_scale``, ``layer_id`` (the
depth), ``stack``, ``group_name`` and ``param_names``. Groups are ordered head first, because
``Trainer`` logs only group 0's rate as ``learning_rate``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from typing import Any

from torch import nn

from .discovery import BlockSpec, DepthOverrides, LayerMap, layer_ids

__all__ = ["param_groups", "check_layer_decay", "default_decay_names", "summarize_groups"]

logger = logging.getLogger(__name__)


def check_layer_decay(value: Any, setting: str = "layer_decay") -> float:
    """Return ``value`` as a float in (0, 1], or raise a ``ValueError`` that names ``setting``.

    Example:
        >>> check_layer_decay(0.8)
        0.8
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{setting}={value!r} is not a number; pass a float in (0, 1], e.g. {setting}=0.8.")
    value = float(value)
    if not (0.0 < value <= 1.0) or math.isnan(value):
        raise ValueError(
            f"{setting}={value!r} is outside (0, 1]. Each block's lr is lr * {setting} ** (depth from the top): "
            f"use e.g. 0.8 (BERT-base) or 0.65 (ViT-B); 1.0 turns layer-wise decay off."
        )
    return value


def default_decay_names(model: nn.Module) -> set[str]:
    """Names of the parameters that get weight decay under ``transformers.Trainer``'s own rule
    (biases and norm weights are exempt)."""
    from transformers import Trainer

    # `get_decay_parameter_names` does not use `self`; calling it keeps us on Trainer's rule as it evolves.
    return set(Trainer.get_decay_parameter_names(None, model))


def param_groups(
    model: nn.Module,
    *,
    lr: float,
    layer_decay: float = 1.0,
    weight_decay: float = 0.0,
    decay_names: Iterable[str] | Callable[[nn.Module], Iterable[str]] | None = None,
    layer_map: LayerMap | None = None,
    block_pattern: BlockSpec = None,
    depth_overrides: DepthOverrides = None,
    include_frozen: bool = False,
) -> list[dict[str, Any]]:
    """Build per-layer param groups for any optimizer.

    Args:
        model: the model (bare, or wrapped by DDP / FSDP / ``torch.compile`` / PEFT).
        lr: learning rate of the head (the top); lower depths get ``lr * layer_decay ** (L + 1 - depth)``.
        layer_decay: decay per depth, in (0, 1]. ``1.0`` gives exactly ``Trainer``'s two groups.
        weight_decay: weight decay of the parameters in ``decay_names``; the others get 0.
        decay_names: raw parameter names that get weight decay, or a callable ``model -> names``.
            Default: ``Trainer``'s rule (no decay for biases and norms).
        layer_map: a precomputed :func:`llrd.layer_ids` result; computed from ``model`` if omitted.
        block_pattern, depth_overrides: passed to :func:`llrd.layer_ids`.
        include_frozen: also put parameters with ``requires_grad=False`` in the groups (for schedules that
            unfreeze them later). Default: frozen parameters are in no group.

    Returns:
        A list of dicts for ``torch.optim.Optimizer``: head first, one per (stack, depth, decay) bucket,
        never empty.

    Example:
        >>> groups = param_groups(model, lr=1e-4, layer_decay=0.8, weight_decay=0.01)   # doctest: +SKIP
        >>> opt = torch.optim.AdamW(groups, lr=1e-4)                                    # doctest: +SKIP
    """
    layer_decay = check_layer_decay(layer_decay)
    if layer_map is None:
        layer_map = layer_ids(model, block_pattern=block_pattern, depth_overrides=depth_overrides)
    if decay_names is None:
        decay = default_decay_names(model)
    elif callable(decay_names):
        decay = set(decay_names(model))
    else:
        decay = set(decay_names)
    entries = [
        (layer_map.info(raw), param, raw in decay)
        for raw, param in model.named_parameters()
        if param.requires_grad or include_frozen
    ]
    if not entries:
        raise ValueError(
            f"{type(model).__name__} has no trainable parameter (every parameter has requires_grad=False): "
            "nothing to optimize. Unfreeze some parameters, or pass include_frozen=True to plan groups anyway."
        )
    if all(info.lr_scale(layer_decay) == 1.0 for info, _, _ in entries):
        groups = _trainer_layout(entries, lr, weight_decay)
    else:
        groups = _depth_layout(entries, lr, layer_decay, weight_decay, list(layer_map.stacks))
    placed = [id(p) for g in groups for p in g["params"]]
    if len(placed) != len(entries) or len(set(placed)) != len(entries):
        raise AssertionError(f"llrd bug: {len(entries)} parameters to place but {len(placed)} placed in groups")
    return groups


def _group(lr: float, weight_decay: float, scale: float, depth: int | None, stack: str | None, name: str):
    return {
        "params": [],
        "lr": lr * scale,
        "weight_decay": weight_decay,
        "lr_scale": scale,
        "layer_id": depth,
        "stack": stack,
        "group_name": name,
        "param_names": [],
    }


def _depth_layout(entries, lr, layer_decay, weight_decay, stacks) -> list[dict[str, Any]]:
    """One group per (stack, depth, decay) bucket, head first."""
    buckets: dict[tuple, dict[str, Any]] = {}
    for info, param, decays in entries:
        key = (info.num_layers + 1 - info.depth, stacks.index(info.stack), not decays)
        if key not in buckets:
            label = f"{info.stack}/{info.role.replace(' ', '_')}/{'decay' if decays else 'no_decay'}"
            wd = weight_decay if decays else 0.0
            buckets[key] = _group(lr, wd, info.lr_scale(layer_decay), info.depth, info.stack, label)
        buckets[key]["params"].append(param)
        buckets[key]["param_names"].append(info.name)
    return [buckets[k] for k in sorted(buckets)]


def _trainer_layout(entries, lr, weight_decay) -> list[dict[str, Any]]:
    """No decay: exactly Trainer's [decay, no_decay] groups, in ``named_parameters`` order."""
    groups = []
    for decays, name in ((True, "all/decay"), (False, "all/no_decay")):
        group = _group(lr, weight_decay if decays else 0.0, 1.0, None, None, name)
        for info, param, d in entries:
            if d == decays:
                group["params"].append(param)
                group["param_names"].append(info.name)
        if group["params"]:
            groups.append(group)
    return groups


def summarize_groups(groups: list[dict[str, Any]]) -> str:
    """One line: how many groups, depths, lr range and tensor counts.

    Example:
        >>> summarize_groups(param_groups(model, lr=1e-4, layer_decay=0.8))   # doctest: +SKIP
        'LLRD: 8 param groups over depths 0-3 (bert.encoder.layer: 2 blocks); lr 5.12e-05..1e-04; 41 tensors'
    """
    lrs = [g["lr"] for g in groups]
    depths = [g["layer_id"] for g in groups if g.get("layer_id") is not None]
    stacks: dict[str, int] = {}
    for g in groups:
        if g.get("stack") is not None:
            stacks[g["stack"]] = max(stacks.get(g["stack"], 0), g["layer_id"])
    where = f"depths {min(depths)}-{max(depths)}" if depths else "no layer-wise decay"
    return (
        f"LLRD: {len(groups)} param groups over {where}"
        + (f" ({', '.join(stacks)})" if stacks else "")
        + f"; lr {min(lrs):.3g}..{max(lrs):.3g}; {sum(len(g['params']) for g in groups)} tensors"
    )

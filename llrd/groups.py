"""Turn depths into optimizer param groups.

Each group holds the parameters of one (stack, depth, weight-decay) bucket and carries an explicit ``lr``
(so any torch or HF scheduler keeps the per-layer ratios) plus metadata: ``lr_scale``, ``layer_id`` (the
depth), ``stack``, ``group_name`` and ``param_names``. Groups are ordered head first, because
``Trainer`` logs only group 0's rate as ``learning_rate``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from torch import nn

from .discovery import BlockSpec, DepthOverrides, LayerMap, layer_ids
from .scaling import Scaling, check_layer_decay

__all__ = ["param_groups", "check_layer_decay", "default_decay_names", "split_by_mesh", "summarize_groups"]

logger = logging.getLogger(__name__)


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
    depth_source: str = "flow",
    include_frozen: bool = False,
    per_depth: bool = False,
    stack_decay: Mapping[str, float] | None = None,
    layer_decay_min_scale: float = 0.0,
    head_lr_scale: float = 1.0,
    lr_multipliers: Mapping[str, float] | None = None,
    freeze_below_scale: float = 0.0,
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
        block_pattern, depth_overrides, depth_source: passed to :func:`llrd.layer_ids` (``depth_source=
            "structure"`` gives llrd 0.1's depths, to resume a checkpoint it wrote).
        include_frozen: also put parameters with ``requires_grad=False`` in the groups (for schedules that
            unfreeze them later). Default: frozen parameters are in no group.
        per_depth: keep one group per depth even when all scales are equal (default: Trainer's 2 groups then).
        stack_decay: ``{regex: decay}`` for stacks whose name matches (``{"text": 0.8, "vision": 0.65}``).
        layer_decay_min_scale: floor on the decayed scale (timm ``min_scale``).
        head_lr_scale: extra factor for the head depth (BEiT-3 ``task_head_lr_weight``).
        lr_multipliers: ``{regex: factor}`` on top of the decay; first regex found in the clean name wins.
        freeze_below_scale: parameters whose decayed scale is below it are left out of every group
            (timm ``no_opt_scale``); :class:`llrd.LLRDTrainer` also sets ``requires_grad=False`` on them.

    Returns:
        A list of dicts for ``torch.optim.Optimizer``: head first, one per (stack, depth, decay) bucket,
        never empty.

    Example:
        >>> groups = param_groups(model, lr=1e-4, layer_decay=0.8, weight_decay=0.01)   # doctest: +SKIP
        >>> opt = torch.optim.AdamW(groups, lr=1e-4)                                    # doctest: +SKIP
    """
    scaling = Scaling(
        layer_decay, stack_decay, layer_decay_min_scale, head_lr_scale, lr_multipliers, freeze_below_scale
    )
    if layer_map is None:
        layer_map = layer_ids(
            model, block_pattern=block_pattern, depth_overrides=depth_overrides, depth_source=depth_source
        )
    scaling.check(layer_map)
    if decay_names is None:
        decay = default_decay_names(model)
    elif callable(decay_names):
        decay = set(decay_names(model))
    else:
        decay = set(decay_names)
    entries = [
        (layer_map.info(raw), param, raw in decay)
        for raw, param in model.named_parameters()
        if (param.requires_grad or include_frozen) and not scaling.frozen(layer_map.info(raw))
    ]
    if not entries:
        raise ValueError(
            f"{type(model).__name__} has no trainable parameter (every parameter has requires_grad=False): "
            "nothing to optimize. Unfreeze some parameters, or pass include_frozen=True to plan groups anyway."
        )
    if not per_depth and all(scaling.scale(info) == 1.0 for info, _, _ in entries):
        groups = _trainer_layout(entries, lr, weight_decay)
    else:
        groups = _depth_layout(entries, lr, scaling, weight_decay, list(layer_map.stacks))
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


def _depth_layout(entries, lr, scaling: Scaling, weight_decay, stacks) -> list[dict[str, Any]]:
    """One group per (stack, depth, multiplier rule, decay) bucket, head first."""
    buckets: dict[tuple, dict[str, Any]] = {}
    for info, param, decays in entries:
        rule, factor = scaling.multiplier(info.name)
        key = (info.num_layers + 1 - info.depth, stacks.index(info.stack), rule, not decays)
        if key not in buckets:
            extra = f"/x{factor:g}" if rule >= 0 else ""
            label = f"{info.stack}/{info.role.replace(' ', '_')}{extra}/{'decay' if decays else 'no_decay'}"
            wd = weight_decay if decays else 0.0
            buckets[key] = _group(lr, wd, scaling.scale(info), info.depth, info.stack, label)
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


def split_by_mesh(groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each group split into one group per device mesh when the parameters live on several meshes.

    Fused and foreach optimizer kernels cannot span tensors of different meshes (expert parallelism, FSDP2 on
    a 2-D mesh), so ``Trainer`` gives each mesh its own group; this is the same rule for LLRD's groups. A group
    keeps its metadata (``lr``, ``lr_scale``, ``layer_id``, ...) and its ``param_names`` stay aligned with its
    ``params``; plain tensors form their own part. Without DTensors on several meshes, ``groups`` is returned
    unchanged.

    Example:
        >>> split_by_mesh(param_groups(model, lr=1e-4, layer_decay=0.8)) == param_groups(model, ...)  # doctest: +SKIP
    """

    from torch.distributed.tensor import DTensor

    def mesh(tensor: Any) -> Any:
        return tensor.device_mesh if isinstance(tensor, DTensor) else None

    if len({mesh(p) for g in groups for p in g["params"]}) <= 1:
        return groups
    out = []
    for group in groups:
        parts: dict[Any, dict[str, Any]] = {}
        names = group.get("param_names")
        for i, param in enumerate(group["params"]):
            part = parts.setdefault(mesh(param), {**group, "params": []} | ({"param_names": []} if names else {}))
            part["params"].append(param)
            if names:
                part["param_names"].append(names[i])
        out.extend(parts.values())
    return out


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

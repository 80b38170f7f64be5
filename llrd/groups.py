"""Turn depths into optimizer param groups.

Each group holds the parameters of one (stack, depth, weight-decay) bucket (split by LoRA+ kind with
``loraplus_lr_ratio``: :mod:`llrd.loraplus`) and carries an explicit ``lr``
(so any torch or HF scheduler keeps the per-layer ratios) plus metadata: ``lr_scale``, ``layer_id`` (the
depth), ``stack``, ``group_name`` and ``param_names``. Groups are ordered head first, because
``Trainer`` logs only group 0's rate as ``learning_rate``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

from torch import nn

from .discovery import BlockSpec, DepthOverrides, LayerMap, ParamDepth, layer_ids
from .loraplus import KINDS, LoraPlus
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
    loraplus_lr_ratio: float | None = None,
    loraplus_lr_embedding: float = 1e-6,
    loraplus_weight_decay: float | None = None,
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
        loraplus_lr_ratio: LoRA+ (peft's name): LoRA's B tensors (and 1-D tensors) train at this many times the
            rate of their depth, inside every depth group (see :mod:`llrd.loraplus`). ``None``: off.
        loraplus_lr_embedding: with LoRA+, the rate of LoRA embedding tensors at scale 1 (peft's default 1e-6).
        loraplus_weight_decay: with LoRA+, the weight decay of the tensors LoRA+ decays; ``None``: ``weight_decay``.

    Returns:
        A list of dicts for ``torch.optim.Optimizer``: head first, one per (stack, depth, decay) bucket (with
        LoRA+, per LoRA+ kind too), never empty.

    Example:
        >>> groups = param_groups(model, lr=1e-4, layer_decay=0.8, weight_decay=0.01)   # doctest: +SKIP
        >>> opt = torch.optim.AdamW(groups, lr=1e-4)                                    # doctest: +SKIP
    """
    scaling = Scaling(
        layer_decay, stack_decay, layer_decay_min_scale, head_lr_scale, lr_multipliers, freeze_below_scale
    )
    plus = None
    if loraplus_lr_ratio is not None:
        plus = LoraPlus(loraplus_lr_ratio, loraplus_lr_embedding, loraplus_weight_decay)
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
    kept = [
        (raw, param)
        for raw, param in model.named_parameters()
        if (param.requires_grad or include_frozen) and not scaling.frozen(layer_map.info(raw))
    ]
    if not kept:
        raise ValueError(
            f"{type(model).__name__} has no trainable parameter (every parameter has requires_grad=False): "
            "nothing to optimize. Unfreeze some parameters, or pass include_frozen=True to plan groups anyway."
        )
    entries = _entries(model, kept, layer_map, decay, lr, weight_decay, plus)
    if not per_depth and all(scaling.scale(e.info) == 1.0 for e in entries):
        groups = _flat_layout(entries, lr)
    else:
        groups = _depth_layout(entries, lr, scaling, list(layer_map.stacks))
    placed = [id(p) for g in groups for p in g["params"]]
    if len(placed) != len(entries) or len(set(placed)) != len(entries):
        raise AssertionError(f"llrd bug: {len(entries)} parameters to place but {len(placed)} placed in groups")
    return groups


def _group(lr: float, weight_decay: float, scale: float, depth: int | None, stack: str | None, name: str, rate=None):
    return {
        "params": [],
        "lr": lr * scale if rate is None else rate,
        "weight_decay": weight_decay,
        "lr_scale": scale,
        "layer_id": depth,
        "stack": stack,
        "group_name": name,
        "param_names": [],
    }


class _Entry(NamedTuple):
    """One parameter to place: its depth, the tensor, its weight decay (0: none), and its LoRA+ kind and rate
    factor (``None`` and 1 without LoRA+); ``absolute``: a rate given as such (LoRA+ embeddings), which the
    group's rate is computed from so that it is exact at scale 1."""

    info: ParamDepth
    param: nn.Parameter
    weight_decay: float
    decays: bool
    kind: str | None
    factor: float
    absolute: float | None = None

    def rate(self, lr: float, depth_scale: float) -> float | None:
        """The group rate, when it is not ``lr * scale``."""
        return None if self.absolute is None else self.absolute * depth_scale


def _entries(model, kept, layer_map: LayerMap, decay: set[str], lr, weight_decay, plus: LoraPlus | None):
    """The parameters to place, with their decay and (with LoRA+) their LoRA+ kind, factor and decay."""
    if plus is None:
        return [
            _Entry(layer_map.info(raw), p, weight_decay if raw in decay else 0.0, raw in decay, None, 1.0)
            for raw, p in kept
        ]
    kinds = plus.kinds(model, [raw for raw, _ in kept])
    value = plus.decay_value(weight_decay)
    out = []
    for raw, param in kept:
        kind = kinds[raw]
        decays = plus.decays(kind, raw in decay)
        absolute = plus.lr_embedding if kind == "embedding" else None
        info = layer_map.info(raw)
        out.append(_Entry(info, param, value if decays else 0.0, decays, kind, plus.factor(kind, lr), absolute))
    return out


def _kind_label(entry: _Entry) -> str:
    return "" if entry.kind in (None, "A") else f"/loraplus_{entry.kind}"


def _depth_layout(entries: list[_Entry], lr, scaling: Scaling, stacks) -> list[dict[str, Any]]:
    """One group per (stack, depth, multiplier rule, LoRA+ kind, decay) bucket, head first."""
    buckets: dict[tuple, dict[str, Any]] = {}
    for e in entries:
        info = e.info
        rule, factor = scaling.multiplier(info.name)
        kind = KINDS.index(e.kind) if e.kind is not None else 0
        key = (info.num_layers + 1 - info.depth, stacks.index(info.stack), rule, kind, not e.decays)
        if key not in buckets:
            extra = f"/x{factor:g}" if rule >= 0 else ""
            label = (
                f"{info.stack}/{info.role.replace(' ', '_')}{extra}{_kind_label(e)}/"
                f"{'decay' if e.decays else 'no_decay'}"
            )
            scale = scaling.scale(info)
            rate = e.rate(lr, scale)
            buckets[key] = _group(lr, e.weight_decay, scale * e.factor, info.depth, info.stack, label, rate)
        buckets[key]["params"].append(e.param)
        buckets[key]["param_names"].append(info.name)
    return [buckets[k] for k in sorted(buckets)]


def _flat_layout(entries: list[_Entry], lr) -> list[dict[str, Any]]:
    """No decay: Trainer's [decay, no_decay] groups, in ``named_parameters`` order (with LoRA+: those two per
    LoRA+ kind, as peft's groups)."""
    buckets: dict[tuple, dict[str, Any]] = {}
    for e in entries:
        key = (KINDS.index(e.kind) if e.kind is not None else 0, not e.decays)
        if key not in buckets:
            name = f"all{_kind_label(e)}/{'decay' if e.decays else 'no_decay'}"
            buckets[key] = _group(lr, e.weight_decay, e.factor, None, None, name, e.rate(lr, 1.0))
        buckets[key]["params"].append(e.param)
        buckets[key]["param_names"].append(e.info.name)
    return [buckets[k] for k in sorted(buckets)]


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

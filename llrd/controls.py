"""Fine-tuning controls: re-initialisation and freezing (model changes made once, when training starts), and
the step-time stages gradual unfreezing and adaptive rates.

* :func:`reinit_top_blocks` — Zhang et al. 2021, "Revisiting Few-sample BERT Fine-tuning": re-initialise
  the top ``k`` blocks of every stack (and the pooler) with the model's own ``_init_weights``.
* :func:`freeze_below_scale` — timm's ``no_opt_scale``: depths whose decayed scale is below a threshold get
  ``requires_grad=False``.
* :class:`GradualUnfreezer` — Howard & Ruder 2018 (ULMFiT): start with the top depths trainable and unfreeze
  ``k`` more depths from the top every ``N`` steps or epochs. All parameters are in the optimizer's groups
  from the start; the frozen set is a function of the step, so a resumed run freezes exactly what the
  uninterrupted run had frozen at that step.
* :class:`AdaptiveLayerLR` — Singh, De, Zhang, Goldstein & Taylor 2015, "Layer-Specific Adaptive Learning
  Rates for Deep Networks" (arXiv:1510.04609): each step, depth ``l``'s rate is multiplied by
  ``1 + log(1 + 1 / ||g_l||)``, so depths with vanishing gradients take larger steps. It multiplies the
  scheduled (and decayed) rate for one optimizer step and puts the scheduled value back right after, so
  the scheduler's next value is never overwritten.

The two stages run through :class:`llrd.engines.StepDriver`, so they act between backward and the update under
every engine (single process, DDP, FSDP2, DeepSpeed ZeRO-1/2/3).
"""

from __future__ import annotations

import contextlib
import logging
import math

import torch
from torch import nn

from .discovery import LayerMap
from .naming import normalize_name
from .scaling import Scaling

__all__ = ["reinit_top_blocks", "freeze_below_scale", "GradualUnfreezer", "AdaptiveLayerLR"]

logger = logging.getLogger(__name__)


def _gathered(params: list[nn.Parameter]):
    """Full tensors of ZeRO-3 partitioned parameters for the duration of the block (rank 0's writes win)."""
    if not any(hasattr(p, "ds_id") for p in params):
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=0)


def reinit_top_blocks(model: nn.Module, k: int, layer_map: LayerMap, pooler: bool = True) -> list[str]:
    """Re-initialise the last ``k`` blocks of each stack (and modules named ``pooler``) in place.

    Works on plain parameters and on DeepSpeed ZeRO-3 partitioned ones (gathered for the write). Parameters
    already sharded by FSDP2 are refused: each rank would draw its own shard of the new weights.
    Returns the clean names of the re-initialised parameters.

    Example:
        >>> reinit_top_blocks(model, 1, layer_ids(model))   # doctest: +SKIP
    """
    from transformers import PreTrainedModel

    hf = next((m for m in model.modules() if isinstance(m, PreTrainedModel)), None)
    if hf is None:
        raise ValueError("reinit_top_blocks needs a transformers model: it re-initialises with its _init_weights.")
    if not 0 <= k <= min(s.num_layers for s in layer_map.stacks.values()):
        raise ValueError(f"reinit_top_blocks={k} must be between 0 and the number of blocks of the smallest stack.")
    from torch.distributed.tensor import DTensor

    if any(isinstance(p, DTensor) for p in model.parameters()):
        raise ValueError(
            f"reinit_top_blocks={k}: the model's parameters are already sharded (FSDP2 DTensors), so each rank "
            "would re-initialise its own shard with its own random stream. Re-initialise before sharding, or use "
            "DDP/DeepSpeed for this run."
        )
    targets = {b for s in layer_map.stacks.values() for b in (s.blocks[-k:] if k else ())}
    if pooler:
        targets |= {normalize_name(n) for n, _ in model.named_modules() if n.rpartition(".")[2] == "pooler"}
    done: list[str] = []
    with torch.no_grad():
        for name, module in model.named_modules():
            clean = normalize_name(name)
            if clean in targets:
                with _gathered(list(module.parameters())):
                    for sub in module.modules():
                        _forget_initialized(sub)
                        hf._init_weights(sub)
                done += [f"{clean}.{n}" for n, _ in module.named_parameters()]
    logger.info("re-initialised %d tensors: %s", len(done), sorted(targets))
    return done


def _forget_initialized(module: nn.Module) -> None:
    """transformers 5 marks loaded weights ``_is_hf_initialized`` and its init functions skip them."""
    for tensor in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
        if getattr(tensor, "_is_hf_initialized", False):
            tensor._is_hf_initialized = False
    if getattr(module, "_is_hf_initialized", False):
        module._is_hf_initialized = False


def freeze_below_scale(model: nn.Module, layer_map: LayerMap, scaling: Scaling) -> list[str]:
    """Set ``requires_grad=False`` on the parameters whose decayed scale is below ``scaling.freeze_below_scale``.

    Returns the clean names it froze (empty when the threshold is 0).

    Example:
        >>> freeze_below_scale(model, layer_ids(model), Scaling(0.5, freeze_below_scale=0.2))   # doctest: +SKIP
    """
    frozen = []
    for raw, param in model.named_parameters():
        info = layer_map.info(raw)
        if param.requires_grad and scaling.frozen(info):
            param.requires_grad_(False)
            frozen.append(info.name)
    if frozen:
        logger.info("freeze_below_scale=%g: froze %d tensors", scaling.freeze_below_scale, len(frozen))
    return frozen


def distance_from_top(group: dict, layer_map: LayerMap) -> int:
    """1 for the head of a group's stack, 2 for the top block, ... (groups are per depth)."""
    if group.get("layer_id") is None:
        raise ValueError("gradual unfreezing and adaptive rates need one param group per depth (per_depth=True).")
    return layer_map.stacks[group["stack"]].num_layers + 1 - group["layer_id"]


class GradualUnfreezer:
    """ULMFiT gradual unfreezing on depths counted from the top of each stack (a :class:`StepDriver` stage).

    Args:
        layer_map: depths of the model's parameters.
        every: unfreeze the next ``depths`` depths every ``every`` units.
        unit: ``"steps"`` (optimizer steps) or ``"epochs"``.
        depths: how many depths each stage unfreezes (the head is depth 1 from the top).
        names: clean names of the parameters it manages (those trainable when training starts).
        model: the model whose parameters it freezes.

    A single process toggles ``requires_grad`` (frozen blocks skip their weight gradients). Under DDP, FSDP2
    and DeepSpeed, where that is not allowed once the model is wrapped, the gradients of frozen depths are
    removed right before clipping, so they count in no clip norm and the optimizer never touches them.
    """

    def __init__(self, layer_map: LayerMap, every: float, unit: str, depths: int, names: set[str], model: nn.Module):
        if every <= 0 or depths < 1 or unit not in ("steps", "epochs"):
            raise ValueError(
                f"gradual unfreezing needs every > 0 (got {every}), depths >= 1 (got {depths}) and unit "
                f"'steps' or 'epochs' (got {unit!r})."
            )
        self.layer_map, self.every, self.unit, self.depths = layer_map, every, unit, depths
        self.names, self.model = names, model
        self.drop_grads = False
        self.stage = -1

    def stage_at(self, state) -> int:
        progress = state.global_step if self.unit == "steps" else (state.epoch or 0.0)
        return int(math.floor(progress / self.every + 1e-9))

    def is_frozen(self, clean: str, stage: int) -> bool:
        info = self.layer_map.info(clean)
        return info.num_layers + 1 - info.depth >= self.depths * (stage + 1)

    def frozen_names(self, stage: int) -> set[str]:
        return {n for n in self.names if self.is_frozen(n, stage)}

    def frozen_groups(self, groups: list[dict], stage: int) -> set[int]:
        limit = self.depths * (stage + 1)
        return {i for i, g in enumerate(groups) if distance_from_top(g, self.layer_map) >= limit}

    def _apply(self, state) -> None:
        stage = self.stage_at(state)
        if stage == self.stage:
            return
        self.stage = stage
        frozen = self.frozen_names(stage)
        if not self.drop_grads:
            for raw, param in self.model.named_parameters():
                clean = self.layer_map.raw_names.get(raw, raw)
                if clean in self.names:
                    param.requires_grad_(clean not in frozen)
        logger.info("gradual unfreezing: stage %d at step %d, %d tensors frozen", stage, state.global_step, len(frozen))

    def on_train_begin(self, ctx, args, state, **kwargs) -> None:
        self.drop_grads = ctx.engine != "torch" or args.world_size > 1
        self.stage = -1
        self._apply(state)

    def on_step_begin(self, ctx, args, state) -> None:
        self._apply(state)

    def before_clip(self, ctx) -> None:
        if self.drop_grads:
            ctx.drop_grads(self.frozen_groups(ctx.groups, self.stage))

    def on_train_end(self, ctx, args, state) -> None:
        for raw, param in self.model.named_parameters():
            if self.layer_map.raw_names.get(raw, raw) in self.names:
                param.requires_grad_(True)


class AdaptiveLayerLR:
    """Singh et al. 2015 layer-specific adaptive rates, on top of the decay and the scheduler (a
    :class:`StepDriver` stage).

    The gradient norm of a depth is taken over all its parameters (all its groups, all ranks), on the
    accumulated, unscaled gradients just before the optimizer step, after clipping. The last factors are in
    :attr:`factors` and are logged as ``lr_factor/<depth>``. Needs one group per depth (``per_depth``).
    """

    def __init__(self, group_key, eps: float = 1e-12):
        self.group_key, self.eps = group_key, eps
        self.factors: dict[str, float] = {}
        self._scheduled: list[float] | None = None

    @staticmethod
    def factor(grad_norm: float) -> float:
        """``1 + log(1 + 1 / ||g||)`` (natural log)."""
        return 1.0 + math.log1p(1.0 / grad_norm)

    def before_step(self, ctx) -> None:
        norms = ctx.grad_norms()
        self._scheduled = [g["lr"] for g in ctx.groups]
        self.factors = {key: self.factor(max(norm, self.eps)) for key, norm in norms.items() if norm > 0}
        for group in ctx.groups:
            group["lr"] = group["lr"] * self.factors.get(self.group_key(group), 1.0)

    def after_step(self, ctx) -> None:
        if self._scheduled is not None:
            for group, lr in zip(ctx.groups, self._scheduled, strict=True):
                group["lr"] = lr
            self._scheduled = None

    def factor_of(self, group: dict) -> float:
        """The factor this step applied to ``group`` (1 when it had no gradient)."""
        return self.factors.get(self.group_key(group), 1.0)

    def pop(self) -> dict[str, float]:
        """The factors of the last step, as log entries."""
        return {f"lr_factor/{k}": v for k, v in sorted(self.factors.items())}

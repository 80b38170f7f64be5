"""Fine-tuning controls that act during training: re-initialisation, gradual unfreezing, adaptive rates.

* :func:`reinit_top_blocks` — Zhang et al. 2021, "Revisiting Few-sample BERT Fine-tuning": re-initialise
  the top ``k`` blocks of every stack (and the pooler) with the model's own ``_init_weights``.
* :class:`GradualUnfreezer` — Howard & Ruder 2018 (ULMFiT): start with the top depths trainable and unfreeze
  ``k`` more depths from the top every ``N`` steps or epochs. All parameters are in the optimizer's groups
  from the start; the frozen set is a function of the step, so a resumed run freezes exactly what the
  uninterrupted run had frozen at that step.
* :class:`AdaptiveLayerLR` — Singh, De, Zhang, Goldstein & Taylor 2015, "Layer-Specific Adaptive Learning
  Rates for Deep Networks" (arXiv:1510.04609): each step, depth ``l``'s rate is multiplied by
  ``1 + log(1 + 1 / ||g_l||)``, so depths with vanishing gradients take larger steps. It multiplies the
  scheduled (and decayed) rate for one optimizer step and puts the scheduled value back right after, so
  the scheduler's next value is never overwritten.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict

import torch
from torch import nn
from transformers import TrainerCallback

from .discovery import LayerMap

__all__ = ["reinit_top_blocks", "GradualUnfreezer", "AdaptiveLayerLR"]

logger = logging.getLogger(__name__)


def reinit_top_blocks(model: nn.Module, k: int, layer_map: LayerMap, pooler: bool = True) -> list[str]:
    """Re-initialise the last ``k`` blocks of each stack (and modules named ``pooler``) in place.

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
    from .naming import normalize_name

    targets = {b for s in layer_map.stacks.values() for b in (s.blocks[-k:] if k else ())}
    if pooler:
        targets |= {normalize_name(n) for n, _ in model.named_modules() if n.rpartition(".")[2] == "pooler"}
    done: list[str] = []
    with torch.no_grad():
        for name, module in model.named_modules():
            clean = normalize_name(name)
            if clean in targets:
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


def _stats_by_depth(optimizer) -> dict[tuple[str, int], list[dict]]:
    """Param groups of the optimizer, bucketed by (stack, depth)."""
    buckets: dict[tuple[str, int], list[dict]] = defaultdict(list)
    for group in optimizer.param_groups:
        buckets[(group["stack"], group["layer_id"])].append(group)
    return buckets


class GradualUnfreezer(TrainerCallback):
    """ULMFiT gradual unfreezing on depths counted from the top of each stack.

    Args:
        layer_map: depths of the model's parameters.
        every: unfreeze the next ``depths`` depths every ``every`` units.
        unit: ``"steps"`` (optimizer steps) or ``"epochs"``.
        depths: how many depths each stage unfreezes (the head is depth 1 from the top).
        names: clean names of the parameters it manages (those trainable when training starts).
        drop_grads: instead of toggling ``requires_grad`` (which DDP does not allow after wrapping), keep
            it on and drop the gradients of frozen parameters before each optimizer step.
    """

    def __init__(self, layer_map: LayerMap, every: float, unit: str, depths: int, names: set[str], drop_grads: bool):
        if every <= 0 or depths < 1 or unit not in ("steps", "epochs"):
            raise ValueError(
                f"gradual unfreezing needs every > 0 (got {every}), depths >= 1 (got {depths}) and unit "
                f"'steps' or 'epochs' (got {unit!r})."
            )
        self.layer_map, self.every, self.unit, self.depths = layer_map, every, unit, depths
        self.names, self.drop_grads = names, drop_grads
        self.model: nn.Module | None = None
        self.stage = -1

    def stage_at(self, state) -> int:
        progress = state.global_step if self.unit == "steps" else (state.epoch or 0.0)
        return int(math.floor(progress / self.every + 1e-9))

    def is_frozen(self, clean: str, stage: int) -> bool:
        info = self.layer_map.info(clean)
        return info.num_layers + 1 - info.depth >= self.depths * (stage + 1)

    def frozen_names(self, stage: int) -> set[str]:
        return {n for n in self.names if self.is_frozen(n, stage)}

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

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.model, self.stage = model, -1
        self._apply(state)

    def on_step_begin(self, args, state, control, **kwargs):
        self._apply(state)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self.drop_grads:
            frozen = self.frozen_names(self.stage)
            for raw, param in self.model.named_parameters():
                if self.layer_map.raw_names.get(raw, raw) in frozen:
                    param.grad = None

    def on_train_end(self, args, state, control, **kwargs):
        for raw, param in self.model.named_parameters():
            if self.layer_map.raw_names.get(raw, raw) in self.names:
                param.requires_grad_(True)


class AdaptiveLayerLR(TrainerCallback):
    """Singh et al. 2015 layer-specific adaptive rates, on top of the decay and the scheduler.

    The gradient norm of a depth is taken over all its parameters (all its groups), on the accumulated,
    unscaled gradients just before the optimizer step (after clipping). The last factors are in
    :attr:`factors` and are logged as ``lr_factor/<depth>``. Needs one group per depth (``per_depth``).
    """

    def __init__(self, several_stacks: bool = False, eps: float = 1e-12):
        self.several, self.eps = several_stacks, eps
        self.optimizer = None
        self.factors: dict[str, float] = {}
        self._scheduled: list[float] | None = None

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        self.optimizer = optimizer

    @staticmethod
    def factor(grad_norm: float) -> float:
        """``1 + log(1 + 1 / ||g||)`` (natural log)."""
        return 1.0 + math.log1p(1.0 / grad_norm)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        groups = self.optimizer.param_groups
        self._scheduled = [g["lr"] for g in groups]
        self.factors = {}
        for (stack, depth), members in _stats_by_depth(self.optimizer).items():
            grads = [p.grad for g in members for p in g["params"] if p.grad is not None]
            if not grads:
                continue
            norm = float(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))))
            f = self.factor(max(norm, self.eps))
            self.factors[(f"{stack}/" if self.several else "") + f"depth_{depth:02d}"] = f
            for g in members:
                g["lr"] = g["lr"] * f

    def pop(self) -> dict[str, float]:
        """The factors of the last step, as log entries."""
        return {f"lr_factor/{k}": v for k, v in self.factors.items()}

    def on_optimizer_step(self, args, state, control, **kwargs):
        if self._scheduled is not None:
            for g, lr in zip(self.optimizer.param_groups, self._scheduled, strict=True):
                g["lr"] = lr
            self._scheduled = None

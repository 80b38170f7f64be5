"""Where the optimizer step really happens, and what the gradients and weights of a depth are there.

Trainer fires ``on_pre_optimizer_step`` / ``on_optimizer_step`` around ``optimizer.step()``. That is where the
update happens for a single process, DDP and FSDP2. Under DeepSpeed, accelerate's ``backward`` already runs
the engine's clip and step, so those callbacks fire *after* the update; there, the work that must sit
between backward and update runs inside the ZeRO optimizer's ``step`` instead.

:class:`StepDriver` gives the LLRD stages (gradual unfreezing, adaptive rates, the monitor) three moments on
every optimizer step, whatever the engine, through a :class:`StepContext`:

1. ``before_clip``: the gradients are complete (accumulated, reduced), not yet clipped;
2. ``before_step``: after clipping, right before the update;
3. ``after_step``: right after the update.

Per-depth quantities are sums of squares over the depth's tensors, reduced over ranks where the tensors are
shards: FSDP2 ``DTensor`` shards (local shards summed, then all-reduced), ZeRO flat partitions (each
optimizer group is one (depth, weight-decay) bucket held as one partition per rank). DDP gradients are
already identical on every rank and are not reduced again.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.distributed as dist
from transformers import TrainerCallback

__all__ = ["StepContext", "StepDriver", "innermost_optimizer", "engine_name", "zero_stage"]

logger = logging.getLogger(__name__)


def innermost_optimizer(optimizer: Any) -> Any:
    """The optimizer that really updates the weights: unwraps accelerate's ``AcceleratedOptimizer``,
    DeepSpeed's wrappers and ZeRO's optimizer down to the torch optimizer.

    Example:
        >>> innermost_optimizer(trainer.optimizer)   # doctest: +SKIP
        AdamW (...)
    """
    seen = set()
    while hasattr(optimizer, "optimizer") and id(optimizer) not in seen:
        seen.add(id(optimizer))
        optimizer = optimizer.optimizer
    return optimizer


def _zero_optimizer(optimizer: Any) -> Any | None:
    """The DeepSpeed ZeRO optimizer inside ``optimizer``, if any."""
    seen = set()
    while optimizer is not None and id(optimizer) not in seen:
        seen.add(id(optimizer))
        if hasattr(optimizer, "averaged_gradients") and hasattr(optimizer, "loss_scale"):
            return optimizer
        optimizer = getattr(optimizer, "optimizer", None)
    return None


def zero_stage(optimizer: Any) -> int | None:
    """1, 2 or 3 for a DeepSpeed ZeRO optimizer (possibly wrapped), else ``None``."""
    zero = _zero_optimizer(optimizer)
    if zero is None:
        return None
    if hasattr(zero, "fp32_partitioned_groups_flat"):
        return 3
    return 2 if getattr(zero, "partition_gradients", False) else 1


def engine_name(optimizer: Any, model: torch.nn.Module | None = None) -> str:
    """A short name of the engine that steps: ``ZeRO-2``, ``FSDP2``, ``DDP`` or ``single process``."""
    stage = zero_stage(optimizer)
    if stage is not None:
        return f"DeepSpeed ZeRO-{stage}"
    params = [p for g in innermost_optimizer(optimizer).param_groups for p in g["params"]]
    if any(_is_sharded(p) for p in params):
        return "FSDP2"
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return "DDP"
    return "single process"


def _is_sharded(tensor: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor) and any(p.is_shard() for p in tensor.placements)


def _local(tensor: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def _sq_sum(tensors: list[torch.Tensor]) -> float:
    if not tensors:
        return 0.0
    norms = torch._foreach_norm([t.detach().float() for t in tensors])
    return float(torch.stack(norms).pow(2).sum())


class StepContext:
    """One optimizer step as the stages see it; quantities are computed on demand, once per step.

    Attributes:
        groups: the param groups of the optimizer that steps (the dicts LLRD built: ``lr``, ``lr_scale``,
            ``layer_id``, ``stack``, ``param_names``; under ZeRO ``params`` hold flat partitions).
        key_of: clean parameter name -> depth key (``depth_03`` or ``encoder/depth_03``).
        state: Trainer's ``TrainerState``.
    """

    engine = "torch"

    def __init__(self, optimizer: Any, key_of: dict[str, str], group_key: Callable[[dict], str]):
        self.optimizer = optimizer
        self.groups: list[dict] = innermost_optimizer(optimizer).param_groups
        self.key_of = key_of
        self.group_key = group_key
        self.state = None
        self._grad_sq: dict[str, float] | None = None

    def new_step(self, state) -> None:
        self.state = state
        self._grad_sq = None

    # -- gradients ---------------------------------------------------------------------------------
    def _grad_buckets(self) -> dict[str, tuple[list[torch.Tensor], list[torch.Tensor]]]:
        """depth key -> (sharded local tensors, replicated tensors) of the current gradients."""
        buckets: dict[str, tuple[list, list]] = defaultdict(lambda: ([], []))
        for group in self.groups:
            for name, param in zip(group["param_names"], group["params"], strict=True):
                if param.grad is not None:
                    sharded, replicated = buckets[self.key_of[name]]
                    (sharded if _is_sharded(param.grad) else replicated).append(_local(param.grad))
        return buckets

    def grad_sq(self) -> dict[str, float]:
        """Per depth key, the squared norm of the gradients as the optimizer will use them (after clipping),
        over all ranks. Computed once per step."""
        if self._grad_sq is None:
            self._grad_sq = self._compute_grad_sq()
        return self._grad_sq

    def _compute_grad_sq(self) -> dict[str, float]:
        buckets = self._grad_buckets()
        keys = sorted(buckets)
        sharded = torch.tensor([_sq_sum(buckets[k][0]) for k in keys], dtype=torch.float64)
        if any(buckets[k][0] for k in keys) and dist.is_available() and dist.is_initialized():
            dist.all_reduce(sharded)
        return {k: float(sharded[i]) + _sq_sum(buckets[k][1]) for i, k in enumerate(keys)}

    def grad_norms(self) -> dict[str, float]:
        return {k: math.sqrt(v) for k, v in self.grad_sq().items()}

    def drop_grads(self, group_indices: set[int]) -> None:
        """Remove the gradients of these groups: they count in no clip norm and the optimizer skips them."""
        for i in group_indices:
            for param in self.groups[i]["params"]:
                param.grad = None

    # -- weights -------------------------------------------------------------------------------------
    def weights(self) -> dict[str, tuple[list[torch.Tensor], list[torch.Tensor]]]:
        """depth key -> (sharded local tensors, replicated tensors) of the trainable weights."""
        buckets: dict[str, tuple[list, list]] = defaultdict(lambda: ([], []))
        for group in self.groups:
            for name, param in zip(group["param_names"], group["params"], strict=True):
                sharded, replicated = buckets[self.key_of[name]]
                (sharded if _is_sharded(param) else replicated).append(_local(param.detach()))
        return buckets

    def reduce(self, values: dict[str, list[float]], sharded: bool) -> dict[str, list[float]]:
        """Sum per-key vectors over ranks when they come from shards."""
        if not sharded or not (dist.is_available() and dist.is_initialized()) or not values:
            return values
        keys = sorted(values)
        flat = torch.tensor([v for k in keys for v in values[k]], dtype=torch.float64)
        dist.all_reduce(flat)
        width = len(values[keys[0]])
        return {k: flat[i * width : (i + 1) * width].tolist() for i, k in enumerate(keys)}


class ZeroStepContext(StepContext):
    """A step of DeepSpeed ZeRO-1/2/3: gradients are this rank's partition of each group, in
    ``averaged_gradients`` before clipping; weights are the fp32 partitions the optimizer updates."""

    engine = "zero"

    def __init__(self, optimizer: Any, key_of: dict[str, str], group_key: Callable[[dict], str]):
        super().__init__(optimizer, key_of, group_key)
        self.zero = _zero_optimizer(optimizer)
        self.stage = zero_stage(optimizer)
        self.group_of_slot = self._slots()
        self._pre_clip: list[float] | None = None
        self.skip_groups: set[int] = set()
        self._hook = innermost_optimizer(optimizer).register_step_pre_hook(self._skip_frozen)

    def _slots(self) -> dict[int, int]:
        """ZeRO slot (group, or stage-3 sub-group) -> index of the optimizer group it belongs to."""
        if self.stage == 3:
            return dict(self.zero.sub_group_to_group_id)
        return {i: i for i in range(len(self.groups))}

    def _slot_grads(self, slot: int) -> list[torch.Tensor]:
        grads = self.zero.averaged_gradients.get(slot)
        return [] if grads is None else list(grads)

    def new_step(self, state) -> None:
        super().new_step(state)
        self._pre_clip = None
        self.skip_groups = set()

    def pre_clip_group_sq(self) -> list[float]:
        """Per optimizer group: squared gradient norm before clipping, unscaled, over all ranks."""
        if self._pre_clip is None:
            sums = torch.zeros(len(self.groups), dtype=torch.float64)
            for slot, group in self.group_of_slot.items():
                sums[group] += _sq_sum(self._slot_grads(slot))
            dist.all_reduce(sums, group=getattr(self.zero, "dp_process_group", None))
            scale = float(self.zero.loss_scale)
            self._pre_clip = (sums / (scale * scale)).tolist()
        return self._pre_clip

    def _compute_grad_sq(self) -> dict[str, float]:
        per_group = self.pre_clip_group_sq()
        clip = float(getattr(self.zero, "clip_grad", 0.0) or 0.0)
        total = math.sqrt(sum(per_group))
        # ZeRO's own rule (unscale_and_clip_grads): divide by max(1, (total + 1e-6) / clip)
        factor = 1.0 / max(1.0, (total + 1e-6) / clip) if clip > 0 else 1.0
        out: dict[str, float] = defaultdict(float)
        for i, sq in enumerate(per_group):
            if i not in self.skip_groups:  # frozen: no gradient, as under DDP
                out[self.group_key(self.groups[i])] += sq * factor * factor
        return dict(out)

    def drop_grads(self, group_indices: set[int]) -> None:
        """Zero these groups' partitioned gradients before ZeRO computes its clip norm, and hide them from
        the optimizer's update, so frozen depths get no step, no weight decay and no optimizer state."""
        for slot, group in self.group_of_slot.items():
            if group in group_indices:
                for grad in self._slot_grads(slot):
                    grad.zero_()
        self.skip_groups = set(group_indices)
        self._pre_clip = None

    def _skip_frozen(self, optimizer, args, kwargs) -> None:
        # ZeRO steps the torch optimizer once per group (or sub-group), with that group's flat partition
        for group in optimizer.param_groups:
            if any(group is self.groups[i] for i in self.skip_groups):
                for param in group["params"]:
                    param.grad = None

    def weights(self) -> dict[str, tuple[list[torch.Tensor], list[torch.Tensor]]]:
        buckets: dict[str, tuple[list, list]] = defaultdict(lambda: ([], []))
        if self.stage == 3:
            partitions = self.zero.fp32_partitioned_groups_flat
        else:
            partitions = self.zero.single_partition_of_fp32_groups
        for slot, group in self.group_of_slot.items():
            buckets[self.group_key(self.groups[group])][0].append(partitions[slot].detach())
        return buckets

    def reduce(self, values: dict[str, list[float]], sharded: bool) -> dict[str, list[float]]:
        return super().reduce(values, True)

    def close(self) -> None:
        self._hook.remove()


class StepDriver(TrainerCallback):
    """Runs the LLRD stages at the three moments of every optimizer step (see the module docstring).

    A stage is any object with optional methods ``on_train_begin(ctx, args, state)``,
    ``on_step_begin(ctx, args, state)``, ``before_clip(ctx)``, ``before_step(ctx)`` and ``after_step(ctx)``.
    Under DeepSpeed they run inside the ZeRO optimizer's ``step``; elsewhere from Trainer's callbacks and,
    for ``before_clip``, from :meth:`llrd.LLRDMixin._clip_grad_norm`.

    Example:
        >>> trainer.add_callback(StepDriver([monitor], key_of, group_key))   # doctest: +SKIP
    """

    def __init__(self, stages: Iterable[Any], key_of: dict[str, str], group_key: Callable[[dict], str]):
        self.stages = list(stages)
        self.key_of, self.group_key = key_of, group_key
        self.ctx: StepContext | None = None
        self._clipped = False
        self._zero_step = None
        self.args = None

    def _call(self, moment: str, *extra, **kwargs) -> None:
        for stage in self.stages:
            method = getattr(stage, moment, None)
            if method is not None:
                method(self.ctx, *extra, **kwargs)

    # -- Trainer events ----------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        self.args = args
        self.close()
        if _zero_optimizer(optimizer) is not None:
            self.ctx = ZeroStepContext(optimizer, self.key_of, self.group_key)
            self._wrap_zero_step(self.ctx.zero, state)
        else:
            self.ctx = StepContext(optimizer, self.key_of, self.group_key)
        self.ctx.new_step(state)
        self._call("on_train_begin", args, state, train_dataloader=kwargs.get("train_dataloader"))

    def on_step_begin(self, args, state, control, **kwargs):
        if self.ctx is not None:
            self.ctx.new_step(state)
            self._clipped = False
            self._call("on_step_begin", args, state)

    def before_clip(self) -> None:
        """Called by the trainer right before it clips the gradients (not under DeepSpeed)."""
        if self.ctx is not None and self.ctx.engine == "torch" and not self._clipped:
            self._clipped = True
            self._call("before_clip")

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self.ctx is None or self.ctx.engine != "torch":
            return
        self.before_clip()  # no clipping this run (max_grad_norm <= 0): the moment is now
        self._call("before_step")

    def on_optimizer_step(self, args, state, control, **kwargs):
        if self.ctx is not None and self.ctx.engine == "torch":
            self._call("after_step")

    def on_train_end(self, args, state, control, **kwargs):
        self._call("on_train_end", args, state)
        self.close()

    # -- DeepSpeed -----------------------------------------------------------------------------------
    def _wrap_zero_step(self, zero, state) -> None:
        original = zero.step
        driver = self

        def step(*args, **kwargs):
            driver._call("before_clip")
            driver._call("before_step")
            try:
                return original(*args, **kwargs)
            finally:
                driver._call("after_step")

        zero.step = step
        self._zero_step = (zero, original)

    def close(self) -> None:
        if self._zero_step is not None:
            zero, original = self._zero_step
            zero.step = original
            self._zero_step = None
        if isinstance(self.ctx, ZeroStepContext):
            self.ctx.close()

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

When no stage needs gradients (the default per-depth output, ``layer_stats="lr"``), the driver touches no
engine internals: it reads the rates from the group dicts in a ``register_step_pre_hook`` of the torch
optimizer that steps (public torch API), on the steps Trainer logs, and never wraps ZeRO's ``step``. Only
the opt-in stages (per-depth gradient norms, update ratios, adaptive rates, gradual unfreezing) get the three
moments below, and only they read ZeRO's partitions (see :mod:`llrd.internals`).

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

from .internals import check as check_internals
from .internals import check_deepspeed, check_zero_optimizer

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


def needs_gradients(stage: Any) -> bool:
    """Whether a stage acts on gradients or weights (else it only reads the rates of the group dicts)."""
    return bool(getattr(stage, "needs_gradients", True))


def needs_norms(stage: Any) -> bool:
    """Whether a stage reduces per-depth norms over ranks (gradual unfreezing only drops gradients)."""
    return bool(getattr(stage, "needs_norms", needs_gradients(stage) and type(stage).__name__ != "GradualUnfreezer"))


def _refuse_multi_dim_meshes(params: Iterable[torch.Tensor], stages: Iterable[Any]) -> None:
    """Per-depth sums are reduced over the whole world: right for a 1-D mesh only, so refuse the stages that
    reduce norms (per-depth gradient norms and update ratios, adaptive rates) on a 2-D or larger mesh."""
    from torch.distributed.tensor import DTensor

    asking = [_setting_of(s) for s in stages if needs_norms(s)]
    if not asking:
        return
    for param in params:
        if isinstance(param, DTensor) and param.device_mesh.ndim > 1:
            raise ValueError(
                f"{' and '.join(asking)}: a parameter is a DTensor on a {param.device_mesh.ndim}-D device mesh (HSDP, "
                "tensor or expert parallelism), and llrd reduces per-depth norms over one data-parallel dimension "
                "only. Use layer_stats='lr' (the default: per-depth rates) without adaptive_lr, or FSDP2 on a 1-D "
                "mesh, DDP or DeepSpeed ZeRO."
            )


def _setting_of(stage: Any) -> str:
    level = getattr(stage, "level", None)
    if level is not None:
        return f"layer_stats={level!r}"
    return {"AdaptiveLayerLR": "adaptive_lr=True"}.get(type(stage).__name__, type(stage).__name__)


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
        over all ranks. Computed once per step. Depths without gradient (frozen, or never used by the forward)
        are left out: every engine reports the same keys, although ZeRO cannot tell "no gradient" from zeros."""
        if self._grad_sq is None:
            self._grad_sq = {k: v for k, v in self._compute_grad_sq().items() if v > 0}
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
        check_zero_optimizer(self.zero, self.stage)
        # ZeRO-Offload keeps the partitioned gradients in the fp32 partitions' .grad, not in averaged_gradients
        self.offload = bool(getattr(self.zero, "cpu_offload", False) or getattr(self.zero, "offload_optimizer", False))
        self.group_of_slot = self._slots()
        self._pre_clip: list[float] | None = None
        self.skip_groups: set[int] = set()
        self._hook = innermost_optimizer(optimizer).register_step_pre_hook(self._skip_frozen)

    def _slots(self) -> dict[int, int]:
        """ZeRO slot (group, or stage-3 sub-group) -> index of the optimizer group it belongs to."""
        if self.stage == 3:
            return dict(self.zero.sub_group_to_group_id)
        return {i: i for i in range(len(self.groups))}

    def _fp32_partition(self, slot: int) -> torch.Tensor:
        if self.stage == 3:
            return self.zero.fp32_partitioned_groups_flat[slot]
        return self.zero.single_partition_of_fp32_groups[slot]

    def _real_pieces(self, slot: int, flat: torch.Tensor) -> list[torch.Tensor]:
        """A ZeRO-3 flat partition cut into its parameters' pieces, without the last rank's padding."""
        pieces, offset = [], 0
        for part, pad in zip(self.zero.fp16_partitioned_groups[slot], self.zero.groups_padding[slot], strict=True):
            pieces.append(flat.narrow(0, offset, part.numel() - pad))
            offset += part.numel()
        return pieces

    def _slot_grads(self, slot: int, real_only: bool = True) -> list[torch.Tensor]:
        if self.offload:
            wait = getattr(self.zero, "_wait_for_offload_copies", None)
            if wait is not None:
                wait()
            grad = self._fp32_partition(slot).grad
            if grad is None:
                return []
            return self._real_pieces(slot, grad) if self.stage == 3 and real_only else [grad]
        grads = self.zero.averaged_gradients.get(slot)
        if grads is None:
            return []
        if (
            self.stage == 3 and real_only
        ):  # one partition per parameter, padded on the last rank: count the real elements
            return [g.view(-1)[: g.numel() - pad] for g, pad in zip(grads, self.zero.groups_padding[slot], strict=True)]
        return list(grads)

    def _slot_weights(self, slot: int) -> list[torch.Tensor]:
        """This rank's fp32 master weights of a slot, without ZeRO-3's padding (it is never written: garbage)."""
        if self.stage != 3:
            return [self._fp32_partition(slot).detach()]  # stage 1/2 pads with zeros
        return self._real_pieces(slot, self._fp32_partition(slot).detach())

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
        if any(g.get("layer_id") is None for g in self.groups):
            return {}  # Trainer's two groups (layer_decay 1): a flat partition mixes every depth
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
                for grad in self._slot_grads(slot, real_only=False):
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
        if any(g.get("layer_id") is None for g in self.groups):
            return buckets
        for slot, group in self.group_of_slot.items():
            buckets[self.group_key(self.groups[group])][0].extend(self._slot_weights(slot))
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

    A stage with ``needs_gradients = False`` (the rates-only monitor) only gets ``before_step``, from a step
    pre-hook of the torch optimizer: if every stage is such, the driver reads no engine internals at all.

    Example:
        >>> trainer.add_callback(StepDriver([monitor], key_of, group_key))   # doctest: +SKIP
    """

    def __init__(self, stages: Iterable[Any], key_of: dict[str, str], group_key: Callable[[dict], str]):
        self.stages = list(stages)
        self.key_of, self.group_key = key_of, group_key
        self.ctx: StepContext | None = None
        self._clipped = False
        self._zero_step = None
        self._rates_hook = None
        self._armed = False
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
        if not any(needs_gradients(stage) for stage in self.stages):
            self._rates_only(optimizer)
            return self._start(args, state, kwargs)
        check_internals("torch")
        if _zero_optimizer(optimizer) is not None:
            check_deepspeed()  # the ZeRO internals below are those of the tested DeepSpeed versions
            self.ctx = ZeroStepContext(optimizer, self.key_of, self.group_key)
            self._wrap_zero_step(self.ctx.zero, state)
        elif getattr(args, "deepspeed", None) or type(optimizer).__name__ == "DeepSpeedOptimizerWrapper":
            self._without_step_access(innermost_optimizer(optimizer))
        else:
            self.ctx = StepContext(optimizer, self.key_of, self.group_key)
        _refuse_multi_dim_meshes((p for g in self.ctx.groups for p in g["params"]), self.stages)
        self._start(args, state, kwargs)

    def _start(self, args, state, kwargs: dict) -> None:
        self.ctx.new_step(state)
        self._call("on_train_begin", args, state, train_dataloader=kwargs.get("train_dataloader"))

    def _without_step_access(self, inner: Any) -> None:
        """DeepSpeed without a ZeRO-1/2/3 optimizer (stage 0, its BF16_Optimizer): the step runs inside backward,
        where nothing can reach it. Refuse what must act there; the monitor keeps only the rates."""
        what = f"DeepSpeed's {type(inner).__name__} (no ZeRO-1/2/3 optimizer)"
        for stage in self.stages:
            if type(stage).__name__ in ("GradualUnfreezer", "AdaptiveLayerLR"):
                setting = "gradual_unfreeze_every" if type(stage).__name__ == "GradualUnfreezer" else "adaptive_lr"
                raise ValueError(
                    f"{setting} needs to act between backward and the optimizer step, which {what} runs inside "
                    "backward out of reach. Use ZeRO stage 1, 2 or 3, DDP or FSDP2 for this run."
                )
            if getattr(stage, "level", "lr") != "lr":
                logger.warning("layer_stats=%r under %s: per-depth gradients are out of reach, logging rates only.",
                               stage.level, what)  # fmt: skip
                stage.level = "lr"
        self.ctx = StepContext(inner, self.key_of, self.group_key)  # rates only, read at Trainer's step callbacks

    def _rates_only(self, optimizer: Any) -> None:
        """No stage needs gradients: run ``before_step`` from a step pre-hook of the torch optimizer, once per
        optimizer step (ZeRO-3 steps it once per sub-group), reading only the group dicts."""
        inner = innermost_optimizer(optimizer)
        self.ctx = StepContext(inner, self.key_of, self.group_key)
        self.ctx.engine = "rates"
        self._rates_hook = inner.register_step_pre_hook(self._rates_step)

    def _rates_step(self, optimizer, args, kwargs) -> None:
        if self._armed:
            self._armed = False
            self._call("before_step")

    def on_step_begin(self, args, state, control, **kwargs):
        self._armed = True
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
        if self._rates_hook is not None:
            self._rates_hook.remove()
            self._rates_hook = None
        if self._zero_step is not None:
            zero, original = self._zero_step
            zero.step = original
            self._zero_step = None
        if isinstance(self.ctx, ZeroStepContext):
            self.ctx.close()

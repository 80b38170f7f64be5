"""Per-depth training signals: learning rate, gradient norm and (opt-in) update-to-weight ratio.

``LayerMonitor`` is a ``TrainerCallback``. On the optimizer steps after which Trainer logs the training loss
(its own decision: ``logging_strategy``, ``logging_steps``, ``logging_first_step``), it reads each depth's
learning rate and gradient norm just before ``optimizer.step()``; ``LLRDTrainer.log`` adds them to Trainer's
normal logs, so they reach TensorBoard, W&B, MLflow, ... through ``report_to``. Other steps cost nothing.

Levels (``layer_stats``), each including the one before:

* ``"lr"``: ``lr/<depth>``, read from the optimizer's groups; no tensor is touched.
* ``"grad_norm"`` (default): plus ``grad_norm/<depth>``, one fused norm over the gradients that exist
  anyway; nothing is copied.
* ``"all"``: plus ``update_ratio/<depth>`` (‖Δw‖/‖w‖ of the step). It needs the weights before the step,
  so on logged steps it holds **a copy of every trainable tensor** during the optimizer step: as much extra
  memory as the trainable weights (28 GB for a 7B model trained in full fp32). Opt-in for that reason.

``<depth>`` is ``depth_03`` (``encoder/depth_03`` when the model has several stacks).
"""

from __future__ import annotations

import copy
from collections import defaultdict

import torch
from transformers import TrainerCallback, TrainerControl
from transformers.trainer_callback import DefaultFlowCallback
from transformers.trainer_utils import IntervalStrategy

from .discovery import LayerMap

__all__ = ["LayerMonitor", "LAYER_STATS_CHOICES", "logs_after_this_step"]

#: Per-depth logging levels, each including the previous one (see the module docstring).
LAYER_STATS_CHOICES = ("none", "lr", "grad_norm", "all")


def logs_after_this_step(args, state, steps_per_epoch: int | None) -> bool:
    """Whether Trainer logs the training loss right after the optimizer step about to be taken.

    Asks Trainer's own flow callback (``logging_steps``, ``logging_first_step``) about the next step, and
    adds ``logging_strategy="epoch"``: the last step of an epoch, or of training.

    Example:
        >>> logs_after_this_step(args, state, steps_per_epoch=50)   # doctest: +SKIP
        True
    """
    upcoming = copy.copy(state)
    upcoming.global_step = state.global_step + 1
    control = TrainerControl()
    DefaultFlowCallback().on_step_end(args, upcoming, control)
    if control.should_log:
        return True
    if args.logging_strategy == IntervalStrategy.EPOCH:
        at_end = bool(state.max_steps) and upcoming.global_step >= state.max_steps
        return at_end or bool(steps_per_epoch) and upcoming.global_step % steps_per_epoch == 0
    return False


def steps_per_epoch(args, train_dataloader) -> int | None:
    """Optimizer steps per epoch, as Trainer counts them; ``None`` for a dataloader without a length."""
    try:
        batches = len(train_dataloader)
    except TypeError:
        return None
    accumulation = args.gradient_accumulation_steps
    return max(batches // accumulation + int(batches % accumulation > 0), 1)


class LayerMonitor(TrainerCallback):
    """Collects per-depth statistics on the steps Trainer logs.

    Args:
        layer_map: depths of the model's parameters (clean names).
        level: ``"lr"``, ``"grad_norm"`` or ``"all"`` (see the module docstring for what each costs).

    Example:
        >>> monitor = LayerMonitor(layer_ids(model), "grad_norm")   # doctest: +SKIP
    """

    def __init__(self, layer_map: LayerMap, level: str = "grad_norm"):
        if level not in LAYER_STATS_CHOICES[1:]:
            raise ValueError(f"layer_stats={level!r}: use one of {LAYER_STATS_CHOICES}.")
        self.level = level
        several = len(layer_map.stacks) > 1
        self.key_of = {
            name: (f"{info.stack}/" if several else "") + f"depth_{info.depth:02d}"
            for name, info in layer_map.params.items()
        }
        self.optimizer = None
        self.steps_per_epoch: int | None = None
        self.pending: dict[str, float] = {}
        self._before: dict[str, list[torch.Tensor]] | None = None

    def _buckets(self) -> dict[str, tuple[float, list[torch.Tensor]]]:
        buckets: dict[str, list] = defaultdict(lambda: [0.0, []])
        for group in self.optimizer.param_groups:
            for name, param in zip(group["param_names"], group["params"], strict=True):
                bucket = buckets[self.key_of[name]]
                bucket[0] = group["lr"]
                bucket[1].append(param)
        return {k: (v[0], v[1]) for k, v in sorted(buckets.items())}

    def on_train_begin(self, args, state, control, optimizer=None, train_dataloader=None, **kwargs):
        self.optimizer = optimizer
        self.steps_per_epoch = steps_per_epoch(args, train_dataloader) if train_dataloader is not None else None

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self.optimizer is None or not logs_after_this_step(args, state, self.steps_per_epoch):
            return
        stats: dict[str, float] = {}
        self._before = {} if self.level == "all" else None
        for key, (lr, params) in self._buckets().items():
            stats[f"lr/{key}"] = float(lr)
            if self.level == "lr":
                continue
            grads = [p.grad for p in params if p.grad is not None]
            if grads:
                stats[f"grad_norm/{key}"] = float(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))))
            if self._before is not None:
                self._before[key] = [p.detach().clone() for p in params]
        self.pending = stats

    def on_optimizer_step(self, args, state, control, **kwargs):
        if not self._before:
            return
        for key, (_, params) in self._buckets().items():
            before = self._before.get(key)
            if not before:
                continue
            delta = torch._foreach_sub([p.detach() for p in params], before)
            update = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(delta)))
            weight = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(before)))
            self.pending[f"update_ratio/{key}"] = float(update / weight.clamp_min(1e-12))
        self._before = None

    def pop(self) -> dict[str, float]:
        stats, self.pending = self.pending, {}
        return stats

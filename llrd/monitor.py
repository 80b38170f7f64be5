"""Per-depth training signals: learning rate, gradient norm and update-to-weight ratio.

``LayerMonitor`` is a ``TrainerCallback``. On the optimizer steps that Trainer will log (every
``logging_steps``), it reads each depth's learning rate and gradient norm just before ``optimizer.step()``
and the relative size of the update just after; ``LLRDTrainer.log`` adds them to Trainer's normal logs,
so they reach TensorBoard, W&B, MLflow, ... through ``report_to``. Other steps cost nothing.

Keys: ``lr/<depth>``, ``grad_norm/<depth>`` and ``update_ratio/<depth>`` where ``<depth>`` is
``depth_03`` (``encoder/depth_03`` when the model has several stacks).
"""

from __future__ import annotations

from collections import defaultdict

import torch
from transformers import TrainerCallback

from .discovery import LayerMap

__all__ = ["LayerMonitor", "LAYER_STATS_CHOICES"]

LAYER_STATS_CHOICES = ("none", "lr", "all")


class LayerMonitor(TrainerCallback):
    """Collects per-depth statistics on logging steps.

    Args:
        layer_map: depths of the model's parameters (clean names).
        level: ``"lr"`` (learning rates only) or ``"all"`` (plus gradient norms and update ratios; the
            update ratio keeps a copy of the trainable weights during the logged optimizer step).

    Example:
        >>> monitor = LayerMonitor(layer_ids(model), "all")   # doctest: +SKIP
    """

    def __init__(self, layer_map: LayerMap, level: str = "all"):
        if level not in LAYER_STATS_CHOICES[1:]:
            raise ValueError(f"layer_stats={level!r}: use one of {LAYER_STATS_CHOICES}.")
        self.level = level
        several = len(layer_map.stacks) > 1
        self.key_of = {
            name: (f"{info.stack}/" if several else "") + f"depth_{info.depth:02d}"
            for name, info in layer_map.params.items()
        }
        self.optimizer = None
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

    def _logs_this_step(self, state) -> bool:
        step = state.global_step + 1  # the step being taken
        every = state.logging_steps or 0
        return bool(every) and step % every == 0

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        self.optimizer = optimizer

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self.optimizer is None or not self._logs_this_step(state):
            return
        stats: dict[str, float] = {}
        self._before = {} if self.level == "all" else None
        for key, (lr, params) in self._buckets().items():
            stats[f"lr/{key}"] = float(lr)
            if self.level != "all":
                continue
            grads = [p.grad for p in params if p.grad is not None]
            if grads:
                stats[f"grad_norm/{key}"] = float(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))))
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

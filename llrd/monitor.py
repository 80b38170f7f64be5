"""Per-depth training signals: learning rate (default), and opt-in gradient norm and update-to-weight ratio.

``LayerMonitor`` is a stage of :class:`llrd.engines.StepDriver`. On the optimizer steps after which Trainer
logs the training loss (its own decision: ``logging_strategy``, ``logging_steps``, ``logging_first_step``), it
reads each depth's learning rate, and on request its gradient norm, right before the update, wherever the
engine makes it (Trainer's loop, or inside DeepSpeed's step); ``LLRDMixin.log`` adds them to Trainer's logs,
so they reach TensorBoard, W&B, MLflow, ... through ``report_to`` and ``trainer_state.json``. The console
line stays Trainer's: :class:`DepthQuietProgress` / :class:`DepthQuietPrinter` leave the per-depth keys out.

Levels (``layer_stats``), each including the one before (costs: ``scripts/results/layer_stats_cost.json``):

* ``"lr"`` (default): ``lr/<depth>``, the rates the optimizer's group dicts hold when it steps, read by a torch
  step pre-hook; no tensor is touched and no engine internal is read.
* ``"grad_norm"``: plus ``grad_norm/<depth>``, one fused norm over the gradients that exist anyway (nothing is
  copied; under DeepSpeed ZeRO it runs inside ZeRO's ``step`` and reads its partitions, see
  :mod:`llrd.internals`).
* ``"all"``: plus ``update_ratio/<depth>`` (‖Δw‖/‖w‖ of the step). It needs the weights before the step,
  so on logged steps it holds **a copy of every trainable tensor** during the optimizer step: as much extra
  memory as the trainable weights (28 GB for a 7B model trained in full fp32).

``<depth>`` is ``depth_03`` (``encoder/depth_03`` when the model has several stacks).
"""

from __future__ import annotations

import copy
import logging
import math

import torch
from transformers import TrainerControl
from transformers.trainer_callback import DefaultFlowCallback, PrinterCallback, ProgressCallback
from transformers.trainer_utils import IntervalStrategy

logger = logging.getLogger(__name__)

__all__ = [
    "LayerMonitor",
    "LAYER_STATS_CHOICES",
    "DEPTH_KEY_PREFIXES",
    "DepthQuietPrinter",
    "DepthQuietProgress",
    "logs_after_this_step",
    "depth_key",
    "quiet_console",
]

#: Per-depth logging levels, each including the previous one (see the module docstring).
LAYER_STATS_CHOICES = ("none", "lr", "grad_norm", "all")
#: Prefixes of the per-depth log keys llrd adds (the monitor's and the adaptive rates').
DEPTH_KEY_PREFIXES = ("lr/", "grad_norm/", "update_ratio/", "lr_factor/")


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


def depth_key(stack: str, depth: int, several_stacks: bool) -> str:
    """The log key of a depth: ``depth_03``, or ``encoder/depth_03`` when the model has several stacks."""
    return (f"{stack}/" if several_stacks else "") + f"depth_{depth:02d}"


class LayerMonitor:
    """Collects per-depth statistics on the steps Trainer logs (a :class:`llrd.engines.StepDriver` stage).

    Args:
        level: ``"lr"``, ``"grad_norm"`` or ``"all"`` (see the module docstring for what each costs). At
            ``"lr"`` the stage has ``needs_gradients = False``: the driver then reads no engine internals.

    Under DDP the gradients are the reduced ones every rank holds; under FSDP2 and DeepSpeed ZeRO the norms
    are summed over the ranks' shards or partitions, so every engine logs the same numbers.

    Example:
        >>> monitor = LayerMonitor("grad_norm")   # doctest: +SKIP
    """

    def __init__(self, level: str = "lr"):
        if level not in LAYER_STATS_CHOICES[1:]:
            raise ValueError(f"layer_stats={level!r}: use one of {LAYER_STATS_CHOICES}.")
        self.level = level
        self.steps_per_epoch: int | None = None
        self.args = None
        self.pending: dict[str, float] = {}
        self._before: dict[str, tuple[list[torch.Tensor], list[torch.Tensor]]] | None = None

    @property
    def needs_gradients(self) -> bool:
        return self.level != "lr"

    @property
    def needs_norms(self) -> bool:
        return self.level != "lr"

    def on_train_begin(self, ctx, args, state, train_dataloader=None, **kwargs) -> None:
        self.args = args
        self.steps_per_epoch = steps_per_epoch(args, train_dataloader) if train_dataloader is not None else None
        if self.steps_per_epoch is None and args.logging_strategy == IntervalStrategy.EPOCH:
            logger.warning(
                "logging_strategy='epoch' with a dataset without a length: the end of an epoch is not known before "
                "its last step, so per-depth statistics come only with the last log. Log by steps to see them all."
            )

    def before_step(self, ctx) -> None:
        if not logs_after_this_step(self.args, ctx.state, self.steps_per_epoch):
            self._before = None
            return
        stats: dict[str, float] = {}
        for group in ctx.groups:
            for name in group["param_names"]:
                stats.setdefault(f"lr/{ctx.key_of[name]}", float(group["lr"]))
        if self.level != "lr":
            stats.update({f"grad_norm/{k}": v for k, v in ctx.grad_norms().items()})
        self._before = None
        if self.level == "all":
            self._before = {
                k: ([t.clone() for t in sh], [t.clone() for t in rep]) for k, (sh, rep) in ctx.weights().items()
            }
        self.pending = dict(sorted(stats.items()))

    def after_step(self, ctx) -> None:
        if not self._before:
            return
        sums: dict[str, list[float]] = {}
        replicated: dict[str, list[float]] = {}
        for key, (sharded, plain) in ctx.weights().items():
            old_sharded, old_plain = self._before[key]
            sums[key] = [_delta_sq(sharded, old_sharded), _sq(old_sharded)]
            replicated[key] = [_delta_sq(plain, old_plain), _sq(old_plain)]
        sums = ctx.reduce(sums, sharded=True)
        for key in sorted(sums):
            delta = sums[key][0] + replicated[key][0]
            weight = sums[key][1] + replicated[key][1]
            self.pending[f"update_ratio/{key}"] = math.sqrt(delta) / max(math.sqrt(weight), 1e-12)
        self._before = None

    def pop(self) -> dict[str, float]:
        stats, self.pending = self.pending, {}
        return stats


def is_depth_key(key: str) -> bool:
    """Whether a log key is one of llrd's per-depth keys (``lr/depth_03``, ``grad_norm/encoder/depth_01``, ...)."""
    return key.startswith(DEPTH_KEY_PREFIXES)


class _DepthQuiet:
    """Mixin for Trainer's console callbacks: the same line, without llrd's per-depth keys."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None:
            logs = {k: v for k, v in logs.items() if not is_depth_key(k)}
        return super().on_log(args, state, control, logs=logs, **kwargs)


class DepthQuietProgress(_DepthQuiet, ProgressCallback):
    """``ProgressCallback`` whose log line leaves out the per-depth keys (they still reach ``report_to``)."""


class DepthQuietPrinter(_DepthQuiet, PrinterCallback):
    """``PrinterCallback`` (``disable_tqdm=True``) whose line leaves out the per-depth keys."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None:
            logs.pop("total_flos", None)  # as PrinterCallback does, on the dict the later callbacks see
        return super().on_log(args, state, control, logs=logs, **kwargs)


def quiet_console(callback_handler) -> None:
    """Swap Trainer's console callback for its per-depth-quiet subclass, in place (same position).

    Example:
        >>> quiet_console(trainer.callback_handler)   # doctest: +SKIP
    """
    callbacks = callback_handler.callbacks
    for i, callback in enumerate(callbacks):
        if type(callback) is ProgressCallback:
            quiet = DepthQuietProgress(max_str_len=callback.max_str_len)
        elif type(callback) is PrinterCallback:
            quiet = DepthQuietPrinter()
        else:
            continue
        callbacks[i] = quiet


def _sq(tensors: list[torch.Tensor]) -> float:
    if not tensors:
        return 0.0
    return float(torch.stack(torch._foreach_norm([t.float() for t in tensors])).pow(2).sum())


def _delta_sq(now: list[torch.Tensor], before: list[torch.Tensor]) -> float:
    if not now:
        return 0.0
    return _sq(torch._foreach_sub([t.float() for t in now], [t.float() for t in before]))

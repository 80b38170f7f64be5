"""``LLRDTrainer``: ``transformers.Trainer`` whose optimizer gets per-layer param groups."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import torch
from transformers import Trainer, TrainingArguments
from transformers.trainer_optimizer import is_optimizer_factory

from .args import LLRDTrainingArguments
from .controls import AdaptiveLayerLR, GradualUnfreezer, reinit_top_blocks
from .discovery import layer_ids
from .groups import param_groups, summarize_groups
from .loss_scaling import loss_uses_num_items
from .manifest import LAYOUT_FILE, LayoutSaver, check_layout, layout_of, read_layout
from .monitor import LayerMonitor

__all__ = ["LLRDTrainer"]

logger = logging.getLogger(__name__)

# Keys of Trainer's optimizer kwargs that replace the param groups with the optimizer's own structure.
_OWN_STRUCTURE = ("params", "model", "optimizer_dict")


class LLRDTrainer(Trainer):
    """Drop-in ``Trainer`` that trains each transformer block at its own learning rate.

    Takes the same arguments as ``Trainer``. ``args`` may be :class:`LLRDTrainingArguments` or a plain
    ``TrainingArguments``; LLRD fields (``layer_decay``, ``block_pattern``, ``depth_overrides``) can also be
    given as keywords and override ``args``. ``args.optim`` keeps working (AdamW, fused AdamW, Adafactor, SGD,
    8-bit, ...): only the param groups change.

    Example:
        >>> args = TrainingArguments("out", learning_rate=1e-4)
        >>> trainer = LLRDTrainer(model=model, args=args, train_dataset=ds, layer_decay=0.8)  # doctest: +SKIP
        >>> trainer.train()  # doctest: +SKIP
    """

    def __init__(self, model=None, args: TrainingArguments | None = None, *rest: Any, **kwargs: Any):
        llrd_names = {f.name for f in dataclasses.fields(LLRDTrainingArguments)} - {
            f.name for f in dataclasses.fields(TrainingArguments)
        }
        overrides = {k: kwargs.pop(k) for k in list(kwargs) if k in llrd_names}
        self._monitor: LayerMonitor | None = None
        self._llrd_callbacks: list = []
        super().__init__(model, _llrd_args(args, overrides), *rest, **kwargs)
        self.add_callback(LayoutSaver())
        if self.model is not None and loss_uses_num_items(self.model) is False and self.model_accepts_loss_kwargs:
            # The head averages its own loss; Trainer would otherwise scale it by GA steps x processes.
            self.model_accepts_loss_kwargs = False

    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        if self.optimizer is None:
            opt_model = self.model if model is None else model
            if self.optimizer_cls_and_kwargs is not None:
                optimizer_cls, optimizer_kwargs = self.optimizer_cls_and_kwargs
            else:
                optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
            own = [k for k in _OWN_STRUCTURE if k in optimizer_kwargs]
            if own or is_optimizer_factory(optimizer_cls):
                raise ValueError(
                    f"optim={self.args.optim!r} builds its own parameter structure ({own or 'a factory'}), which "
                    "cannot carry per-layer learning rates. Use adamw_torch, adamw_torch_fused, adafactor, sgd, "
                    "an 8-bit AdamW, ... or layer_decay=1.0 with the plain Trainer."
                )
            layer_map = layer_ids(
                opt_model, block_pattern=self.args.block_pattern, depth_overrides=self.args.depth_overrides
            )
            if self.args.reinit_top_blocks:
                reinit_top_blocks(opt_model, self.args.reinit_top_blocks, layer_map, self.args.reinit_pooler)
            groups = param_groups(
                opt_model, layer_map=layer_map, decay_names=self.get_decay_parameter_names, **self.args.group_kwargs()
            )
            in_groups = {n for g in groups for n in g["param_names"]}
            for raw, param in opt_model.named_parameters():  # freeze_below_scale: out of the groups, no grads
                if param.requires_grad and layer_map.raw_names[raw] not in in_groups:
                    param.requires_grad_(False)
            kwargs = {**optimizer_kwargs, "lr": self.args.learning_rate}  # defaults["lr"] stays the head lr
            self.optimizer = optimizer_cls(groups, **kwargs)
            _keep_embeddings_32bit(optimizer_cls, kwargs, opt_model)
            logger.info(summarize_groups(groups))
            if self.args.layer_decay == 1.0 and not self.args.stack_decay:
                logger.warning("layer_decay=1.0: layer-wise decay is off. Set e.g. --layer_decay 0.8.")
            self._llrd_layer_map = layer_map
            self._attach_callbacks(layer_map, in_groups)
        return super().create_optimizer(model)  # the optimizer exists: Trainer only applies its wrappers

    def _attach_callbacks(self, layer_map, names: set[str]) -> None:
        """(Re)attach this run's unfreezer, adaptive-rate and monitor callbacks, in that order: each sees the
        gradients and rates the previous one left."""
        for callback in self._llrd_callbacks:
            self.remove_callback(callback)
        args, several = self.args, len(layer_map.stacks) > 1
        self._llrd_callbacks = []
        if args.gradual_unfreeze_every > 0:
            self._llrd_callbacks.append(
                GradualUnfreezer(
                    layer_map,
                    args.gradual_unfreeze_every,
                    args.gradual_unfreeze_unit,
                    args.gradual_unfreeze_depths,
                    names,
                    drop_grads=args.world_size > 1,
                )
            )
        if args.adaptive_lr:
            if args.fp16 and args.max_grad_norm <= 0:
                raise ValueError(
                    "adaptive_lr with fp16 needs max_grad_norm > 0: Trainer unscales fp16 gradients only when it "
                    "clips them, and the adaptive rates need their true norm. Use bf16, or max_grad_norm=1e9."
                )
            self._llrd_callbacks.append(AdaptiveLayerLR(several_stacks=several))
        self._monitor = LayerMonitor(layer_map, args.layer_stats) if args.layer_stats != "none" else None
        if self._monitor is not None:
            self._llrd_callbacks.append(self._monitor)
        for callback in self._llrd_callbacks:
            self.add_callback(callback)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        """Before Trainer loads optimizer/scheduler state, check the checkpoint's group layout is ours."""
        if checkpoint is not None and self.optimizer is not None:
            saved = read_layout(checkpoint)
            if saved is None:
                logger.warning("%s has no %s: cannot verify that its param groups match.", checkpoint, LAYOUT_FILE)
            else:
                check_layout(saved, layout_of(self.optimizer.param_groups), checkpoint)
        super()._load_optimizer_and_scheduler(checkpoint)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Trainer's logging, plus the per-depth statistics of this logging step (training logs only)."""
        if "loss" in logs:
            for callback in self._llrd_callbacks:
                if hasattr(callback, "pop"):
                    logs = {**logs, **callback.pop()}
        super().log(logs, start_time)


def _llrd_args(args: TrainingArguments | None, overrides: dict[str, Any]) -> LLRDTrainingArguments:
    if isinstance(args, LLRDTrainingArguments) and not overrides:
        return args
    if args is None:
        return LLRDTrainingArguments(output_dir="trainer_output", **overrides)
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(args) if f.init}
    values.update(overrides)
    return LLRDTrainingArguments(**values)


def _keep_embeddings_32bit(optimizer_cls, kwargs: dict[str, Any], model: torch.nn.Module) -> None:
    """Trainer's rule for bitsandbytes 8-bit optimizers: embeddings keep 32-bit optimizer state."""
    if "bitsandbytes" not in str(optimizer_cls) or kwargs.get("optim_bits") != 8:
        return
    import bitsandbytes

    manager = bitsandbytes.optim.GlobalOptimManager.get_instance()
    for module in model.modules():
        if isinstance(module, torch.nn.Embedding):
            manager.register_module_override(module, "weight", {"optim_bits": 32})

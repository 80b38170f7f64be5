"""``LLRDTrainer``: ``transformers.Trainer`` whose optimizer gets per-layer param groups."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import torch
from transformers import Trainer, TrainingArguments
from transformers.trainer_optimizer import is_optimizer_factory

from .args import LLRDTrainingArguments
from .discovery import layer_ids
from .groups import param_groups, summarize_groups
from .loss_scaling import loss_uses_num_items
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
        super().__init__(model, _llrd_args(args, overrides), *rest, **kwargs)
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
            groups = param_groups(
                opt_model,
                layer_map=layer_map,
                lr=self.args.learning_rate,
                layer_decay=self.args.layer_decay,
                weight_decay=self.args.weight_decay,
                decay_names=self.get_decay_parameter_names,
            )
            kwargs = {**optimizer_kwargs, "lr": self.args.learning_rate}  # defaults["lr"] stays the head lr
            self.optimizer = optimizer_cls(groups, **kwargs)
            _keep_embeddings_32bit(optimizer_cls, kwargs, opt_model)
            logger.info(summarize_groups(groups))
            self._attach_monitor(layer_map)
            if self.args.layer_decay == 1.0:
                logger.warning("layer_decay=1.0: layer-wise decay is off (plain Trainer groups). Set e.g. 0.8.")
        return super().create_optimizer(model)  # the optimizer exists: Trainer only applies its wrappers

    def _attach_monitor(self, layer_map) -> None:
        if self._monitor is not None:
            self.remove_callback(self._monitor)
            self._monitor = None
        if self.args.layer_stats != "none":
            self._monitor = LayerMonitor(layer_map, self.args.layer_stats)
            self.add_callback(self._monitor)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Trainer's logging, plus the per-depth statistics of this logging step (training logs only)."""
        if self._monitor is not None and "loss" in logs:
            logs = {**logs, **self._monitor.pop()}
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

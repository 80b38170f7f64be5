"""``LLRDMixin``: per-layer learning rates for any ``transformers.Trainer`` subclass; ``LLRDTrainer`` = mixin + Trainer.

The mixin changes three things and leaves the rest of the trainer alone:

* ``create_optimizer`` builds the optimizer of ``args.optim`` (Trainer's own factory) on :func:`llrd.param_groups`;
  it never changes the model;
* when training starts (after ``model_init``, before any checkpoint is loaded) it applies the model changes
  once: re-initialising the top blocks (never on resume) and freezing depths below a scale;
* it runs the step-time stages (gradual unfreezing, adaptive rates, per-depth logging) through
  :class:`llrd.engines.StepDriver`, and checks after the first step that the rates survived the launch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import weakref
from collections import OrderedDict
from typing import Any

import torch
from torch import nn
from transformers import Trainer
from transformers.trainer_utils import unwrap_peft_model

from .args import LLRDArguments, check_distributed_setup, llrd_field_names
from .controls import AdaptiveLayerLR, GradualUnfreezer, freeze_below_scale, reinit_top_blocks
from .discovery import LayerMap, layer_ids
from .engines import StepDriver
from .groups import param_groups, summarize_groups
from .launch_check import RateCheck
from .loss_scaling import loss_uses_num_items
from .manifest import LayoutSaver, check_resume, layout_of, resume_layer_map, resume_layout
from .monitor import LayerMonitor, depth_key
from .optim import apply_rate_mapping, build_optimizer

__all__ = ["LLRDMixin", "LLRDTrainer"]

logger = logging.getLogger(__name__)


class LLRDMixin:
    """Per-layer learning rates for any ``Trainer`` subclass: ``class MyTrainer(LLRDMixin, SFTTrainer)``.

    LLRD settings come as keywords (``layer_decay=0.8``, ...), as ``llrd_args=LLRDArguments(...)`` (parse it with
    ``HfArgumentParser((SFTConfig, LLRDArguments))``), or, for :class:`llrd.LLRDTrainingArguments`, from ``args``
    itself. The subclass's own ``args`` class is never converted. The settings in use are ``trainer.llrd_args``.

    Example:
        >>> class LLRDSeq2SeqTrainer(LLRDMixin, Seq2SeqTrainer):
        ...     pass
        >>> trainer = LLRDSeq2SeqTrainer(model=model, args=seq2seq_args, train_dataset=ds, layer_decay=0.8)
    """

    llrd_args: LLRDArguments

    def __init__(self, *args: Any, llrd_args: LLRDArguments | None = None, **kwargs: Any):
        names = set(llrd_field_names())
        overrides = {k: kwargs.pop(k) for k in list(kwargs) if k in names}
        args, kwargs, given = _with_overrides(args, kwargs, overrides)
        if isinstance(given, LLRDArguments):
            if llrd_args is not None:
                raise ValueError(
                    "pass the LLRD settings once: args is an LLRDTrainingArguments, so do not pass llrd_args= as well."
                )
            self.llrd_args = given
        elif llrd_args is not None:
            self.llrd_args = llrd_args.with_llrd(**overrides)
        else:
            self.llrd_args = LLRDArguments(**overrides)
        self.llrd_layout: list[dict[str, Any]] | None = None
        self._llrd_map_cache: tuple[nn.Module, LayerMap] | None = None
        self._llrd_built_optimizer: torch.optim.Optimizer | None = None
        self._llrd_given_optimizer = (kwargs.get("optimizers") or (None, None))[0]  # for the launch check
        self._llrd_driver: StepDriver | None = None
        self._llrd_adaptive: AdaptiveLayerLR | None = None
        self._llrd_resuming = False
        self._llrd_resume_layout: list[dict[str, Any]] | None = None  # the checkpoint's groups, when resuming
        self._llrd_reinitialised: weakref.WeakSet[nn.Module] = weakref.WeakSet()  # models re-initialised once
        super().__init__(*args, **kwargs)
        if isinstance(self.args, LLRDArguments):
            self.llrd_args = self.args
        if self.llrd_args.changes_rates:
            check_distributed_setup(self.args)
        self.add_callback(LayoutSaver())
        if self.llrd_args.verify_rates:
            self.add_callback(RateCheck(self))
        self._llrd_fix_loss_scaling()

    # -- which module, which depths ------------------------------------------------------------------
    def llrd_module(self, model: nn.Module) -> nn.Module:
        """The module whose parameters the optimizer covers: the model, or for sentence-transformers the loss
        module (a loss can hold trainable weights, e.g. ``SoftmaxLoss``), which contains the model."""
        loss = getattr(self, "loss", None)
        if _is_sentence_transformers(self) and loss is not None:
            return nn.Sequential(OrderedDict(loss)) if isinstance(loss, dict) else loss
        return model

    def llrd_layer_map(self, module: nn.Module) -> LayerMap:
        """:func:`llrd.layer_ids` of ``module`` under these settings (computed once per module)."""
        if self._llrd_map_cache is None or self._llrd_map_cache[0] is not module:
            settings = self.llrd_args
            layer_map = layer_ids(
                module,
                block_pattern=settings.block_pattern,
                depth_overrides=settings.depth_overrides,
                depth_source=settings.depth_source,
            )
            self._llrd_map_cache = (module, layer_map)
        return resume_layer_map(self._llrd_map_cache[1], self._llrd_resume_layout)  # resume: the checkpoint's

    def _llrd_fix_loss_scaling(self) -> None:
        """Turn off Trainer's ``num_items_in_batch`` loss path for heads whose loss takes a plain mean."""
        if self.model is None:
            return
        inner = unwrap_peft_model(self.accelerator.unwrap_model(self.model))  # what Trainer itself inspects
        if loss_uses_num_items(inner) is False and self.model_accepts_loss_kwargs:
            # The head averages its own loss; Trainer would otherwise scale it by GA steps x processes.
            self.model_accepts_loss_kwargs = False

    # -- training start: settings of this trial, then the model changes -------------------------------
    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any):
        if not isinstance(self.args, LLRDArguments):
            stray = [name for name in llrd_field_names() if name in vars(self.args)]
            if stray:
                raise ValueError(
                    f"args.{stray[0]}={getattr(self.args, stray[0])!r} is set on a {type(self.args).__name__}, which "
                    f"has no such field, so it would be ignored: LLRD settings live in trainer.llrd_args. Set "
                    f"trainer.llrd_args.{stray[0]} instead (after hyperparameter_search, apply the LLRD keys of "
                    "best.hyperparameters there)."
                )
        self._llrd_resuming = resume_from_checkpoint not in (None, False)
        self._llrd_resume_layout = resume_layout(resume_from_checkpoint, self.args.output_dir)
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def hyperparameter_search(self, *args: Any, **kwargs: Any):
        """Trainer's search; LLRD keys of the hp space may be LLRD settings. Afterwards the LLRD settings are the
        trainer's own again (not the last trial's): apply the best ones with ``trainer.llrd_args``."""
        saved = self.llrd_args.llrd_dict()
        try:
            return super().hyperparameter_search(*args, **kwargs)
        finally:
            for key, value in saved.items():
                setattr(self.llrd_args, key, value)

    def _hp_search_setup(self, trial) -> None:
        """Trainer's trial set-up, for LLRD settings too (they may live outside ``args``); then the model
        changes, which Trainer.train reaches after ``model_init`` and before loading a checkpoint."""
        params = self._llrd_trial_params(trial)
        if params:
            validated = self.llrd_args.with_llrd(**params)
            for key in params:
                setattr(self.llrd_args, key, getattr(validated, key))
            logger.info("LLRD settings of this trial: %s", params)
        if isinstance(trial, dict):  # ray / wandb hand the values themselves
            trial = {k: v for k, v in trial.items() if k not in params}
        with self._hp_space_without(params):
            super()._hp_search_setup(trial)
        self._llrd_prepare_model()

    @contextlib.contextmanager
    def _hp_space_without(self, params: dict[str, Any]):
        """Trainer asks ``hp_space(trial)`` again (optuna) and sets each key on ``args``: hide the LLRD keys."""
        space = getattr(self, "hp_space", None)
        if not params or space is None:
            yield
            return
        self.hp_space = lambda t: {k: v for k, v in space(t).items() if k not in params}
        try:
            yield
        finally:
            self.hp_space = space

    def _llrd_trial_params(self, trial) -> dict[str, Any]:
        if getattr(self, "hp_search_backend", None) is None or trial is None:
            return {}
        values = self.hp_space(trial) if not isinstance(trial, dict) else trial
        names = set(llrd_field_names())
        params = {}
        for key, value in values.items():
            if key in names:
                old = getattr(self.llrd_args, key)
                params[key] = type(old)(value) if old is not None else value
        return params

    def _llrd_prepare_model(self) -> None:
        """Re-initialise (once, never on resume) and freeze below the scale, before the optimizer exists."""
        target = self.llrd_module(self.model)
        layer_map = self.llrd_layer_map(target)
        k = self.llrd_args.reinit_top_blocks
        if k and not self._llrd_resuming and self.model not in self._llrd_reinitialised:
            reinit_top_blocks(target, k, layer_map, self.llrd_args.reinit_pooler)
            self._llrd_reinitialised.add(self.model)
        elif k and self._llrd_resuming:
            logger.info("reinit_top_blocks=%d: resuming, so the checkpoint's weights are kept", k)
        freeze_below_scale(target, layer_map, self.llrd_args.scaling())
        self._llrd_fix_loss_scaling()

    # -- the optimizer ---------------------------------------------------------------------------------
    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        if self.optimizer is None:
            opt_model = self.model if model is None else model
            target = self.llrd_module(opt_model)
            if self.optimizer_cls_and_kwargs is not None:
                optimizer_cls, optimizer_kwargs = self.optimizer_cls_and_kwargs
            else:
                optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
            mapping = None
            if target is not opt_model:  # sentence-transformers: its groups over the loss module are ours now
                optimizer_kwargs = {k: v for k, v in optimizer_kwargs.items() if k != "optimizer_dict"}
                mapping = getattr(self.args, "learning_rate_mapping", None)
            layer_map = self.llrd_layer_map(target)
            options = self.llrd_args.group_kwargs(self.args.learning_rate, self.args.weight_decay)
            if self.is_deepspeed_enabled and self.llrd_args.changes_rates:
                options["per_depth"] = True  # ZeRO flattens each group: per-depth norms need per-depth groups
            groups = param_groups(target, layer_map=layer_map, decay_names=self.get_decay_parameter_names, **options)
            groups = apply_rate_mapping(groups, mapping, self.args.learning_rate, layer_map)
            self.optimizer = build_optimizer(optimizer_cls, optimizer_kwargs, groups, self.args.learning_rate)
            self._llrd_built_optimizer = self.optimizer
            self.llrd_layout = layout_of(groups)
            _keep_embeddings_32bit(optimizer_cls, optimizer_kwargs, target)
            logger.info(summarize_groups(groups))
            if not self.llrd_args.changes_rates:
                logger.warning("layer_decay=1.0: layer-wise decay is off. Set e.g. --layer_decay 0.8.")
            self._llrd_attach(target, layer_map, groups)
        elif self.llrd_layout is None:
            self._llrd_adopt(self.llrd_module(self.model if model is None else model))
        return super().create_optimizer(model)  # the optimizer exists: Trainer only applies its wrappers

    def _llrd_adopt(self, target: nn.Module) -> None:
        """An optimizer passed in: if ``llrd.create_optimizer`` built it, run the stages on its groups too."""
        from .engines import innermost_optimizer

        groups = getattr(innermost_optimizer(self.optimizer), "param_groups", None)
        if groups is None:  # DeepSpeed's DummyOptim (a config `optimizer` section): the launch check reports it
            return
        if all("param_names" in g and "lr_scale" in g for g in groups):
            layer_map = self.llrd_layer_map(target)
            self.llrd_layout = layout_of(groups)
            self._llrd_attach(target, layer_map, groups)
            return
        settings = self.llrd_args
        controls = [name for name, on in (("adaptive_lr", settings.adaptive_lr),
                    ("gradual_unfreeze_every", settings.gradual_unfreeze_every > 0)) if on]  # fmt: skip
        if controls:
            raise ValueError(
                f"{' and '.join(controls)} need LLRD's per-depth param groups, and the optimizer passed in has none. "
                "Build it with llrd.create_optimizer(model, ...) or let the trainer build it."
            )
        if settings.layer_stats != "none":
            logger.warning(
                "the optimizer passed in has no LLRD param groups (build it with llrd.create_optimizer), so "
                "layer_stats=%r cannot log per depth: off for this run.",
                settings.layer_stats,
            )

    def _llrd_attach(self, target: nn.Module, layer_map: LayerMap, groups: list[dict[str, Any]]) -> None:
        """(Re)attach this run's stages, in order: each sees the gradients and rates the previous one left."""
        if self._llrd_driver is not None:
            self.remove_callback(self._llrd_driver)
        settings, several = self.llrd_args, len(layer_map.stacks) > 1
        key_of = {name: depth_key(info.stack, info.depth, several) for name, info in layer_map.params.items()}

        def group_key(group: dict) -> str:
            return depth_key(group["stack"], group["layer_id"], several)

        stages: list[Any] = []
        if settings.gradual_unfreeze_every > 0:
            names = {n for g in groups for n in g["param_names"]}
            stages.append(
                GradualUnfreezer(
                    layer_map,
                    settings.gradual_unfreeze_every,
                    settings.gradual_unfreeze_unit,
                    settings.gradual_unfreeze_depths,
                    names,
                    target,
                )
            )
        self._llrd_adaptive = AdaptiveLayerLR(group_key) if settings.adaptive_lr else None
        if self._llrd_adaptive is not None:
            stages.append(self._llrd_adaptive)
        if settings.layer_stats != "none":
            stages.append(LayerMonitor(settings.layer_stats))
        self._llrd_driver = StepDriver(stages, key_of, group_key) if stages else None
        if self._llrd_driver is not None:
            self.add_callback(self._llrd_driver)

    def _clip_grad_norm(self, model):
        """Trainer's clipping, after the stages' ``before_clip`` (frozen depths leave the clip norm)."""
        if self._llrd_driver is not None:
            self._llrd_driver.before_clip()
        return super()._clip_grad_norm(model)

    def _get_grad_norm(self, model, grad_norm=None):
        """Without clipping, Trainer still takes the norm it logs here: after ``before_clip`` too, so the logged
        norm leaves frozen depths out whether or not clipping is on."""
        if grad_norm is None and self._llrd_driver is not None:
            self._llrd_driver.before_clip()
        return super()._get_grad_norm(model, grad_norm)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        """Before Trainer loads optimizer/scheduler state, check the checkpoint's group layout is ours."""
        check_resume(checkpoint if self.optimizer is not None else None, self.llrd_layout)
        super()._load_optimizer_and_scheduler(checkpoint)

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """Trainer's logging, plus the per-depth statistics of this logging step (training logs only)."""
        if "loss" in logs and self._llrd_driver is not None:
            for stage in self._llrd_driver.stages:
                if hasattr(stage, "pop"):
                    logs = {**logs, **stage.pop()}
        super().log(logs, *args, **kwargs)


class LLRDTrainer(LLRDMixin, Trainer):
    """Drop-in ``Trainer`` that trains each transformer block at its own learning rate.

    Takes the same arguments as ``Trainer``. ``args`` may be :class:`llrd.LLRDTrainingArguments` or any
    ``TrainingArguments``; LLRD settings can also be given as keywords or as ``llrd_args=``. ``args.optim`` keeps
    working (AdamW, fused AdamW, Adafactor, SGD, 8-bit, ...): only the param groups change.

    Example:
        >>> args = TrainingArguments("out", learning_rate=1e-4)
        >>> trainer = LLRDTrainer(model=model, args=args, train_dataset=ds, layer_decay=0.8)  # doctest: +SKIP
        >>> trainer.train()  # doctest: +SKIP
    """


def _with_overrides(args: tuple, kwargs: dict, overrides: dict[str, Any]) -> tuple[tuple, dict, Any]:
    """The trainer's ``args`` argument, as a copy with LLRD keyword overrides when it holds LLRD settings."""
    positional = len(args) > 1
    given = args[1] if positional else kwargs.get("args")
    if isinstance(given, LLRDArguments) and overrides:
        given = dataclasses.replace(given, **overrides)  # same class, validated again; the caller's is untouched
        if positional:
            args = (args[0], given, *args[2:])
        else:
            kwargs = {**kwargs, "args": given}
    return args, kwargs, given


def _is_sentence_transformers(trainer: Any) -> bool:
    return any(c.__module__.startswith("sentence_transformers.") for c in type(trainer).__mro__)


def _keep_embeddings_32bit(optimizer_cls, kwargs: dict[str, Any], model: torch.nn.Module) -> None:
    """Trainer's rule for bitsandbytes 8-bit optimizers: embeddings keep 32-bit optimizer state."""
    if "bitsandbytes" not in str(optimizer_cls) or kwargs.get("optim_bits") != 8:
        return
    import bitsandbytes

    manager = bitsandbytes.optim.GlobalOptimManager.get_instance()
    for module in model.modules():
        if isinstance(module, torch.nn.Embedding):
            manager.register_module_override(module, "weight", {"optim_bits": 32})

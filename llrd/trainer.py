"""``LLRDMixin``: per-layer learning rates for any ``transformers.Trainer`` subclass; ``LLRDTrainer`` = mixin + Trainer.

With every LLRD setting at its default the mixin does nothing: the trainer is ``Trainer`` (no block discovery,
no callbacks, no log keys, no checkpoint files, Trainer's groups). With LLRD on (:attr:`LLRDArguments.active`)
it changes these things and leaves the rest of the trainer alone:

* ``create_optimizer`` hands :func:`llrd.param_groups` to ``Trainer.create_optimizer`` (Trainer's own path:
  ``args.optim``, its wrappers, bitsandbytes' 32-bit embeddings); it never changes the model;
* when training starts (after ``model_init``, before any checkpoint is loaded) it applies the model changes
  once: re-initialising the top blocks (never on resume) and freezing depths below a scale;
* each checkpoint gets ``llrd_layout.json``, a resume checks it, and after the first step a launch check
  verifies that the rates survived the launch;
* the step-time stages (gradual unfreezing, adaptive rates, per-depth logging) run through
  :class:`llrd.engines.StepDriver`.
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
import weakref
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import Trainer
from transformers.trainer_utils import get_last_checkpoint, unwrap_peft_model

from .args import LLRDArguments, check_distributed_setup, llrd_field_names
from .controls import AdaptiveLayerLR, GradualUnfreezer, freeze_below_scale, reinit_top_blocks
from .discovery import LayerMap, layer_ids
from .engines import StepDriver
from .groups import param_groups, split_by_mesh, summarize_groups
from .internals import check as check_internals
from .launch_check import RateCheck
from .loss_scaling import loss_uses_num_items
from .manifest import LAYOUT_FILE, LayoutSaver, check_layout, layout_of, read_layout, resume_layer_map
from .monitor import LayerMonitor, depth_key, quiet_console
from .optim import apply_rate_mapping, check_optimizer

__all__ = ["LLRDMixin", "LLRDTrainer"]

logger = logging.getLogger(__name__)

#: The release that removes LLRD settings passed as bare trainer keywords.
KEYWORDS_REMOVED_IN = "0.3.0"


class LLRDMixin:
    """Per-layer learning rates for any ``Trainer`` subclass: ``class MyTrainer(LLRDMixin, SFTTrainer)``.

    LLRD settings come from ``args`` when it is an :class:`llrd.LLRDTrainingArguments` (what ``LLRDTrainer``,
    the recipes, the sweep and hyperparameter search use), or as ``llrd_args=LLRDArguments(...)`` for a
    subclass with its own arguments class (parse it with ``HfArgumentParser((SFTConfig, LLRDArguments))``).
    The subclass's own ``args`` class is never converted. The settings in use are ``trainer.llrd_args``.
    Bare keywords (``layer_decay=0.8``) still work, with a ``FutureWarning``: they go in llrd 0.3.0.

    Example:
        >>> class LLRDSeq2SeqTrainer(LLRDMixin, Seq2SeqTrainer):
        ...     pass
        >>> trainer = LLRDSeq2SeqTrainer(model=model, args=seq2seq_args, train_dataset=ds,
        ...                              llrd_args=LLRDArguments(layer_decay=0.8))
    """

    llrd_args: LLRDArguments

    def __init__(self, *args: Any, llrd_args: LLRDArguments | None = None, **kwargs: Any):
        check_internals("transformers", "accelerate", "torch")  # one line naming the version if one is gone
        names = set(llrd_field_names())
        overrides = {k: kwargs.pop(k) for k in list(kwargs) if k in names}
        if overrides:
            listed = ", ".join(f"{k}={v!r}" for k, v in overrides.items())
            warnings.warn(
                f"LLRD settings as trainer keywords ({listed}) are deprecated and removed in llrd "
                f"{KEYWORDS_REMOVED_IN}: pass args=LLRDTrainingArguments(..., {listed}) or "
                f"llrd_args=LLRDArguments({listed}).",
                FutureWarning,
                stacklevel=2,
            )
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
        self._llrd_resume_from: str | None = None
        self._llrd_callbacks: list[Any] = []
        self._llrd_hp_space: Any = None
        self._llrd_reinitialised: weakref.WeakSet[nn.Module] = weakref.WeakSet()  # models re-initialised once
        super().__init__(*args, **kwargs)
        if isinstance(self.args, LLRDArguments):
            self.llrd_args = self.args
        if self.llrd_args.changes_rates:
            check_distributed_setup(self.args)
        for idle in self.llrd_args.idle_settings():
            logger.warning("LLRD setting %s has no effect on its own: this trainer runs as Trainer there.", idle)
        self._llrd_check_loss_scaling()

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

    def _llrd_check_loss_scaling(self) -> None:
        """Trainer's ``num_items_in_batch`` loss path, for a head that takes a plain mean of its loss: warn with
        the factor by which gradients and logged losses come out too large, or apply the opt-in fix."""
        if self.model is None or not self.model_accepts_loss_kwargs or self.compute_loss_func is not None:
            return
        if self.label_smoother is not None or getattr(self, "loss_is_scaled_for_ga", None) is not None:
            return  # Trainer's label smoother normalises by num_items_in_batch; the subclass said how it scales
        processes = self.accelerator.num_processes if self.args.average_tokens_across_devices else 1
        factor = self.args.gradient_accumulation_steps * processes
        fix = self.llrd_args.fix_loss_scaling
        if factor == 1 and not fix:
            return
        inner = unwrap_peft_model(self.accelerator.unwrap_model(self.model))  # what Trainer itself inspects
        if loss_uses_num_items(inner) is not False:
            return
        if fix:
            self.model_accepts_loss_kwargs = False  # Trainer's own switch: it divides by the GA steps again
            logger.info(
                "fix_loss_scaling=True: %s averages its own loss, so Trainer divides it by the gradient-accumulation "
                "steps and no longer multiplies it by the processes.",
                type(inner).__name__,
            )
        elif self.args.process_index == 0:
            logger.warning(
                "%s averages its own loss and ignores num_items_in_batch, but its forward takes **kwargs: Trainer "
                "neither divides its loss by gradient_accumulation_steps=%d nor averages it over %d process(es), so "
                "gradients and logged losses are %dx too large. Pass %s to scale it as for any other head.",
                type(inner).__name__,
                self.args.gradient_accumulation_steps,
                processes,
                factor,
                "fix_loss_scaling=True (--fix_loss_scaling)"
                if isinstance(self.args, LLRDArguments)
                else "llrd_args=LLRDArguments(fix_loss_scaling=True)",  # a mixin subclass's own args class
            )

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
        checkpoint = resume_from_checkpoint
        if checkpoint is True:
            checkpoint = get_last_checkpoint(self.args.output_dir)  # None: Trainer raises its own error
        self._llrd_resume_from = str(checkpoint) if self._llrd_resuming and checkpoint else None
        self._llrd_resume_layout = read_layout(self._llrd_resume_from) if self._llrd_resume_from else None
        try:
            if self.model_init is None:  # else the model is made in call_model_init, prepared there
                self._llrd_start(self.model)
            if self.optimizer is not None and self.llrd_layout is not None:
                self._llrd_check_resume()  # an optimizer built before train(): check it now
            return super().train(resume_from_checkpoint, *args, **kwargs)
        finally:
            self._llrd_resume_from = None

    def call_model_init(self, trial: Any = None) -> nn.Module:
        """Trainer's ``model_init`` call; in ``train`` (not at construction) then this trial's LLRD settings and
        the model changes, which Trainer reaches after ``model_init`` and before loading a checkpoint."""
        model = super().call_model_init(trial)
        if getattr(self, "is_in_train", False):
            params = self._llrd_trial_params(trial)
            if params:
                validated = self.llrd_args.with_llrd(**params)
                for key in params:
                    setattr(self.llrd_args, key, getattr(validated, key))
                logger.info("LLRD settings of this trial: %s", params)
            self._llrd_start(model)
        return model

    def hyperparameter_search(self, hp_space: Any = None, *args: Any, **kwargs: Any):
        """Trainer's search; keys of the hp space may be LLRD settings. Afterwards the LLRD settings are the
        trainer's own again (not the last trial's): apply the best ones with ``trainer.llrd_args``."""
        saved = self.llrd_args.llrd_dict()
        self._llrd_hp_space = hp_space
        if hp_space is not None and self.llrd_args is not self.args:
            hp_space = _without_llrd_keys(hp_space)  # Trainer sets each key on args, which has no LLRD field
        try:
            return super().hyperparameter_search(hp_space, *args, **kwargs)
        finally:
            self._llrd_hp_space = None
            for key, value in saved.items():
                setattr(self.llrd_args, key, value)

    def _llrd_trial_params(self, trial) -> dict[str, Any]:
        space = getattr(self, "_llrd_hp_space", None)
        if getattr(self, "hp_search_backend", None) is None or trial is None or space is None:
            return {}
        values = space(trial) if not isinstance(trial, dict) else trial
        names = set(llrd_field_names())
        params = {}
        for key, value in values.items():
            if key in names:
                old = getattr(self.llrd_args, key)
                params[key] = type(old)(value) if old is not None else value
        return params

    def _llrd_start(self, model: nn.Module | None) -> None:
        """At the start of a run: LLRD's callbacks when on (none when off), then the model changes."""
        for callback in self._llrd_callbacks:
            self.remove_callback(callback)
        self._llrd_callbacks = []
        self._llrd_map_cache = None
        if not self.llrd_args.active:
            if self._llrd_driver is not None:  # an earlier trial had LLRD on
                self.remove_callback(self._llrd_driver)
            self._llrd_driver = self._llrd_adaptive = self.llrd_layout = None
            return
        check = self.llrd_args.verify_rates and self.llrd_args.changes_rates  # only per-layer rates to verify
        self._llrd_callbacks = [LayoutSaver()] + ([RateCheck(self)] if check else [])
        for callback in self._llrd_callbacks:
            self.add_callback(callback)
        if model is not None:
            self._llrd_prepare_model(model)

    def _llrd_prepare_model(self, model: nn.Module) -> None:
        """Re-initialise (once, never on resume) and freeze below the scale, before the optimizer exists."""
        target = self.llrd_module(model)
        layer_map = self.llrd_layer_map(target)
        k = self.llrd_args.reinit_top_blocks
        if k and not self._llrd_resuming and model not in self._llrd_reinitialised:
            reinit_top_blocks(target, k, layer_map, self.llrd_args.reinit_pooler)
            self._llrd_reinitialised.add(model)
        elif k and self._llrd_resuming:
            logger.info("reinit_top_blocks=%d: resuming, so the checkpoint's weights are kept", k)
        freeze_below_scale(target, layer_map, self.llrd_args.scaling())

    def _llrd_check_resume(self) -> None:
        """Resuming with LLRD on: the checkpoint's group layout must be the one built now."""
        checkpoint = self._llrd_resume_from
        if checkpoint is None or self.llrd_layout is None:
            return
        saved = read_layout(checkpoint)
        if saved is not None:
            check_layout(saved, self.llrd_layout, checkpoint)
        elif _has_optimizer_state(checkpoint):
            raise ValueError(
                f"cannot resume from {checkpoint} with LLRD on: it has no {LAYOUT_FILE}, so it was written with LLRD "
                f"off and its optimizer state holds Trainer's param groups, not these {len(self.llrd_layout)}; "
                "resume it with every LLRD setting at its default, or start a new run from its weights "
                "(model=from_pretrained(checkpoint), no resume_from_checkpoint)."
            )

    # -- the optimizer ---------------------------------------------------------------------------------
    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """Trainer's ``create_optimizer``; with LLRD on it builds the optimizer on LLRD's param groups."""
        if not self.llrd_args.active:
            return super().create_optimizer(model)
        if self.optimizer is not None:
            if self.llrd_layout is None:
                self._llrd_adopt(self.llrd_module(self.model if model is None else model))
            return super().create_optimizer(model)  # the optimizer exists: Trainer only applies its wrappers
        opt_model = self.model if model is None else model
        target = self.llrd_module(opt_model)
        own = self.optimizer_cls_and_kwargs
        optimizer_cls, optimizer_kwargs = (
            own if own is not None else self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        )
        optimizer_kwargs = dict(optimizer_kwargs)
        mapping = None
        if target is not opt_model:  # sentence-transformers: its groups over the loss module are ours now
            optimizer_kwargs.pop("optimizer_dict", None)
            mapping = getattr(self.args, "learning_rate_mapping", None)
        check_optimizer(optimizer_cls, optimizer_kwargs)
        lr = optimizer_kwargs.get("lr", self.args.learning_rate)  # the head's: Trainer's rate (its kwargs win)
        layer_map = self.llrd_layer_map(target)
        options = self.llrd_args.group_kwargs(lr, self.args.weight_decay)
        if self.is_deepspeed_enabled and self.llrd_args.changes_rates:
            options["per_depth"] = True  # ZeRO flattens each group: per-depth norms need per-depth groups
        groups = param_groups(target, layer_map=layer_map, decay_names=self.get_decay_parameter_names, **options)
        groups = split_by_mesh(apply_rate_mapping(groups, mapping, lr, layer_map))
        # Trainer's path builds the optimizer: `params` replaces its own groups (after its own mesh split);
        # defaults["lr"] stays the head's rate, as HF's min-lr schedulers divide by it.
        self.optimizer_cls_and_kwargs = (
            optimizer_cls,
            {**optimizer_kwargs, "params": groups, "lr": lr},
        )
        try:
            optimizer = super().create_optimizer(model)
        finally:
            self.optimizer_cls_and_kwargs = own
        self._llrd_built_optimizer = self.optimizer
        self.llrd_layout = layout_of(groups)
        logger.info(summarize_groups(groups))
        self._llrd_check_resume()
        self._llrd_attach(target, layer_map, groups)
        return optimizer

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
            quiet_console(self.callback_handler)  # the console keeps Trainer's line; per-depth keys go to report_to

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

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """Trainer's logging, plus the per-depth statistics of this logging step (training logs only)."""
        if "loss" in logs and self._llrd_driver is not None:
            for stage in self._llrd_driver.stages:
                if hasattr(stage, "pop"):
                    logs = {**logs, **stage.pop()}
        super().log(logs, *args, **kwargs)


class LLRDTrainer(LLRDMixin, Trainer):
    """Drop-in ``Trainer`` that trains each transformer block at its own learning rate.

    Takes the same arguments as ``Trainer``; with every LLRD setting at its default it is ``Trainer`` (any model
    ``Trainer`` trains, it trains the same way). LLRD settings are fields of :class:`llrd.LLRDTrainingArguments`
    (``--layer_decay 0.8`` on the command line). ``args.optim`` keeps working (AdamW, fused AdamW, Adafactor, SGD,
    8-bit, ...): only the param groups change.

    Example:
        >>> args = LLRDTrainingArguments("out", learning_rate=1e-4, layer_decay=0.8)  # doctest: +SKIP
        >>> trainer = LLRDTrainer(model=model, args=args, train_dataset=ds)  # doctest: +SKIP
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


def _without_llrd_keys(hp_space: Any) -> Any:
    """The hp space as Trainer should see it for a trial (optuna): without the LLRD settings. Called without a
    trial (ray, wandb read the space itself), the whole space."""
    names = set(llrd_field_names())

    def space(trial: Any) -> Any:
        values = hp_space(trial)
        return values if trial is None else {k: v for k, v in values.items() if k not in names}

    return space


def _is_sentence_transformers(trainer: Any) -> bool:
    return any(c.__module__.startswith("sentence_transformers.") for c in type(trainer).__mro__)


def _has_optimizer_state(checkpoint: str) -> bool:
    """Whether a checkpoint folder holds optimizer state (Trainer's, FSDP's or DeepSpeed's files)."""
    folder = Path(checkpoint)
    return folder.is_dir() and any(p.name.startswith(("optimizer", "global_step")) for p in folder.iterdir())

"""A check that the per-layer rates survived the launch, and that the ranks do not all train on the same data.

Config guards (:mod:`llrd.guards`) refuse what they can see in a DeepSpeed or FSDP config. Other things
collapse the rates where no guard looks: a DeepSpeed scheduler or optimizer set in code, an optimizer passed
through ``optimizers=`` or built eagerly by a Trainer subclass, a callback that rewrites ``lr``. Users of
DeepSpeed, timm and Lightning report each of these; the run trains on, at one rate, silently.

:class:`RateCheck` hooks the optimizer that really steps (below accelerate's and DeepSpeed's wrappers and
ZeRO), records the rate each group had *when it stepped*, and after the first step with non-zero rates
compares them with the layout LLRD built: every group must carry LLRD's metadata (``lr_scale``), the number of
groups must match, and ``lr / lr_scale`` must be the same for every group (the scheduler moves all rates by one
factor). Otherwise it stops training with an error naming the most likely cause. It logs one line when the check
passes, then removes its hook: it costs one read of the group dicts on the first steps.

When training starts it also compares the ``torch.distributed`` process group with the processes the trainer
shards data over (accelerate's ``num_processes``). Launching ``torchrun`` with ``TrainingArguments(deepspeed=...)``
on CPU without ``use_cpu`` gives 2 ranks to ``torch.distributed`` and 1 process to accelerate: every rank iterates
the whole dataset (twice the steps), and nothing else warns. :func:`check_data_sharding` stops such a run.
"""

from __future__ import annotations

import logging
from typing import Any

import torch.distributed as dist
from transformers import TrainerCallback

from .engines import engine_name, innermost_optimizer, zero_stage

__all__ = ["RateCheck", "RatesCollapsed", "SameDataOnEveryRank", "check_data_sharding"]

logger = logging.getLogger(__name__)

_MAX_STEPS = 20  # give up (and say so) if no step in this many had a non-zero rate


class RatesCollapsed(RuntimeError):
    """The optimizer that steps does not train at the per-layer rates LLRD built."""


class SameDataOnEveryRank(RuntimeError):
    """The process group is larger than what the trainer shards data over: ranks would train on the same data."""


def check_data_sharding(trainer: Any) -> None:
    """Stop when ``torch.distributed`` has more ranks than the processes accelerate shards the data over.

    Example:
        >>> check_data_sharding(trainer)   # doctest: +SKIP
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    world = dist.get_world_size()
    state = trainer.accelerator.state
    shards = trainer.accelerator.num_processes
    if world <= shards:
        return
    on_cpu = str(trainer.args.device).startswith("cpu")
    fix = (
        "pass use_cpu=True (--use_cpu) so that accelerate joins the process group on CPU"
        if on_cpu and not trainer.args.use_cpu
        else "launch with `accelerate launch` or `torchrun` and let accelerate set up the process group (no "
        "torch.distributed.init_process_group of your own before the trainer)"
    )
    raise SameDataOnEveryRank(
        f"torch.distributed has {world} processes but the trainer shards data over {shards} (accelerate "
        f"distributed_type={state.distributed_type.value}, device {trainer.args.device}): every rank would train on "
        f"the same batches ({world // shards}x the steps per epoch). To fix it, {fix}."
    )


class RateCheck(TrainerCallback):
    """Verifies, after the first optimizer step with non-zero rates, that the live rates are LLRD's.

    Args:
        trainer: the LLRD trainer (read: ``llrd_layout``, the built optimizer, the adaptive stage, callbacks,
            DeepSpeed config).

    Example:
        >>> trainer.add_callback(RateCheck(trainer))   # doctest: +SKIP
    """

    def __init__(self, trainer: Any):
        self.trainer = trainer
        self._hook = None
        self._seen: dict[int, tuple[dict, float]] = {}
        self._steps = 0
        self.done = False

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        check_data_sharding(self.trainer)
        self.done, self._steps, self._seen = False, 0, {}
        self._remove()
        if optimizer is not None and self.trainer.llrd_args.changes_rates:  # else there are no per-layer rates
            self._hook = innermost_optimizer(optimizer).register_step_pre_hook(self._record)

    def _record(self, optimizer, args, kwargs) -> None:
        adaptive = getattr(self.trainer, "_llrd_adaptive", None)
        for group in optimizer.param_groups:
            lr = float(group["lr"])
            if adaptive is not None and "lr_scale" in group:
                lr /= adaptive.factor_of(group)  # the adaptive factor of this step is LLRD's own, by design
            self._seen[id(group)] = (group, lr)

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        if self.done or self._hook is None:
            return
        self._steps += 1
        groups = innermost_optimizer(optimizer).param_groups
        rates = [self._seen[id(g)][1] if id(g) in self._seen else None for g in groups]
        self._seen = {}
        if any(r is None for r in rates) or all(r == 0 for r in rates):
            if self._steps >= _MAX_STEPS:
                logger.warning(
                    "LLRD rate check: no optimizer step with non-zero rates in %d steps; not verified.", _MAX_STEPS
                )
                self._finish()
            return
        self._verify(groups, rates, optimizer, state)
        self._finish()

    def _finish(self) -> None:
        self.done = True
        self._remove()

    def _remove(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def on_train_end(self, args, state, control, **kwargs):
        self._remove()

    # ----------------------------------------------------------------------------------------------
    def _verify(self, groups: list[dict], rates: list[float], optimizer: Any, state) -> None:
        engine = engine_name(optimizer)
        inner = innermost_optimizer(optimizer)
        expected = getattr(self.trainer, "llrd_layout", None)
        if not all("lr_scale" in g for g in groups):
            raise RatesCollapsed(self._foreign_optimizer(inner, len(groups), engine))
        if expected is not None and len(groups) != len(expected):
            raise RatesCollapsed(
                f"LLRD built {len(expected)} param groups but the optimizer that steps ({type(inner).__name__} under "
                f"{engine}) has {len(groups)}: groups were merged or dropped on the way. " + self._engine_hint()
            )
        scales = [g["lr_scale"] for g in groups]
        head = max(range(len(groups)), key=lambda i: scales[i])
        expected = [rates[head] * s / scales[head] for s in scales]
        off = [i for i, (r, e) in enumerate(zip(rates, expected, strict=True)) if abs(r - e) > 1e-6 * abs(e) + 1e-15]
        if off:
            if len(set(rates)) == 1:
                what = f"all {len(groups)} groups stepped at the same lr {rates[0]:.4g}"
            else:
                i = off[0]
                what = (
                    f"group {i} ({groups[i].get('group_name')}) stepped at lr {rates[i]:.4g} instead of "
                    f"{expected[i]:.4g} ({len(off)} of {len(groups)} groups are off)"
                )
            raise RatesCollapsed(
                f"after step {state.global_step} the per-layer rates are gone: {what}, though LLRD built them at "
                f"{min(scales):.4g}x..{max(scales):.4g}x the head's rate. Cause: {self._collapse_cause(rates)}"
            )
        low, high = min(rates), max(rates)
        logger.info(
            "LLRD rates verified after step %d: %d groups on %s under %s step at %.3g..%.3g, as built.",
            state.global_step,
            len(groups),
            type(inner).__name__,
            engine,
            low,
            high,
        )

    def _ds_config(self) -> dict:
        args = self.trainer.args
        config = getattr(getattr(args, "hf_deepspeed_config", None), "config", None)
        return config or {}

    def _engine_hint(self) -> str:
        config = self._ds_config()
        if "optimizer" in config:
            return "The DeepSpeed config has an 'optimizer' section: remove it so that LLRD's groups are used."
        return ""

    def _foreign_optimizer(self, inner: Any, count: int, engine: str) -> str:
        what = (
            f"the optimizer that steps ({type(inner).__name__} under {engine}, {count} group(s)) was not built by LLRD"
        )
        if "optimizer" in self._ds_config():
            cause = (
                "the DeepSpeed config has an 'optimizer' section, so DeepSpeed built its own optimizer over one flat "
                "group. Remove the section: LLRD then builds the optimizer from args.optim"
            )
        elif inner is innermost_optimizer(getattr(self.trainer, "_llrd_given_optimizer", None)):
            cause = (
                "it was passed through optimizers=(...). Build it with llrd.create_optimizer(model, ...) or let the "
                "trainer build it"
            )
        elif getattr(self.trainer, "_llrd_built_optimizer", None) is None:
            cause = (
                "it was built before LLRD's create_optimizer ran (e.g. eagerly by the trainer class, or by an "
                "optimizer factory). Let create_optimizer build it, or build it with llrd.create_optimizer"
            )
        else:
            cause = "something replaced LLRD's optimizer after it was built"
        return f"{what}: its groups carry no per-layer rates. Cause: {cause}."

    def _collapse_cause(self, rates: list[float]) -> str:
        trainer = self.trainer
        engine_scheduler = getattr(getattr(trainer, "model_wrapped", None), "lr_scheduler", None)
        if zero_stage(trainer.optimizer) is not None or engine_scheduler is not None:
            if engine_scheduler is not None or "scheduler" in self._ds_config():
                return (
                    f"a DeepSpeed scheduler ({type(engine_scheduler).__name__}) writes its rates into every group. "
                    "Remove the DeepSpeed 'scheduler' section (or the scheduler passed in code): Trainer's scheduler "
                    "keeps each group's rate."
                )
        scheduler = getattr(trainer, "lr_scheduler", None)
        scales = [g.get("lr_scale") for g in innermost_optimizer(trainer.optimizer).param_groups]
        base = getattr(scheduler, "base_lrs", None)
        if base is not None and len(set(round(b, 12) for b in base)) == 1 and len(set(scales)) > 1:
            return (
                f"the learning-rate scheduler ({type(scheduler).__name__}) has one base rate for every group; it was "
                "built before LLRD's groups or rewrote them. Let the trainer create the scheduler after the optimizer."
            )
        extra = [
            type(c).__name__
            for c in trainer.callback_handler.callbacks
            if type(c).__module__.split(".")[0] not in ("transformers", "llrd")
        ]
        hint = f" (callbacks not from transformers or llrd: {', '.join(extra)})" if extra else ""
        return (
            "something rewrote the group rates between the scheduler and the optimizer step, most likely a callback"
            f"{hint}. Scale rates instead of overwriting them (multiply each group's lr by one factor)."
        )

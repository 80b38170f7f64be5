"""Every outside internal llrd still uses, in one place, with the versions it is tested with and a loud check.

Public APIs are not listed. Each entry below is something a minor release of transformers, accelerate, DeepSpeed
or torch may rename or remove without notice; :func:`check` looks each one up and fails in one line naming the
installed version, the tested ones and what to install, instead of an ``AttributeError`` deep inside a step.

* ``check("transformers", "accelerate", "torch")`` runs when an LLRD trainer is built (a few ``getattr``).
* DeepSpeed is checked when llrd is about to read ZeRO's partitions (opt-in per-depth statistics, adaptive
  rates, gradual unfreezing under ZeRO; see :mod:`llrd.engines`): :func:`check_deepspeed` refuses a version
  outside ``DEEPSPEED_RANGE`` and :func:`check_zero_optimizer` the live ZeRO optimizer missing an attribute.
* The default path (``layer_stats="lr"``) only follows the wrappers' ``optimizer`` attribute (accelerate's
  ``AcceleratedOptimizer``, DeepSpeed's ZeRO optimizer) down to the torch optimizer, to register a public
  ``register_step_pre_hook``; nothing else of an engine is read.

Example:
    >>> from llrd.internals import check
    >>> check("transformers")   # silent when every listed internal is there
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = [
    "DEEPSPEED_RANGE",
    "INTERNALS",
    "TESTED",
    "Internal",
    "UnsupportedVersion",
    "ZERO_ATTRIBUTES",
    "check",
    "check_deepspeed",
    "check_zero_optimizer",
    "locate",
]

logger = logging.getLogger(__name__)

#: The versions CI runs (.ci/run: the main venv, and the oldest transformers pyproject.toml declares).
TESTED = {
    "transformers": "5.20.0 and 5.25.0",
    "accelerate": "1.16.0",
    "torch": "2.13.0",
    "deepspeed": "0.19.8",
}
#: DeepSpeed versions whose ZeRO internals llrd reads (pyproject.toml's test extra pins the same range).
DEEPSPEED_RANGE = (">=0.19.8", "<0.20")
_INSTALL = {
    "transformers": "transformers>=5.20,<6",
    "accelerate": "accelerate>=1.10,<2",
    "torch": "torch==2.13.0",
    "deepspeed": "deepspeed>=0.19.8,<0.20",
}


class UnsupportedVersion(RuntimeError):
    """An outside internal llrd relies on is missing, or DeepSpeed is outside the tested range."""


@dataclass(frozen=True)
class Internal:
    """One outside internal: ``path`` is ``module.Attr.attr`` (the longest importable prefix is the module)."""

    package: str
    path: str
    used_in: str
    why: str
    #: for a behaviour rather than a name: called with the located object, True when it still behaves so
    probe: Callable[[Any], bool] | None = None
    #: the name ``used_in`` uses, when it is not the last part of ``path``
    token: str | None = None

    @property
    def used_name(self) -> str:
        return self.token or self.path.rsplit(".", 1)[-1]


def _source_has(function: Any, text: str) -> bool:
    """Whether the source of ``function`` contains ``text``. A wrapper from outside the package (a test's spy, a
    user's patch) is not judged: its wrapped code is what runs, and it cannot be read reliably."""
    import inspect

    function = inspect.unwrap(function)
    package = getattr(function, "__module__", "") or ""
    if package.split(".")[0] not in TESTED:
        return True
    try:
        return text in inspect.getsource(function)
    except (OSError, TypeError):
        return False


def _sets(cls: Any, method: str, attribute: str) -> bool:
    """Whether ``cls.method`` assigns ``self.attribute``."""
    return isinstance(cls, type) and _source_has(getattr(cls, method), f"self.{attribute} =")


def _skips_initialized(normal_: Any) -> bool:
    """transformers' init functions leave tensors marked ``_is_hf_initialized`` alone (controls.py unmarks them)."""
    import torch

    tensor = torch.zeros(4)
    tensor._is_hf_initialized = True
    normal_(tensor)
    return bool((tensor == 0).all())


INTERNALS: tuple[Internal, ...] = (
    # transformers: private Trainer methods llrd overrides (each calls super() first or last)
    Internal("transformers", "transformers.Trainer._clip_grad_norm", "llrd/trainer.py",
             "frozen depths leave the clip norm (gradual unfreezing)"),
    Internal("transformers", "transformers.Trainer._get_grad_norm", "llrd/trainer.py",
             "the logged norm leaves frozen depths out without clipping"),
    # transformers: undocumented methods, attributes and behaviours the adapter relies on
    Internal("transformers", "transformers.Trainer.call_model_init", "llrd/trainer.py",
             "a trial's LLRD settings and the model changes, right after model_init"),
    Internal("transformers", "transformers.Trainer.train", "llrd/trainer.py",
             "Trainer.train sets is_in_train, which tells call_model_init in train from the one at construction",
             probe=lambda train: _source_has(train, "self.is_in_train = True"), token="is_in_train"),
    Internal("transformers", "transformers.trainer.Trainer", "llrd/trainer.py",
             "Trainer's switch model_accepts_loss_kwargs (set in __init__), which fix_loss_scaling turns off",
             probe=lambda cls: _sets(cls, "__init__", "model_accepts_loss_kwargs"), token="model_accepts_loss_kwargs"),
    Internal("transformers", "transformers.training_args.TrainingArguments", "llrd/launch_check.py",
             "args.hf_deepspeed_config (set in __post_init__), read to name a DeepSpeed config section in errors",
             probe=lambda cls: _sets(cls, "__post_init__", "hf_deepspeed_config"), token="hf_deepspeed_config"),
    Internal("transformers", "transformers.Trainer.create_optimizer", "llrd/trainer.py",
             "optimizer_kwargs['params'] replaces Trainer's own groups (LLRD's groups go through Trainer's path)",
             probe=lambda create: _source_has(create, 'optimizer_kwargs.pop("params")'), token="params"),
    # transformers: other private or undocumented names
    Internal("transformers", "transformers.Trainer.get_decay_parameter_names", "llrd/groups.py",
             "called unbound (self=None) for Trainer's weight-decay rule outside a trainer"),
    Internal("transformers", "transformers.TrainingArguments._VALID_DICT_FIELDS", "llrd/args.py",
             "dict settings given as JSON on the command line"),
    Internal("transformers", "transformers.modeling_utils.local_torch_dtype", "llrd/flow.py",
             "the meta-device twin is built in bfloat16"),
    Internal("transformers", "transformers.trainer_optimizer.is_optimizer_factory", "llrd/optim.py",
             "optimizer factories are refused"),
    Internal("transformers", "transformers.PreTrainedModel._init_weights", "llrd/controls.py",
             "reinit_top_blocks uses the model's own init"),
    Internal("transformers", "transformers.initialization.normal_", "llrd/controls.py",
             "the _is_hf_initialized flag, which reinit_top_blocks clears so that the init runs",
             probe=_skips_initialized, token="_is_hf_initialized"),
    Internal("transformers", "transformers.trainer_utils.unwrap_peft_model", "llrd/trainer.py",
             "the model Trainer itself inspects for its loss kwargs"),
    Internal("transformers", "transformers.models.auto.configuration_auto.CONFIG_MAPPING", "llrd/inspect.py",
             "llrd inspect builds a model from a model type"),
    Internal("transformers", "transformers.modeling_layers.GradientCheckpointingLayer", "llrd/blocks.py",
             "a block candidate the model itself marks"),
    # accelerate
    Internal("accelerate", "accelerate.utils.deepspeed.DeepSpeedOptimizerWrapper", "llrd/engines.py",
             "DeepSpeed without a ZeRO optimizer is recognised by this wrapper's name"),
    # torch: private fused kernels
    Internal("torch", "torch._foreach_norm", "llrd/engines.py", "one fused norm per depth (opt-in statistics)"),
    Internal("torch", "torch._foreach_sub", "llrd/monitor.py", "the update ratio of layer_stats='all'"),
    # DeepSpeed: module-level names (the ZeRO optimizer's attributes are in ZERO_ATTRIBUTES)
    Internal("deepspeed", "deepspeed.zero.GatheredParameters", "llrd/controls.py",
             "reinit_top_blocks writes ZeRO-3 partitioned weights"),
)  # fmt: skip

#: Attributes of DeepSpeed's live ZeRO optimizer that llrd reads (engines.py), per stage; checked on the object.
ZERO_ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "all": ("optimizer", "step", "averaged_gradients", "loss_scale", "clip_grad", "dp_process_group"),
    "1/2": ("single_partition_of_fp32_groups", "partition_gradients", "cpu_offload"),
    "3": ("fp32_partitioned_groups_flat", "sub_group_to_group_id", "fp16_partitioned_groups", "groups_padding",
          "offload_optimizer"),
}  # fmt: skip


def _version(package: str) -> str:
    try:
        return str(importlib.import_module(package).__version__)
    except Exception:  # noqa: BLE001 - a package without a version is reported as such
        return "(unknown version)"


def locate(path: str) -> Any:
    """The object at ``path`` (``module.Class.attr``); ``AttributeError``/``ImportError`` if it is gone.

    Example:
        >>> locate("torch._foreach_norm")   # doctest: +SKIP
    """
    parts = path.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for name in parts[cut:]:
            obj = getattr(obj, name)
        return obj
    raise ImportError(f"no module in {path!r}")


def _missing_line(package: str, what: str, where: str) -> str:
    return (
        f"llrd needs {what} ({where}), which {package} {_version(package)} does not have: llrd is tested with "
        f"{package} {TESTED[package]}. Install a tested version: pip install '{_INSTALL[package]}'."
    )


def check(*packages: str) -> None:
    """Look up every listed internal of these packages (all four when none is named); raise in one line.

    Example:
        >>> check("transformers", "accelerate", "torch")
    """
    wanted = packages or tuple(TESTED)
    for internal in INTERNALS:
        if internal.package not in wanted:
            continue
        where = f"{internal.used_in}: {internal.why}"
        try:
            found = locate(internal.path)
        except (AttributeError, ImportError) as err:
            raise UnsupportedVersion(_missing_line(internal.package, internal.path, where)) from err
        if internal.probe is not None and not internal.probe(found):
            raise UnsupportedVersion(_missing_line(internal.package, f"{internal.path} as it behaved", where))


def _in_range(version: str) -> bool:
    from packaging.version import Version

    low, high = (Version(bound.lstrip("<>=")) for bound in DEEPSPEED_RANGE)
    return low <= Version(version.split("+")[0]) < high


def check_deepspeed() -> None:
    """Refuse a DeepSpeed outside ``DEEPSPEED_RANGE`` before llrd reads ZeRO's internals, in one line.

    Example:
        >>> check_deepspeed()   # doctest: +SKIP
    """
    version = _version("deepspeed")
    try:
        ok = _in_range(version)
    except Exception:  # noqa: BLE001 - an unparsable version is outside the range
        ok = False
    if not ok:
        raise UnsupportedVersion(
            f"deepspeed {version} is outside the range whose ZeRO internals llrd reads for per-depth statistics, "
            f"adaptive rates and gradual unfreezing ({','.join(DEEPSPEED_RANGE)}; tested {TESTED['deepspeed']}). "
            f"Install pip install '{_INSTALL['deepspeed']}', or train with layer_stats='lr' (the default) and "
            "without adaptive_lr / gradual_unfreeze_every, which read no ZeRO internal."
        )
    check("deepspeed")


def check_zero_optimizer(zero: Any, stage: int) -> None:
    """The live ZeRO optimizer has every attribute llrd reads at this stage; else one line naming the version.

    Example:
        >>> check_zero_optimizer(zero, 2)   # doctest: +SKIP
    """
    names = ZERO_ATTRIBUTES["all"] + ZERO_ATTRIBUTES["3" if stage == 3 else "1/2"]
    missing = [name for name in names if not hasattr(zero, name)]
    if missing:
        what = f"{type(zero).__name__}.{missing[0]}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
        raise UnsupportedVersion(_missing_line("deepspeed", what, f"llrd/engines.py: ZeRO-{stage} partitions"))

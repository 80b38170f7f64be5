"""Refuse distributed set-ups that would silently merge or flatten the per-layer param groups."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["check_deepspeed_config", "check_fsdp", "check_launch_environment"]


def _load(config: str | os.PathLike | Mapping[str, Any] | None) -> Mapping[str, Any] | None:
    if config is None or isinstance(config, Mapping):
        return config
    path = Path(config)
    if not path.is_file():
        return None  # TrainingArguments reports a missing file itself
    if path.suffix in (".yaml", ".yml"):
        import yaml

        return yaml.safe_load(path.read_text())
    return json.loads(path.read_text())


def check_deepspeed_config(config: str | os.PathLike | Mapping[str, Any] | None, setting: str = "deepspeed") -> None:
    """Raise if a DeepSpeed config defines its own optimizer or scheduler.

    Trainer then hands DeepSpeed one flat group (all parameters at one lr), and DeepSpeed's schedulers write
    one absolute lr into every group: either way the per-layer rates are lost.

    Example:
        >>> check_deepspeed_config({"zero_optimization": {"stage": 2}})   # fine: no optimizer/scheduler
    """
    loaded = _load(config)
    if not loaded:
        return
    own = [key for key in ("optimizer", "scheduler") if key in loaded]
    if own:
        raise ValueError(
            f"{setting}: the DeepSpeed config defines {' and '.join(repr(k) for k in own)}, which would merge all "
            "layer-wise param groups into one (or overwrite their rates). Remove those sections: LLRDTrainer then "
            "builds the optimizer from args.optim and Trainer's scheduler keeps the per-layer ratios."
        )


def check_fsdp(version: Any, use_orig_params: Any, setting: str = "fsdp_config") -> None:
    """Raise for FSDP1 without ``use_orig_params``: its flat parameters mix layers, so no per-layer rate.

    Example:
        >>> check_fsdp(2, None)   # FSDP2 always keeps the original parameters
    """
    if str(version) != "1":
        return
    if str(use_orig_params).lower() not in ("true", "1"):
        raise ValueError(
            f"{setting}: FSDP1 with use_orig_params={use_orig_params!r} flattens each wrapped unit into one "
            "parameter, so layers cannot have their own learning rate. Set `fsdp_version: 2` (recommended) or "
            "`fsdp_use_orig_params: true`."
        )


def check_launch_environment(environ: Mapping[str, str] | None = None) -> None:
    """Apply both checks to what ``accelerate launch`` put in the environment."""
    env = os.environ if environ is None else environ
    if env.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        check_deepspeed_config(env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE"), "accelerate deepspeed_config_file")
    if env.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        # accelerate's own defaults when the variables are unset: version 1, use_orig_params false in code
        check_fsdp(env.get("FSDP_VERSION", "1"), env.get("FSDP_USE_ORIG_PARAMS", "false"), "accelerate fsdp config")

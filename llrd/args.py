"""``LLRDTrainingArguments``: ``TrainingArguments`` plus the layer-wise decay settings."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from transformers import TrainingArguments

from .groups import check_layer_decay
from .guards import check_deepspeed_config, check_fsdp, check_launch_environment

__all__ = ["LLRDTrainingArguments"]


@dataclass
class LLRDTrainingArguments(TrainingArguments):
    """``TrainingArguments`` with layer-wise learning-rate decay.

    Every field is a CLI flag through ``HfArgumentParser`` (``--layer_decay 0.8``) and is saved with the
    other arguments.

    Example:
        >>> args = LLRDTrainingArguments(output_dir="out", learning_rate=1e-4, layer_decay=0.8)
        >>> args.layer_decay
        0.8
    """

    _VALID_DICT_FIELDS = TrainingArguments._VALID_DICT_FIELDS + ["depth_overrides"]

    layer_decay: float = field(
        default=1.0,
        metadata={
            "help": "Layer-wise learning-rate decay in (0, 1]: a parameter at depth d of a stack of L blocks trains "
            "at learning_rate * layer_decay ** (L + 1 - d) (head: learning_rate; embeddings: the smallest). "
            "Typical: 0.8-0.9 for BERT-base, 0.65-0.75 for ViT-B. 1.0 turns LLRD off (plain Trainer groups)."
        },
    )
    block_pattern: str | None = field(
        default=None,
        metadata={
            "help": "Regex that fully matches the module paths of the transformer blocks (e.g. "
            "'encoder\\.layers\\.\\d+'), overriding automatic block discovery. Must match at least one module."
        },
    )
    depth_overrides: dict | str | None = field(
        default=None,
        metadata={
            "help": "JSON dict {regex: depth} forcing the depth of parameters whose clean name contains a match "
            "(re.search); depth is an int, 'stem' or 'head'. Every regex must match a parameter. "
            'Example: \'{"^pooler\\\\.": "head"}\'.'
        },
    )

    layer_stats: str = field(
        default="all",
        metadata={
            "help": "Per-depth logging on every logging step: 'all' (learning rate, gradient norm and "
            "update-to-weight ratio), 'lr' (learning rates only) or 'none'.",
            "choices": ["none", "lr", "all"],
        },
    )

    def __post_init__(self):
        self.layer_decay = check_layer_decay(self.layer_decay, "layer_decay")
        if self.layer_stats not in ("none", "lr", "all"):
            raise ValueError(f"layer_stats={self.layer_stats!r}: use 'none', 'lr' or 'all'.")
        if self.block_pattern is not None:
            try:
                re.compile(self.block_pattern)
            except re.error as err:
                raise ValueError(f"block_pattern={self.block_pattern!r} is not a valid regex: {err}") from err
        if self.layer_decay != 1.0:
            self._check_distributed_setup()
        super().__post_init__()
        if self.depth_overrides is not None and not isinstance(self.depth_overrides, dict):
            raise ValueError(
                f"depth_overrides={self.depth_overrides!r} is not a dict; pass a JSON object such as "
                '\'{"classifier\\\\.": "head"}\'.'
            )

    def _check_distributed_setup(self) -> None:
        """DeepSpeed optimizer/scheduler sections and FSDP1 flat params would silently drop per-layer rates."""
        check_launch_environment()
        check_deepspeed_config(self.deepspeed, "deepspeed")
        fsdp_config = self.fsdp_config
        if isinstance(fsdp_config, str) and fsdp_config.startswith("{"):
            fsdp_config = json.loads(fsdp_config)
        if self.fsdp and isinstance(fsdp_config, dict):
            version = fsdp_config.get("version", fsdp_config.get("fsdp_version", 2))
            check_fsdp(version, fsdp_config.get("use_orig_params", "true"), "fsdp_config")

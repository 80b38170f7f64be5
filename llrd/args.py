"""The LLRD settings, as a dataclass of their own and as ``TrainingArguments`` fields.

* :class:`LLRDArguments` holds only the layer-wise settings. Parse it beside any arguments class
  (``HfArgumentParser((SFTConfig, LLRDArguments))``) and hand it to an :class:`llrd.LLRDMixin` trainer as
  ``llrd_args=``; the trainer's own ``args`` stay untouched.
* :class:`LLRDTrainingArguments` is ``TrainingArguments`` with the same fields, for plain ``Trainer`` users and
  the recipes (``--layer_decay 0.8`` next to ``--learning_rate``).
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from typing import Any

from transformers import TrainingArguments

from .guards import check_deepspeed_config, check_fsdp, check_launch_environment
from .loraplus import check_loraplus
from .monitor import LAYER_STATS_CHOICES
from .scaling import Scaling, check_layer_decay

__all__ = ["LLRDArguments", "LLRDTrainingArguments", "llrd_field_names"]

_DICT_FIELDS = ("depth_overrides", "stack_decay", "lr_multipliers")


@dataclass
class LLRDArguments:
    """Layer-wise learning-rate decay settings, independent of any ``TrainingArguments`` class.

    Every field is a CLI flag through ``HfArgumentParser`` (``--layer_decay 0.8``); dict fields take JSON.

    Example:
        >>> LLRDArguments(layer_decay=0.8).layer_decay
        0.8
    """

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
    depth_source: str = field(
        default="flow",
        metadata={
            "help": "Where depths come from: 'flow' (default: the order in which one forward pass, traced on the meta "
            "device, first uses each module) or 'structure' (the module tree, llrd 0.1's rule: resume checkpoints "
            "written by llrd 0.1 with it).",
            "choices": ["flow", "structure"],
        },
    )
    layer_stats: str = field(
        default="lr",
        metadata={
            "help": "Per-depth logs on the steps Trainer logs (to report_to and trainer_state.json; the console "
            "keeps Trainer's line). 'lr' (default): the rates the group dicts hold, read in a step pre-hook; no "
            "tensor, no engine internal (measured 0.12 ms per logged step). 'grad_norm': plus per-depth gradient "
            "norms, one fused norm over the gradients (measured 2.7 ms per logged step, 1.7% of a 4-block BERT's "
            "CPU step); under DeepSpeed ZeRO it runs inside ZeRO's step and reads its partitions. 'all': plus the "
            "update-to-weight ratio, holding a copy of every trainable tensor during each logged step (as much "
            "memory as the trainable weights; measured 30 ms, +20% of that step). 'none': off. Figures: "
            "scripts/results/layer_stats_cost.json (python scripts/bench_layer_stats.py).",
            "choices": list(LAYER_STATS_CHOICES),
        },
    )
    stack_decay: dict | str | None = field(
        default=None,
        metadata={
            "help": "JSON dict {regex: decay}: a different layer_decay for the stacks whose name matches, e.g. "
            '\'{"encoder": 0.9, "decoder": 0.8}\' (T5/BART/Whisper) or \'{"text": 0.8, "vision": 0.65}\' (CLIP). '
            "Other stacks use layer_decay. Every regex must match a stack."
        },
    )
    layer_decay_min_scale: float = field(
        default=0.0, metadata={"help": "Floor on the decayed lr scale (timm min_scale), in [0, 1]. 0: no floor."}
    )
    head_lr_scale: float = field(
        default=1.0,
        metadata={
            "help": "Extra lr factor for the head (everything after the last block), as BEiT-3's "
            "task_head_lr_weight. 10 trains a new classifier 10x faster than the top block."
        },
    )
    lr_multipliers: dict | str | None = field(
        default=None,
        metadata={
            "help": "JSON dict {regex: factor} multiplying the rate of parameters whose clean name contains a "
            "match, on top of the decay (first match wins), e.g. '{\"lora_\": 4.0}'. Every regex must match."
        },
    )
    freeze_below_scale: float = field(
        default=0.0,
        metadata={
            "help": "Freeze the depths whose decayed lr scale is below this (timm no_opt_scale); depths "
            "are not shifted. 0: freeze nothing."
        },
    )
    loraplus_lr_ratio: float | None = field(
        default=None,
        metadata={
            "help": "LoRA+ (arXiv:2402.12354, peft's name) inside every depth group: LoRA's B tensors, and every 1-D "
            "trainable tensor as in peft, train at loraplus_lr_ratio x their depth's rate (the paper uses 2-16). At "
            "layer_decay=1 every rate and weight decay equals peft's create_loraplus_optimizer. Needs a peft LoRA "
            "model (an error otherwise). None: off."
        },
    )
    loraplus_lr_embedding: float = field(
        default=1e-6,
        metadata={
            "help": "With loraplus_lr_ratio: the absolute rate of LoRA embedding tensors at scale 1 (peft's default "
            "1e-6), times their depth's scale like every other tensor."
        },
    )
    loraplus_weight_decay: float | None = field(
        default=None,
        metadata={
            "help": "With loraplus_lr_ratio: the weight decay of the tensors LoRA+ decays (LoRA A, embeddings, and "
            "the B tensors Trainer decays). None: weight_decay (peft's own default is 0)."
        },
    )
    gradual_unfreeze_every: float = field(
        default=0.0,
        metadata={
            "help": "Gradual unfreezing (ULMFiT): start with the top gradual_unfreeze_depths depths "
            "trainable and unfreeze as many more every N steps or epochs (gradual_unfreeze_unit). 0: off."
        },
    )
    gradual_unfreeze_unit: str = field(
        default="steps", metadata={"help": "Unit of gradual_unfreeze_every.", "choices": ["steps", "epochs"]}
    )
    gradual_unfreeze_depths: int = field(
        default=1, metadata={"help": "Depths unfrozen per stage (the head counts as one depth)."}
    )
    reinit_top_blocks: int = field(
        default=0,
        metadata={
            "help": "Re-initialize the top k blocks of every stack when training starts (never on resume), with "
            "the model's own _init_weights (Zhang et al. 2021, Revisiting Few-sample BERT Fine-tuning). 0: off."
        },
    )
    reinit_pooler: bool = field(
        default=True, metadata={"help": "With reinit_top_blocks > 0, also re-initialize modules named 'pooler'."}
    )
    adaptive_lr: bool = field(
        default=False,
        metadata={
            "help": "Layer-specific adaptive rates (Singh et al. 2015, arXiv:1510.04609): each step, "
            "multiply each depth's scheduled rate by 1 + log(1 + 1/||g_depth||)."
        },
    )
    fix_loss_scaling: bool = field(
        default=False,
        metadata={
            "help": "Opt-in fix of Trainer's loss scaling for heads that average their own loss (most "
            "classification heads) while their forward takes **kwargs: Trainer then stops dividing the loss by "
            "gradient_accumulation_steps and multiplies it by the number of processes, so gradients and logged "
            "losses come out that many times too large. True sets trainer.model_accepts_loss_kwargs=False for such "
            "heads (Trainer's own switch). Default False: Trainer's behaviour, with one warning naming the factor. "
            "Independent of layer-wise decay."
        },
    )
    verify_rates: bool = field(
        default=True,
        metadata={
            "help": "After the first optimizer step with non-zero rates, read the rates of the optimizer that really "
            "stepped and stop with an error if they are not the per-layer rates LLRD built (a DeepSpeed "
            "scheduler or optimizer, an optimizer passed in, a callback rewriting rates). Costs one read of the "
            "group dicts on the first steps."
        },
    )

    def __post_init__(self) -> None:
        self.validate_llrd()

    def validate_llrd(self) -> None:
        """Check every LLRD setting; JSON strings of dict settings become dicts."""
        self.layer_decay = check_layer_decay(self.layer_decay, "layer_decay")
        if self.depth_source not in ("flow", "structure"):
            raise ValueError(f"depth_source={self.depth_source!r}: use 'flow' (default) or 'structure' (llrd 0.1).")
        if self.layer_stats not in LAYER_STATS_CHOICES:
            raise ValueError(f"layer_stats={self.layer_stats!r}: use one of {', '.join(LAYER_STATS_CHOICES)}.")
        if self.block_pattern is not None:
            try:
                re.compile(self.block_pattern)
            except re.error as err:
                raise ValueError(f"block_pattern={self.block_pattern!r} is not a valid regex: {err}") from err
        for name in _DICT_FIELDS:
            value = getattr(self, name)
            if isinstance(value, str):
                try:
                    value = json.loads(value)
                except json.JSONDecodeError as err:
                    raise ValueError(
                        f"{name}={value!r} is not JSON; pass an object such as '{{\"regex\": 0.8}}'."
                    ) from err
                setattr(self, name, value)
            if value is not None and not isinstance(value, dict):
                raise ValueError(f"{name}={value!r} is not a dict; pass a JSON object such as '{{\"regex\": 0.8}}'.")
        if self.gradual_unfreeze_unit not in ("steps", "epochs"):
            raise ValueError(f"gradual_unfreeze_unit={self.gradual_unfreeze_unit!r}: use 'steps' or 'epochs'.")
        if self.gradual_unfreeze_every < 0 or self.gradual_unfreeze_depths < 1 or self.reinit_top_blocks < 0:
            raise ValueError(
                f"gradual_unfreeze_every={self.gradual_unfreeze_every} must be >= 0, gradual_unfreeze_depths="
                f"{self.gradual_unfreeze_depths} >= 1 and reinit_top_blocks={self.reinit_top_blocks} >= 0."
            )
        self.scaling()  # validates the scale settings
        check_loraplus(self.loraplus_lr_ratio, self.loraplus_lr_embedding, self.loraplus_weight_decay)

    def scaling(self) -> Scaling:
        """The scale rules these settings mean."""
        return Scaling(
            self.layer_decay,
            self.stack_decay,
            self.layer_decay_min_scale,
            self.head_lr_scale,
            self.lr_multipliers,
            self.freeze_below_scale,
        )

    @property
    def changes_rates(self) -> bool:
        """Whether these settings give any parameter a rate other than the base one."""
        return bool(
            self.layer_decay != 1.0
            or self.stack_decay
            or self.lr_multipliers
            or self.head_lr_scale != 1.0
            or self.adaptive_lr
            or self.gradual_unfreeze_every > 0
            or self.loraplus_lr_ratio is not None
        )

    @property
    def active(self) -> bool:
        """Whether LLRD does anything: some setting that acts on its own differs from its default.

        Off (every setting at its default, or only refinements of an off setting changed), an LLRD trainer is
        ``Trainer``: no block discovery, no callbacks, no log keys, no checkpoint files, Trainer's groups.
        ``fix_loss_scaling`` is independent of this.

        Example:
            >>> LLRDArguments().active, LLRDArguments(layer_decay=0.8).active
            (False, True)
        """
        return bool(
            self.changes_rates
            or self.reinit_top_blocks > 0
            or self.layer_stats not in (_default("layer_stats"), "none")
        )

    def idle_settings(self) -> list[str]:
        """``name=value (needs ...)`` for each changed setting that has no effect under the others.

        Example:
            >>> LLRDArguments(gradual_unfreeze_unit="epochs").idle_settings()
            ["gradual_unfreeze_unit='epochs' (needs gradual_unfreeze_every > 0)"]
        """
        idle = []
        for name, needs in _REFINES.items():
            value = getattr(self, name)
            if value == _default(name):
                continue
            if needs == "llrd" and not self.active:
                idle.append(f"{name}={value!r} (needs layer-wise decay on, e.g. layer_decay=0.8)")
            elif needs == "rates" and not self.changes_rates:
                idle.append(f"{name}={value!r} (needs rates that differ per depth, e.g. layer_decay=0.8)")
            elif needs not in ("llrd", "rates") and getattr(self, needs) == _default(needs):
                idle.append(f"{name}={value!r} (needs {needs} > 0)")
        return idle

    def group_kwargs(self, learning_rate: float, weight_decay: float) -> dict[str, Any]:
        """The ``llrd.param_groups`` keyword arguments these settings mean."""
        return dict(
            lr=learning_rate,
            layer_decay=self.layer_decay,
            weight_decay=weight_decay,
            stack_decay=self.stack_decay,
            layer_decay_min_scale=self.layer_decay_min_scale,
            head_lr_scale=self.head_lr_scale,
            lr_multipliers=self.lr_multipliers,
            freeze_below_scale=self.freeze_below_scale,
            loraplus_lr_ratio=self.loraplus_lr_ratio,
            loraplus_lr_embedding=self.loraplus_lr_embedding,
            loraplus_weight_decay=self.loraplus_weight_decay,
            per_depth=self.adaptive_lr or self.gradual_unfreeze_every > 0,
        )

    def llrd_dict(self) -> dict[str, Any]:
        """Only the LLRD settings, as a plain dict (also of an ``LLRDTrainingArguments``)."""
        return {name: getattr(self, name) for name in llrd_field_names()}

    def with_llrd(self, **changes: Any) -> LLRDArguments:
        """A validated :class:`LLRDArguments` with these settings changed; ``self`` is not modified."""
        return LLRDArguments(**{**self.llrd_dict(), **changes})


# Settings that refine another one and do nothing on their own -> what they need ("llrd": LLRD on; "rates":
# per-depth rates; else the name of the setting that must be > 0).
_REFINES = {
    "block_pattern": "llrd",
    "depth_overrides": "llrd",
    "depth_source": "llrd",
    "layer_stats": "llrd",  # 'none' alone; 'lr', 'grad_norm', 'all' turn LLRD on (per-depth logging)
    "verify_rates": "rates",
    "layer_decay_min_scale": "rates",
    "freeze_below_scale": "rates",
    "gradual_unfreeze_unit": "gradual_unfreeze_every",
    "gradual_unfreeze_depths": "gradual_unfreeze_every",
    "reinit_pooler": "reinit_top_blocks",
    "loraplus_lr_embedding": "loraplus_lr_ratio",
    "loraplus_weight_decay": "loraplus_lr_ratio",
}


def _default(name: str) -> Any:
    return next(f.default for f in dataclasses.fields(LLRDArguments) if f.name == name)


def llrd_field_names() -> tuple[str, ...]:
    """Names of the LLRD settings."""
    return tuple(f.name for f in dataclasses.fields(LLRDArguments))


@dataclass
class LLRDTrainingArguments(LLRDArguments, TrainingArguments):
    """``TrainingArguments`` with the layer-wise learning-rate decay settings of :class:`LLRDArguments`.

    Every field is a CLI flag through ``HfArgumentParser`` (``--layer_decay 0.8``) and is saved with the
    other arguments.

    Example:
        >>> args = LLRDTrainingArguments(output_dir="out", learning_rate=1e-4, layer_decay=0.8)
        >>> args.layer_decay
        0.8
    """

    _VALID_DICT_FIELDS = TrainingArguments._VALID_DICT_FIELDS + list(_DICT_FIELDS)

    def __post_init__(self) -> None:
        self.validate_llrd()
        if self.changes_rates:
            check_distributed_setup(self)
        TrainingArguments.__post_init__(self)

    def group_kwargs(self, learning_rate: float | None = None, weight_decay: float | None = None) -> dict[str, Any]:
        """The ``llrd.param_groups`` keyword arguments, with this run's learning rate and weight decay."""
        return LLRDArguments.group_kwargs(
            self,
            self.learning_rate if learning_rate is None else learning_rate,
            self.weight_decay if weight_decay is None else weight_decay,
        )


def check_distributed_setup(args: TrainingArguments) -> None:
    """DeepSpeed optimizer/scheduler sections and FSDP1 flat params would silently drop per-layer rates."""
    check_launch_environment()
    check_deepspeed_config(getattr(args, "deepspeed", None), "deepspeed")
    fsdp_config = getattr(args, "fsdp_config", None)
    if isinstance(fsdp_config, str) and fsdp_config.startswith("{"):
        fsdp_config = json.loads(fsdp_config)
    if getattr(args, "fsdp", None) and isinstance(fsdp_config, dict):
        version = fsdp_config.get("version", fsdp_config.get("fsdp_version", 2))
        check_fsdp(version, fsdp_config.get("use_orig_params", "true"), "fsdp_config")

"""Parameter names without the prefixes that wrappers add.

DDP adds ``module.``, ``torch.compile`` adds ``_orig_mod.``, FSDP1 adds ``_fsdp_wrapped_module.`` (at every
wrapped level), activation checkpointing adds ``_checkpoint_wrapped_module.`` and PEFT adds
``base_model.model.``. Depths and user patterns are always about the clean name a user sees on the bare
``transformers`` model.
"""

from __future__ import annotations

import re

__all__ = ["normalize_name", "WRAPPER_SEGMENTS"]

#: Path segments that wrappers insert anywhere in a name.
WRAPPER_SEGMENTS: tuple[str, ...] = ("_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod")

_SEGMENT_RE = re.compile(r"(?:^|(?<=\.))(?:" + "|".join(map(re.escape, WRAPPER_SEGMENTS)) + r")(?:\.|$)")
_LEADING_RE = re.compile(r"^(?:(?:module|base_model\.model)\.)+")


def normalize_name(name: str) -> str:
    """Strip wrapper segments from a parameter or module name.

    Example:
        >>> normalize_name("module._fsdp_wrapped_module.bert.encoder.layer.0._fsdp_wrapped_module.output.dense.bias")
        'bert.encoder.layer.0.output.dense.bias'
    """
    previous = None
    while previous != name:
        previous = name
        name = _SEGMENT_RE.sub("", name)
        name = _LEADING_RE.sub("", name)
    return name.rstrip(".")

"""Layer-wise learning-rate decay (LLRD) for the Hugging Face stack.

``param_groups``, ``layer_ids`` and ``create_optimizer`` need only torch; the Trainer pieces (``LLRDTrainer``,
``LLRDMixin``, ``LLRDArguments``, ``LLRDTrainingArguments``) import ``transformers.trainer`` on first use.

Example:
    >>> from llrd import LLRDTrainer, LLRDMixin, LLRDTrainingArguments, param_groups, layer_ids, create_optimizer
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .discovery import LayerMap, ParamDepth, Stack, layer_ids
from .groups import param_groups, summarize_groups
from .naming import normalize_name
from .optim import create_optimizer

if TYPE_CHECKING:  # imported lazily (light import): see __getattr__
    from .args import LLRDArguments, LLRDTrainingArguments
    from .trainer import LLRDMixin, LLRDTrainer

__version__ = "0.2.0"
__all__ = [
    "LLRDArguments",
    "LLRDMixin",
    "LLRDTrainer",
    "LLRDTrainingArguments",
    "LayerMap",
    "ParamDepth",
    "Stack",
    "create_optimizer",
    "layer_ids",
    "normalize_name",
    "param_groups",
    "summarize_groups",
    "__version__",
]

# name -> submodule: these pull in transformers' Trainer, so they load on first access only
_LAZY = {
    "LLRDArguments": "args",
    "LLRDTrainingArguments": "args",
    "LLRDMixin": "trainer",
    "LLRDTrainer": "trainer",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'llrd' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

"""Layer-wise learning-rate decay (LLRD) for the Hugging Face stack.

Example:
    >>> from llrd import LLRDTrainer, LLRDMixin, LLRDTrainingArguments, param_groups, layer_ids, create_optimizer
"""

from .args import LLRDArguments, LLRDTrainingArguments
from .discovery import LayerMap, ParamDepth, Stack, layer_ids
from .groups import param_groups, summarize_groups
from .naming import normalize_name
from .optim import create_optimizer
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

"""Layer-wise learning-rate decay (LLRD) for the Hugging Face stack.

Example:
    >>> from llrd import LLRDTrainer, LLRDTrainingArguments, param_groups, layer_ids
"""

from .args import LLRDTrainingArguments
from .discovery import LayerMap, ParamDepth, Stack, layer_ids
from .groups import param_groups, summarize_groups
from .naming import normalize_name
from .trainer import LLRDTrainer

__version__ = "0.1.0"
__all__ = [
    "LLRDTrainer",
    "LLRDTrainingArguments",
    "LayerMap",
    "ParamDepth",
    "Stack",
    "layer_ids",
    "normalize_name",
    "param_groups",
    "summarize_groups",
    "__version__",
]

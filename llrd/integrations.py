"""Ready-made LLRD trainers for the common ``Trainer`` subclasses, imported only when asked for.

Each name is ``LLRDMixin`` + the subclass, nothing more; trl and sentence-transformers stay optional.

============================  ===============================================
``LLRDSeq2SeqTrainer``        ``transformers.Seq2SeqTrainer``
``LLRDSFTTrainer``            ``trl.SFTTrainer``
``LLRDDPOTrainer``            ``trl.DPOTrainer``
``LLRDRewardTrainer``         ``trl.RewardTrainer``
``LLRDSentenceTransformerTrainer``  ``sentence_transformers.SentenceTransformerTrainer``
============================  ===============================================

Example:
    >>> from llrd.integrations import LLRDSFTTrainer
    >>> trainer = LLRDSFTTrainer(model=model, args=SFTConfig("out"), train_dataset=ds, layer_decay=0.8)
"""

from __future__ import annotations

import importlib
from typing import Any

from .trainer import LLRDMixin

_BASES = {
    "LLRDSeq2SeqTrainer": ("transformers", "Seq2SeqTrainer"),
    "LLRDSFTTrainer": ("trl", "SFTTrainer"),
    "LLRDDPOTrainer": ("trl", "DPOTrainer"),
    "LLRDRewardTrainer": ("trl", "RewardTrainer"),
    "LLRDSentenceTransformerTrainer": ("sentence_transformers", "SentenceTransformerTrainer"),
}

__all__ = list(_BASES)
_made: dict[str, type] = {}


def __getattr__(name: str) -> Any:
    if name not in _BASES:
        raise AttributeError(f"module 'llrd.integrations' has no attribute {name!r}; it offers {', '.join(_BASES)}")
    if name not in _made:
        package, base_name = _BASES[name]
        try:
            base = getattr(importlib.import_module(package), base_name)
        except ImportError as err:
            raise ImportError(f"{name} needs the package {package!r}: pip install {package.replace('_', '-')}") from err
        _made[name] = type(name, (LLRDMixin, base), {"__module__": __name__, "__doc__": f"LLRDMixin + {base_name}."})
    return _made[name]

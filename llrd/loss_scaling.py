"""Does a model's loss use ``num_items_in_batch``?

``Trainer`` (``average_tokens_across_devices=True``, the default) multiplies the loss by the number of
processes and stops dividing it by the gradient-accumulation steps whenever the model's ``forward`` takes
``**kwargs``, assuming the loss normalises by the global ``num_items_in_batch``. Most classification heads
compute a plain mean instead and ignore it, so their gradients and logged losses come out
``accumulation steps x processes`` times too large. We detect which case a model is in.
"""

from __future__ import annotations

import inspect
import re

from torch import nn

__all__ = ["loss_uses_num_items"]

# `self.loss_function(..., **kwargs)`: the only way a transformers head forwards `num_items_in_batch`.
_FORWARDS_KWARGS = re.compile(r"self\.loss_function\((?:[^()]|\([^()]*\))*\*\*kwargs", re.DOTALL)


def loss_uses_num_items(model: nn.Module) -> bool | None:
    """``True`` if the model's loss receives ``num_items_in_batch``, ``False`` if it ignores it, ``None``
    when unknown (no source, or the model says so itself through ``accepts_loss_kwargs``).

    Example:
        >>> loss_uses_num_items(BertForSequenceClassification(config))   # doctest: +SKIP
        False
    """
    if hasattr(model, "accepts_loss_kwargs"):
        return None  # the model declares it; Trainer reads that flag itself
    forward = inspect.unwrap(type(model).forward)
    try:
        source = inspect.getsource(forward)
    except (OSError, TypeError):
        return None
    if "**kwargs" not in str(inspect.signature(forward)):
        return False
    return bool(_FORWARDS_KWARGS.search(source))

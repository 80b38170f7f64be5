"""Learning-rate scale of one parameter: the decay and the controls layered on top of it.

``scale = max(decay_s ** (L_s + 1 - depth), layer_decay_min_scale) * head_lr_scale (head only) * multiplier``

* ``decay_s``: ``stack_decay`` for stacks it names (open_clip's per-tower decay), else ``layer_decay``;
* ``layer_decay_min_scale``: a floor on the decayed scale (timm ``min_scale``);
* ``head_lr_scale``: extra factor for depth ``L + 1`` (BEiT-3 ``task_head_lr_weight``);
* ``lr_multipliers``: ``{regex: factor}``, first regex found in the clean name wins (adapters, LoRA, tokens);
* ``freeze_below_scale``: depths whose decayed scale falls below it are frozen (timm ``no_opt_scale``),
  without shifting any depth.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .discovery import LayerMap, ParamDepth

__all__ = ["Scaling", "check_layer_decay"]


def check_layer_decay(value: Any, setting: str = "layer_decay") -> float:
    """Return ``value`` as a float in (0, 1], or raise a ``ValueError`` that names ``setting``.

    Example:
        >>> check_layer_decay(0.8)
        0.8
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{setting}={value!r} is not a number; pass a float in (0, 1], e.g. {setting}=0.8.")
    value = float(value)
    if not (0.0 < value <= 1.0) or math.isnan(value):
        raise ValueError(
            f"{setting}={value!r} is outside (0, 1]. Each block's lr is lr * {setting} ** (depth from the top): "
            f"use e.g. 0.8 (BERT-base) or 0.65 (ViT-B); 1.0 turns layer-wise decay off."
        )
    return value


def _positive(value, setting: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or math.isinf(value):
        raise ValueError(f"{setting}={value!r} must be a positive number.")
    return float(value)


@dataclass
class Scaling:
    """The scale rules for one model (see the module docstring).

    Example:
        >>> Scaling(0.5).scale(ParamDepth("x", "s", depth=1, num_layers=2))
        0.25
    """

    layer_decay: float = 1.0
    stack_decay: Mapping[str, float] | None = None
    layer_decay_min_scale: float = 0.0
    head_lr_scale: float = 1.0
    lr_multipliers: Mapping[str, float] | None = None
    freeze_below_scale: float = 0.0
    _rules: list[tuple[re.Pattern, float]] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self):
        self.layer_decay = check_layer_decay(self.layer_decay)
        self.stack_decay = {
            rx: check_layer_decay(d, f"stack_decay[{rx!r}]") for rx, d in (self.stack_decay or {}).items()
        }
        if not 0.0 <= float(self.layer_decay_min_scale) <= 1.0:
            raise ValueError(f"layer_decay_min_scale={self.layer_decay_min_scale!r} must be in [0, 1].")
        if not 0.0 <= float(self.freeze_below_scale) <= 1.0:
            raise ValueError(f"freeze_below_scale={self.freeze_below_scale!r} must be in [0, 1].")
        self.head_lr_scale = _positive(self.head_lr_scale, "head_lr_scale")
        self._rules = [
            (re.compile(rx), _positive(f, f"lr_multipliers[{rx!r}]")) for rx, f in (self.lr_multipliers or {}).items()
        ]

    def check(self, layer_map: LayerMap) -> None:
        """Every stack_decay and lr_multipliers pattern must match something."""
        for rx in self.stack_decay:
            if not any(re.search(rx, s) for s in layer_map.stacks):
                raise ValueError(
                    f"stack_decay pattern {rx!r} matches no stack; the stacks are {list(layer_map.stacks)}."
                )
        for rx, _ in self._rules:
            if not any(rx.search(n) for n in layer_map):
                raise ValueError(
                    f"lr_multipliers pattern {rx.pattern!r} matches no parameter name; list them with "
                    "`[n for n, _ in model.named_parameters()]`."
                )

    def decay_of(self, stack: str) -> float:
        for rx, decay in self.stack_decay.items():
            if re.search(rx, stack):
                return decay
        return self.layer_decay

    def decay_scale(self, info: ParamDepth) -> float:
        """The decayed scale with its floor, before the head factor and multipliers."""
        return max(info.lr_scale(self.decay_of(info.stack)), float(self.layer_decay_min_scale))

    def multiplier(self, name: str) -> tuple[int, float]:
        """(index of the first matching rule or -1, its factor)."""
        for i, (rx, factor) in enumerate(self._rules):
            if rx.search(name):
                return i, factor
        return -1, 1.0

    def frozen(self, info: ParamDepth) -> bool:
        return self.decay_scale(info) < self.freeze_below_scale

    def scale(self, info: ParamDepth) -> float:
        head = self.head_lr_scale if info.depth == info.num_layers + 1 else 1.0
        return self.decay_scale(info) * head * self.multiplier(info.name)[1]

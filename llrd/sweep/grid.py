"""The settings a sweep trains: the user's grid, split into a plain arm (``layer_decay=1.0``) and an LLRD arm
of equal size, plus the typing of command-line values."""

from __future__ import annotations

import itertools
import json
import math
import typing
from enum import Enum
from typing import Any

PLAIN_DECAY = 1.0
# LLRD settings that only change what llrd logs or checks, or that act with LLRD off too (fix_loss_scaling is
# Trainer's loss scaling, not a per-layer rate): the plain arm keeps them
_NEUTRAL = ("layer_decay", "layer_stats", "verify_rates", "fix_loss_scaling")


def llrd_only_fields() -> frozenset[str]:
    """The LLRD settings that change training (``head_lr_scale``, ``adaptive_lr``, ...) other than
    ``layer_decay``: plain fine-tuning has none of them, so the sweep applies them to the LLRD arm only.

    Example:
        >>> "head_lr_scale" in llrd_only_fields(), "learning_rate" in llrd_only_fields()
        (True, False)
    """
    from llrd.args import llrd_field_names

    return frozenset(llrd_field_names()) - frozenset(_NEUTRAL)


def label(setting: dict[str, Any]) -> str:
    """Human-readable name of a setting.

    Example:
        >>> label({"layer_decay": 0.8, "learning_rate": 2e-4})
        'layer_decay=0.8, learning_rate=0.0002'
    """
    return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in setting.items())


def slug(setting: dict[str, Any]) -> str:
    """File-name-safe name of a setting.

    Example:
        >>> slug({"layer_decay": 0.8, "learning_rate": 2e-4})
        'layer_decay-0.8_learning_rate-0.0002'
    """
    text = label(setting).replace(", ", "_").replace("=", "-")
    return "".join(c if c.isalnum() or c in "-_.+" else "~" for c in text)


def is_plain(setting: dict[str, Any]) -> bool:
    """True for the plain fine-tuning arm (no layer-wise decay).

    Example:
        >>> is_plain({"layer_decay": 1.0, "learning_rate": 5e-5})
        True
    """
    return float(setting["layer_decay"]) == PLAIN_DECAY


def widen(rates: list[float], n: int) -> list[float]:
    """``rates`` extended geometrically to ``n`` values in the grid's own step (2x for a single rate), adding
    alternately one below the lowest and one above the highest, below first: plain fine-tuning usually wants
    a lower rate than the head rate of LLRD.

    Example:
        >>> widen([1e-4, 2e-4], 4)
        [5e-05, 0.0001, 0.0002, 0.0004]
    """
    out = sorted(set(rates))
    if not out:
        raise ValueError("learning_rate: the grid has no learning rate to widen")
    ratio = (out[-1] / out[0]) ** (1 / (len(out) - 1)) if len(out) > 1 else 2.0
    if ratio <= 1.0:
        ratio = 2.0
    below = True
    while len(out) < n:
        out.append(float(f"{(out[0] / ratio if below else out[-1] * ratio):.3g}"))
        out.sort()
        below = not below
    return out


def expand(
    grid: dict[str, list[Any]],
    base_learning_rate: float,
    plain_learning_rates: list[float] | None = None,
    llrd_only: frozenset[str] | None = None,
) -> tuple[list[dict], list[dict]]:
    """(plain settings, LLRD settings), each the product of the other axes with its rates and decays.

    The plain arm always has as many settings per shared combination as the LLRD arm (equal tuning budget): its
    learning rates are ``plain_learning_rates`` when given (their count must match), else the grid's rates,
    widened. Axes in ``llrd_only`` (default: :func:`llrd_only_fields`, e.g. ``head_lr_scale``) vary the LLRD arm
    only and count in its budget; repeated values are refused.

    Example:
        >>> plain, llrd = expand({"layer_decay": [0.8], "learning_rate": [1e-4, 2e-4]}, 5e-5)
        >>> [s["learning_rate"] for s in plain], len(llrd)
        ([0.0001, 0.0002], 2)
    """
    for key, values in grid.items():
        names = [label({key: v}) for v in values]
        if len(set(names)) != len(names):
            raise ValueError(f"--{key} {' '.join(str(v) for v in values)}: a value is given twice; list each once")
    llrd_only = llrd_only_fields() if llrd_only is None else llrd_only
    decays = [float(d) for d in grid.get("layer_decay", [])]
    llrd_decays = [d for d in decays if d != PLAIN_DECAY]
    if not llrd_decays:
        raise ValueError(
            f"--layer_decay {' '.join(f'{d:g}' for d in decays) or '(none)'}: give at least one decay below 1.0 "
            "to compare with plain fine-tuning, e.g. --layer_decay 0.9 0.8"
        )
    rates = [float(r) for r in grid.get("learning_rate", [base_learning_rate])]
    shared = {k: v for k, v in grid.items() if k not in ("layer_decay", "learning_rate") and k not in llrd_only}
    own = {k: v for k, v in grid.items() if k in llrd_only}
    combos = [dict(zip(shared, values, strict=True)) for values in itertools.product(*shared.values())]
    own_combos = [dict(zip(own, values, strict=True)) for values in itertools.product(*own.values())]
    llrd = [
        {"layer_decay": d, "learning_rate": r, **o, **combo}
        for d in llrd_decays
        for r in rates
        for o in own_combos
        for combo in combos
    ]
    wanted = len(llrd_decays) * len(rates) * len(own_combos)
    if plain_learning_rates:
        plain_rates = [float(r) for r in plain_learning_rates]
        if len(plain_rates) != wanted:
            raise ValueError(
                f"--plain_learning_rate has {len(plain_rates)} values but the LLRD arm tunes {wanted} "
                f"(decay, rate{', LLRD-only settings' if own else ''}) combinations; give {wanted} plain rates so "
                "both arms get the same tuning budget"
            )
        if len(set(plain_rates)) != len(plain_rates):
            raise ValueError(f"--plain_learning_rate {' '.join(f'{r:g}' for r in plain_rates)}: a rate is repeated")
    else:
        plain_rates = widen(rates, wanted)
    plain = [{"layer_decay": PLAIN_DECAY, "learning_rate": r, **combo} for r in plain_rates for combo in combos]
    return plain, llrd


def _types(annotation: Any) -> list[type]:
    args = typing.get_args(annotation)
    return [t for t in (args or (annotation,)) if isinstance(t, type)]


def coerce(name: str, text: str, annotation: Any = None, current: Any = None) -> Any:
    """A command-line value typed as the field it sets (its annotation, else its current config value).

    Example:
        >>> coerce("learning_rate", "5e-5", float)
        5e-05
        >>> coerce("adaptive_lr", "true", bool)
        True
    """
    kinds = _types(annotation) if annotation is not None else ([type(current)] if current is not None else [])
    low = text.strip().lower()
    if bool in kinds:
        if low in ("true", "1", "yes"):
            return True
        if low in ("false", "0", "no"):
            return False
        if len(kinds) == 1:
            raise ValueError(f"--{name} {text!r}: expected true or false")
    if dict in kinds and low.startswith("{"):
        try:
            return json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"--{name} {text!r}: not a JSON object ({err.msg})") from err
    for kind in (int, float):
        if kind in kinds:
            try:
                value = kind(text)
            except ValueError:
                continue
            if kind is float and not math.isfinite(value):
                raise ValueError(f"--{name} {text!r}: must be a finite number")
            return value
    if str in kinds or any(issubclass(k, Enum) for k in kinds):
        return text
    if not kinds:  # a config key whose current value is null: read it as a literal
        for kind in (int, float):
            try:
                return kind(text)
            except ValueError:
                pass
        return text
    raise ValueError(f"--{name} {text!r}: expected {' or '.join(k.__name__ for k in kinds)}")


def expand_arms(
    grid: dict[str, list[Any]],
    base_learning_rate: float,
    plain_learning_rates: list[float] | None = None,
    named: dict[str, dict[str, list[Any]]] | None = None,
) -> dict[str, list[dict]]:
    """Every arm's settings: ``plain``, ``llrd`` (the grid's decays below 1) and each ``named`` arm, whose own
    values (e.g. ``{"layer_decay": [0.8], "lr_scheduler_type": ["cosine"]}``) replace the grid's axes of the
    same name. Every arm tunes as many settings as plain (equal budget), or a ValueError names the sizes.

    Example:
        >>> arms = expand_arms({"layer_decay": [0.8], "learning_rate": [1e-4]}, 1e-4,
        ...                    named={"wd": {"weight_decay": [0.1]}})
        >>> {arm: len(s) for arm, s in arms.items()}, arms["wd"][0]["weight_decay"]
        ({'plain': 1, 'llrd': 1, 'wd': 1}, 0.1)
    """
    plain, llrd = expand(grid, base_learning_rate, plain_learning_rates)
    arms = {"plain": plain, "llrd": llrd}
    for name, values in (named or {}).items():
        if name in arms:
            raise ValueError(f"--arm {name}: the name is taken (plain and llrd are the built-in arms)")
        arms[name] = expand({**grid, **values}, base_learning_rate)[1]
    sizes = {arm: len(settings) for arm, settings in arms.items()}
    if len(set(sizes.values())) > 1:
        raise ValueError(
            f"arms of unequal size {sizes}: every arm must tune as many settings as plain (equal budget); give "
            "each --arm as many values as the LLRD grid has (decay, rate) combinations"
        )
    return arms

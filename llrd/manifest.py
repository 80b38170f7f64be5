"""The group layout recorded in every checkpoint, and the check that a resume uses the same one.

``optimizer.load_state_dict`` only requires the same number of groups and tensors per group: a different
model, decay or grouping that happens to keep those counts would load Adam moments into the wrong tensors,
and the LR scheduler would restore the old per-group base rates. Each checkpoint therefore holds
``llrd_layout.json`` (group names, stacks, parameter names, depths, scales). On resume, group membership and
depths come from that file (:func:`resume_layer_map`), whatever rule built them (llrd 0.1's module tree, the
data flow of 0.2 or a later one); the current settings recompute the scales, and :func:`check_resume` refuses
any difference, saying what changed. A checkpoint without the file, or with an unreadable one, is refused in one
error line (the trainer's, for a checkpoint written with LLRD off).
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from .discovery import LayerMap, ParamDepth, Stack
from .files import atomic_write_text

__all__ = ["LAYOUT_FILE", "layout_of", "check_layout", "read_layout", "resume_layer_map", "LayoutSaver"]

logger = logging.getLogger(__name__)
LAYOUT_FILE = "llrd_layout.json"


def layout_of(param_groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What identifies a group: its name, depth, scale and parameter names, in optimizer order."""
    return [
        {
            "group_name": g.get("group_name"),
            "stack": g.get("stack"),
            "layer_id": g.get("layer_id"),
            "lr_scale": g.get("lr_scale"),
            "weight_decay": g.get("weight_decay"),
            "param_names": list(g.get("param_names", [])),
        }
        for g in param_groups
    ]


def check_layout(saved: list[dict[str, Any]], current: list[dict[str, Any]], where: str) -> None:
    """Raise a ``ValueError`` naming the first differences between two layouts."""
    problems = []
    if len(saved) != len(current):
        problems.append(f"{len(saved)} param groups in the checkpoint, {len(current)} now")
    for i, (old, new) in enumerate(zip(saved, current)):  # noqa: B905 - lengths compared above
        if old["param_names"] != new["param_names"]:
            gone = sorted(set(old["param_names"]) - set(new["param_names"]))[:3]
            added = sorted(set(new["param_names"]) - set(old["param_names"]))[:3]
            problems.append(f"group {i} ({new['group_name']}) holds other parameters: missing {gone}, new {added}")
        for key, hint in (
            ("lr_scale", "layer_decay or an lr control changed?"),
            ("weight_decay", "weight_decay changed?"),
            ("layer_id", "the depth map changed?"),
        ):
            if old[key] != new[key]:
                problems.append(
                    f"group {i} ({new['group_name']}): {key} {old[key]} in the checkpoint, {new[key]} now ({hint})"
                )
        if len(problems) >= 5:
            break
    if problems:
        raise ValueError(
            f"cannot resume from {where}: its LLRD param-group layout differs from the one built now, so the "
            "optimizer and scheduler state would land on the wrong tensors or rates. "
            + "; ".join(problems)
            + ". The groups' members and depths come from the checkpoint's own layout file, so the model or the "
            "LLRD settings (layer_decay, stack_decay, lr_multipliers, head_lr_scale, weight_decay, ...) differ: "
            "resume with the ones it was written with, or start a new run."
        )


def read_layout(checkpoint: str | os.PathLike) -> list[dict[str, Any]] | None:
    """The layout recorded in ``checkpoint``; ``None`` if it has none (the trainer then says so in one error
    line when the checkpoint holds optimizer state). An unreadable file is a one-line error.

    Example:
        >>> read_layout("/nonexistent/checkpoint-2") is None
        True
    """
    path = Path(checkpoint) / LAYOUT_FILE
    if not path.is_file():
        return None
    try:
        saved = json.loads(path.read_text())
        if not isinstance(saved, list) or not all(isinstance(g, dict) and "param_names" in g for g in saved):
            raise ValueError("not a list of groups with param_names")
    except (OSError, ValueError) as err:
        raise ValueError(
            f"cannot resume from {checkpoint}: its {LAYOUT_FILE} is unreadable ({err}), so its param groups are "
            "unknown; restore the file from a copy of the checkpoint, or start a new run from its weights."
        ) from None
    return saved


def resume_layer_map(current: LayerMap, saved: list[dict[str, Any]] | None) -> LayerMap:
    """``current`` with the stacks and depths recorded in ``saved`` for every parameter it lists.

    A stack's block count is read from its head group (depth = blocks + 1), else from the recorded scales
    (``scale = decay ** (blocks + 1 - depth)``: the decay from two depths, the count from one), else its deepest
    depth; parameters the layout does not list (frozen then) keep today's placement. A layout without depths
    (``layer_decay=1``: Trainer's two groups) leaves
    ``current`` as it is.
    """
    if not saved or any(g.get("layer_id") is None for g in saved):
        return current
    placed: dict[str, tuple[str, int]] = {}
    for g in saved:
        placed |= {name: (_stack_of(g), int(g["layer_id"])) for name in g["param_names"]}
    blocks = _block_counts(saved)
    stacks = {s: Stack(s, tuple(f"{s}[{i}]" for i in range(blocks[s]))) for s in _stack_order(saved, blocks)}
    stacks |= {s: v for s, v in current.stacks.items() if s not in stacks}
    params = {}
    for name, info in current.params.items():
        if name in placed:
            stack, depth = placed[name]
            info = ParamDepth(name, stack, depth, blocks[stack], "from the checkpoint's " + LAYOUT_FILE)
        params[name] = info
    return LayerMap(params, stacks, current.raw_names, source="checkpoint", note=f"depths from {LAYOUT_FILE}",
                    ticks=current.ticks, check=current.check)  # fmt: skip


def _stack_of(group: dict[str, Any]) -> str:
    """The group's stack (recorded since 0.2; before, the first part of its name ``stack/role/decay``)."""
    return group.get("stack") or str(group.get("group_name", "")).split("/", 1)[0]


def _block_counts(saved: list[dict[str, Any]]) -> dict[str, int]:
    """Per stack of a layout, its number of blocks (see :func:`resume_layer_map`)."""
    deepest: dict[str, int] = {}
    heads: dict[str, int] = {}
    scales: dict[str, dict[int, float]] = {}  # stack -> depth -> scale, for groups without a multiplier rule
    for g in saved:
        stack, depth, parts = _stack_of(g), int(g["layer_id"]), str(g.get("group_name", "")).split("/")
        deepest[stack] = max(deepest.get(stack, 0), depth - 1)
        if len(parts) > 1 and parts[1] == "head":
            heads[stack] = depth - 1
        elif len(parts) == 3 and isinstance(g.get("lr_scale"), (int, float)) and g["lr_scale"] > 0:
            scales.setdefault(stack, {})[depth] = float(g["lr_scale"])
    decays = {s: _decay(d) for s, d in scales.items() if len(d) > 1}
    counts = {}
    for stack, count in deepest.items():
        own = scales.get(stack, {})
        decay = decays.get(stack) or next(iter(decays.values()), None)
        if stack in heads:
            count = heads[stack]
        elif own and decay and 0 < decay < 1:
            depth = min(own)
            count = max(count, round(math.log(own[depth]) / math.log(decay)) + depth - 1)
        counts[stack] = count
    return counts


def _stack_order(saved: list[dict[str, Any]], blocks: dict[str, int]) -> list[str]:
    """The stacks in the order that sorted the groups (head first; within one distance from the head, by stack)."""
    after: dict[str, set[str]] = {s: set() for s in blocks}  # stack -> stacks that come before it
    level: dict[int, list[str]] = {}
    for g in saved:
        stack = _stack_of(g)
        level.setdefault(blocks[stack] + 1 - int(g["layer_id"]), []).append(stack)
    for stacks in level.values():
        for i, stack in enumerate(stacks):
            after[stack] |= {s for s in stacks[:i] if s != stack}
    order: list[str] = []
    while len(order) < len(after):
        ready = [s for s in after if s not in order and after[s] <= set(order)]
        order.append(ready[0] if ready else next(s for s in after if s not in order))
    return order


def _decay(scales: dict[int, float]) -> float:
    """The decay between the two shallowest depths: ``scale = decay ** (blocks + 1 - depth)``."""
    a, b = sorted(scales)[:2]
    return (scales[a] / scales[b]) ** (1 / (b - a))


class LayoutSaver(TrainerCallback):
    """Writes ``llrd_layout.json`` into each checkpoint folder (main process only)."""

    def on_save(self, args, state, control, optimizer=None, **kwargs):
        if not state.is_world_process_zero or optimizer is None:
            return
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if folder.is_dir():
            atomic_write_text(folder / LAYOUT_FILE, json.dumps(layout_of(optimizer.param_groups), indent=1))
        else:
            logger.debug("no checkpoint folder %s to record the group layout in", folder)

"""The group layout recorded in every checkpoint, and the check that a resume uses the same one.

``optimizer.load_state_dict`` only requires the same number of groups and tensors per group: a different
model, decay or grouping that happens to keep those counts would load Adam moments into the wrong tensors,
and the LR scheduler would restore the old per-group base rates. Each checkpoint therefore holds
``llrd_layout.json`` (group names, parameter names, depths, scales); resuming compares it with the groups
just built and refuses any difference, saying what changed.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from .files import atomic_write_text

__all__ = ["LAYOUT_FILE", "layout_of", "check_layout", "LayoutSaver"]

logger = logging.getLogger(__name__)
LAYOUT_FILE = "llrd_layout.json"


def layout_of(param_groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What identifies a group: its name, depth, scale and parameter names, in optimizer order."""
    return [
        {
            "group_name": g.get("group_name"),
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
            + ". Resume with the same model and LLRD settings, or start a new run. A checkpoint written by llrd "
            "0.1 has depths from the module tree: resume it with depth_source='structure' (`--depth_source "
            "structure`), which rebuilds that layout."
        )


def read_layout(checkpoint: str | os.PathLike) -> list[dict[str, Any]] | None:
    path = Path(checkpoint) / LAYOUT_FILE
    if not path.is_file():
        return None
    return json.loads(path.read_text())


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

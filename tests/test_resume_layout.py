"""Resume takes group membership and depths from the checkpoint's llrd_layout.json, whatever rule wrote it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from old_checkpoint_job import model as funnel
from safetensors.torch import load_file

from llrd import layer_ids, param_groups
from llrd.manifest import LAYOUT_FILE, check_layout, layout_of, read_layout, resume_layer_map

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "funnel_18bea29"


def test_a_checkpoint_of_the_old_rule_resumes_bit_for_bit(tmp_path):
    saved = json.loads((FIXTURE / "checkpoint-2" / LAYOUT_FILE).read_text())
    old_stacks = {g["group_name"].split("/")[0] for g in saved}
    assert old_stacks == {"0", "1", "2"} and len(layer_ids(funnel()).stacks) == 1  # the rules disagree
    shutil.copytree(FIXTURE / "checkpoint-2", tmp_path / "checkpoint-2")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "tests/old_checkpoint_job.py", str(tmp_path), "--resume"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    resumed = load_file(tmp_path / "final.safetensors")
    reference = load_file(FIXTURE / "uninterrupted_final.safetensors")
    assert resumed.keys() == reference.keys()
    assert all(torch.equal(resumed[k], reference[k]) for k in reference)  # as if never interrupted


def test_the_layout_decides_membership_and_the_settings_decide_the_scales():
    saved = json.loads((FIXTURE / "checkpoint-2" / LAYOUT_FILE).read_text())
    model = funnel()
    lm = resume_layer_map(layer_ids(model), saved)
    assert {s: lm.stacks[s].num_layers for s in ("0", "1", "2")} == {"0": 1, "1": 2, "2": 1}
    assert lm.info("funnel.encoder.blocks.1.1.ffn.linear_1.weight").stack == "1"
    same = param_groups(model, lr=1e-3, layer_decay=0.5, weight_decay=0.01, layer_map=lm)
    check_layout(saved, layout_of(same), "checkpoint-2")  # same settings: same groups, same scales
    other = param_groups(model, lr=1e-3, layer_decay=0.8, weight_decay=0.01, layer_map=lm)
    with pytest.raises(ValueError, match=r"lr_scale 0\.5 in the checkpoint, 0\.8 now \(layer_decay"):
        check_layout(saved, layout_of(other), "checkpoint-2")


def test_a_missing_or_unreadable_layout_is_one_line(tmp_path):
    (tmp_path / "checkpoint-2").mkdir()
    assert read_layout(tmp_path / "checkpoint-2") is None  # the trainer refuses it in one line (LLRD off then)
    (tmp_path / "checkpoint-2" / LAYOUT_FILE).write_text("{not json")
    with pytest.raises(ValueError, match=r"llrd_layout.json is unreadable .*restore the file") as err:
        read_layout(tmp_path / "checkpoint-2")
    assert "\n" not in str(err.value)

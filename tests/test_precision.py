"""Mixed precision, really run: bf16 autocast on CPU with the monitor and adaptive rates, and the GPU check script."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import tiny_models
import torch
from test_trainer import RecordLR, text_data
from test_trainer import args as make_args

from llrd import LLRDTrainer

ROOT = Path(__file__).resolve().parents[1]


def test_bf16_end_to_end_with_monitor_and_adaptive_rates(tmp_out):
    model = tiny_models.make("bert")
    dtypes = []
    model.classifier.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    rec = RecordLR()
    a = make_args(
        tmp_out, bf16=True, layer_decay=0.5, adaptive_lr=True, layer_stats="all", max_steps=3, logging_steps=1,
        lr_scheduler_type="constant",
    )  # fmt: skip
    trainer = LLRDTrainer(model=model, args=a, train_dataset=text_data(16), callbacks=[rec])
    trainer.train()
    assert dtypes and all(d == torch.bfloat16 for d in dtypes)  # autocast was on
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 3
    for h in logs:
        for d in range(4):
            factor = h[f"lr_factor/depth_{d:02d}"]
            assert math.isfinite(factor) and factor == pytest.approx(1 + math.log1p(1 / h[f"grad_norm/depth_{d:02d}"]))
            assert h[f"lr/depth_{d:02d}"] == pytest.approx(1e-3 * 0.5 ** (3 - d) * factor)  # the rate stepped with
            assert 0 < h[f"update_ratio/depth_{d:02d}"] < 1
    for _, groups in rec.rows:  # the scheduled rates are back after every step
        assert [lr for lr, _ in groups] == [1e-3 * scale for _, scale in groups]
    assert all(not torch.equal(p.detach(), before[n]) for n, p in model.named_parameters())


@pytest.mark.slow
def test_gpu_check_script_runs(tmp_path):
    """The GPU comparison script (plain Trainer vs LLRDTrainer) in its quick mode, on whatever device is here."""
    proc = subprocess.run(
        [sys.executable, "scripts/gpu_check.py", "--quick", "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert set(report["summary"]) >= {"minilm_l6/no", "vit_b16/no"} or report["device"] != "cpu"
    kinds = {(r["model"], r["trainer"]) for r in report["runs"]}
    assert kinds == {(m, t) for m in ("minilm_l6", "vit_b16") for t in ("trainer", "llrd")}
    assert all(r["groups"] == (8 if r["trainer"] == "llrd" else 2) for r in report["runs"])

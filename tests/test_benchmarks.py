"""The benchmark scripts run end to end (their --quick versions); they are scripts, not timed tests, so
only their outputs' shape and sanity are checked, never a speed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_recipes import needs_data

ROOT = Path(__file__).resolve().parents[1]


def run_script(script: str, out: Path, timeout: int) -> None:
    """Run ``scripts/<script> --quick --out <out>`` offline; fail with its stderr."""
    proc = subprocess.run(
        [sys.executable, f"scripts/{script}", "--quick", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.slow
@needs_data
def test_bench_quality_quick(tmp_path):
    run_script("bench_quality.py", tmp_path, timeout=1500)
    record = json.loads((tmp_path / "bench_quality_quick.json").read_text())
    methods = [row["method"] for row in record["summary"]]
    assert methods == [
        "Trainer",
        "LLRD",
        "LLRD + re-init top block",
        "LLRD + gradual unfreezing",
        "LLRD + adaptive (Singh)",
    ]
    for row in record["summary"]:
        assert row["seeds"] == 2 and 0.4 < row["test_mean"] <= 1.0
    # each method had the same budget: as many tuning trials, the same number of steps
    trials = [sum(1 for t in record["tuning"] if t["method"] == m) for m in methods]
    assert len(set(trials)) == 1
    assert (tmp_path / "bench_quality_quick.png").stat().st_size > 10_000
    assert "| LLRD |" in (tmp_path / "bench_quality_quick.md").read_text()
    # re-initialisation really changes the run (it was a silent no-op on loaded checkpoints once)
    final = record["final"]
    assert final["LLRD"][0]["val_curve"] != final["LLRD + re-init top block"][0]["val_curve"]


@pytest.mark.slow
def test_bench_overhead_quick(tmp_path):
    run_script("bench_overhead.py", tmp_path, timeout=1200)
    res = json.loads((tmp_path / "bench_overhead_quick.json").read_text())
    for optim in ("adamw_torch", "adamw_torch_fused"):
        assert len(res["step_time"][optim]["ratios_per_round"]["LLRD, logging on"]) == 2
    rows = res["group_building"]["rows"]
    assert [r["tensors"] for r in rows[:5]] == sorted(r["tensors"] for r in rows[:5])
    assert rows[-1]["model"].startswith("Llama") and rows[-1]["groups"] > 80
    # With a fixed mmap threshold the peak measures live memory, which LLRD must not grow: the same tensors,
    # gradients and optimizer state as Trainer (the per-depth monitor's copy of the weights is the one cost).
    live = res["peak_memory"]["MALLOC_MMAP_THRESHOLD_=65536"]["ratio"]
    assert live["LLRD, logging off"] <= 1.01, live
    assert "| adamw_torch_fused | LLRD, logging on |" in (tmp_path / "bench_overhead_quick.md").read_text()

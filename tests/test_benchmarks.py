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


# measured 11.5 min with the machine loaded by other jobs (3.6 min CPU); a safety net for a hung run, not a speed check
TIMEOUT_QUALITY_QUICK = 1800
QUICK_TEST_ACCURACY = 0.65


@pytest.mark.slow
@needs_data
def test_bench_quality_quick(tmp_path):
    """The quality benchmark's code path on the real MiniLM: scripts/bench_quality.py --quick runs `llrd sweep`
    on SST-2 (2 seeds, one setting per arm, 30 steps on 320 sentences: 8 trial processes)."""
    run_script("bench_quality.py", tmp_path, timeout=TIMEOUT_QUALITY_QUICK)
    out = tmp_path / "sweep_sst2_quick"
    record = json.loads((out / "results.json").read_text())
    assert [t["status"] for t in record["trials"]] == ["ok"] * 8, [t.get("error") for t in record["trials"]]
    assert [t["phase"] for t in record["trials"]] == ["tune"] * 4 + ["test"] * 4
    assert record["chosen"] == {
        "plain": "layer_decay=1, learning_rate=0.0002",
        "llrd": "layer_decay=0.65, learning_rate=0.0005",
    }
    # the settings reached the recipe: plain has Trainer's 2 groups, LLRD 16 with the embeddings at 0.65 ** 7
    work = tmp_path / "tmp" / "bench_quality_quick" / "sst2" / "trials" / "tune"
    plain = json.loads((work / "layer_decay-1_learning_rate-0.0002__seed-0" / "llrd_groups.json").read_text())
    llrd = json.loads((work / "layer_decay-0.65_learning_rate-0.0005__seed-0" / "llrd_groups.json").read_text())
    assert len(plain) == 2 and len(llrd) == 16
    assert min(g["lr"] for g in llrd) == pytest.approx(5e-4 * 0.65**7, rel=1e-9)
    # seed k reproduces itself: each test run repeats its tuning run's validation curve exactly (the pairing)
    assert not [n for n in record["notes"] if "did not reproduce" in n], record["notes"]
    # both arms learn: a constant or untrained classifier scores about 0.55 on these 300 test sentences
    for row in record["test"]:
        assert row["mean"] >= QUICK_TEST_ACCURACY, record["test"]
    table = (out / "table.md").read_text()
    assert record["verdict"]["line"] in table and "95% t-interval over 2 paired seeds" in record["verdict"]["line"]
    assert (out / "sweep.png").stat().st_size > 10_000


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

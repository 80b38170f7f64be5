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


def run_script(script: str, out: Path, timeout: int, mode: str = "--quick", *extra: str) -> None:
    """Run ``scripts/<script> <mode> --out <out> [extra]`` offline; fail with its stderr."""
    proc = subprocess.run(
        [sys.executable, f"scripts/{script}", mode, "--out", str(out), *extra],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


# measured 11.5 min of wall time (3.6 min CPU) on 2 CPU cores; a safety net for a hung run, not a speed check
TIMEOUT_QUALITY_QUICK = 1800
QUICK_TEST_ACCURACY = 0.65


@pytest.mark.slow
@needs_data
def test_bench_quality_quick(tmp_path):
    """The quality benchmark's code path on the real MiniLM: scripts/bench_quality.py --quick runs `llrd sweep`
    on SST-2 (2 seeds, one setting per arm, 30 steps on 320 sentences: 4 trial processes, each scoring the test
    split once at its end: no re-runs)."""
    run_script("bench_quality.py", tmp_path, timeout=TIMEOUT_QUALITY_QUICK)
    out = tmp_path / "sweep_sst2_quick"
    record = json.loads((out / "results.json").read_text())
    assert [t["status"] for t in record["trials"]] == ["ok"] * 4, [t.get("error") for t in record["trials"]]
    assert record["storage"] == {"attempts": 4, "trials": 4, "duplicates": []}
    assert record["chosen"] == {
        "plain": "layer_decay=1, learning_rate=0.0002",
        "llrd": "layer_decay=0.65, learning_rate=0.0005",
    }
    # the settings reached the recipe: plain has Trainer's 2 groups, LLRD 16 with the embeddings at 0.65 ** 7
    folder = {(t["arm"], t["seed"]): Path(t["folder"]) for t in record["trials"]}
    plain = json.loads((folder["plain", 0] / "llrd_groups.json").read_text())
    llrd = json.loads((folder["llrd", 0] / "llrd_groups.json").read_text())
    assert len(plain) == 2 and len(llrd) == 16
    assert min(g["lr"] for g in llrd) == pytest.approx(5e-4 * 0.65**7, rel=1e-9)
    # the test score is the trial's own: test_results.json of the model whose validation curve is recorded
    for t in record["trials"]:
        test = json.loads((Path(t["folder"]) / "test_results.json").read_text())
        assert t["test"]["accuracy"] == test["test_accuracy"] and t["curve"][-1][0] == 30
    # both arms learn: a constant or untrained classifier scores about 0.55 on these 300 test sentences
    for row in record["test"]:
        assert row["mean"] >= QUICK_TEST_ACCURACY, record["test"]
    table = (out / "table.md").read_text()
    assert record["verdict"]["line"] in table and "95% t-interval over 2 paired seeds" in record["verdict"]["line"]
    assert (out / "sweep.png").stat().st_size > 10_000


@pytest.mark.slow
@needs_data
def test_bench_quality_fashion_mnist_quick(tmp_path):
    """The image half of the quality benchmark, small: `llrd sweep` runs the image recipe on the real DINOv2-S
    with Fashion-MNIST photos (converted from the IDX files when missing; 2 seeds, one setting per arm, one
    epoch of 96 photos: 4 trial processes; measured about 1 min on 2 CPU cores)."""
    run_script("bench_quality.py", tmp_path, TIMEOUT_QUALITY_QUICK, "--quick", "--dataset", "fashion_mnist")
    out = tmp_path / "sweep_fashion_mnist_quick"
    record = json.loads((out / "results.json").read_text())
    assert [t["status"] for t in record["trials"]] == ["ok"] * 4, [t.get("error") for t in record["trials"]]
    assert record["chosen"] == {
        "plain": "layer_decay=1, learning_rate=0.0001",
        "llrd": "layer_decay=0.75, learning_rate=0.0005",
    }
    assert record["data"]["train"]["rows"] == 96 and record["data"]["test"]["rows"] == 96, record["data"]
    folder = {(t["arm"], t["seed"]): Path(t["folder"]) for t in record["trials"]}
    plain = json.loads((folder["plain", 0] / "llrd_groups.json").read_text())
    llrd = json.loads((folder["llrd", 0] / "llrd_groups.json").read_text())
    assert len(plain) == 2  # Trainer's own groups
    # DINOv2-S: 12 blocks, so the embeddings (depth 0) train at 5e-4 * 0.75 ** 13 and the classifier at 5e-4
    assert min(g["lr"] for g in llrd) == pytest.approx(5e-4 * 0.75**13, rel=1e-9)
    assert max(g["lr"] for g in llrd) == pytest.approx(5e-4, rel=1e-9)
    for t in record["trials"]:
        test = json.loads((Path(t["folder"]) / "test_results.json").read_text())
        assert t["test"]["accuracy"] == test["test_accuracy"]
    assert record["verdict"]["line"] in (out / "table.md").read_text()


@pytest.mark.slow
def test_bench_overhead_smoke(tmp_path):
    """Every section of the overhead benchmark runs (its --smoke mode: one optimizer, 6 steps, live memory only;
    measured 14.5 min of wall time and 5.1 min of CPU time on 2 CPU cores, x86_64); the grad_norm monitor (llrd
    0.1's default) holds Trainer's live memory, and the measurement is sensitive enough to see
    layer_stats="all"'s copy of the weights."""
    run_script("bench_overhead.py", tmp_path, timeout=2700, mode="--smoke")
    res = json.loads((tmp_path / "bench_overhead_smoke.json").read_text())
    variants = ["LLRD, layer_stats=none", "LLRD, layer_stats=grad_norm", "LLRD, layer_stats=all"]
    assert list(res["step_time"]) == ["adamw_torch_fused"]
    assert [len(res["step_time"]["adamw_torch_fused"]["ratios_per_round"][v]) for v in variants] == [1, 1, 1]
    rows = res["group_building"]["rows"]
    assert [r["tensors"] for r in rows[:5]] == sorted(r["tensors"] for r in rows[:5])
    assert rows[-1]["model"].startswith("Llama") and rows[-1]["groups"] > 80
    # With a fixed mmap threshold the peak measures live memory: LLRD with the grad_norm monitor holds exactly
    # Trainer's tensors, gradients and optimizer state (measured: the same MiB); "all" copies the trainable
    # weights on the logged step (measured +34 MiB, 22.7M fp32 parameters are 87 MiB).
    live = res["peak_memory"]["MALLOC_MMAP_THRESHOLD_=65536"]
    assert live["ratio"]["LLRD, layer_stats=none"] <= 1.01, live
    assert live["ratio"]["LLRD, layer_stats=grad_norm"] <= 1.01, live
    peaks = live["peak_rss_mib"]
    assert peaks["LLRD, layer_stats=all"] - peaks["LLRD, layer_stats=grad_norm"] >= 10, live
    # llrd inspect of a 69B-parameter Llama builds it on the meta device: well under the 257 GiB of its fp32 weights
    assert "68,976,648,192 trainable parameters" in res["inspect"]["parameters"]
    assert res["inspect"]["peak_rss_mib_median"] < 2048, res["inspect"]
    assert "| adamw_torch_fused | LLRD, layer_stats=all |" in (tmp_path / "bench_overhead_smoke.md").read_text()


def test_main_job_reads_only_the_files_its_run_wrote(tmp_path):
    """scripts/main_job.py quotes the run it started: files older than the run's start are refused."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import main_job

    results = {
        "train_results.json": {"train_loss": 0.34129, "train_runtime": 3059.04},
        "eval_results.json": {"eval_accuracy": 0.88654, "eval_f1": 0.89871},
        "test_results.json": {"test_accuracy": 0.86353, "test_f1": 0.86674},
        "trainer_state.json": {"global_step": 625},
    }
    for name, content in results.items():
        (tmp_path / name).write_text(json.dumps(content))
    saved = main_job.read_metrics(tmp_path, since=0)
    assert main_job.summary(saved) == {
        "test_accuracy": 0.8635,
        "test_f1": 0.8667,
        "validation_accuracy": 0.8865,
        "validation_f1": 0.8987,
        "train_loss": 0.3413,
        "train_runtime_s": 3059.0,
        "steps": 625,
    }
    os.utime(tmp_path / "test_results.json", (1, 1))  # left over from an older run
    with pytest.raises(SystemExit, match="test_results.json was not written by this run"):
        main_job.read_metrics(tmp_path, since=2)

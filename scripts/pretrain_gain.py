"""Measure what the slow end-to-end image test asserts: DINOv2-S fine-tuned from its pretrained weights against the
same architecture from random init, on a small real Fashion-MNIST slice, over 3 seeds.

    python scripts/pretrain_gain.py     # 6 short runs -> scripts/results/pretrain_gain.json

Each run is ``recipes/image_classification.py`` with ``FLAGS`` (the test's slice: 56 px, 320 training photos,
2 epochs, 300 test photos) and ``--seed S``, plus ``--random_init`` for the baseline. The file holds every
accuracy, the per-seed gains, their mean, standard error and ``threshold`` = mean - 3 standard errors, which
``tests/test_image_recipe.py::test_pretrained_dinov2_beats_random_init`` quotes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "scripts" / "results"
SHARED = ROOT.parent / "shared"
SEEDS = (0, 1, 2)


def flags(out: str, seed: int, random_init: bool) -> list[str]:
    """The recipe's command-line flags for one run of the test's slice."""
    return [
        "--model_name_or_path", str(SHARED / "models" / "dinov2-small"),
        "--fashion_mnist_dir", str(SHARED / "data" / "fashion_mnist"),
        "--image_size", "56",
        "--max_train_samples", "320",
        "--max_test_samples", "300",
        "--num_train_epochs", "2",
        "--per_device_train_batch_size", "32",
        "--per_device_eval_batch_size", "100",
        "--learning_rate", "5e-4",
        "--layer_decay", "0.75",
        "--weight_decay", "0.05",
        "--warmup_steps", "0.1",
        "--lr_scheduler_type", "cosine",
        "--eval_strategy", "no",
        "--save_strategy", "no",
        "--use_cpu",
        "--report_to", "none",
        "--disable_tqdm", "true",
        "--seed", str(seed),
        "--output_dir", out,
        *(["--random_init"] if random_init else []),
    ]  # fmt: skip


def run_one(seed: int, random_init: bool, work: Path, threads: int | None = None) -> float:
    """Test accuracy of one run; a run that finished in ``work`` before (its ``test_results.json``) is read back."""
    out = work / f"{'random' if random_init else 'pretrained'}_{seed}"
    if (out / "test_results.json").is_file():
        return json.loads((out / "test_results.json").read_text())["test_accuracy"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    cmd = [sys.executable, "recipes/image_classification.py", *flags(str(out), seed, random_init)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"error: run failed ({' '.join(cmd)}):\n{proc.stderr[-3000:]}")
    return json.loads((out / "test_results.json").read_text())["test_accuracy"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=RESULTS, help="where pretrain_gain.json goes (default scripts/results)")
    p.add_argument(
        "--work", type=Path, default=None, help="keep the runs here; finished ones are reused (default: tmp)"
    )
    p.add_argument("--jobs", type=int, default=1, help="runs at a time (each then with OMP_NUM_THREADS=1)")
    ns = p.parse_args()
    from concurrent.futures import ThreadPoolExecutor

    from llrd.files import atomic_write_text

    start = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        work = ns.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        threads = 1 if ns.jobs > 1 else None
        jobs = [(seed, random_init) for seed in SEEDS for random_init in (False, True)]
        with ThreadPoolExecutor(ns.jobs) as pool:
            acc = dict(zip(jobs, pool.map(lambda j: run_one(*j, work, threads), jobs), strict=True))
    runs = [
        {
            "seed": s,
            "pretrained": acc[s, False],
            "random_init": acc[s, True],
            "gain": round(acc[s, False] - acc[s, True], 4),
        }
        for s in SEEDS
    ]
    gains = [r["gain"] for r in runs]
    mean, se = statistics.mean(gains), statistics.stdev(gains) / len(gains) ** 0.5
    pre = [r["pretrained"] for r in runs]
    record = {
        "command": "python scripts/pretrain_gain.py",
        "flags": flags("OUT", 0, False)[:-4],
        "runs": runs,
        "wall_seconds_all": round(time.time() - start, 1),
        "gain_mean": round(mean, 4),
        "gain_standard_error": round(se, 4),
        "threshold": round(mean - 3 * se, 4),
        "pretrained_mean": round(statistics.mean(pre), 4),
        "pretrained_standard_error": round(statistics.stdev(pre) / len(pre) ** 0.5, 4),
    }
    ns.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(ns.out / "pretrain_gain.json", json.dumps(record, indent=1) + "\n")
    print(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()

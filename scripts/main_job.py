"""Run the main job (README, first commands) and record its numbers: metrics, wall time, command, hardware class.

    python scripts/main_job.py     # about 6 min on 2 CPU cores

It runs exactly the README's main job, ``python recipes/text_classification.py recipes/configs/minilm_sst2.yaml``,
from the repository root (so the model and metrics land in ``runs/minilm_sst2``, as for a user), and writes
``scripts/results/main_job.json``: the command, wall time, test and validation metrics, training loss and
steps, the hardware class (e.g. ``2 CPU cores, x86_64``) and the python, torch and transformers versions.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "scripts" / "results"
CONFIG = "recipes/configs/minilm_sst2.yaml"
COMMAND = ["recipes/text_classification.py", CONFIG]


def read_metrics(run: Path, since: float) -> dict:
    """The run's saved metrics; refuses files older than ``since`` (a failed run must not report an old one)."""
    out = {}
    for name in ("train_results.json", "eval_results.json", "test_results.json", "trainer_state.json"):
        path = run / name
        if not path.is_file() or path.stat().st_mtime < since:
            raise SystemExit(f"error: {path} was not written by this run.")
        out[name.removesuffix(".json")] = json.loads(path.read_text())
    return out


def summary(saved: dict) -> dict:
    """The figures the README quotes, rounded as it quotes them."""
    test, val, train = saved["test_results"], saved["eval_results"], saved["train_results"]
    return {
        "test_accuracy": round(test["test_accuracy"], 4),
        "test_f1": round(test["test_f1"], 4),
        "validation_accuracy": round(val["eval_accuracy"], 4),
        "validation_f1": round(val["eval_f1"], 4),
        "train_loss": round(train["train_loss"], 4),
        "train_runtime_s": round(train["train_runtime"], 1),
        "steps": saved["trainer_state"]["global_step"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=RESULTS, help="where main_job.json goes (default scripts/results)")
    ns = p.parse_args()
    import yaml
    from docs_blocks import hardware_class

    from llrd.files import atomic_write_text

    config = yaml.safe_load((ROOT / CONFIG).read_text())
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    start = time.time()
    proc = subprocess.run([sys.executable, *COMMAND], cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.time() - start
    if proc.returncode:
        raise SystemExit(f"error: the main job failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    saved = read_metrics(ROOT / config["output_dir"], since=start)
    done = [line for line in proc.stdout.splitlines() if line.startswith("done:")]
    import torch
    import transformers

    record = {
        "command": "python " + " ".join(COMMAND),
        "wall_seconds": round(wall, 1),
        "wall": f"{int(wall // 60)} min {int(wall % 60):02d} s",
        **summary(saved),
        "done_line": done[-1] if done else None,
        "machine": {
            "cpus": os.cpu_count(),
            "hardware": hardware_class(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
        "config": config,
    }
    ns.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(ns.out / "main_job.json", json.dumps(record, indent=1) + "\n")
    print(json.dumps({k: v for k, v in record.items() if k != "config"}, indent=1))


if __name__ == "__main__":
    main()

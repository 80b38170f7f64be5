"""Run the README's ViT main job and record its numbers: metrics, wall time and the machine's load.

    python scripts/main_job_vit.py              # one process  -> scripts/results/main_job_vit.json
    python scripts/main_job_vit.py --procs 2    # accelerate launch, 2 CPU processes -> main_job_vit_2proc.json

One process runs exactly the README's command, ``python recipes/image_classification.py
recipes/configs/dinov2_fashion_mnist.yaml``, from the repository root (model and metrics in
``runs/dinov2_fashion_mnist``). ``--procs 2`` runs the same config through ``accelerate launch --config_file
recipes/accelerate/cpu_2proc.yaml`` with half the per-device batch (the same global batch of 32, the same 96 steps),
into ``runs/dinov2_fashion_mnist_2proc``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

from main_job import read_metrics, summary

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "scripts" / "results"
CONFIG = "recipes/configs/dinov2_fashion_mnist.yaml"
SCRIPT = "recipes/image_classification.py"


def command(procs: int, config: dict) -> tuple[list[str], str, str]:
    """(argv, output folder, results file name) of the job on ``procs`` processes."""
    if procs == 1:
        return [sys.executable, SCRIPT, CONFIG], config["output_dir"], "main_job_vit.json"
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or "accelerate"
    out = config["output_dir"] + f"_{procs}proc"
    per_device = config["per_device_train_batch_size"] // procs
    launch = [accelerate, "launch", "--config_file", "recipes/accelerate/cpu_2proc.yaml", "--num_processes", str(procs)]
    argv = [*launch, SCRIPT, CONFIG, "--per_device_train_batch_size", str(per_device), "--output_dir", out]
    return argv, out, f"main_job_vit_{procs}proc.json"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--procs", type=int, default=1, choices=(1, 2), help="processes (2: accelerate launch, gloo)")
    p.add_argument("--out", type=Path, default=RESULTS, help="where the results file goes (default scripts/results)")
    ns = p.parse_args()
    import yaml

    from llrd.files import atomic_write_text

    config = yaml.safe_load((ROOT / CONFIG).read_text())
    argv, out_dir, name = command(ns.procs, config)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    load_before = os.getloadavg()
    start = time.time()
    proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.time() - start
    load_after = os.getloadavg()
    if proc.returncode:
        raise SystemExit(f"error: the ViT main job failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    saved = read_metrics(ROOT / out_dir, since=start)
    done = [line for line in proc.stdout.splitlines() if line.startswith("done:")]
    import torch
    import transformers

    shown = [Path(a).name if a == sys.executable or a.endswith("accelerate") else a for a in argv]
    record = {
        "command": " ".join(shown),
        "processes": ns.procs,
        "per_device_train_batch_size": config["per_device_train_batch_size"] // ns.procs,
        "wall_seconds": round(wall, 1),
        "wall": f"{int(wall // 60)} min {int(wall % 60):02d} s",
        **summary(saved),
        "done_line": done[-1] if done else None,
        "machine": {
            "cpus": os.cpu_count(),
            "machine": platform.machine(),
            "load_average_1_5_15_before": [round(x, 2) for x in load_before],
            "load_average_1_5_15_after": [round(x, 2) for x in load_after],
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
        "config": config,
    }
    ns.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(ns.out / name, json.dumps(record, indent=1) + "\n")
    print(json.dumps({k: v for k, v in record.items() if k != "config"}, indent=1))


if __name__ == "__main__":
    main()

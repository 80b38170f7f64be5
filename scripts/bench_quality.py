"""Does LLRD pay off? The quality benchmark is `llrd sweep` run with one protocol on SST-2, MR and AG News.

    python scripts/bench_quality.py                       # all three datasets (hours on 2 CPU cores; resumable)
    python scripts/bench_quality.py --dataset mr          # one of them
    python scripts/bench_quality.py --quick --out DIR     # smoke version (minutes): what the slow test runs

Each dataset is one `llrd sweep` command (printed, and recorded at the top of its table.md), on the protocol
config ``scripts/configs/minilm_fewshot.yaml``: MiniLM-L6, 1,000 training sentences, 300 validation sentences
(SST-2: sampled from its validation file; MR and AG News: split off the training file), 80 steps of batch 16,
an evaluation every 20 steps, seeds 0-4; LLRD arm decay {0.9, 0.8, 0.65} at lr 3e-4, plain arm lr {5e-5, 1e-4,
2e-4} (three settings each: equal budget). The sweep works in ``runs/bench_quality/<dataset>`` (interrupted?
run the same command again: finished trials are reused) and its ``results.json``, ``table.md`` and ``sweep.png``
are copied to ``scripts/results/sweep_<dataset>/`` (``--out`` elsewhere).
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = "../shared/data"
CONFIG = "scripts/configs/minilm_fewshot.yaml"
DATASETS = {
    "sst2": ["--train_file", f"{DATA}/sst2/train.csv", "--validation_file", f"{DATA}/sst2/validation.csv",
             "--test_file", f"{DATA}/sst2/test.csv"],
    "mr": ["--train_file", f"{DATA}/mr/train.csv", "--test_file", f"{DATA}/mr/test.csv"],
    "agnews": ["--train_file", f"{DATA}/agnews/train.csv", "--test_file", f"{DATA}/agnews/test.csv",
               "--test_size", "2000"],
}  # fmt: skip
PROTOCOL = ["--seeds", "5", "--train_size", "1000", "--validation_size", "300", "--layer_decay", "0.9", "0.8",
            "0.65", "--learning_rate", "3e-4", "--plain_learning_rate", "5e-5", "1e-4", "2e-4"]  # fmt: skip
# the same code path, small: 2 seeds, one trial per arm, 30 steps on 320 sentences
QUICK = ["--seeds", "2", "--train_size", "320", "--validation_size", "100", "--test_size", "300", "--max_steps", "30",
         "--eval_steps", "10", "--logging_steps", "10", "--layer_decay", "0.65", "--learning_rate", "5e-4",
         "--plain_learning_rate", "2e-4"]  # fmt: skip
OUTPUTS = ("results.json", "table.md", "sweep.png")


def sweep_argv(dataset: str, quick: bool, work: Path) -> list[str]:
    """The `llrd sweep` arguments of one dataset's benchmark.

    Example:
        >>> sweep_argv("mr", False, Path("runs/bench_quality"))[:3]
        ['scripts/configs/minilm_fewshot.yaml', '--train_file', '../shared/data/mr/train.csv']
    """
    data = DATASETS[dataset]
    if quick and "--test_size" in data:
        i = data.index("--test_size")
        data = data[:i] + data[i + 2 :]
    return [CONFIG, *data, "--output_dir", str(work / dataset), *(QUICK if quick else PROTOCOL)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", nargs="+", choices=list(DATASETS), default=list(DATASETS))
    parser.add_argument("--quick", action="store_true", help="small smoke version (SST-2 only unless --dataset)")
    parser.add_argument("--out", type=Path, default=ROOT / "scripts" / "results", help="where the results go")
    parser.add_argument(
        "--work", type=Path, help="the sweeps' work folder (default runs/bench_quality; --quick: OUT/tmp/...)"
    )
    ns = parser.parse_args()
    ns.out, ns.work = ns.out.resolve(), ns.work.resolve() if ns.work else None  # before the chdir below
    os.chdir(ROOT)  # the config's and the commands' relative paths start at the project root
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_EVALUATE_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(var, "1")
    # One thread per trial: on a 2-core machine shared with other jobs, torch's 2 threads ran a MiniLM training
    # step 3-5x slower than 1 thread (spinning on a core someone else holds). Results record the setting.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if not Path(DATA).is_dir():
        print(
            f"error: {ROOT.parent / 'shared' / 'data'} not found: the benchmark needs ../shared/data", file=sys.stderr
        )
        return 1
    sys.path.insert(0, str(ROOT))
    from llrd.sweep.cli import main as sweep

    datasets = ["sst2"] if ns.quick and ns.dataset == list(DATASETS) else ns.dataset
    work = ns.work or (ns.out / "tmp" / "bench_quality_quick" if ns.quick else Path("runs") / "bench_quality")
    failed = 0
    for dataset in datasets:
        argv = sweep_argv(dataset, ns.quick, work)
        print(f"$ llrd sweep {shlex.join(argv)}", flush=True)
        rc = sweep(argv)
        if rc == 130:  # Ctrl-C: stop here; the same command resumes
            return rc
        if rc != 0:
            failed += 1
            continue
        dest = ns.out / f"sweep_{dataset}{'_quick' if ns.quick else ''}"
        dest.mkdir(parents=True, exist_ok=True)
        for name in OUTPUTS:
            shutil.copyfile(work / dataset / name, dest / name)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

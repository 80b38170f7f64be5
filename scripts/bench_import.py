"""How long does importing llrd take, next to ``import torch, transformers``?

    python scripts/bench_import.py            # 7 rounds, about 1 min
    python scripts/bench_import.py --runs 3

Each round starts a fresh interpreter per statement (the order alternates between rounds) and times the
statement itself inside that interpreter (interpreter start-up excluded), as CPU time (``time.process_time``,
the figure the ratios use) and wall time (``wall_seconds``, which includes waiting for the disk):

* ``import torch, transformers``: the reference;
* ``from llrd import param_groups``: the light path (torch and llrd's pure functions only);
* ``from transformers import Trainer``: what any Trainer user pays anyway;
* ``from llrd import LLRDTrainer``: the Trainer path (it imports ``transformers.trainer``).

Reported per statement: the ratio to the reference of the same round, as median and range over rounds, and
which heavy modules the statement loaded. Results go to scripts/results/import_time.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "scripts" / "results"
REFERENCE = "import torch, transformers"
STATEMENTS = (
    REFERENCE,
    "from llrd import param_groups",
    "from transformers import Trainer",
    "from llrd import LLRDTrainer",
)
HEAVY = ("transformers.trainer", "transformers.modeling_utils", "datasets", "accelerate", "deepspeed")

_PROBE = """
import json, sys, time
t, c = time.perf_counter(), time.process_time()
exec({stmt!r})
wall, cpu = time.perf_counter() - t, time.process_time() - c
print(json.dumps({{"seconds": cpu, "wall_seconds": wall, "loaded": [m for m in {heavy!r} if m in sys.modules]}}))
"""


def time_statement(stmt: str) -> dict:
    """Seconds ``stmt`` takes in a fresh interpreter, and which heavy modules it loaded."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-c", _PROBE.format(stmt=stmt, heavy=HEAVY)], env=env, capture_output=True, text=True,
        check=True, cwd=ROOT,
    )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--out", type=Path, default=RESULTS / "import_time.json")
    opts = parser.parse_args()
    time_statement(REFERENCE)  # warm the file cache once; not counted
    rounds = []
    for r in range(opts.runs):
        order = STATEMENTS if r % 2 == 0 else tuple(reversed(STATEMENTS))
        rounds.append({stmt: time_statement(stmt) for stmt in order})
    summary = {}
    for stmt in STATEMENTS:
        ratios = [rnd[stmt]["seconds"] / rnd[REFERENCE]["seconds"] for rnd in rounds]
        seconds = [rnd[stmt]["seconds"] for rnd in rounds]
        summary[stmt] = {
            "ratio_median": round(statistics.median(ratios), 3),
            "ratio_range": [round(min(ratios), 3), round(max(ratios), 3)],
            "seconds_median": round(statistics.median(seconds), 3),
            "seconds_range": [round(min(seconds), 3), round(max(seconds), 3)],
            "loaded": rounds[-1][stmt]["loaded"],
        }
    import torch
    import transformers

    result = {
        "reference": REFERENCE,
        "runs": opts.runs,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "summary": summary,
        "rounds": rounds,
    }
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    opts.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(summary, indent=1))  # the script's output is its report


if __name__ == "__main__":
    main()

"""A stand-in for a recipe, for the mechanics of ``llrd sweep`` (tests/test_sweep.py): it reads the trial's
JSON config and writes what the real recipe writes (``trainer_state.json`` with evaluations, and
``test_results.json`` when it gets a test file) from a made-up formula, in milliseconds.

- every call appends ``<output_dir>`` to the file named by ``$FAKE_CALLS``;
- ``learning_rate == 0.000777`` fails with ``error: boom``;
- ``$FAKE_FAIL_ONCE`` (a file path): fail while that file exists, to test ``--retry_failed``;
- ``$FAKE_FAIL_TEST``: every run fails when it comes to the test split (after training);
- ``$FAKE_HANG`` (a file path): the first call that finds no such file writes its pid there and hangs (a trial
  whose worker is then killed); later calls run normally;
- ``$FAKE_SLEEP``: seconds every call sleeps first (so two workers overlap);
- under a launcher only rank 0 writes, and it records ``WORLD_SIZE`` in ``world_size.txt``.
"""

import json
import math
import os
import sys
import time
from pathlib import Path

cfg = json.loads(Path(sys.argv[1]).read_text())
out = Path(cfg["output_dir"])
rank = int(os.environ.get("RANK", "0"))
if os.environ.get("FAKE_CALLS") and rank == 0:
    with open(os.environ["FAKE_CALLS"], "a") as f:
        f.write(f"{out.parent.name}/{out.name}\n")
if os.environ.get("FAKE_HANG") and rank == 0:
    try:
        fd = os.open(os.environ["FAKE_HANG"], os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        pass
    else:
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        time.sleep(600)
time.sleep(float(os.environ.get("FAKE_SLEEP", "0")))
if cfg["learning_rate"] == 0.000777:
    sys.exit("error: boom")
if os.environ.get("FAKE_FAIL_TEST") and cfg.get("test_file"):
    sys.exit("error: test split unreadable")
if os.environ.get("FAKE_FAIL_ONCE") and Path(os.environ["FAKE_FAIL_ONCE"]).exists():
    sys.exit("error: transient failure")
if rank != 0:
    sys.exit(0)
# quality peaks at lr 1e-4; decay 0.8 adds 0.02; seeds shift everything by -0.01..+0.01
seed_shift = (cfg["seed"] % 3 - 1) / 100
quality = 0.85 - 0.03 * math.log2(cfg["learning_rate"] / 1e-4) ** 2 + (0.02 if cfg["layer_decay"] < 1 else 0.0)
steps = list(range(int(cfg["eval_steps"]), cfg["max_steps"] + 1, int(cfg["eval_steps"])))
history = [
    {"step": s, "eval_accuracy": round(quality * (0.6 + 0.4 * s / steps[-1]) + seed_shift, 6), "eval_loss": 1 - s / 100}
    for s in steps
]
out.mkdir(parents=True, exist_ok=True)
(out / "trainer_state.json").write_text(json.dumps({"log_history": history}))
(out / "model.safetensors").write_bytes(b"weights")
(out / "world_size.txt").write_text(os.environ.get("WORLD_SIZE", "1"))
if cfg.get("test_file"):
    rows = sum(1 for _ in open(cfg["test_file"])) - 1
    # LLRD's test gain varies by seed (0.020, 0.022, 0.024), so paired differences have a spread
    gain = 0.002 * (cfg["seed"] % 3) if cfg["layer_decay"] < 1 else 0.0
    test = {"test_accuracy": round(quality - 0.05 + seed_shift / 2 + gain, 6), "test_loss": 0.5, "test_rows": rows}
    (out / "test_results.json").write_text(json.dumps(test))
print("done")

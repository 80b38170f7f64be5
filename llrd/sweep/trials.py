"""One trial of a sweep: its config file, its command line, its own process (which dies with its worker), and
the record it leaves behind: validation evaluations during training and the test split's scores, evaluated once
at its end on the same model (``test_results.json``). The record goes to the sweep's storage (``store.py``) and,
for people, to ``trial.json`` in the trial's folder.

The contract of a trial script (``--script``): it is run as ``python SCRIPT CONFIG.json`` (or ``LAUNCHER...
SCRIPT CONFIG.json``), CONFIG.json holding every setting as a flat JSON object (the recipe config, the setting,
``seed``, ``output_dir`` and the data: ``train_file``/``validation_file``/``test_file`` or ``train_dir``/...);
it writes into ``output_dir``:

- ``trainer_state.json`` whose ``log_history`` has entries with ``step`` and ``eval_<metric>`` (what Trainer's
  ``save_state()`` writes when it evaluates during training), and
- ``test_results.json`` with ``test_<metric>``, the test split evaluated once after training in the same process
  (``trainer.evaluate(test, metric_key_prefix="test")`` then ``trainer.save_metrics("test", metrics)``),

and exits 0; on a failure it exits non-zero, ideally with an ``error: ...`` line (the sweep records it).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .grid import llrd_only_fields, slug

logger = logging.getLogger("llrd.sweep")

RECORD = "trial.json"
# keys of an eval log entry that describe speed, not quality
_TIMING = ("runtime", "samples_per_second", "steps_per_second")
# config keys a trial never inherits: the sweep gives every trial its data; Hub data could bring its own splits
_DROPPED = ("dataset_name", "dataset_config_name", "test_file", "test_dir")
GUARD = Path(__file__).with_name("guard.py")


@dataclass
class Trial:
    """One attempt at a setting of an arm with one seed; ``number`` is its optuna trial number (a rerun gets a
    new one, so a fresh folder).

    Example:
        >>> t = Trial("llrd", {"layer_decay": 0.8}, 2, 7)
        >>> t.id, t.folder
        ('layer_decay-0.8__seed-2', 'layer_decay-0.8__seed-2/trial-7')
    """

    arm: str
    setting: dict[str, Any]
    seed: int
    number: int = 0

    @property
    def id(self) -> str:
        return f"{slug(self.setting)}__seed-{self.seed}"

    @property
    def folder(self) -> str:
        return f"{self.id}/trial-{self.number}"


def trial_config(base: dict, trial: Trial, out_dir: Path, files: dict[str, dict]) -> dict:
    """The recipe config of one trial: the base config, the setting, the seed, the sweep's data (train,
    validation and test: the test split is evaluated once, after training), no checkpoints. A plain-arm trial
    drops the config's LLRD settings (``head_lr_scale``, ``reinit_top_blocks``, ...), so "plain" means
    Trainer's own fine-tuning.

    Example:
        >>> files = {s: {"key": f"{s}_file", "path": f"/d/{s}.csv"} for s in ("train", "validation", "test")}
        >>> cfg = trial_config({"max_steps": 9}, Trial("llrd", {"layer_decay": 0.8}, 1, 3), Path("/o"), files)
        >>> cfg["seed"], cfg["test_file"], cfg["output_dir"]
        (1, '/d/test.csv', '/o/trials/layer_decay-0.8__seed-1/trial-3')
    """
    cfg = {k: v for k, v in base.items() if k not in _DROPPED}
    if trial.arm == "plain":  # plain fine-tuning: no LLRD setting of the config applies
        cfg = {k: v for k, v in cfg.items() if k not in llrd_only_fields()}
    cfg.update(trial.setting)
    cfg.update(seed=trial.seed, output_dir=str(Path(out_dir) / "trials" / trial.folder), save_strategy="no")
    for info in files.values():
        cfg[info["key"]] = info["path"]
    cfg.setdefault("disable_tqdm", True)
    return cfg


def command(script: str, config_path: Path, launcher: list[str] | None = None) -> list[str]:
    """The trial's command line: ``python SCRIPT CONFIG``, or ``LAUNCHER... SCRIPT CONFIG`` (e.g. ``accelerate
    launch --config_file ddp.yaml``, which runs the script with its own processes).

    Example:
        >>> command("recipes/text_classification.py", Path("c.json"), ["accelerate", "launch"])
        ['accelerate', 'launch', 'recipes/text_classification.py', 'c.json']
    """
    return [*(launcher or [sys.executable]), script, str(config_path)]


def script_digest(script: str) -> str | None:
    """Content hash of the trial script and, when it has one beside it, the ``common.py`` it imports (the
    recipes do); None when the script is not a file here (a launcher may resolve it).

    Example:
        >>> len(script_digest("recipes/text_classification.py"))  # doctest: +SKIP
        16
    """
    path = Path(script)
    if not path.is_file():
        return None
    h = hashlib.sha256(path.read_bytes())
    common = path.with_name("common.py")
    if common.is_file() and common != path:
        h.update(common.read_bytes())
    return h.hexdigest()[:16]


def failure_line(log: str, returncode: int) -> str:
    """The line that says why a trial failed: its last ``error:`` line, else its last line.

    Example:
        >>> failure_line("step 1\\nerror: layer_decay=2 is outside (0, 1]\\n", 1)
        'exit code 1: error: layer_decay=2 is outside (0, 1]'
    """
    lines = [line.strip() for line in log.splitlines() if line.strip()]
    errors = [line for line in lines if "error:" in line.lower()[:40]]
    last = errors[-1] if errors else (lines[-1] if lines else "no output")
    return f"exit code {returncode}: {last[:300]}"


def metric_missing(error: str | None) -> bool:
    """Whether a trial failed only because its script logs no such metric (then every trial would)."""
    return bool(error) and error.startswith("ValueError: no eval_")


def with_metric(record: dict, metric: str) -> dict:
    """``record`` with ``curve`` and ``final`` taken from its recorded evaluations for ``metric``: a resumed
    sweep may select on another ``--metric`` than the run that wrote the record.

    Example:
        >>> rec = {"status": "ok", "evals": [{"step": 10, "accuracy": 0.7, "loss": 0.6}]}
        >>> with_metric(rec, "loss")["final"]
        0.6
    """
    if record.get("status") != "ok":
        return record
    evals = [e for e in record.get("evals", []) if metric in e]
    if not evals:
        keys = sorted({k for e in record.get("evals", []) for k in e if k != "step"})
        raise ValueError(f"trial {record.get('id')} has no eval_{metric} (its metrics: {keys}); set --metric to one")
    if "test" in record and metric not in record["test"]:
        raise ValueError(f"trial {record.get('id')} has no test_{metric}; set --metric to one it logged")
    out = {**record, "curve": [[e["step"], e[metric]] for e in evals], "final": evals[-1][metric]}
    pairs = (("eval", out["final"]), ("test", (record.get("test") or {}).get(metric)))
    bad = [(name, v) for name, v in pairs if v is not None and not (isinstance(v, int | float) and math.isfinite(v))]
    if bad:  # a diverged trial: counted as failed, never averaged
        out.update(status="failed", error=f"{bad[0][0]}_{metric} is {bad[0][1]} (diverged)")
    return out


def read_outputs(trial_dir: Path, metric: str) -> dict:
    """Per-eval metrics from ``trainer_state.json`` and the test scores from ``test_results.json``."""
    state_path = Path(trial_dir) / "trainer_state.json"
    if not state_path.is_file():
        raise ValueError(f"the script wrote no {state_path.name} in {trial_dir}")
    history = json.loads(state_path.read_text())["log_history"]
    evals = [
        {"step": h["step"], **{k[5:]: v for k, v in h.items() if k.startswith("eval_") and k[5:] not in _TIMING}}
        for h in history
        if any(k.startswith("eval_") and k[5:] not in _TIMING for k in h)
    ]
    if not any(metric in e for e in evals):
        keys = sorted({k for h in history for k in h if k.startswith("eval_")})
        raise ValueError(f"no eval_{metric} in {state_path} (eval keys: {keys}); set --metric to one of them")
    test_path = Path(trial_dir) / "test_results.json"
    test = json.loads(test_path.read_text()) if test_path.is_file() else {}
    if f"test_{metric}" not in test:
        raise ValueError(
            f"no test_{metric} in {test_path}: the script must evaluate the test split once after training and "
            "save it there (trainer.save_metrics('test', trainer.evaluate(test, metric_key_prefix='test')))"
        )
    test = {k[5:]: v for k, v in test.items() if k.startswith("test_") and k[5:] not in _TIMING}
    return {"evals": evals, "test": test}


def _drop_weights(trial_dir: Path) -> None:
    for path in Path(trial_dir).iterdir():
        if path.is_dir() and path.name.startswith("checkpoint-"):
            shutil.rmtree(path)
        elif path.suffix == ".safetensors" or (path.name.startswith("pytorch_model") and path.suffix == ".bin"):
            path.unlink()


def _run_process(cmd: list[str], log_path: Path, cwd: Path, timeout: float | None, env: dict | None = None) -> int:
    """Run ``cmd`` under ``guard.py`` in its own process group (a launcher's workers included), output to
    ``log_path``; the group is killed on a timeout, on Ctrl-C, when the command ends, and (by the guard) when
    this worker dies."""
    run_env = {**os.environ, **(env or {})}
    run_env.setdefault("TOKENIZERS_PARALLELISM", "false")
    guarded = [sys.executable, str(GUARD), str(os.getpid()), *cmd]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            guarded, cwd=cwd, env=run_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            return proc.wait(timeout=timeout)
        except BaseException:
            _kill_group(proc.pid)
            proc.wait()
            raise
        finally:  # whatever the trial left running in its group (a launcher's stray workers) ends with it
            _kill_group(proc.pid)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def run_trial(
    trial: Trial,
    cfg: dict,
    cmd_prefix: tuple[str, list[str] | None],
    metric: str,
    timeout: float | None = None,
    keep_models: bool = False,
    cwd: Path | None = None,
    env: dict | None = None,
) -> dict:
    """Run one trial in its own process and return (and write to ``trial.json``) its record; a failure is
    recorded, not raised. ``env`` adds variables (e.g. ``CUDA_VISIBLE_DEVICES`` of a pinned worker)."""
    from llrd.files import atomic_write_text

    trial_dir = Path(cfg["output_dir"])
    if trial_dir.exists():  # never read stale outputs (a folder is one attempt's, so this is a leftover)
        shutil.rmtree(trial_dir)
    trial_dir.mkdir(parents=True)
    config_path = trial_dir / "trial_config.json"  # not config.json: save_model writes the model config there
    atomic_write_text(config_path, json.dumps(cfg, indent=1))
    script, launcher = cmd_prefix
    cmd = command(script, config_path, launcher)
    record = {"id": trial.id, "number": trial.number, "arm": trial.arm, "setting": trial.setting, "seed": trial.seed,
              "folder": str(trial_dir), "command": cmd}  # fmt: skip
    start = time.perf_counter()
    try:
        rc = _run_process(cmd, trial_dir / "log.txt", Path(cwd or os.getcwd()), timeout, env)
    except subprocess.TimeoutExpired:
        rc, error = None, f"timed out after {timeout:g} s (--trial_timeout)"
    record["seconds"] = round(time.perf_counter() - start, 1)
    if rc is not None:
        log = (trial_dir / "log.txt").read_text(errors="replace")
        error = failure_line(log, rc) if rc != 0 else None
    if error is None:
        try:
            record.update(read_outputs(trial_dir, metric))
            record["curve"] = [[e["step"], e[metric]] for e in record["evals"] if metric in e]
            record["final"] = record["curve"][-1][1]
            error = with_metric({**record, "status": "ok"}, metric).get("error")  # diverged: failed
        except (ValueError, KeyError, json.JSONDecodeError) as err:
            error = f"{type(err).__name__}: {err}"
    record["status"] = "failed" if error else "ok"
    record["error"] = error
    if not keep_models:
        _drop_weights(trial_dir)
    atomic_write_text(trial_dir / RECORD, json.dumps(record, indent=1))
    return record

"""One trial of a sweep: its config file, its command line, its own process, and the record it leaves behind
(``trial.json``), which a resumed sweep reads instead of running the trial again."""

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

from .grid import is_plain, llrd_only_fields, slug

logger = logging.getLogger("llrd.sweep")

RECORD = "trial.json"
_UNHASHED: set[str] = set()  # reused records without a script hash (warned about once)
# keys of an eval log entry that describe speed, not quality
_TIMING = ("runtime", "samples_per_second", "steps_per_second")
# config keys a trial never inherits: test data is for the test phase only, Hub data could bring its own test
_DROPPED = ("dataset_name", "dataset_config_name", "test_file")


@dataclass
class Trial:
    """A setting trained with one seed; ``phase`` is "tune" (validation only) or "test" (adds the test split).

    Example:
        >>> Trial("tune", {"layer_decay": 0.8}, 2).id
        'tune/layer_decay-0.8__seed-2'
    """

    phase: str
    setting: dict[str, Any]
    seed: int

    @property
    def id(self) -> str:
        return f"{self.phase}/{slug(self.setting)}__seed-{self.seed}"


def trial_config(base: dict, trial: Trial, out_dir: Path, files: dict[str, dict]) -> dict:
    """The recipe config of one trial: the base config, the setting, the seed, the sweep's data files, no
    checkpoints; the test file only in the test phase. A plain-arm trial drops the config's LLRD settings
    (``head_lr_scale``, ``reinit_top_blocks``, ...), so "plain" means Trainer's own fine-tuning.

    Example:
        >>> files = {s: {"path": f"/d/{s}.csv"} for s in ("train", "validation", "test")}
        >>> trial_config({"max_steps": 9}, Trial("tune", {"layer_decay": 0.8}, 1), Path("/o"), files)["seed"]
        1
    """
    cfg = {k: v for k, v in base.items() if k not in _DROPPED}
    if is_plain(trial.setting):  # plain fine-tuning: no LLRD setting of the config applies
        cfg = {k: v for k, v in cfg.items() if k not in llrd_only_fields()}
    cfg.update(trial.setting)
    cfg.update(
        seed=trial.seed,
        output_dir=str(Path(out_dir) / "trials" / trial.id),
        train_file=files["train"]["path"],
        validation_file=files["validation"]["path"],
        save_strategy="no",
    )
    if trial.phase == "test":
        cfg["test_file"] = files["test"]["path"]
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


def fingerprint(cfg: dict, script: str, launcher: list[str] | None, files: dict[str, dict], phase: str) -> dict:
    """What must be equal for a finished trial to be reused: config, script (path and content), launcher and
    the contents of the data splits this trial reads (a tuning trial never reads the test split, so a new
    ``--test_size`` keeps the tuning trials)."""
    used = ("train", "validation", "test") if phase == "test" else ("train", "validation")
    data = {split: info["sha"] for split, info in files.items() if split in used}
    fp = {"config": cfg, "script": script, "script_sha": script_digest(script), "launcher": launcher or []}
    return json.loads(json.dumps({**fp, "data": data}))


def _difference(old: dict, new: dict, where: str = "") -> str:
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            if a != b:
                return _difference(a, b, f"{where}{key}.")
        elif a != b:
            return f"{where}{key}: {a!r} there, {b!r} now"
    return "no difference"


def reset_warnings() -> None:
    """Forget which records were warned about (once per sweep)."""
    _UNHASHED.clear()


def _comparable(old: dict, expected: dict, trial_dir: Path) -> dict:
    """``old`` reduced to what ``expected`` checks: the data splits this trial reads; a record written before
    llrd hashed the script's content (no ``script_sha``) is compared without it, with a warning."""
    old = {**old, "data": {k: v for k, v in (old.get("data") or {}).items() if k in expected["data"]}}
    if old.get("script_sha") is None or expected.get("script_sha") is None:  # unknown on one side: not compared
        if "script_sha" in old:
            old["script_sha"] = expected["script_sha"]
    if "script_sha" not in old:
        if not _UNHASHED:
            logger.warning(
                "%s (and maybe others): recorded before llrd hashed the script's content; reused without that check",
                trial_dir,
            )
        _UNHASHED.add(str(trial_dir))
        old["script_sha"] = expected["script_sha"]
    return old


def load_record(trial_dir: Path, expected: dict) -> dict | None:
    """The finished record of a trial, or None when it must (re)run (never run, interrupted or failed).

    Raises ValueError when the trial finished with other settings than this sweep would give it.
    """
    path = Path(trial_dir) / RECORD
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    if record.get("status") != "ok":
        return None
    old = _comparable(record.get("fingerprint") or {}, expected, trial_dir)
    if old != expected:
        raise ValueError(
            f"{trial_dir} finished with other settings than this sweep gives it "
            f"({_difference(old, expected)}); use another --output_dir, or delete that folder to run it again "
            "(for a changed test split or script: every folder under trials/test/, or trials/ entirely)"
        )
    return record


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
    if record.get("phase") == "test" and metric not in record.get("test", {}):
        raise ValueError(f"trial {record.get('id')} has no test_{metric}; set --metric to one it logged")
    out = {**record, "curve": [[e["step"], e[metric]] for e in evals], "final": evals[-1][metric]}
    pairs = (("eval", out["final"]), ("test", (record.get("test") or {}).get(metric)))
    bad = [(name, v) for name, v in pairs if v is not None and not (isinstance(v, int | float) and math.isfinite(v))]
    if bad:  # a diverged trial: counted as failed, never averaged
        out.update(status="failed", error=f"{bad[0][0]}_{metric} is {bad[0][1]} (diverged)")
    return out


def read_outputs(trial_dir: Path, metric: str, phase: str) -> dict:
    """Per-eval metrics from ``trainer_state.json`` and, in the test phase, ``test_results.json``."""
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
    out: dict[str, Any] = {"evals": evals}
    if phase == "test":
        test_path = Path(trial_dir) / "test_results.json"
        test = json.loads(test_path.read_text()) if test_path.is_file() else {}
        if f"test_{metric}" not in test:
            raise ValueError(f"no test_{metric} in {test_path}")
        out["test"] = {k[5:]: v for k, v in test.items() if k.startswith("test_") and k[5:] not in _TIMING}
    return out


def _drop_weights(trial_dir: Path) -> None:
    for path in Path(trial_dir).iterdir():
        if path.is_dir() and path.name.startswith("checkpoint-"):
            shutil.rmtree(path)
        elif path.suffix == ".safetensors" or (path.name.startswith("pytorch_model") and path.suffix == ".bin"):
            path.unlink()


def _run_process(cmd: list[str], log_path: Path, cwd: Path, timeout: float | None) -> int:
    """Run ``cmd`` in its own process group (a launcher's workers included), output to ``log_path``; on a
    timeout or Ctrl-C the whole group is killed."""
    env = {**os.environ}
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
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
    expected: dict,
    cmd_prefix: tuple[str, list[str] | None],
    metric: str,
    timeout: float | None = None,
    keep_models: bool = False,
    cwd: Path | None = None,
) -> dict:
    """Run one trial in its own process and return (and write) its record; a failure is recorded, not raised."""
    from llrd.files import atomic_write_text

    trial_dir = Path(cfg["output_dir"])
    if trial_dir.exists():  # an interrupted or failed attempt: never read its stale outputs
        shutil.rmtree(trial_dir)
    trial_dir.mkdir(parents=True)
    config_path = trial_dir / "config.json"
    atomic_write_text(config_path, json.dumps(cfg, indent=1))
    script, launcher = cmd_prefix
    cmd = command(script, config_path, launcher)
    record = {"id": trial.id, "phase": trial.phase, "setting": trial.setting, "seed": trial.seed, "command": cmd}
    start = time.perf_counter()
    try:
        rc = _run_process(cmd, trial_dir / "log.txt", Path(cwd or os.getcwd()), timeout)
    except subprocess.TimeoutExpired:
        rc, error = None, f"timed out after {timeout:g} s (--trial_timeout)"
    record["seconds"] = round(time.perf_counter() - start, 1)
    if rc is not None:
        log = (trial_dir / "log.txt").read_text(errors="replace")
        error = failure_line(log, rc) if rc != 0 else None
    if error is None:
        try:
            record.update(read_outputs(trial_dir, metric, trial.phase))
            record["curve"] = [[e["step"], e[metric]] for e in record["evals"] if metric in e]
            record["final"] = record["curve"][-1][1]
            error = with_metric({**record, "status": "ok"}, metric).get("error")  # diverged: failed on disk too
        except (ValueError, KeyError, json.JSONDecodeError) as err:
            error = f"{type(err).__name__}: {err}"
    record["status"] = "failed" if error else "ok"
    record["error"] = error
    record["fingerprint"] = expected
    if not keep_models:
        _drop_weights(trial_dir)
    atomic_write_text(trial_dir / RECORD, json.dumps(record, indent=1))
    return record

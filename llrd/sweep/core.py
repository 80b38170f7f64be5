"""The sweep from start to verdict: prepare the data, check every setting, run the tuning trials (each setting
with every seed, validation only), choose each arm's setting on validation, re-run the two chosen settings with
the test split, and write ``results.json``, ``table.md`` and ``sweep.png``."""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import data, report, trials
from .grid import expand, label
from .grid import llrd_only_fields as grid_llrd_only
from .plot import plot

logger = logging.getLogger("llrd.sweep")


@dataclass
class SweepSpec:
    """Everything a sweep needs; the CLI (``llrd sweep``) and ``scripts/bench_quality.py`` both build one.

    Example:
        >>> spec = SweepSpec(config={"train_file": "t.csv"}, grid={"layer_decay": [0.8]}, output_dir=Path("o"))
        >>> spec.seeds, spec.metric
        (3, 'accuracy')
    """

    config: dict[str, Any]
    grid: dict[str, list[Any]]
    output_dir: Path
    script: str = "recipes/text_classification.py"
    seeds: int = 3
    plain_learning_rate: list[float] | None = None
    metric: str = "accuracy"
    target: float | None = None
    train_size: int | None = None
    validation_size: int | None = None
    test_size: int | None = None
    split_seed: int = 0
    launcher: list[str] | None = None
    trial_timeout: float | None = None
    keep_models: bool = False
    confidence: float = 0.95
    greater_is_better: bool | None = None
    command: str = ""
    title: str = ""


def check_settings(configs: list[tuple[str, dict]]) -> None:
    """Parse each trial config's training arguments before any trial runs: a bad value fails now, naming the
    setting, not minutes later in a trial. Also insists on evaluations during training."""
    from transformers import HfArgumentParser

    from llrd.args import LLRDTrainingArguments

    parser = HfArgumentParser(LLRDTrainingArguments)
    for name, cfg in configs:
        try:
            (args,) = parser.parse_dict(cfg, allow_extra_keys=True)
        except (ValueError, TypeError) as err:
            raise ValueError(f"setting {name}: {str(err).strip().splitlines()[0]}") from err
        if str(getattr(args.eval_strategy, "value", args.eval_strategy)) == "no":
            raise ValueError(
                "eval_strategy='no': llrd sweep needs evaluations during training to compare settings; set "
                "eval_strategy: steps and eval_steps in the config, or pass --eval_strategy steps --eval_steps 20"
            )


def _check_dependencies() -> None:
    try:
        import matplotlib  # noqa: F401
        import scipy  # noqa: F401
    except ImportError as err:
        raise ValueError(f"llrd sweep needs {err.name}: pip install 'llrd[recipes]'") from err


class _Progress:
    """``[i/n]`` counter; the remaining time is the mean time of the trials run so far times the trials still to
    run (finished ones found on disk cost nothing)."""

    def __init__(self, total: int, metric: str):
        self.total, self.metric, self.done, self.spent, self.ran, self.pending = total, metric, 0, 0.0, 0, 0

    def step(self, record: dict, reused: bool) -> None:
        self.done += 1
        if not reused:
            self.spent += record["seconds"]
            self.ran += 1
            self.pending -= 1
        eta = "done" if self.done == self.total else ""
        if self.ran and self.done < self.total:
            eta = f"~{self.spent / self.ran * max(self.pending, 0) / 60:.1f} min left"
        what = f"{record['id']}: " + (
            f"val {self.metric} {record['final']:.4f}"
            + (f", test {record['test'][self.metric]:.4f}" if "test" in record else "")
            if record["status"] == "ok"
            else f"FAILED ({record['error']})"
        )
        how = "finished earlier, reused" if reused else f"{record['seconds']:.0f} s"
        logger.info("[%d/%d] %s; %s; %s", self.done, self.total, what, how, eta)


class _Runner:
    """Runs trials in order, reusing finished ones, and keeps ``results.json`` up to date after each."""

    def __init__(self, spec: SweepSpec, out: Path, files: dict, record: dict, total: int):
        self.spec, self.out, self.files, self.record = spec, out, files, record
        self.progress = _Progress(total, spec.metric)

    def config(self, trial: trials.Trial) -> dict:
        return trials.trial_config(self.spec.config, trial, self.out, self.files)

    def run(self, batch: list[trials.Trial], later: int = 0) -> None:
        """Run ``batch``; ``later`` trials are still to come after it (for the time estimate)."""
        spec, plan = self.spec, []
        for trial in batch:
            cfg = self.config(trial)
            expected = trials.fingerprint(cfg, spec.script, spec.launcher, self.files, trial.phase)
            done = trials.load_record(Path(cfg["output_dir"]), expected)
            if done is not None:  # a reused record lacking --metric stops the sweep now, before anything runs
                trials.with_metric(done, spec.metric)
            plan.append((trial, cfg, expected, done))
        self.progress.pending = sum(done is None for *_, done in plan) + later
        for trial, cfg, expected, done in plan:
            rec = done or trials.run_trial(
                trial, cfg, expected, (spec.script, spec.launcher), spec.metric, spec.trial_timeout, spec.keep_models
            )
            if trials.metric_missing(rec.get("error")):  # every other trial would train for nothing
                _write_json(self.out / "results.json", {**self.record, "trials": [*self.record["trials"], rec]})
                raise ValueError(f"--metric {spec.metric}: {rec['error'].removeprefix('ValueError: ')}")
            rec = trials.with_metric(rec, spec.metric)  # a reused record may have been run with another --metric
            self.record["trials"].append(rec)
            self.progress.step(rec, reused=done is not None)
            if done is None:  # partial results survive a crash; a resume that only reuses keeps the old file
                _write_json(self.out / "results.json", self.record)


def run_sweep(spec: SweepSpec) -> dict:
    """Run (or resume) the sweep described by ``spec``; returns the ``results.json`` content.

    Example:
        >>> result = run_sweep(spec)  # doctest: +SKIP
        >>> print(result["verdict"]["line"])  # doctest: +SKIP
        verdict: use layer_decay=0.8, learning_rate=0.0004 (best on validation); ...
    """
    began = time.perf_counter()
    trials.reset_warnings()
    _check_dependencies()
    _check_script(spec)
    out = Path(spec.output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    with _lock(out):  # a second sweep on the same folder would delete this one's live trials
        return _run_locked(spec, out, began)


def _run_locked(spec: SweepSpec, out: Path, began: float) -> dict:
    _check_data_settings(spec.config)
    files = data.prepare(spec.config, out, spec.train_size, spec.validation_size, spec.test_size, spec.split_seed)
    plain, llrd = expand(spec.grid, float(spec.config.get("learning_rate", 5e-5)), spec.plain_learning_rate)
    logger.info("plain arm (%d): %s", len(plain), "; ".join(label(s) for s in plain))
    logger.info("LLRD arm (%d): %s", len(llrd), "; ".join(label(s) for s in llrd))
    record: dict[str, Any] = {
        "sweep": {**{k: v for k, v in dataclasses.asdict(spec).items() if k != "output_dir"}, "output_dir": str(out)},
        "data": files,
        "environment": _environment(),
        "settings": {"plain": plain, "llrd": llrd},
        "trials": [],
    }
    runner = _Runner(spec, out, files, record, (len(plain) + len(llrd) + 2) * spec.seeds)
    check_settings([(label(s), runner.config(trials.Trial("tune", s, 0))) for s in plain + llrd])
    logger.info("%d settings x %d seeds, then the 2 chosen x %d seeds on test", len(plain + llrd), *[spec.seeds] * 2)
    runner.run([trials.Trial("tune", s, k) for k in range(spec.seeds) for s in plain + llrd], later=2 * spec.seeds)
    greater = report.greater_is_better(spec.metric, spec.greater_is_better)
    chosen = [report.choose(report.summarize(arm, record["trials"], greater), greater) for arm in (plain, llrd)]
    if None in chosen:
        _write_json(out / "results.json", record)
        arm, settings = ("plain", plain) if chosen[0] is None else ("LLRD", llrd)
        errors = [r["error"] for r in record["trials"] if r["setting"] in settings and r["error"]]
        common = max(set(errors), key=errors.count) if errors else "no error recorded"
        raise RuntimeError(
            f"every {arm} trial failed: no verdict; most common error ({errors.count(common)} of {len(errors)}): "
            f"{common} (all errors: {out / 'results.json'})"
        )
    runner.run([trials.Trial("test", row["setting"], k) for row in chosen for k in range(spec.seeds)])
    _conclude(spec, record, plain, llrd, chosen, greater)
    record.update(wall_seconds_this_invocation=round(time.perf_counter() - began, 1))
    _write_outputs(spec, out, files, record, greater)
    return record


def _check_script(spec: SweepSpec) -> None:
    """Without a launcher the script must be a file here (paths are relative to the working directory)."""
    if not spec.launcher and not Path(spec.script).is_file():
        raise ValueError(
            f"--script {spec.script}: no such file from {Path.cwd()}; run llrd sweep from the project root or give "
            "the script's path"
        )


def _lock(out: Path):
    """An exclusive lock on ``out/.lock`` for this process; ValueError when another sweep holds it."""
    import fcntl

    try:
        handle = open(out / ".lock", "w")  # noqa: SIM115 - held for the sweep's lifetime
    except OSError as err:
        raise ValueError(f"--output_dir {out}: cannot write there ({err.strerror})") from err
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as err:
        handle.close()
        raise ValueError(
            f"--output_dir {out}: another llrd sweep is running there; wait for it or use another folder"
        ) from err
    except OSError as err:
        handle.close()
        raise ValueError(f"--output_dir {out}: cannot lock {out / '.lock'} ({err.strerror})") from err
    return handle


def _check_data_settings(config: dict) -> None:
    if not config.get("test_file"):
        raise ValueError(
            "the config has no test_file: llrd sweep reports the chosen settings on a test split; add test_file "
            "to the config or pass --test_file"
        )
    if config.get("max_eval_samples"):
        logger.warning(
            "max_eval_samples=%s in the config also truncates the test split; --validation_size/--test_size "
            "sample each split on its own",
            config["max_eval_samples"],
        )


def _conclude(spec: SweepSpec, record: dict, plain: list, llrd: list, chosen: list[dict], greater: bool) -> None:
    """Summaries, test rows, verdict and notes into ``record``; RuntimeError when no seed has both test results."""
    best_plain, best_llrd = chosen
    target = spec.target if spec.target is not None else best_plain["mean"]
    test_rows = [
        report.summarize(
            [row["setting"]], record["trials"], greater, phase="test", value=lambda r: r["test"][spec.metric]
        )[0]
        for row in chosen
    ]
    verdict = report.verdict(
        best_plain, best_llrd, test_rows[0]["finals"], test_rows[1]["finals"], spec.metric, greater, spec.confidence
    )
    if not verdict["seeds"]:
        _write_json(Path(record["sweep"]["output_dir"]) / "results.json", record)
        raise RuntimeError("no seed has test results for both chosen settings: no verdict (see results.json)")
    notes = report.edge_notes(best_plain, plain) + report.edge_notes(best_llrd, llrd)
    notes += [
        f"no {row['arm']} setting finished every seed; {row['label']} was chosen on the seeds that did "
        f"({sorted(row['finals'])})"
        for row in chosen
        if row["failed"]
    ]
    dropped = sorted(k for k in spec.config if k in grid_llrd_only() and spec.config[k] != _llrd_default(k))
    if dropped:
        notes.append(f"LLRD settings of the config applied to the LLRD arm only: {', '.join(dropped)}")
    record.update(
        summary=report.summarize(plain + llrd, record["trials"], greater, target),
        target=target,
        chosen={"plain": best_plain["label"], "llrd": best_llrd["label"]},
        test=test_rows,
        verdict=verdict,
        notes=notes + _reproduction_notes(record["trials"]) + _failure_notes(record["trials"]),
        trial_seconds_total=round(sum(r["seconds"] for r in record["trials"]), 1),
    )


def _llrd_default(name: str) -> Any:
    from llrd.args import LLRDArguments

    field = LLRDArguments.__dataclass_fields__[name]
    return field.default if field.default is not dataclasses.MISSING else None


def _write_outputs(spec: SweepSpec, out: Path, files: dict, record: dict, greater: bool = True) -> None:
    """``results.json``, ``table.md`` and ``sweep.png``."""
    from llrd.files import atomic_write_text

    _write_json(out / "results.json", record)
    rows, verdict, notes = record["summary"], record["verdict"], record["notes"]
    header = _header(spec, files, record)
    footer = [f"Note: {n}" for n in notes] + ([""] if notes else []) + [f"**{verdict['line']}**"]
    text = report.markdown(header, rows, record["test"], spec.metric, record["target"], footer, greater)
    atomic_write_text(out / "table.md", text)
    data_name = "/".join(Path(files["train"]["source"]).parts[-2:])
    title = spec.title or (
        f"{spec.config.get('model_name_or_path', 'model')} on {data_name}: validation {spec.metric} "
        f"(mean line, min-max band over {spec.seeds} seeds)"
    )
    plot(rows, record["trials"], list(record["chosen"].values()), spec.metric, title, out / "sweep.png")


def _failure_notes(records: list[dict]) -> list[str]:
    """One note per (setting, error) of the failed trials, with the seeds it hit."""
    seeds: dict[tuple[str, str], list[int]] = {}
    for r in records:
        if r["status"] != "ok":
            seeds.setdefault((f"{r['phase']} {label(r['setting'])}", r["error"]), []).append(r["seed"])
    return [f"failed: {what}, seeds {s}: {error}" for (what, error), s in seeds.items()]


def _reproduction_notes(records: list[dict]) -> list[str]:
    """Each test run repeats a tuning run with the test split added: its validation curve must be the same."""
    tune = {(json.dumps(r["setting"], sort_keys=True), r["seed"]): r for r in records if r["phase"] == "tune"}
    notes = []
    for r in records:
        if r["phase"] != "test" or r["status"] != "ok":
            continue
        twin = tune.get((json.dumps(r["setting"], sort_keys=True), r["seed"]))
        if twin and twin["status"] == "ok" and twin["curve"] != r["curve"]:
            notes.append(
                f"{r['id']} did not reproduce its tuning run's validation curve ({twin['curve'][-1][1]:.4f} then, "
                f"{r['curve'][-1][1]:.4f} now): the script or hardware is not deterministic, so pairs are looser"
            )
    return notes


def _header(spec: SweepSpec, files: dict, record: dict) -> list[str]:
    """The protocol, as run: command, script, data sizes, seeds, budget, target, time and environment."""
    rows, target = record["summary"], record["target"]
    sizes = ", ".join(f"{split} {info['rows']} rows ({info['how']})" for split, info in files.items())
    env = ", ".join(f"{k}={v}" for k, v in record["environment"].items() if v is not None)
    return [
        f"Command: `{spec.command}`" if spec.command else "Command: (Python API)",
        "",
        f"Script `{spec.script}`"
        + (f" under `{' '.join(spec.launcher)}`" if spec.launcher else "")
        + f"; data: {sizes}; seeds 0-{spec.seeds - 1}; {len(rows)} settings ({len(rows) // 2} per arm: equal "
        f"budget), every trial the same steps and evaluations. Target for 'steps to': {target:.4f}"
        + (" (given)" if spec.target is not None else " (the best plain setting's mean final validation value)")
        + f". {len(record['trials'])} trials took {record['trial_seconds_total'] / 60:.1f} min (sum of their wall "
        f"times); this invocation ran {record['wall_seconds_this_invocation'] / 60:.1f} min (trials reused from an "
        f"earlier invocation cost nothing here). Environment: {env}.",
    ]


def _environment() -> dict:
    """What the trials ran on: CPU count and the thread/device variables they inherit."""
    import os
    import platform

    keys = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "CUDA_VISIBLE_DEVICES")
    return {"cpu_count": os.cpu_count(), "machine": platform.machine(), **{k: os.environ.get(k) for k in keys}}


def _write_json(path: Path, obj: Any) -> None:
    from llrd.files import atomic_write_text

    atomic_write_text(path, json.dumps(obj, indent=1, default=str))

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


def run_sweep(spec: SweepSpec) -> dict:
    """Run (or resume) the sweep described by ``spec``; returns the ``results.json`` content.

    Example:
        >>> result = run_sweep(spec)  # doctest: +SKIP
        >>> print(result["verdict"]["line"])  # doctest: +SKIP
        verdict: use layer_decay=0.8, learning_rate=0.0004 (best on validation); ...
    """
    began = time.perf_counter()
    _check_dependencies()
    out = Path(spec.output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if not spec.config.get("test_file"):
        raise ValueError("the config has no test_file: llrd sweep reports the chosen settings on a test split")
    if spec.config.get("max_eval_samples"):
        logger.warning(
            "max_eval_samples=%s in the config also truncates the test split; --validation_size/--test_size "
            "sample each split on its own",
            spec.config["max_eval_samples"],
        )
    files = data.prepare(spec.config, out, spec.train_size, spec.validation_size, spec.test_size, spec.split_seed)
    plain, llrd = expand(spec.grid, float(spec.config.get("learning_rate", 5e-5)), spec.plain_learning_rate)
    settings = plain + llrd
    logger.info("plain arm (%d): %s", len(plain), "; ".join(label(s) for s in plain))
    logger.info("LLRD arm (%d): %s", len(llrd), "; ".join(label(s) for s in llrd))
    prefix = (spec.script, spec.launcher)

    def config_of(trial: trials.Trial) -> dict:
        return trials.trial_config(spec.config, trial, out, files)

    check_settings([(label(s), config_of(trials.Trial("tune", s, 0))) for s in settings])
    greater = report.greater_is_better(spec.metric)
    record: dict[str, Any] = {
        "sweep": {**{k: v for k, v in dataclasses.asdict(spec).items() if k != "output_dir"}, "output_dir": str(out)},
        "data": files,
        "environment": _environment(),
        "settings": {"plain": plain, "llrd": llrd},
        "trials": [],
    }
    results = out / "results.json"
    progress = _Progress(len(settings) * spec.seeds + 2 * spec.seeds, spec.metric)

    def run_all(batch: list[trials.Trial], later: int = 0) -> None:
        """Run ``batch`` in order; ``later`` trials are still to come after it (for the time estimate)."""
        plan = []
        for trial in batch:
            cfg = config_of(trial)
            expected = trials.fingerprint(cfg, spec.script, spec.launcher, files)
            plan.append((trial, cfg, expected, trials.load_record(Path(cfg["output_dir"]), expected)))
        progress.pending = sum(done is None for *_, done in plan) + later
        for trial, cfg, expected, done in plan:
            rec = done or trials.run_trial(
                trial, cfg, expected, prefix, spec.metric, spec.trial_timeout, spec.keep_models
            )
            record["trials"].append(rec)
            progress.step(rec, reused=done is not None)
            _write_json(results, record)  # partial results survive a crash

    logger.info(
        "%d settings x %d seeds, then the 2 chosen settings x %d seeds on test", len(settings), spec.seeds, spec.seeds
    )
    run_all([trials.Trial("tune", s, k) for k in range(spec.seeds) for s in settings], later=2 * spec.seeds)

    plain_rows = report.summarize(plain, record["trials"], greater)
    llrd_rows = report.summarize(llrd, record["trials"], greater)
    best_plain, best_llrd = report.choose(plain_rows, greater), report.choose(llrd_rows, greater)
    if best_plain is None or best_llrd is None:
        arm = "plain" if best_plain is None else "LLRD"
        _write_json(results, record)
        raise RuntimeError(f"every {arm} trial failed: no verdict (see the errors in {results})")
    target = spec.target if spec.target is not None else best_plain["mean"]
    rows = report.summarize(settings, record["trials"], greater, target)
    run_all([trials.Trial("test", row["setting"], k) for row in (best_plain, best_llrd) for k in range(spec.seeds)])

    def test_value(r: dict) -> float:
        return r["test"][spec.metric]

    test_rows = [
        report.summarize([row["setting"]], record["trials"], greater, phase="test", value=test_value)[0]
        for row in (best_plain, best_llrd)
    ]
    verdict = report.verdict(
        best_plain, best_llrd, test_rows[0]["finals"], test_rows[1]["finals"], spec.metric, greater, spec.confidence
    )
    if not verdict["seeds"]:
        _write_json(results, record)
        raise RuntimeError(f"no seed has test results for both chosen settings: no verdict (see {results})")
    notes = report.edge_notes(best_plain, plain) + report.edge_notes(best_llrd, llrd)
    notes += _reproduction_notes(record["trials"])
    notes += _failure_notes(record["trials"])
    trial_seconds = sum(r["seconds"] for r in record["trials"])
    wall = time.perf_counter() - began
    record.update(
        summary=rows,
        target=target,
        chosen={"plain": best_plain["label"], "llrd": best_llrd["label"]},
        test=test_rows,
        verdict=verdict,
        notes=notes,
        trial_seconds_total=round(trial_seconds, 1),
        wall_seconds_this_invocation=round(wall, 1),
    )
    _write_json(results, record)
    header = _header(spec, files, rows, target, trial_seconds, wall)
    footer = [f"Note: {n}" for n in notes] + ([""] if notes else []) + [f"**{verdict['line']}**"]
    from llrd.manifest import atomic_write_text

    atomic_write_text(out / "table.md", report.markdown(header, rows, test_rows, spec.metric, target, footer))
    data_name = "/".join(Path(files["train"]["source"]).parts[-2:])
    title = spec.title or (
        f"{spec.config.get('model_name_or_path', 'model')} on {data_name}: validation {spec.metric} "
        f"(mean line, min-max band over {spec.seeds} seeds)"
    )
    plot(rows, record["trials"], [best_plain["label"], best_llrd["label"]], spec.metric, title, out / "sweep.png")
    return record


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


def _header(
    spec: SweepSpec, files: dict, rows: list[dict], target: float, trial_seconds: float, wall: float
) -> list[str]:
    sizes = ", ".join(f"{split} {info['rows']} rows ({info['how']})" for split, info in files.items())
    n_trials = len(rows) * spec.seeds + 2 * spec.seeds
    return [
        f"Command: `{spec.command}`" if spec.command else "Command: (Python API)",
        "",
        f"Script `{spec.script}`"
        + (f" under `{' '.join(spec.launcher)}`" if spec.launcher else "")
        + f"; data: {sizes}; seeds 0-{spec.seeds - 1}; {len(rows)} settings ({len(rows) // 2} per arm: equal "
        f"budget), every trial the same steps and evaluations. Target for 'steps to': {target:.4f}"
        + (" (given)" if spec.target is not None else " (the best plain setting's mean final validation value)")
        + f". {n_trials} trials took {trial_seconds / 60:.1f} min (sum of their wall times); this invocation ran "
        f"{wall / 60:.1f} min (trials reused from an earlier invocation cost nothing here).",
    ]


def _environment() -> dict:
    """What the trials ran on: CPU count and the thread/device variables they inherit."""
    import os
    import platform

    keys = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "CUDA_VISIBLE_DEVICES")
    return {"cpu_count": os.cpu_count(), "machine": platform.machine(), **{k: os.environ.get(k) for k in keys}}


def _write_json(path: Path, obj: Any) -> None:
    from llrd.manifest import atomic_write_text

    atomic_write_text(path, json.dumps(obj, indent=1, default=str))

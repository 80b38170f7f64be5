"""The sweep from start to verdict, as one worker of it: prepare the data, check every setting, join the sweep's
study in its optuna storage (creating it and enqueueing every (setting, seed) when it is new), run waiting trials
until none is left (each setting with every seed; each trial also scores the test split once at its end), then
choose each arm's setting on validation (test scores stripped), compare every arm with plain on test, and write
``results.json``, ``table.md`` and ``sweep.png``. Several workers (processes, GPUs, machines) share one sweep by
sharing its storage."""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import bundled, data, report, store, trials
from .grid import expand_arms, label
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
    script: str | None = None  # None: the bundled text-classification recipe
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
    arms: dict[str, dict[str, list[Any]]] | None = None  # named arms besides plain and llrd
    storage: str | None = None  # None: sqlite:///<output_dir>/sweep.db
    study_name: str = "llrd-sweep"
    heartbeat: int = 30
    devices: str | None = None
    retry_failed: bool = False


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
        import optuna  # noqa: F401
        import scipy  # noqa: F401
    except ImportError as err:
        raise ValueError(f"llrd sweep needs {err.name}: pip install 'llrd[sweep]'") from err


class _Worker:
    """Takes waiting trials of the study until none is waiting or running, and runs each in its own process."""

    def __init__(self, spec: SweepSpec, out: Path, files: dict, script: str, study, total: int):
        self.spec, self.out, self.files, self.script, self.study, self.total = spec, out, files, script, study, total
        self.ran = 0
        self.env = {"CUDA_VISIBLE_DEVICES": spec.devices} if spec.devices is not None else {}

    def run(self) -> None:
        from optuna.storages import fail_stale_trials

        poll = max(1.0, min(float(self.spec.heartbeat), 10.0))
        waited = False
        while True:
            with store.quiet_experimental():  # a dead worker's trial: failed and enqueued again (store.requeue)
                fail_stale_trials(self.study)
            store.requeue_orphans(self.study, grace=2 * self.spec.heartbeat)  # its failing worker died too
            trial = store.take(self.study)
            if trial is not None:
                self._run(trial)
                waited = False
                continue
            now = store.state(self.study)
            if not now["waiting"] and not now["running"] and not now["pending"]:
                return
            if not waited:
                logger.info("no trial waiting; %d running on other workers: waiting for them", now["running"])
                waited = True
            time.sleep(poll)

    def _run(self, optuna_trial) -> None:
        spec, attrs = self.spec, optuna_trial.user_attrs
        trial = trials.Trial(attrs["arm"], attrs["setting"], attrs["seed"], optuna_trial.number)
        cfg = trials.trial_config(spec.config, trial, self.out, self.files)
        try:
            with store.Heartbeat(self.study._storage, optuna_trial._trial_id, spec.heartbeat):
                rec = trials.run_trial(
                    trial, cfg, (self.script, spec.launcher), spec.metric, spec.trial_timeout, spec.keep_models,
                    env=self.env,
                )  # fmt: skip
        except BaseException:  # Ctrl-C, SIGTERM: the trial goes back to the queue for another worker
            store.interrupted(self.study, optuna_trial)
            raise
        rec["attempt"] = attrs.get("attempt", 1)
        store.finish(self.study, optuna_trial, rec)
        if trials.metric_missing(rec.get("error")):  # every other trial would train for nothing
            raise ValueError(f"--metric {spec.metric}: {rec['error'].removeprefix('ValueError: ')}")
        self.ran += 1
        done = len(store.state(self.study)["records"])
        what = (
            f"val {spec.metric} {rec['final']:.4f}, test {rec['test'][spec.metric]:.4f}"
            if rec["status"] == "ok"
            else f"FAILED ({rec['error']})"
        )
        logger.info("[%d/%d] %s/%s (trial %d): %s; %.0f s", done, self.total, trial.arm, trial.id,
                    trial.number, what, rec["seconds"])  # fmt: skip


def run_sweep(spec: SweepSpec) -> dict:
    """Run (or join, or resume) the sweep described by ``spec`` as one worker; returns the ``results.json``
    content once no trial is left.

    Example:
        >>> result = run_sweep(spec)  # doctest: +SKIP
        >>> print(result["verdict"]["line"])  # doctest: +SKIP
        verdict: use layer_decay=0.8, learning_rate=0.0004 (best on validation); ...
    """
    began = time.perf_counter()
    _check_dependencies()
    script = bundled.resolve_script(spec.script)
    _check_script(spec, script)
    out = Path(spec.output_dir).resolve()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"--output_dir {out}: cannot create it ({err.strerror})") from err
    _check_data_settings(spec.config)
    files = data.prepare(spec.config, out, spec.train_size, spec.validation_size, spec.test_size, spec.split_seed)
    arms = expand_arms(spec.grid, float(spec.config.get("learning_rate", 5e-5)), spec.plain_learning_rate, spec.arms)
    for arm, settings in arms.items():
        logger.info("%s arm (%d): %s", arm, len(settings), "; ".join(label(s) for s in settings))
    check_settings(
        [(label(s), trials.trial_config(spec.config, trials.Trial(a, s, 0), out, files)) for a in arms for s in arms[a]]
    )
    entries = [{"arm": a, "setting": s, "seed": k} for k in range(spec.seeds) for a in arms for s in arms[a]]
    url = spec.storage or f"sqlite:///{out / 'sweep.db'}"
    storage = store.open_storage(url, spec.heartbeat)
    study, created = store.join(storage, spec.study_name, _fingerprint(spec, arms, files, script), entries)
    logger.info(
        "%s study %r in %s: %d settings x %d seeds = %d trials, each scoring the test split once at its end",
        "created" if created else "joined", spec.study_name, store.redact(url), len(entries) // spec.seeds,
        spec.seeds, len(entries),
    )  # fmt: skip
    if spec.retry_failed:
        logger.info("--retry_failed: %d failed trials enqueued again", store.retry_failed(study))
    _Worker(spec, out, files, script, study, len(entries)).run()
    now = store.state(study)
    order = {store.key_of(e["arm"], e["setting"], e["seed"]): i for i, e in enumerate(entries)}
    records = [
        trials.with_metric(r, spec.metric) for _, r in sorted(now["records"].items(), key=lambda kv: order[kv[0]])
    ]
    record: dict[str, Any] = {
        "sweep": {**{k: v for k, v in dataclasses.asdict(spec).items() if k not in ("output_dir", "storage")},
                  "output_dir": str(out), "script": script, "storage": store.redact(url)},
        "data": files,
        "environment": _environment(spec),
        "settings": arms,
        "storage": {"attempts": now["attempts"], "trials": len(records), "duplicates": now["duplicates"]},
        "trials": records,
    }  # fmt: skip
    greater = report.greater_is_better(spec.metric, spec.greater_is_better)
    chosen = report.select(arms, records, greater)
    missing = [arm for arm, row in chosen.items() if row is None]
    if missing:
        _write_json(out / "results.json", record)
        settings = [s for arm in missing for s in arms[arm]]
        errors = [r["error"] for r in records if r["setting"] in settings and r["error"]]
        common = max(set(errors), key=errors.count) if errors else "no error recorded"
        arm = "plain" if missing[0] == "plain" else "LLRD" if missing[0] == "llrd" else missing[0]
        raise RuntimeError(
            f"every {arm} trial failed: no verdict; most common error ({errors.count(common)} of {len(errors)}): "
            f"{common} (all errors: {out / 'results.json'})"
        )
    _conclude(spec, record, arms, chosen, greater)
    record.update(wall_seconds_this_invocation=round(time.perf_counter() - began, 1))
    _write_outputs(spec, out, files, record, greater)
    return record


def _fingerprint(spec: SweepSpec, arms: dict, files: dict, script: str) -> dict:
    """What every worker of one sweep must share: the config (without its data paths, which differ between
    machines), the arms' settings, the seeds, the script's content and the data's content."""
    paths = {f"{s}_{kind}" for s in data.SPLITS for kind in ("file", "dir")}
    return {
        "config": {k: v for k, v in spec.config.items() if k not in paths},
        "arms": arms,
        "seeds": spec.seeds,
        "script_sha": trials.script_digest(script),
        "data": {split: info["sha"] for split, info in files.items()},
    }


def _check_script(spec: SweepSpec, script: str) -> None:
    """Without a launcher the script must be a file here (paths are relative to the working directory)."""
    if not spec.launcher and not Path(script).is_file():
        raise ValueError(
            f"--script {spec.script}: no such file from {Path.cwd()}; give the script's path, or leave --script "
            "out for the bundled text-classification recipe"
        )


def _check_data_settings(config: dict) -> None:
    if not config.get("test_file") and not config.get("test_dir"):
        raise ValueError(
            "the config has no test_file (nor test_dir): llrd sweep reports the chosen settings on a test split; "
            "add test_file to the config or pass --test_file (image folders: test_dir in the config)"
        )
    if config.get("max_eval_samples"):
        logger.warning(
            "max_eval_samples=%s in the config also truncates the test split; --validation_size/--test_size "
            "sample each split on its own",
            config["max_eval_samples"],
        )


def _conclude(spec: SweepSpec, record: dict, arms: dict, chosen: dict, greater: bool) -> None:
    """Summaries, test rows, verdict and notes into ``record``; RuntimeError when no seed has test results for
    plain and an arm."""
    records = record["trials"]
    target = spec.target if spec.target is not None else chosen["plain"]["mean"]
    test_rows = [
        report.summarize([row["setting"]], records, greater, value=lambda r: r["test"][spec.metric], arm=arm)[0]
        for arm, row in chosen.items()
    ]
    verdict = report.compare(chosen, records, spec.metric, greater, spec.confidence)
    if not verdict["seeds"]:
        _write_json(Path(record["sweep"]["output_dir"]) / "results.json", record)
        raise RuntimeError("no seed has test results for both chosen settings: no verdict (see results.json)")
    notes = [n for arm in arms for n in report.edge_notes(chosen[arm], arms[arm])]
    notes += [
        f"no {row['arm']} setting finished every seed; {row['label']} was chosen on the seeds that did "
        f"({sorted(row['finals'])})"
        for row in chosen.values()
        if row["failed"]
    ]
    dropped = sorted(k for k in spec.config if k in grid_llrd_only() and spec.config[k] != _llrd_default(k))
    if dropped:
        notes.append(f"LLRD settings of the config applied to the LLRD arm only: {', '.join(dropped)}")
    summary = [row for arm, settings in arms.items() for row in report.summarize(settings, records, greater, target,
                                                                                  arm=arm)]  # fmt: skip
    record.update(
        summary=summary,
        target=target,
        chosen={arm: row["label"] for arm, row in chosen.items()},
        test=test_rows,
        verdict=verdict,
        notes=notes + _failure_notes(records),
        trial_seconds_total=round(sum(r["seconds"] for r in records), 1),
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
            seeds.setdefault((f"{r.get('arm', '')} {label(r['setting'])}", r["error"]), []).append(r["seed"])
    return [f"failed: {what}, seeds {s}: {error}" for (what, error), s in seeds.items()]


def _header(spec: SweepSpec, files: dict, record: dict) -> list[str]:
    """The protocol, as run: command, script, data sizes, seeds, budget, target, time and environment."""
    rows, target = record["summary"], record["target"]
    sizes = ", ".join(f"{split} {info['rows']} rows ({info['how']})" for split, info in files.items())
    env = ", ".join(f"{k}={v}" for k, v in record["environment"].items() if v is not None)
    arms = record["settings"]
    script = spec.script or f"{Path(record['sweep']['script']).name} (bundled)"
    stored = record["storage"]
    return [
        f"Command: `{spec.command}`" if spec.command else "Command: (Python API)",
        "",
        f"Script `{script}`"
        + (f" under `{' '.join(spec.launcher)}`" if spec.launcher else "")
        + f"; data: {sizes}; seeds 0-{spec.seeds - 1}; {len(rows)} settings ({len(rows) // len(arms)} per arm, "
        f"{len(arms)} arms: equal budget), every trial the same steps and evaluations, and the test split scored "
        f"once at its end (no re-runs). Target for 'steps to': {target:.4f}"
        + (" (given)" if spec.target is not None else " (the best plain setting's mean final validation value)")
        + f". {len(record['trials'])} trials took {record['trial_seconds_total'] / 60:.1f} min (sum of their wall "
        f"times; {stored['attempts']} attempts in the storage); "
        + (
            record["rescored"]["line"]
            if "rescored" in record
            else f"this worker ran {record['wall_seconds_this_invocation'] / 60:.1f} min"
        )  # fmt: skip
        + f". Environment: {env}.",
    ]


def _environment(spec: SweepSpec) -> dict:
    """What this worker's trials ran on: CPU count and the thread/device variables they inherit."""
    import os
    import platform

    keys = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "CUDA_VISIBLE_DEVICES")
    env = {"cpu_count": os.cpu_count(), "machine": platform.machine(), **{k: os.environ.get(k) for k in keys}}
    if spec.devices is not None:
        env["CUDA_VISIBLE_DEVICES"] = spec.devices
    return env


def _write_json(path: Path, obj: Any) -> None:
    from llrd.files import atomic_write_text

    atomic_write_text(path, json.dumps(obj, indent=1, default=str))

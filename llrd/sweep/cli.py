"""``llrd sweep CONFIG [--layer_decay 0.9 0.8 ...] [--learning_rate 1e-4 2e-4 ...] [--seeds 5] --output_dir DIR``:
the command line of the sweep (one worker of it); every other ``--FIELD v1 v2 ...`` is a grid axis."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import shlex
import sys
import typing
from pathlib import Path

from .grid import coerce

logger = logging.getLogger("llrd.sweep")

USAGE = (
    "llrd sweep CONFIG --output_dir DIR [--seeds N] [--script S] [--storage URL] [--devices IDS] "
    "[--layer_decay D ...] [--learning_rate LR ...] [--arm NAME FIELD=V[,V...] ...] [--FIELD V ...]"
)
_RESERVED = {"seed": "--seeds", "output_dir": "--output_dir (the sweep's)"}
DATA_KEYS = ("train_file", "validation_file", "test_file")
FOLDER_KEYS = ("train_dir", "validation_dir", "test_dir")  # image folders (the image recipe)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="llrd sweep",
        usage=USAGE,
        allow_abbrev=False,
        description="Equal-budget A/B of layer-wise lr decay against plain fine-tuning on your data: every "
        "setting of the grid with every seed, each trial its own process scoring validation during training and "
        "the test split once at its end; settings chosen on validation only, every arm's chosen setting compared "
        "with plain's on test, paired by seed, with one verdict line. Any --FIELD V1 V2 ... (an "
        "LLRDTrainingArguments field or a key of CONFIG) is a grid axis; a single value overrides the config for "
        "every trial. Start the same command several times (one per GPU with --devices, or on several machines "
        "with one --storage) and the workers share the sweep.",
    )
    p.add_argument("config", help="recipe config (YAML/JSON), as the recipe takes it, or a bundled config's name")
    p.add_argument("--output_dir", required=True, help="folder for data splits, trials and results")
    p.add_argument(
        "--script",
        help="trial script: a path, or a bundled recipe's name (text_classification, image_classification); "
        "default: the bundled text recipe. Any script works that takes one JSON config path and writes "
        "trainer_state.json (eval_<metric> per evaluation) and test_results.json (test_<metric>) into its "
        "output_dir (see docs/sweep.md)",
    )
    p.add_argument(
        "--storage",
        help="optuna storage URL holding the sweep (default: sqlite:///OUTPUT_DIR/sweep.db, one machine); a "
        "PostgreSQL or MySQL URL (pip install 'llrd[sweep-cluster]') for workers on several machines",
    )
    p.add_argument("--study_name", default="llrd-sweep", help="the sweep's name in the storage (default: %(default)s)")
    p.add_argument(
        "--heartbeat",
        type=int,
        default=30,
        help="seconds between a running trial's heartbeats; a trial silent for twice this is failed and run "
        "again by a live worker (default: %(default)s)",
    )
    p.add_argument(
        "--devices",
        help="CUDA_VISIBLE_DEVICES of this worker's trials, e.g. 0 (one worker per GPU) or 0,1 with a "
        "multi-GPU --launcher",
    )
    p.add_argument(
        "--arm",
        nargs="+",
        action="append",
        metavar="NAME FIELD=V",
        help="a named arm besides plain and llrd: its values replace the grid's for that arm, e.g. --arm cosine "
        "layer_decay=0.9,0.8,0.65 lr_scheduler_type=cosine; each arm is compared with plain (Holm's correction "
        "over the arms)",
    )
    p.add_argument(
        "--retry_failed", action="store_true", help="run again the trials whose last attempt failed with an error"
    )
    p.add_argument("--seeds", type=int, default=5, help="seeds 0..N-1 for every setting (default: %(default)s)")
    p.add_argument(
        "--plain_learning_rate",
        type=float,
        nargs="+",
        help="the plain arm's rates (as many as the LLRD arm's (decay, rate) pairs); default: the grid's rates, "
        "widened geometrically to that count, one below then one above",
    )
    p.add_argument("--metric", default="accuracy", help="eval metric to select and report (default: %(default)s)")
    p.add_argument("--target", type=float, help="for 'steps to target' (default: best plain mean final value)")
    for key in DATA_KEYS:
        p.add_argument(f"--{key}", help=f"CSV file replacing the config's {key} (relative to the working directory)")
    p.add_argument("--train_size", type=int, help="sample this many training rows (seed --split_seed)")
    p.add_argument(
        "--validation_size",
        type=int,
        help="validation rows: sampled from validation_file, or split off train_file when the config has none "
        "(default then: 10%% of it)",
    )
    p.add_argument("--test_size", type=int, help="sample this many test rows (default: the whole test file)")
    p.add_argument("--split_seed", type=int, default=0, help="seed of the data sampling and split (default: 0)")
    p.add_argument(
        "--launcher",
        help="prefix for each trial's command instead of python, e.g. "
        "'accelerate launch --config_file {recipes}/accelerate/ddp_bf16.yaml' ({recipes}: the bundled recipes)",
    )
    p.add_argument("--trial_timeout", type=float, help="seconds after which a trial is killed and marked failed")
    p.add_argument("--keep_models", action="store_true", help="keep each trial's weights (default: delete them)")
    p.add_argument("--confidence", type=float, default=0.95, help="level of the t-interval (default: 0.95)")
    p.add_argument(
        "--greater_is_better",
        choices=("true", "false"),
        help="whether a higher --metric is better (default: false for names ending in 'loss' and for mse, mae, "
        "rmse, perplexity, error, wer, cer; true otherwise)",
    )
    return p


def parse_grid(tokens: list[str], config: dict) -> dict[str, list]:
    """``--FIELD v1 v2 ...`` tokens as {field: [typed values]}; fields are LLRDTrainingArguments fields or
    keys of ``config``.

    Example:
        >>> parse_grid(["--layer_decay", "0.9", "0.8", "--learning_rate", "1e-4"], {})
        {'layer_decay': [0.9, 0.8], 'learning_rate': [0.0001]}
    """
    from llrd.args import LLRDTrainingArguments

    hints = typing.get_type_hints(LLRDTrainingArguments)
    known = {f.name for f in dataclasses.fields(LLRDTrainingArguments)}
    raw: dict[str, list[str]] = {}
    name = None
    for token in tokens:
        if token.startswith("--"):
            name, _, inline = token[2:].partition("=")
            if name in _RESERVED:
                raise ValueError(f"--{name} cannot be swept: it is set by {_RESERVED[name]}")
            if name not in known and name not in config:
                raise ValueError(
                    f"--{name}: not an LLRDTrainingArguments field nor a key of the config; grid axes are "
                    "fields such as --layer_decay, --learning_rate, --weight_decay, --warmup_steps"
                )
            if name in raw:
                raise ValueError(f"--{name} given twice; list all its values after one flag")
            raw[name] = [inline] if inline else []
        elif name is None:
            raise ValueError(f"unexpected {token!r}: values follow a --FIELD flag")
        else:
            raw[name].append(token)
    grid = {}
    for key, values in raw.items():
        if not values:
            raise ValueError(f"--{key} has no value; e.g. --{key} V1 V2")
        grid[key] = [coerce(key, v, hints.get(key), config.get(key)) for v in values]
    return grid


def parse_arms(specs: list[list[str]], config: dict) -> dict[str, dict[str, list]]:
    """``--arm NAME FIELD=V1,V2 ...`` (repeated) as {name: {field: [typed values]}}.

    Example:
        >>> parse_arms([["cosine", "layer_decay=0.8", "lr_scheduler_type=cosine"]], {})
        {'cosine': {'layer_decay': [0.8], 'lr_scheduler_type': ['cosine']}}
    """
    arms: dict[str, dict[str, list]] = {}
    for spec in specs:
        name, *pairs = spec
        if not name.replace("_", "").replace("-", "").isalnum() or "=" in name:
            raise ValueError(f"--arm {' '.join(spec)}: start with the arm's name (letters, digits, - and _)")
        if name in arms or name in ("plain", "llrd"):
            raise ValueError(f"--arm {name}: the name is {'given twice' if name in arms else 'a built-in arm'}")
        if not pairs:
            raise ValueError(f"--arm {name}: give its settings, e.g. --arm {name} lr_scheduler_type=cosine")
        tokens = []
        for pair in pairs:
            field, eq, values = pair.partition("=")
            if not eq or not values:
                raise ValueError(f"--arm {name} {pair}: settings are FIELD=V or FIELD=V1,V2")
            tokens += [f"--{field}", *values.split(",")]
        arms[name] = parse_grid(tokens, config)
    return arms


def load_config(path: str) -> dict:
    """A recipe config file as a dict (YAML or JSON). Its relative data paths are relative to the file's folder,
    as the recipes read them; ``--train_file`` and the like on the command line are relative to the working
    directory.

    Example:
        >>> load_config("recipes/configs/minilm_sst2.yaml")["train_file"]  # doctest: +SKIP
        '/repo/recipes/configs/../../../shared/data/sst2/train.csv'
    """
    import yaml

    file = Path(path)
    if not file.is_file():
        raise ValueError(f"config {path!r} not found")
    text = file.read_text()
    try:
        cfg = json.loads(text) if file.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as err:
        raise ValueError(f"config {path!r} does not parse: {' '.join(str(err).split())}") from err
    if not isinstance(cfg, dict):
        raise ValueError(f"config {path!r} is not a mapping of recipe settings")
    for key in DATA_KEYS + FOLDER_KEYS:
        if isinstance(cfg.get(key), str) and not Path(cfg[key]).expanduser().is_absolute():
            cfg[key] = os.path.normpath(file.resolve().parent / cfg[key])
    return cfg


def build_spec(argv: list[str]):
    """Parse ``argv`` (without ``sweep``) into a SweepSpec."""
    from . import bundled
    from .core import SweepSpec

    ns, rest = parser().parse_known_args(argv)
    _check_numbers(ns)
    config = load_config(bundled.resolve_config(ns.config))
    given = {key: os.path.expanduser(getattr(ns, key)) for key in DATA_KEYS if getattr(ns, key)}
    kept = [key for key in DATA_KEYS if key not in given and config.get(key)]
    if given and kept:
        logger.warning(
            "data: %s from the command line, %s from the config (%s)",
            ", ".join(f"--{k}" for k in given),
            ", ".join(kept),
            "; ".join(f"{k}={config[k]}" for k in kept),
        )
    config.update(given)
    grid = parse_grid(rest, config)
    if "layer_decay" not in grid and config.get("layer_decay") is not None:  # the config's decay is the LLRD arm
        grid["layer_decay"] = [float(config["layer_decay"])]
    rates = [("--learning_rate", v) for v in grid.get("learning_rate", [])]
    for flag, value in rates + [("--plain_learning_rate", v) for v in ns.plain_learning_rate or []]:
        if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
            raise ValueError(f"{flag} {value}: a learning rate must be a positive number, e.g. 1e-4")
    if ns.metric.startswith("eval_"):
        ns.metric = ns.metric.removeprefix("eval_")  # the name Trainer logs without its prefix
    # one-valued axes are plain overrides: fold them into the config so the settings' names stay short
    fixed = {k: v[0] for k, v in grid.items() if len(v) == 1 and k not in ("layer_decay", "learning_rate")}
    grid = {k: v for k, v in grid.items() if k not in fixed}
    if "learning_rate" in grid and len(grid["learning_rate"]) == 1:
        config = {**config, "learning_rate": grid["learning_rate"][0]}
    ns.script = os.path.expanduser(ns.script) if ns.script else None
    arms = parse_arms(ns.arm or [], config)
    special = {"config", "grid", "output_dir", "launcher", "command", "title", "greater_is_better", "arms"}
    same_name = {f.name: getattr(ns, f.name) for f in dataclasses.fields(SweepSpec) if f.name not in special}
    return SweepSpec(
        config={**config, **fixed},
        grid=grid,
        output_dir=Path(ns.output_dir).expanduser(),
        launcher=shlex.split(bundled.expand_launcher(ns.launcher)) if ns.launcher else None,
        arms=arms or None,
        command="llrd sweep " + shlex.join(argv),
        greater_is_better=None if ns.greater_is_better is None else ns.greater_is_better == "true",
        **same_name,
    )


def _check_numbers(ns: argparse.Namespace) -> None:
    """Counts, sizes and the confidence level, checked before anything runs."""
    if ns.seeds < 1:
        raise ValueError(f"--seeds {ns.seeds}: need at least 1 (5 or more for a useful interval)")
    for name in ("train_size", "validation_size", "test_size"):
        value = getattr(ns, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name} {value}: must be at least 1 row (leave it out to use the whole file)")
    if not 0 < ns.confidence < 1:
        raise ValueError(f"--confidence {ns.confidence:g}: must lie strictly between 0 and 1, e.g. 0.95")
    if ns.heartbeat < 1:
        raise ValueError(f"--heartbeat {ns.heartbeat}: must be at least 1 second (30 is a good default)")
    if ns.trial_timeout is not None and ns.trial_timeout <= 0:
        raise ValueError(f"--trial_timeout {ns.trial_timeout:g}: must be a positive number of seconds")


def _terminate(signum, frame) -> None:  # noqa: ARG001 - signal handler signature
    """SIGTERM ends the sweep like Ctrl-C: the running trial's process group is killed on the way out."""
    raise KeyboardInterrupt


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is now (not the stream at setup), so a replaced stderr still works."""

    @property
    def stream(self):  # noqa: D102
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def setup_logging() -> None:
    if logger.handlers:  # main() called again in one process
        return
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def main(argv: list[str]) -> int:
    """Run the sweep; exit code 0 with a verdict, 1 when no verdict was possible, 2 for bad input."""

    setup_logging()
    import signal
    import threading

    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGHUP):  # like Ctrl-C: the running trial's process group is killed
            if signal.getsignal(sig) is not signal.SIG_IGN:  # nohup's ignored SIGHUP stays ignored
                previous[sig] = signal.signal(sig, _terminate)
    try:
        return _run(argv)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _run(argv: list[str]) -> int:
    from .core import run_sweep

    try:
        spec = build_spec(argv)
        result = run_sweep(spec)
    except ValueError as err:
        print(f"llrd sweep: error: {err}", file=sys.stderr)
        return 2
    except RuntimeError as err:
        print(f"llrd sweep: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(
            "llrd sweep: interrupted (the running trial went back to the queue); run the same command again to resume",
            file=sys.stderr,
        )
        return 130
    out = spec.output_dir
    print(f"results: {out / 'results.json'}, {out / 'table.md'}, {out / 'sweep.png'}")
    print(result["verdict"]["line"])
    return 0

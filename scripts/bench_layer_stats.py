"""What does each ``layer_stats`` level cost per logged step? The figures next to the flag's help.

    python scripts/bench_layer_stats.py             # 7 rounds, about 4 min on 2 CPU cores
    python scripts/bench_layer_stats.py --rounds 2 --steps 8 --out /tmp/x.json   # a quick look

A 4-block BERT (hidden 256, random weights), batch 8 x 64 tokens, AdamW, layer_decay 0.8, **logging every step**
(so every step pays the level's work: the worst case; with ``logging_steps=N`` a level costs 1/N of it). Per
round, one trainer per level runs the same data and seed (the order alternates between rounds); the time of a
step runs from one ``on_step_begin`` to the next, so the log call is included; the first steps are warm-up.
Reported per level: its mean step time divided by ``layer_stats="none"``'s in the same round, as median and
range over rounds, and the extra milliseconds per logged step; and, measured inside the run, the monitor's own
work per logged step (its ``before_step`` and ``after_step``, timed around each call), which the step-to-step
spread of a whole step would hide. One untimed run comes first (warm-up of the process). Times are the
process's CPU time with one torch thread (``time.process_time``). For ``"all"`` also the size of the weight copy
it holds during a logged step (the trainable fp32 weights), computed from the model.
Results go to scripts/results/layer_stats_cost.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "scripts" / "results"
LEVELS = ("none", "lr", "grad_norm", "all")
logger = logging.getLogger("bench_layer_stats")


def model():
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.BertConfig(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024)
    return tf.BertForSequenceClassification(cfg)


def data(n: int = 256, seq: int = 64) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 30000, (n, seq), generator=g)
    labels = torch.randint(0, 2, (n,), generator=g)
    mask = torch.ones(seq, dtype=torch.long)
    return [{"input_ids": ids[i], "attention_mask": mask, "labels": labels[i]} for i in range(n)]


class StepClock(TrainerCallback):
    """CPU time of the process from one step's start to the next one's (the log of the step included)."""

    def __init__(self):
        self.starts: list[float] = []

    def on_step_begin(self, *a, **k):
        self.starts.append(time.process_time())

    def on_train_end(self, *a, **k):
        self.starts.append(time.process_time())

    def step_seconds(self, warmup: int) -> list[float]:
        return [b - a for a, b in zip(self.starts, self.starts[1:], strict=False)][warmup:]


class MonitorClock:
    """CPU time spent in ``LayerMonitor.before_step`` / ``after_step`` (patched on the class for this process)."""

    seconds: list[float] = []

    @classmethod
    def install(cls) -> None:
        from llrd.monitor import LayerMonitor

        for name in ("before_step", "after_step"):
            original = getattr(LayerMonitor, name)

            def timed(self, ctx, _original=original):
                start = time.process_time()
                try:
                    return _original(self, ctx)
                finally:
                    cls.seconds.append(time.process_time() - start)

            setattr(LayerMonitor, name, timed)


def run_level(level: str, steps: int, warmup: int, scratch: str) -> tuple[float, float]:
    """Mean CPU seconds per (logged) step of one trainer at this level, and the monitor's own part of it."""
    from llrd import LLRDTrainer, LLRDTrainingArguments

    clock = StepClock()
    MonitorClock.seconds = []
    args = LLRDTrainingArguments(
        output_dir=f"{scratch}/{level}", learning_rate=1e-4, max_steps=steps + warmup, per_device_train_batch_size=8,
        logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True, seed=0,
        layer_decay=0.8, layer_stats=level, log_level="error",
    )  # fmt: skip
    trainer = LLRDTrainer(model=model(), args=args, train_dataset=data(), callbacks=[clock])
    trainer.train()
    steps_timed = clock.step_seconds(warmup)
    return statistics.mean(steps_timed), sum(MonitorClock.seconds) / (steps + warmup)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS / "layer_stats_cost.json")
    opts = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(1)  # one intra-op thread: the process's CPU time is the step's work
    MonitorClock.install()
    rounds, monitor = [], []
    with tempfile.TemporaryDirectory() as scratch:
        run_level("all", 2, 1, scratch)  # warm-up, not counted
        for r in range(opts.rounds):
            order = LEVELS if r % 2 == 0 else tuple(reversed(LEVELS))
            timed = {level: run_level(level, opts.steps, opts.warmup, scratch) for level in order}
            rounds.append({k: v[0] for k, v in timed.items()})
            monitor.append({k: v[1] for k, v in timed.items()})
            logger.info("round %d: %s", r, {k: round(v * 1e3, 1) for k, v in rounds[-1].items()})
    trainable = sum(p.numel() for p in model().parameters() if p.requires_grad)
    levels = {}
    for level in LEVELS:
        ratios = [rnd[level] / rnd["none"] for rnd in rounds]
        extra = [(rnd[level] - rnd["none"]) * 1e3 for rnd in rounds]
        levels[level] = {
            "step_ms_median": round(statistics.median(rnd[level] for rnd in rounds) * 1e3, 2),
            "ratio_to_none_median": round(statistics.median(ratios), 4),
            "ratio_to_none_range": [round(min(ratios), 4), round(max(ratios), 4)],
            "extra_ms_per_logged_step_median": round(statistics.median(extra), 2),
            "extra_ms_per_logged_step_range": [round(min(extra), 2), round(max(extra), 2)],
            "monitor_ms_per_logged_step_median": round(statistics.median(m[level] for m in monitor) * 1e3, 3),
            "monitor_ms_per_logged_step_range": [
                round(min(m[level] for m in monitor) * 1e3, 3),
                round(max(m[level] for m in monitor) * 1e3, 3),
            ],
        }
    result = {
        "setup": "BERT 4 blocks x 256 (random weights), batch 8 x 64 tokens, AdamW, layer_decay 0.8, logging every "
        f"step, {opts.steps} timed steps after {opts.warmup} warm-up, {opts.rounds} interleaved rounds",
        "torch": torch.__version__,
        "trainable_parameters": trainable,
        "all_holds_copy_mib": round(trainable * 4 / 2**20, 1),
        "levels": levels,
        "rounds_step_ms": [{k: round(v * 1e3, 2) for k, v in rnd.items()} for rnd in rounds],
    }
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    opts.out.write_text(json.dumps(result, indent=1) + "\n")
    logger.info("%s", json.dumps(levels, indent=1))


if __name__ == "__main__":
    main()

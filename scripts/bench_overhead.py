"""What does LLRD cost? Step time and memory of LLRDTrainer vs plain Trainer, group building, and `llrd inspect`.

    python scripts/bench_overhead.py            # about 20 min on 2 CPU cores (Linux: reads /proc)
    python scripts/bench_overhead.py --quick    # about 5 min
    python scripts/bench_overhead.py --smoke    # the slow test's run (one optimizer, 6 steps): no evidence
    python scripts/bench_overhead.py --render scripts/results/bench_overhead.json   # rewrite its .md, no run

1. Step time: a MiniLM-sized BERT (6 blocks, hidden 384, random weights), batch 16 x 64 tokens, the same data
   and seed, for `adamw_torch` and `adamw_torch_fused`. Trainer and LLRDTrainer (28 param groups) with each
   per-depth monitor level that costs something different: `layer_stats="none"`, the default `"grad_norm"`
   (rates and per-depth gradient norms) and `"all"` (adds the update ratio, copying the trainable weights on
   logged steps); logging every 10 steps. They run interleaved in one process, round after round (the order
   alternates); each round's mean step time after warm-up (logged steps included, one in ten, so their extra
   work counts) is divided by Trainer's in the same round. Reported: the median ratio over rounds, its range
   and every round's ratio.
2. Group building (`layer_ids` + `param_groups`) on the meta device for 12 to 192 blocks, and an 80-block,
   8192-wide Llama.
3. Peak memory (VmHWM) of a 10-step training run (one logged step) in a fresh process per variant, repeated and
   interleaved, under glibc's default malloc and with a fixed mmap threshold (live memory); the median vs
   Trainer's.
4. `llrd inspect` of the 80-block, 8192-wide Llama (69B parameters, meta device) in a fresh process: wall time
   (interpreter start and imports included) and peak RSS.
Results go to scripts/results/bench_overhead{,_quick}.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "scripts" / "results"
# variant -> LLRDTrainingArguments.layer_stats (None: plain Trainer)
STATS = {
    "Trainer": None,
    "LLRD, layer_stats=none": "none",
    "LLRD, layer_stats=grad_norm (default)": "grad_norm",
    "LLRD, layer_stats=all": "all",
}
VARIANTS = tuple(STATS)
LLAMA_80 = dict(
    num_hidden_layers=80, hidden_size=8192, intermediate_size=28672, num_attention_heads=64, num_key_value_heads=8
)


def model():
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536)
    return tf.BertForSequenceClassification(cfg)


def data(n=512, seq=64):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 30000, (n, seq), generator=g)
    labels = torch.randint(0, 2, (n,), generator=g)
    return [
        {"input_ids": ids[i], "attention_mask": torch.ones(seq, dtype=torch.long), "labels": labels[i]}
        for i in range(n)
    ]


def make_trainer(variant: str, optim: str, steps: int, out: str, callbacks=()):
    from transformers import Trainer, TrainingArguments

    from llrd import LLRDTrainer, LLRDTrainingArguments

    common = dict(
        output_dir=out,
        optim=optim,
        learning_rate=1e-4,
        weight_decay=0.01,
        max_steps=steps,
        per_device_train_batch_size=16,
        logging_steps=10,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    m = model()
    if variant == "Trainer":
        m.accepts_loss_kwargs = False  # LLRDTrainer's loss-scaling fix, so both compute the same thing
        trainer = Trainer(model=m, args=TrainingArguments(**common), train_dataset=data(), callbacks=list(callbacks))
    else:
        trainer = LLRDTrainer(
            model=m,
            args=LLRDTrainingArguments(**common, layer_decay=0.8, layer_stats=STATS[variant]),
            train_dataset=data(),
            callbacks=list(callbacks),
        )
    from transformers import PrinterCallback

    trainer.remove_callback(PrinterCallback)
    return trainer


class StepTimer(TrainerCallback):
    def __init__(self):
        self.times, self._t = [], 0.0

    def on_step_begin(self, *a, **k):
        self._t = time.perf_counter()

    def on_step_end(self, *a, **k):
        self.times.append(time.perf_counter() - self._t)


def step_times(optims: tuple[str, ...], rounds: int, steps: int, warmup: int, scratch: str) -> dict:
    out = {}
    for optim in optims:
        ratios = {v: [] for v in VARIANTS[1:]}
        means = {v: [] for v in VARIANTS}
        for r in range(rounds):
            order = VARIANTS if r % 2 == 0 else tuple(reversed(VARIANTS))  # alternate to cancel drift
            for variant in order:
                timer = StepTimer()
                make_trainer(variant, optim, steps, scratch, [timer]).train()
                means[variant].append(statistics.mean(timer.times[warmup:]))
            for v in VARIANTS[1:]:
                ratios[v].append(means[v][-1] / means["Trainer"][-1])
            print(f"{optim} round {r}: " + ", ".join(f"{v} {means[v][-1] * 1e3:.1f} ms" for v in VARIANTS), flush=True)
        out[optim] = {
            "step_ms_median_of_round_means": {v: round(statistics.median(means[v]) * 1e3, 2) for v in VARIANTS},
            "ratio_median": {v: round(statistics.median(ratios[v]), 4) for v in ratios},
            "ratio_range": {v: [round(min(ratios[v]), 4), round(max(ratios[v]), 4)] for v in ratios},
            "ratios_per_round": {v: [round(x, 4) for x in ratios[v]] for v in ratios},
        }
    return out


def group_building() -> dict:
    import transformers as tf

    from llrd import layer_ids, param_groups

    rows = []
    configs = [(f"BERT-base width, {n} blocks", tf.BertConfig(num_hidden_layers=n)) for n in (12, 24, 48, 96, 192)]
    configs.append(("Llama 80 blocks x 8192", tf.LlamaConfig(**LLAMA_80)))
    for name, cfg in configs:
        with torch.device("meta"):
            m = (
                tf.AutoModelForSequenceClassification.from_config(cfg)
                if "BERT" in name
                else tf.AutoModelForCausalLM.from_config(cfg)
            )
        times = []
        for _ in range(3):
            start = time.perf_counter()
            groups = param_groups(m, lr=1e-4, layer_decay=0.9, weight_decay=0.01, layer_map=layer_ids(m))
            times.append(time.perf_counter() - start)
        tensors = sum(len(g["params"]) for g in groups)
        rows.append(
            {
                "model": name,
                "tensors": tensors,
                "groups": len(groups),
                "seconds": round(min(times), 4),
                "us_per_tensor": round(min(times) / tensors * 1e6, 1),
            }
        )
        print(rows[-1], flush=True)
    return {"rows": rows}


MEMORY_CHILD = """
import sys
sys.path.insert(0, {scripts!r})
from bench_overhead import make_trainer
make_trainer({variant!r}, "adamw_torch", 10, {out!r}).train()
print(next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:")))
"""

# glibc's default malloc raises its mmap threshold as large blocks are freed, so where a tensor lands (and how
# much freed heap stays resident) depends on allocation order; a fixed threshold returns every freed tensor to
# the OS at once, so the peak measures live memory.
ALLOCATORS = {"default malloc": {}, "MALLOC_MMAP_THRESHOLD_=65536": {"MALLOC_MMAP_THRESHOLD_": "65536"}}


INSPECT_CHILD = """
import json, sys
from llrd.__main__ import main
code = main({argv!r})
hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({{"exit": code, "vmhwm_kib": hwm}}), file=sys.stderr)
"""


def inspect_cost(repeats: int) -> dict:
    """Wall time and peak RSS of `llrd inspect` on the 80-block Llama, each run a fresh process."""
    argv = ["inspect", "llama", "--task", "causal-lm", "--layer_decay", "0.9"]
    argv += [arg for k, v in LLAMA_80.items() for arg in ("--config", f"{k}={v}")]
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-c", INSPECT_CHILD.format(argv=argv)],
            capture_output=True,
            text=True,
            cwd=ROOT,
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )
        wall = time.perf_counter() - start
        child = json.loads(proc.stderr.strip().splitlines()[-1]) if proc.returncode == 0 else {}
        if child.get("exit") != 0:
            raise SystemExit(proc.stderr[-2000:])
        runs.append({"seconds": round(wall, 2), "peak_rss_mib": round(child["vmhwm_kib"] / 1024, 1)})
        print("llrd inspect, Llama 80 x 8192:", runs[-1], flush=True)
    return {
        "command": "llrd " + " ".join(argv),
        "parameters": proc.stdout.strip().splitlines()[-1],
        "runs": runs,
        "seconds_median": statistics.median(r["seconds"] for r in runs),
        "peak_rss_mib_median": statistics.median(r["peak_rss_mib"] for r in runs),
    }


def peak_memory(repeats: int, scratch: str, allocators: dict) -> dict:
    """Peak RSS (VmHWM, KiB) of a fresh process per run. Not ``ru_maxrss``: Linux carries the parent's high-water
    mark across fork + exec, so a child started by this (large) process would report the parent's peak."""
    result = {}
    for allocator, env in allocators.items():
        runs: dict[str, list[int]] = {v: [] for v in VARIANTS}
        for _ in range(repeats):
            for variant in VARIANTS:
                code = MEMORY_CHILD.format(scripts=str(ROOT / "scripts"), variant=variant, out=scratch)
                proc = subprocess.run(
                    [sys.executable, "-c", code],
                    capture_output=True,
                    text=True,
                    cwd=ROOT,
                    env={**os.environ, "HF_HUB_OFFLINE": "1", **env},
                )
                if proc.returncode:
                    raise SystemExit(proc.stderr[-2000:])
                runs[variant].append(int(proc.stdout.strip().splitlines()[-1]))
        peaks = {v: statistics.median(k) for v, k in runs.items()}
        print(f"peak RSS runs (MiB), {allocator}:", {v: [round(k / 1024) for k in ks] for v, ks in runs.items()})
        result[allocator] = {
            "peak_rss_mib": {v: round(k / 1024, 1) for v, k in peaks.items()},
            "peak_rss_runs_mib": {v: [round(k / 1024, 1) for k in ks] for v, ks in runs.items()},
            "ratio": {v: round(peaks[v] / peaks["Trainer"], 4) for v in VARIANTS[1:]},
        }
    return result


def markdown(res: dict) -> str:
    """The results table, from a results record alone (``--render`` rebuilds the .md from the .json)."""
    lines = [
        f"Command: `{res['command']}` ({res['hardware']}, fp32).",
        "",
        "| optimizer | variant | step time (median of round means) | ratio vs Trainer (median, range over rounds) |",
        "|---|---|---|---|",
    ]
    for optim, r in res["step_time"].items():
        for v in VARIANTS:
            ratio = (
                "1"
                if v == "Trainer"
                else (f"{r['ratio_median'][v]:.3f} ({r['ratio_range'][v][0]:.3f}-{r['ratio_range'][v][1]:.3f})")
            )
            lines.append(f"| {optim} | {v} | {r['step_ms_median_of_round_means'][v]:.1f} ms | {ratio} |")
    lines += [
        "",
        "| model (meta device) | tensors | groups | layer_ids + param_groups | per tensor |",
        "|---|---|---|---|---|",
    ]
    for row in res["group_building"]["rows"]:
        lines.append(
            f"| {row['model']} | {row['tensors']} | {row['groups']} | {row['seconds'] * 1e3:.0f} ms | "
            f"{row['us_per_tensor']:.0f} µs |"
        )
    lines += ["", "| allocator | variant | peak RSS (median) | runs | ratio vs Trainer |", "|---|---|---|---|---|"]
    for allocator, mem in res["peak_memory"].items():
        for v in VARIANTS:
            runs = ", ".join(f"{x:.0f}" for x in mem["peak_rss_runs_mib"][v])
            lines.append(
                f"| {allocator} | {v} | {mem['peak_rss_mib'][v]:.0f} MiB | {runs} | {mem['ratio'].get(v, 1):.3f} |"
            )
    ins = res["inspect"]
    runs = ", ".join(f"{r['seconds']:.1f} s / {r['peak_rss_mib']:.0f} MiB" for r in ins["runs"])
    lines += [
        "",
        f"`{ins['command']}` ({ins['parameters']}), fresh process each: wall time {ins['seconds_median']:.1f} s, "
        f"peak RSS {ins['peak_rss_mib_median']:.0f} MiB (median; runs: {runs}).",
    ]
    return "\n".join(lines) + "\n"


OPTIMS = ("adamw_torch", "adamw_torch_fused")
MODES = {
    # mode: (optimizers, rounds, steps, memory repeats, allocators, inspect repeats)
    "full": (OPTIMS, 7, 25, 3, ALLOCATORS, 3),
    "quick": (OPTIMS, 2, 15, 1, ALLOCATORS, 1),
    "smoke": (OPTIMS[1:], 1, 6, 1, {k: v for k, v in ALLOCATORS.items() if v}, 1),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="2 rounds, 1 memory run per variant (about 5 min)")
    mode.add_argument("--smoke", action="store_true", help="fused AdamW, 6 steps, live memory (the slow test)")
    mode.add_argument("--render", type=Path, metavar="JSON", help="rewrite the .md beside a results .json; no run")
    p.add_argument("--out", type=Path, default=RESULTS, help="where results go (default scripts/results)")
    ns = p.parse_args()
    if ns.render:
        res = json.loads(ns.render.read_text())
        ns.render.with_suffix(".md").write_text(markdown(res))
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers.utils import logging as hf_logging

    from llrd.files import atomic_write_text

    hf_logging.set_verbosity_error()
    ns.out.mkdir(parents=True, exist_ok=True)
    name = "quick" if ns.quick else "smoke" if ns.smoke else "full"
    optims, rounds, steps, repeats, allocators, inspect_repeats = MODES[name]
    from docs_blocks import hardware_class

    cmd = "python scripts/bench_overhead.py" + ("" if name == "full" else f" --{name}")
    with tempfile.TemporaryDirectory() as scratch:  # Trainer's output_dir; nothing is saved there
        res = {
            "mode": name,
            "command": cmd,
            "hardware": hardware_class(),
            "step_time": step_times(optims, rounds, steps, min(5, steps // 3), scratch),
            "group_building": group_building(),
            "peak_memory": peak_memory(repeats, scratch, allocators),
            "inspect": inspect_cost(inspect_repeats),
        }
    suffix = "" if name == "full" else f"_{name}"
    atomic_write_text(ns.out / f"bench_overhead{suffix}.json", json.dumps(res, indent=1))
    text = markdown(res)
    atomic_write_text(ns.out / f"bench_overhead{suffix}.md", text)
    print(text)


if __name__ == "__main__":
    main()

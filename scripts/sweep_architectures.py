"""Every model type of the installed transformers through `layer_ids` + `param_groups`, on the meta device.

    python scripts/sweep_architectures.py               # all model types (a few minutes on 2 CPU cores)
    python scripts/sweep_architectures.py --only opt xlm  # some types, to look at one

For each model type that has a model class in transformers' auto mappings, one class is built from the
type's default config on the meta device (a task head where the type has one: sequence, image or audio
classification, causal or seq2seq LM, masked LM; else the base model). Then:

1. `layer_ids` and `param_groups` must not raise (a model with no repeated blocks may raise llrd's own
   "no transformer blocks found" error, and is listed);
2. every trainable parameter is in exactly one group;
3. the block count equals the config's, tower by tower, or the model is an explained exception
   (:data:`EXCEPTIONS`, or the trace shows blocks run several times: shared weights, loops), or the config
   has no layer count;
4. placement: every tower the configs declare and the class builds (a module holding a sub-config with a
   layer count and a list of modules) is a stack of its own; within a stack, a parameter used earlier is
   never deeper (stem before block 0, downsampling with the block it feeds, head after the last block;
   blocks that run twice are placed by their first run);
5. the input embeddings are at depth 0 and the parameters used last are at the head.

A model whose forward pass cannot be traced on meta gets the structural fallback (checked for 1, 2 and
the towers of 4 only) and is listed with the reason. Results: scripts/results/architectures.{json,md};
with --update-docs the summary also replaces the generated block of docs/architectures.md. Exit code 1
if any type fails.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import signal
import sys
import time
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "scripts" / "results"
TIMEOUT_S = 60  # per model type

# Task heads tried first, then the base model, then any other auto mapping.
PREFERRED = (
    "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES",
    "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES",
    "MODEL_FOR_AUDIO_CLASSIFICATION_MAPPING_NAMES",
    "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES",
    "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES",
    "MODEL_FOR_MASKED_LM_MAPPING_NAMES",
    "MODEL_MAPPING_NAMES",
)

#: Model types whose block count differs from their config's, and why (checked by hand on transformers 5.24).
EXCEPTIONS: dict[str, str] = {
    "efficientnet": "the config's num_hidden_layers is sum(num_block_repeats) * 4 = 64, not a block count; the "
    "encoder holds 55 EfficientNetBlocks (each repeat count scaled by depth_coefficient 3.1, rounded up)",
    "hgnet_v2": "the config's depths [3, 4, 6, 3] only name the stages; the stages hold stage_num_blocks [1, 1, 3, 1] "
    "basic layers of 6 conv layers and 2 aggregation convs each; llrd takes the 48 innermost conv layers (no "
    "level matches, innermost rule)",
    "levit": "the config's depths [4, 4, 4] count attention + MLP pairs; the stages' layer lists hold one residual "
    "attention and one residual MLP layer per pair, plus the subsampling layers: 28 residual layers",
    "pp_doclayout_v3": "its backbone tower is HGNetV2 (see hgnet_v2: no level matches its depths, 48 conv layers); "
    "the encoder's FPN, downsampling and PAN lists match the model's own 6 encoder layers",
    "pp_doclayout_v4": "as pp_doclayout_v3: an HGNetV2 backbone (48 conv layers, innermost rule) and the encoder's "
    "FPN, downsampling and PAN lists (the model's own 6 encoder layers)",
    "pp_ocrv5_server_rec": "the base model is its HGNetV2 backbone alone (see hgnet_v2: 48 conv layers); the config's "
    "depth (2) counts the blocks of the text-recognition head, which this class does not build",
}


class Timeout(BaseException):
    """Raised by the alarm; a BaseException so that no `except Exception` inside a forward swallows it."""


def _alarm(signum, frame):
    raise Timeout


def mappings() -> list[dict[str, Any]]:
    from transformers.models.auto import modeling_auto

    names = [n for n in dir(modeling_auto) if n.startswith("MODEL") and n.endswith("_MAPPING_NAMES")]
    ordered = list(PREFERRED) + sorted(n for n in names if n not in PREFERRED)
    return [getattr(modeling_auto, n) for n in ordered if hasattr(modeling_auto, n)]


def model_types() -> list[str]:
    """Every model type with at least one model class in the auto mappings."""
    return sorted({t for mapping in mappings() for t in mapping})


def model_class(model_type: str) -> str:
    for mapping in mappings():
        if model_type in mapping:
            name = mapping[model_type]
            return name[0] if isinstance(name, (list, tuple)) else name
    raise KeyError(model_type)


def build(model_type: str):
    """The model class of ``model_type`` on the meta device, from the type's default config."""
    import torch
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    cls = getattr(transformers, model_class(model_type))
    config = CONFIG_MAPPING[model_type]()
    with torch.device("meta"):
        return cls._from_config(config)


def check(model, model_type: str) -> dict[str, Any]:
    """Run llrd on ``model`` and check the invariants; returns the record of one model type."""
    from llrd import layer_ids, param_groups

    rec: dict[str, Any] = {}
    try:
        lm = layer_ids(model)
        groups = param_groups(model, lr=1e-3, layer_decay=0.8, weight_decay=0.01, layer_map=lm)
    except ValueError as err:
        if "no transformer blocks found" in str(err):
            return {"status": "no blocks", "why": str(err).split(":")[0]}
        raise
    rec["source"], rec["note"] = lm.source, lm.note
    rec["blocks"] = {s.name: s.num_layers for s in lm.stacks.values()}
    problems = []
    placed = [id(p) for g in groups for p in g["params"]]
    trainable = [id(p) for p in model.parameters() if p.requires_grad]
    if sorted(placed) != sorted(trainable) or len(set(placed)) != len(placed):
        problems.append("a trainable parameter is in no group or in two")
    towers = _tower_problems(model, lm)
    if lm.source != "flow":  # the module-tree rule splits towers too: an unstacked one fails
        rec["status"] = "fallback"
        rec["why"] = lm.note.removeprefix("module tree (fallback: ").removesuffix(")")
        problems += towers
        return rec | ({"status": "FAIL", "why": "; ".join(problems)} if problems else {})
    how = lm.note.split("; ", 1)[1]  # after the description of the trace
    check, _, repeated = lm.check.partition("+")
    problems += _embedding_problems(model, lm) + towers
    if not repeated:  # blocks that run several times (loops over frames or passes): no single order to check
        problems += _order_problems(lm) + _last_use_problems(lm)
    if model_type in EXCEPTIONS:
        rec["status"], rec["why"] = "exception", EXCEPTIONS[model_type]
    elif repeated or check == "shared weights":
        rec["status"], rec["why"] = "exception", how
    elif check == "config":
        rec["status"] = "pass"
    elif check == "no count":
        rec["status"], rec["why"] = "unchecked", how
    else:
        problems.append(how)
    if problems:
        rec["status"], rec["why"] = "FAIL", "; ".join(problems)
    return rec


def _order_problems(lm) -> list[str]:
    """Within each stack, sorted by first use, depths never decrease (shared tables excepted)."""
    by_stack: dict[str, list[tuple[int, int, str]]] = {}
    for name, info in lm.params.items():
        # shared tables (stem, used in block 0), outputs taken to another stack between blocks (head)
        if name in lm.ticks and "shared" not in info.reason and "takes its output there" not in info.reason:
            by_stack.setdefault(info.stack, []).append((lm.ticks[name], info.depth, name))
    for stack, items in by_stack.items():
        items.sort()
        for (_, d1, n1), (_, d2, n2) in zip(items, items[1:], strict=False):
            if d2 < d1:
                return [f"{n2} (depth {d2}) is used after {n1} (depth {d1}) in stack {stack}"]
    return []


def _tower_problems(model, lm) -> list[str]:
    """Every tower the configs declare and the class builds (a module holding a sub-config with a layer count,
    with a list of repeated modules inside) is its own stack: some stack's blocks lie inside it."""
    from torch import nn

    from llrd.blocks import config_towers, expected_layers

    modules = dict(model.named_modules())
    problems = []
    for path, config in config_towers(modules, model.config).items():
        lists = [
            p
            for p, m in modules.items()
            if p.startswith(path + ".") and isinstance(m, nn.ModuleList) and len(m)
            and all(not type(c).__module__.startswith("torch.nn") and any(True for _ in c.parameters()) for c in m)
        ]  # fmt: skip
        if not path or not expected_layers(config) or not lists:
            continue
        if not any(b.startswith(path + ".") for s in lm.stacks.values() for b in s.blocks):
            problems.append(f"tower {path} ({type(config).__name__}) is built but is no stack")
    return problems


def _embedding_problems(model, lm) -> list[str]:
    """The input embeddings are at depth 0."""
    from torch import nn

    try:
        embeddings = model.get_input_embeddings()
    except (NotImplementedError, AttributeError):
        embeddings = None
    ids = {id(p) for p in embeddings.parameters()} if isinstance(embeddings, nn.Module) else set()
    return [
        f"input embedding {raw} at depth {lm[raw]}, not 0"
        for raw, param in model.named_parameters()
        if id(param) in ids and lm[raw] != 0
    ]


def _last_use_problems(lm) -> list[str]:
    """Where something runs after the last block (a norm, a head), what runs last is at the head."""
    if not lm.ticks:
        return []
    last = max(lm.ticks, key=lm.ticks.get)
    info = lm.params[last]
    if info.reason.startswith("in block") or info.depth == info.num_layers + 1:
        return []
    return [f"{last}, used last, is at depth {info.depth}, not the head ({info.num_layers + 1})"]


def sweep(types: list[str], progress: bool = False) -> list[dict[str, Any]]:
    records = []
    signal.signal(signal.SIGALRM, _alarm)
    for model_type in types:
        rec: dict[str, Any] = {"type": model_type}
        start = time.perf_counter()
        signal.alarm(TIMEOUT_S)
        try:
            rec["class"] = model_class(model_type)
            try:
                model = build(model_type)
            except Exception as err:  # noqa: BLE001 - transformers' own default config or a missing extra
                rec |= {"status": "not buildable", "why": f"{type(err).__name__}: {_first_line(err)}"}
            else:
                rec["build_s"] = round(time.perf_counter() - start, 3)
                rec |= check(model, model_type)
                del model
        except Timeout:
            rec |= {"status": "FAIL", "why": f"took more than {TIMEOUT_S} s"}
        except Exception as err:  # noqa: BLE001 - llrd must never crash: record it as a failure
            rec |= {"status": "FAIL", "why": f"llrd raised {type(err).__name__}: {_first_line(err)}"}
        finally:
            signal.alarm(0)
        rec["seconds"] = round(time.perf_counter() - start, 3)
        records.append(rec)
        if progress:
            print(
                f"{len(records)}/{len(types)} {model_type}: {rec['status']} ({rec['seconds']:.2f} s)", file=sys.stderr
            )
        if len(records) % 50 == 0:
            gc.collect()
    return records


def _first_line(err: BaseException) -> str:
    return (str(err).splitlines() or [""])[0][:200]


STATUS_ORDER = ("pass", "exception", "unchecked", "fallback", "no blocks", "not buildable", "FAIL")
MEANING = {
    "pass": "data-flow depths; each tower's block count = its config's; every built tower a stack; all invariants hold",
    "exception": "data-flow depths; block count differs from the config, or blocks run several times (shared "
    "weights, loops): explained",
    "unchecked": "data-flow depths; invariants hold, but the config declares no layer count to check the blocks "
    "against",
    "fallback": "no forward pass could be traced on meta: module-tree depths, said in a log line",
    "no blocks": "no repeated blocks: llrd's own error asks for block_pattern",
    "not buildable": "transformers cannot build the class from its default config (or an optional dependency "
    "is missing): not an llrd result",
    "FAIL": "llrd raised, or an invariant broke",
}


def markdown(summary: dict[str, Any], records: list[dict[str, Any]]) -> str:
    counts = summary["counts"]
    lines = [
        f"Command: `python scripts/sweep_architectures.py` — transformers {summary['transformers']}, torch "
        f"{summary['torch']}: {summary['cpu_seconds']:.0f} s of CPU time, {summary['seconds']:.0f} s wall time "
        f"on {summary['hardware']}, {summary['per_type_ms_median']:.0f} ms wall per type (median).",
        "",
        f"{summary['types']} model types with a model class; {summary['buildable']} build from their default "
        f"config; llrd gives data-flow depths to {sum(counts.get(k, 0) for k in STATUS_ORDER[:3])} of them.",
        "",
        "| result | model types | meaning |",
        "|---|---|---|",
        *(f"| {s} | {counts.get(s, 0)} | {MEANING[s]} |" for s in STATUS_ORDER),
    ]
    for status in STATUS_ORDER[1:]:
        rows = [r for r in records if r["status"] == status]
        if rows:
            lines += ["", f"### {status} ({len(rows)})", "", "| model type | class | why |", "|---|---|---|"]
            lines += [f"| {r['type']} | {r.get('class', '')} | {r.get('why', '').replace('|', '/')} |" for r in rows]
    passed = [r["type"] for r in records if r["status"] == "pass"]
    lines += ["", f"### pass ({len(passed)})", "", ", ".join(passed)]
    return "\n".join(lines) + "\n"


def update_docs() -> None:
    """Rewrite docs/architectures.md's generated summary from the results files (scripts/docs_blocks.py)."""
    from docs_blocks import update

    update("sweep_architectures")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="*", help="model types to run (default: all)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for architectures.{json,md}")
    parser.add_argument("--progress", action="store_true", help="one line per model type on stderr")
    parser.add_argument("--update-docs", action="store_true", help="write the summary into docs/architectures.md too")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    import os

    import torch
    import transformers

    types = args.only or model_types()
    from docs_blocks import hardware_class

    start = time.perf_counter()
    cpu = time.process_time()
    records = sweep(types, args.progress)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    times = sorted(r["seconds"] for r in records)
    summary = {
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
        "seconds": round(seconds, 1),
        "cpu_seconds": round(cpu, 1),
        "hardware": hardware_class(),
        "per_type_ms_median": 1000 * times[len(times) // 2] if times else 0,
        "types": len(records),
        "buildable": sum(r["status"] != "not buildable" for r in records),
        "counts": dict(Counter(r["status"] for r in records)),
    }
    name = "architectures" if not args.only else "architectures_only"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{name}.json").write_text(json.dumps({"summary": summary, "types": records}, indent=1) + "\n")
    (args.out / f"{name}.md").write_text(markdown(summary, records))
    if args.update_docs and not args.only:
        update_docs()
    print(json.dumps(summary))
    for rec in records:
        if rec["status"] == "FAIL":
            print(f"FAIL {rec['type']}: {rec['why']}", file=sys.stderr)
    return 1 if summary["counts"].get("FAIL") else 0


if __name__ == "__main__":
    sys.exit(main())

"""Command line: ``llrd inspect MODEL [--layer_decay 0.8 --learning_rate 1e-4 ...]`` (``python -m llrd``)."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from .inspect import (
    TASKS,
    empty_model,
    explain_rows,
    format_explanation,
    format_table,
    inspect_model,
    load_config,
    plot_rows,
    with_lora,
)

USAGE = (
    "llrd inspect MODEL [--config key=value ...] [--task TASK] [--lora TARGET ...] [--explain] [--json] [--plot PNG] "
    "[LLRD training flags]"
)


def _inspect_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="llrd inspect",
        usage=USAGE,
        description="Show the per-layer param groups MODEL would train with, without allocating its weights. "
        "Any LLRDTrainingArguments flag (--layer_decay, --learning_rate, --weight_decay, --block_pattern, "
        "--depth_overrides, ...) is accepted, as in the recipes.",
    )
    p.add_argument("model", help="local checkpoint folder, Hub name (config only), or a model_type such as bert")
    p.add_argument("--config", action="extend", nargs="+", default=[], metavar="KEY=VALUE", help="config overrides")
    p.add_argument("--task", choices=TASKS, default="auto", help="which head to build (default: auto)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument(
        "--explain", action="store_true", help="also say why each parameter outside the blocks got its depth"
    )
    p.add_argument("--plot", metavar="PNG", help="also draw learning rate per depth to this PNG")
    p.add_argument(
        "--lora",
        nargs="+",
        metavar="TARGET",
        help="wrap the model with peft LoRA on these target modules (e.g. q_proj v_proj, or all-linear) to see the "
        "groups of a LoRA run, e.g. with --loraplus_lr_ratio 16",
    )
    p.add_argument("--lora_r", type=int, default=8, help="with --lora: the LoRA rank (default 8)")
    p.add_argument("--lora_modules_to_save", nargs="+", metavar="MODULE", help="with --lora: peft's modules_to_save")
    p.add_argument("--trust_remote_code", action="store_true", help="allow custom code from the checkpoint")
    return p


def inspect_main(argv: list[str]) -> int:
    from transformers import HfArgumentParser

    from .args import LLRDTrainingArguments

    parser = _inspect_parser()
    ns, rest = parser.parse_known_args(argv)
    if "--output_dir" not in rest:
        rest = [*rest, "--output_dir", "llrd_inspect"]
    try:
        (args,) = HfArgumentParser(LLRDTrainingArguments).parse_args_into_dataclasses(rest)
    except ValueError as err:
        parser.error(str(err))
    try:
        config = load_config(ns.model, ns.config, ns.trust_remote_code)
    except (OSError, ValueError, KeyError) as err:
        parser.error(
            f"unknown model {ns.model!r}: not a local folder with config.json, not a model_type, and not "
            f"reachable on the Hub ({type(err).__name__}: {str(err).splitlines()[0][:200]})"
        )
    try:
        model = empty_model(config, ns.task)
        if ns.lora:
            model = with_lora(model, ns.lora, ns.lora_r, ns.lora_modules_to_save)
        rows, layer_map = inspect_model(model, args)
    except ValueError as err:
        lora = "no trainable LoRA" in str(err)
        hint = " (llrd inspect: add --lora TARGET ..., e.g. --lora query value)" if lora else ""
        parser.error(str(err) + hint)
    if ns.plot:
        plot_rows(rows, ns.plot, title=f"{type(model).__name__}, layer_decay={args.layer_decay}")
    depth = {"source": layer_map.source, "how": layer_map.note}
    if ns.json:
        stacks = {s.name: s.num_layers for s in layer_map.stacks.values()}
        report = {"model": type(model).__name__, "stacks": stacks, "depth": depth, "groups": rows}
        if ns.explain:
            report["explain"] = explain_rows(layer_map)
        print(json.dumps(report, indent=1))
        return 0
    stacks = ", ".join(f"{s.name}: {s.num_layers} blocks" for s in layer_map.stacks.values())
    total = sum(r["params"] for r in rows)
    print(f"{type(model).__name__} ({stacks}); layer_decay={args.layer_decay}, lr={args.learning_rate:g}")
    print(f"depth from {layer_map.source}: {layer_map.note}")
    print(format_table(rows))
    print(f"{len(rows)} groups, {sum(r['tensors'] for r in rows)} tensors, {total:,} trainable parameters")
    if ns.explain:
        print("\nWhy each parameter outside the blocks has its depth:")
        print(format_explanation(explain_rows(layer_map)))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.WARNING)
    if not argv or argv[0] in ("-h", "--help"):
        print(
            f"usage: {USAGE}\n\nCommands:\n  inspect   show the per-layer param groups of a model\n"
            "  sweep     equal-budget A/B of LLRD against plain fine-tuning (llrd sweep --help)"
        )
        return 0 if argv else 2
    if argv[0] == "sweep":
        from .sweep.cli import main as sweep_main

        return sweep_main(argv[1:])
    if argv[0] != "inspect":
        print(f"llrd: error: unknown command {argv[0]!r}; usage: {USAGE}", file=sys.stderr)
        return 2
    return inspect_main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())

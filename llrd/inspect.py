"""``llrd inspect``: the param groups a model would train with, as a table, JSON or a plot.

The model is built on the meta device from its config alone (no weights are allocated or downloaded), so
a 70B-parameter config inspects in seconds.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .checkpoints import resolve_checkpoint
from .discovery import LayerMap, layer_ids
from .groups import param_groups

__all__ = [
    "resolve_checkpoint",
    "empty_model",
    "with_lora",
    "inspect_rows",
    "format_table",
    "plot_rows",
    "explain_rows",
]

TASKS = ("auto", "sequence-classification", "image-classification", "causal-lm", "seq2seq-lm", "base")


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def load_config(model: str, overrides: Sequence[str] = (), trust_remote_code: bool = False):
    """Config of a local folder, a ``model_type`` (``bert``, ``llama``) or a Hub name, with ``key=value``
    overrides (values parsed as JSON when they can be)."""
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    kwargs = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--config {item!r}: expected key=value, e.g. --config num_hidden_layers=24")
        kwargs[key] = _parse_value(value)
    if model not in CONFIG_MAPPING:
        return AutoConfig.from_pretrained(resolve_checkpoint(model), trust_remote_code=trust_remote_code, **kwargs)
    return AutoConfig.for_model(model, **kwargs)


def empty_model(config, task: str = "auto") -> nn.Module:
    """Instantiate ``config`` on the meta device: parameters have shapes but no storage.

    Example:
        >>> from transformers import BertConfig
        >>> empty_model(BertConfig(), "sequence-classification").classifier.weight.device
        device(type='meta')
    """
    import transformers as tf

    classes = {
        "sequence-classification": [tf.AutoModelForSequenceClassification],
        "image-classification": [tf.AutoModelForImageClassification],
        "causal-lm": [tf.AutoModelForCausalLM],
        "seq2seq-lm": [tf.AutoModelForSeq2SeqLM],
        "base": [tf.AutoModel],
    }
    candidates = (
        [
            tf.AutoModelForSequenceClassification,
            tf.AutoModelForImageClassification,
            tf.AutoModelForSeq2SeqLM,
            tf.AutoModelForCausalLM,
            tf.AutoModel,
        ]
        if task == "auto"
        else classes[task]
    )
    errors = []
    for cls in candidates:
        try:
            with torch.device("meta"):
                return cls.from_config(config)
        except ValueError as err:  # this auto class does not know the config
            errors.append(f"{cls.__name__}: {str(err).splitlines()[0]}")
    raise ValueError(f"no model class for {type(config).__name__} and task {task!r}: " + "; ".join(errors))


def with_lora(
    model: nn.Module, targets: Sequence[str], r: int = 8, modules_to_save: Sequence[str] | None = None
) -> nn.Module:
    """``model`` wrapped by peft's LoRA on ``targets`` (peft's ``target_modules``; ``["all-linear"]`` works), on the
    meta device like the model, so that ``llrd inspect`` shows the groups of a LoRA run (``--lora``). A sequence
    classifier gets peft's ``SEQ_CLS`` task type (its head trains, as in a real run).

    Example:
        >>> with_lora(empty_model(BertConfig()), ["query", "value"]).peft_config["default"].r   # doctest: +SKIP
        8
    """
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as err:
        raise ValueError(f"--lora needs peft (pip install peft): {err}") from err
    target: str | list[str] = targets[0] if list(targets) == ["all-linear"] else list(targets)
    task = "SEQ_CLS" if type(model).__name__.endswith("ForSequenceClassification") else None
    config = LoraConfig(r=r, target_modules=target, modules_to_save=list(modules_to_save or []) or None, task_type=task)
    return get_peft_model(model, config)


def _loraplus_kind(group_name: str) -> str:
    kind = next((k for k in ("B", "embedding") if f"/loraplus_{k}/" in group_name), None)
    return f" (LoRA+ {kind})" if kind else ""


def inspect_rows(groups: list[dict[str, Any]], layer_map: LayerMap) -> list[dict[str, Any]]:
    """One row per param group: depth, stack, what it holds, tensors, parameters, lr, scale, weight decay."""
    rows = []
    for group in groups:
        infos = [layer_map.info(name) for name in group["param_names"]]
        roles = sorted({i.role for i in infos}, key=lambda r: (r != "embeddings", r == "head", r))
        rows.append(
            {
                "depth": group["layer_id"],
                "stack": group["stack"] if group["stack"] is not None else "all",
                "what": (roles[0] if len(roles) == 1 else f"{len(roles)} depths") + _loraplus_kind(group["group_name"]),
                "tensors": len(group["params"]),
                "params": sum(p.numel() for p in group["params"]),
                "lr": group["lr"],
                "lr_scale": group["lr_scale"],
                "weight_decay": group["weight_decay"],
                "group_name": group["group_name"],
            }
        )
    return rows


def explain_rows(layer_map: LayerMap) -> list[dict[str, Any]]:
    """Why each parameter outside the blocks got its depth (one row per parameter), for ``--explain``.

    Example:
        >>> explain_rows(layer_ids(opt))[-1]["reason"]                    # doctest: +SKIP
        'used after block 11, the last -> head'
    """
    return [
        {"name": info.name, "stack": info.stack, "depth": info.depth, "reason": info.reason}
        for info in layer_map.params.values()
        if not info.reason.startswith(("in block", "fallback: in block"))
    ]


def format_explanation(rows: list[Mapping[str, Any]]) -> str:
    """A fixed-width text table of :func:`explain_rows`."""
    return _table(
        ["parameter", "stack", "depth", "why"],
        [[r["name"], r["stack"], str(r["depth"]), r["reason"]] for r in rows],
        {2},
    )


def _table(header: list[str], body: list[list[str]], right: set[int]) -> str:
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(header)]

    def line(cells):
        return "  ".join(
            c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(b) for b in body)])


def format_table(rows: list[Mapping[str, Any]]) -> str:
    """A fixed-width text table of :func:`inspect_rows`."""
    header = ["depth", "stack", "what", "tensors", "params", "lr", "lr scale", "wd"]
    body = [
        [
            "-" if r["depth"] is None else str(r["depth"]),
            r["stack"],
            r["what"],
            str(r["tensors"]),
            f"{r['params']:,}",
            f"{r['lr']:.3e}",
            f"{r['lr_scale']:.4g}",
            f"{r['weight_decay']:g}",
        ]
        for r in rows
    ]
    return _table(header, body, {3, 4, 5, 6, 7, 0})


def plot_rows(rows: list[Mapping[str, Any]], path: str, title: str = "") -> None:
    """Learning rate per depth, log scale, one line per stack."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    by_stack: dict[str, dict[int, float]] = {}
    for r in rows:
        if r["depth"] is not None:
            by_stack.setdefault(r["stack"], {})[r["depth"]] = r["lr"]
    for stack, points in by_stack.items():
        depths = sorted(points)
        ax.plot(depths, [points[d] for d in depths], marker="o", label=stack)
    ax.set_yscale("log")
    ax.set_xlabel("depth (0 = embeddings, L+1 = head)")
    ax.set_ylabel("learning rate")
    ax.set_title(title or "learning rate per depth")
    ax.grid(True, which="both", alpha=0.3)
    if by_stack:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def inspect_model(model: nn.Module, args) -> tuple[list[dict[str, Any]], LayerMap]:
    """Rows for ``model`` under the LLRD settings of ``args`` (an ``LLRDTrainingArguments``)."""
    from .groups import default_decay_names

    layer_map = layer_ids(
        model,
        block_pattern=args.block_pattern,
        depth_overrides=args.depth_overrides,
        depth_source=getattr(args, "depth_source", "flow"),
    )
    groups = param_groups(model, decay_names=default_decay_names, layer_map=layer_map, **args.group_kwargs())
    return inspect_rows(groups, layer_map), layer_map

"""Where each parameter sits: its stack of blocks and its depth in that stack (the public API).

:mod:`llrd.flow` traces one forward pass of a meta-device twin of the model, :mod:`llrd.blocks` finds the
blocks (each config tower's lists checked against its layer counts) and :mod:`llrd.depth` is the one rule that
turns them into ``(stack, depth, reason)`` per parameter. Here: the stacks get names, ``depth_overrides``
apply, and the result becomes a :class:`LayerMap`. Where the model cannot be traced, the module tree alone
decides and the reason says so; ``depth_source="structure"`` asks for that directly.

Every :class:`ParamDepth` carries a ``reason``; ``llrd inspect --explain`` prints them. Names decide only
through the user's ``block_pattern`` and ``depth_overrides``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import nn

from .blocks import (
    Block,
    Blocks,
    BlockSpec,
    ancestors,
    config_towers,
    expected_layers,
    first_starts,
    inside,
    structural_blocks,
    traced_blocks,
)
from .depth import Rule, outside
from .flow import Trace, TraceError, trace
from .naming import normalize_name

__all__ = ["LayerMap", "ParamDepth", "Stack", "layer_ids", "BlockSpec", "DepthOverrides", "DEPTH_SOURCES"]

logger = logging.getLogger(__name__)

STEM = "stem"
HEAD = "head"
#: ``"flow"``: from one traced forward pass (default); ``"structure"``: the module tree alone (llrd 0.1).
DEPTH_SOURCES = ("flow", "structure")

#: ``{regex: depth}``; the regex is searched in the clean parameter name, the depth is an ``int`` or
#: ``"stem"`` / ``"head"``.
DepthOverrides = Mapping[str, int | str] | None


@dataclass(frozen=True)
class Stack:
    """One chain of blocks, ordered from input to output.

    Attributes:
        name: short name (``"encoder"``, ``"text_model"``; the list's path for a single-stack model).
        blocks: clean module paths of the blocks, in forward order.
        members: per block, all its module paths (more than one for parallel lists, as in XLM).
    """

    name: str
    blocks: tuple[str, ...]
    members: tuple[tuple[str, ...], ...] = ()

    @property
    def num_layers(self) -> int:
        return len(self.blocks)


@dataclass(frozen=True)
class ParamDepth:
    """Depth of one parameter. ``depth`` runs from 0 (stem) to ``num_layers + 1`` (head); ``reason`` says why."""

    name: str
    stack: str
    depth: int
    num_layers: int
    reason: str = ""

    @property
    def role(self) -> str:
        if self.depth == 0:
            return "embeddings"
        if self.depth > self.num_layers:
            return "head"
        return f"block {self.depth - 1}"

    def lr_scale(self, layer_decay: float) -> float:
        """``layer_decay ** (num_layers + 1 - depth)``: 1 for the head, smallest for the stem."""
        return float(layer_decay) ** (self.num_layers + 1 - self.depth)


class LayerMap(Mapping[str, int]):
    """Mapping from clean parameter name to depth, with the stacks it was derived from.

    Raw names (with ``module.``, ``_orig_mod.``, ... prefixes) are accepted as keys too. ``source`` is
    ``"flow"``, ``"structure"`` or ``"fallback"`` (flow was asked for, but the model could not be traced);
    ``note`` says how the blocks and the order were found; ``ticks`` maps clean names to when the traced
    forward pass first used each parameter (empty without a trace); ``check`` says how the block count was
    checked: ``"config"`` (each tower's count as its config declares), ``"mismatch"``, ``"shared weights"``
    (ALBERT), ``"no count"``, ``"block_pattern"`` or ``"structure"`` (no trace), with ``"+repeated"`` where
    blocks run more than once per forward pass.

    Example:
        >>> lm = layer_ids(model)            # doctest: +SKIP
        >>> lm["bert.encoder.layer.0.output.dense.weight"], lm.num_layers
        (1, 12)
    """

    def __init__(
        self,
        params: dict[str, ParamDepth],
        stacks: dict[str, Stack],
        raw_names: dict[str, str],
        *,
        source: str = "structure",
        note: str = "",
        ticks: dict[str, int] | None = None,
        check: str = "structure",
    ):
        self.params = params
        self.stacks = stacks
        self.raw_names = raw_names  # raw -> clean
        self.source = source
        self.note = note
        self.ticks = ticks or {}
        self.check = check

    def info(self, name: str) -> ParamDepth:
        return self.params[self.raw_names.get(name, name)]

    def __getitem__(self, name: str) -> int:
        return self.info(name).depth

    def __iter__(self) -> Iterator[str]:
        return iter(self.params)

    def __len__(self) -> int:
        return len(self.params)

    @property
    def num_layers(self) -> int:
        """Total number of blocks over all stacks."""
        return sum(s.num_layers for s in self.stacks.values())

    def __repr__(self) -> str:
        stacks = ", ".join(f"{s.name}: {s.num_layers} blocks" for s in self.stacks.values())
        return f"LayerMap({len(self)} parameters; {stacks}; depth from {self.source})"


def layer_ids(
    model: nn.Module,
    *,
    block_pattern: BlockSpec = None,
    depth_overrides: DepthOverrides = None,
    depth_source: str = "flow",
) -> LayerMap:
    """Find the blocks of ``model`` and give every parameter a stack, a depth and the reason for it.

    Args:
        model: any ``nn.Module``; usually a ``transformers`` model, possibly wrapped by DDP, FSDP,
            ``torch.compile``, PEFT or a SentenceTransformer. Never run: the trace runs a meta-device twin.
        block_pattern: overrides block discovery: a regex that fully matches the clean paths of the block
            modules (``r"bert\\.encoder\\.layer\\.\\d+"``), or a callable ``(path, module) -> bool``.
        depth_overrides: ``{regex: depth}``; the first regex found (``re.search``) in a clean parameter name
            sets its depth (``int``, ``"stem"`` or ``"head"``). A regex that matches no parameter is an error.
        depth_source: ``"flow"`` (default): from the order of one traced forward pass; ``"structure"``: from
            the module tree alone, as llrd 0.1 did (to resume checkpoints it wrote).

    Returns:
        A :class:`LayerMap` (clean name -> depth) that also knows the stacks.

    Example:
        >>> from transformers import BertConfig, BertForSequenceClassification
        >>> model = BertForSequenceClassification(BertConfig(hidden_size=32, num_hidden_layers=2,
        ...     num_attention_heads=2, intermediate_size=37))
        >>> lm = layer_ids(model)
        >>> [lm[n] for n in ("bert.embeddings.word_embeddings.weight", "bert.encoder.layer.1.output.dense.weight",
        ...                  "classifier.weight")]
        [0, 2, 3]
    """
    if depth_source not in DEPTH_SOURCES:
        raise ValueError(f"depth_source={depth_source!r}: use 'flow' (default) or 'structure' (module tree only).")
    named = list(model.named_parameters())
    _check_flat([n for n, _ in named])
    if depth_source == "flow":
        try:
            built = _from_trace(model, trace(model), block_pattern)
        except TraceError as err:
            built = _from_tree(model, block_pattern, f"module tree (fallback: {err})")
            logger.warning("%s: depth from the module tree, not the data flow: %s", type(model).__name__, err)
        except ValueError:
            raise  # llrd's own errors about the user's settings (block_pattern, ...)
        except Exception as err:  # noqa: BLE001 - never crash on a foreign model: fall back, loudly
            why = f"llrd could not use the trace ({type(err).__name__}: {err}); please report this model"
            built = _from_tree(model, block_pattern, f"module tree (fallback: {why})")
            logger.warning("%s: depth from the module tree, not the data flow: %s", type(model).__name__, why)
    else:
        built = _from_tree(model, block_pattern, "module tree (depth_source='structure')", "structure")
    stacks = built.stacks

    overrides = [(re.compile(rx), d) for rx, d in (depth_overrides or {}).items()]
    used: set[str] = set()
    params: dict[str, ParamDepth] = {}
    raw_names: dict[str, str] = {}
    ticks: dict[str, int] = {}
    for raw, _ in named:
        clean = normalize_name(raw)
        stack, depth, reason = built.place(raw)
        if (tick := built.tick(raw)) is not None:
            ticks[clean] = tick
        for rx, value in overrides:
            if rx.search(clean):
                used.add(rx.pattern)
                depth = _override_depth(value, rx.pattern, stacks[stack].num_layers)
                reason = f"depth_overrides {rx.pattern!r} -> {value}"
                break
        params[clean] = ParamDepth(clean, stack, depth, stacks[stack].num_layers, reason)
        raw_names[raw] = clean
    unused = [rx.pattern for rx, _ in overrides if rx.pattern not in used]
    if unused:
        raise ValueError(
            f"depth_overrides pattern(s) {unused} match no parameter of {type(model).__name__}. Patterns are searched "
            "in clean parameter names (e.g. 'classifier\\.'); list them with "
            "`[n for n, _ in model.named_parameters()]`."
        )
    return LayerMap(params, stacks, raw_names, source=built.source, note=built.note, ticks=ticks, check=built.check)


@dataclass
class _Built:
    """The stacks of one model and the rule that places its parameters (raw names in, twin names inside)."""

    stacks: dict[str, Stack]
    rule: Rule
    source: str
    note: str
    check: str
    root: str | None = None  # raw path of the traced model; None: the rule sees raw names
    outside: Callable[[str], tuple[str, int, str]] | None = None

    def relative(self, raw: str) -> str | None:
        if self.root is None:
            return raw
        if not inside(raw, self.root):
            return None
        return normalize_name(raw[len(self.root) + 1 :] if self.root else raw)

    def place(self, raw: str) -> tuple[str, int, str]:
        rel = self.relative(raw)
        if rel is None and self.outside is not None:
            return self.outside(raw)
        return self.rule.place(rel)

    def tick(self, raw: str) -> int | None:
        rel = self.relative(raw)
        return None if rel is None else self.rule.first_use.get(rel)


def _from_tree(model: nn.Module, spec: BlockSpec, note: str, source: str = "fallback") -> _Built:
    """No trace: blocks and depths from the module tree (raw paths)."""
    modules = dict(model.named_modules())
    model_path, base = _trunk_and_model(modules)
    hf = modules.get(model_path)
    towers = config_towers(modules, getattr(hf, "config", None))
    found = structural_blocks(modules, spec, getattr(hf, "config", None))
    stacks, keys = _make_stacks(found, {}, type(model).__name__)
    stack_blocks = {name: found.stacks[key] for name, key in keys.items()}
    tower_of = {name: found.towers.get(key, "") for name, key in keys.items()}
    rule = Rule(modules, stack_blocks, tower_of, set(towers), base if base != model_path else "",
                shared=_shared_tables(model, stack_blocks))  # fmt: skip
    rule.prefix = "fallback: " if source == "fallback" else ""
    _cross_check(hf, stacks)
    return _Built(stacks, rule, source, note, "structure")


def _rebuilt_modules(cls: type, config: Any) -> dict[str, nn.Module]:
    """``named_modules`` of ``cls(config)`` built on the meta device, as the trace's twin is."""
    from transformers.modeling_utils import local_torch_dtype

    with torch.device("meta"), local_torch_dtype(torch.bfloat16):
        return dict(cls(config).named_modules())


def _from_trace(model: nn.Module, traced: Trace, spec: BlockSpec) -> _Built:
    """Blocks chosen with the trace; depths from when each parameter was first used."""
    twin = traced.twin
    modules = dict(twin.named_modules())
    root = traced.root
    full = {p: normalize_name(f"{root}.{p}" if root and p else root or p) for p in modules}
    if spec is not None:
        spec = _on_clean_paths(spec, full)
        if not any(spec(p, m) for p, m in modules.items() if p):
            raise TraceError("block_pattern matches no module of the traced transformers model")
    found = traced_blocks(modules, traced, twin.config, spec, rebuild=partial(_rebuilt_modules, type(twin)))
    stacks, keys = _make_stacks(found, full, type(model).__name__)
    stack_blocks = {name: found.stacks[key] for name, key in keys.items()}
    first = first_starts(traced)
    spans: dict[str, list[tuple[int, int]] | None] = {}
    for name, blocks in stack_blocks.items():
        if all(m in first and m in traced.first_end for b in blocks for m in b):
            spans[name] = [(min(first[m] for m in b), max(traced.first_end[m] for m in b)) for b in blocks]
        else:
            spans[name] = None
    towers = config_towers(modules, twin.config)
    tower_of = {name: found.towers.get(key, "") for name, key in keys.items()}
    base = next((p for p, m in modules.items() if m is getattr(twin, "base_model", twin)), "")
    rule = Rule(modules, stack_blocks, tower_of, set(towers), base, spans, traced.first_use, first,
                _shared_tables(twin, stack_blocks))  # fmt: skip
    note = f"{traced.describe()}; {found.note}"
    repeated = sum(traced.calls.get(b[0], 0) > 1 for blocks in stack_blocks.values() for b in blocks)
    if repeated and found.check != "shared weights":
        note += f"; {repeated} blocks run more than once per forward pass (shared weights or loops)"
    if found.check == "mismatch":
        logger.warning("%s: %s", type(model).__name__, found.note)
    elif found.check == "shared weights":
        logger.info("%s: %s", type(model).__name__, found.note)
    raw_names = [n for n, _ in model.named_parameters()]
    mine = min((i for i, n in enumerate(raw_names) if inside(n, root)), default=0)
    order = {n: i for i, n in enumerate(raw_names)}
    everything = dict(model.named_modules())
    names = list(stacks)
    head = stacks[names[-1]].num_layers + 1

    def _outside(raw: str) -> tuple[str, int, str]:
        return outside(everything, raw, order[raw] < mine, names, head)

    check = found.check + ("+repeated" if repeated and found.check != "shared weights" else "")
    return _Built(stacks, rule, "flow", note, check, root, _outside)


def _make_stacks(found: Blocks, full: dict[str, str], model_name: str) -> tuple[dict[str, Stack], dict[str, str]]:
    """Name the stacks (``encoder``/``decoder``, ...) in forward order; ``full`` maps paths to clean names."""
    if not found.stacks:
        raise ValueError(
            f"no transformer blocks found in {model_name}: it has no GradientCheckpointingLayer and no "
            "list of repeated modules. Pass block_pattern=r'<regex fully matching block module paths>' "
            "(e.g. r'encoder\\.layers\\.\\d+') or a callable (path, module) -> bool."
        )
    keys = list(found.stacks)
    names = _short_names([full.get(k, normalize_name(k)) for k in keys])
    stacks = {
        name: Stack(
            name,
            tuple(full.get(b[0], normalize_name(b[0])) for b in found.stacks[key]),
            tuple(tuple(full.get(m, normalize_name(m)) for m in b) for b in found.stacks[key]),
        )
        for name, key in zip(names, keys, strict=True)
    }
    return stacks, dict(zip(names, keys, strict=True))


def _short_names(keys: list[str]) -> list[str]:
    """Drop the path segments shared by all stacks: ``model.encoder.layers`` / ``model.decoder.layers`` ->
    ``encoder`` / ``decoder``."""
    clean = [k.split(".") for k in keys]
    if len(clean) == 1:
        return [".".join(clean[0]) or "blocks"]
    while all(len(c) > 1 for c in clean) and len({c[0] for c in clean}) == 1:
        clean = [c[1:] for c in clean]
    while all(len(c) > 1 for c in clean) and len({c[-1] for c in clean}) == 1:
        clean = [c[:-1] for c in clean]
    names = [".".join(c) for c in clean]
    return names if len(set(names)) == len(names) else keys


def _trunk_and_model(modules: dict[str, nn.Module]) -> tuple[str, str]:
    """Paths of the transformers model inside any wrappers, and of its base model (``model.base_model``)."""
    from transformers import PreTrainedModel

    ids = {id(m): p for p, m in modules.items()}
    for path, module in modules.items():
        if isinstance(module, PreTrainedModel):
            base = getattr(module, "base_model", module)
            return path, ids.get(id(base), path)
    return "", ""


def _check_flat(names: list[str]) -> None:
    flat = [n for n in names if n.endswith("_flat_param")]
    if flat:
        raise ValueError(
            f"parameter {flat[0]!r} is an FSDP1 flat parameter: one tensor holds many layers, so per-layer "
            "learning rates are impossible. Use FSDP2 (`fsdp_version: 2`) or FSDP1 with `use_orig_params: true`."
        )


def _on_clean_paths(spec: BlockSpec, full: dict[str, str]):
    """``block_pattern`` sees the clean path in the user's model, not the twin's relative one."""
    if isinstance(spec, str):
        pattern = re.compile(spec)
        return lambda path, module: pattern.fullmatch(full.get(path, path)) is not None
    return lambda path, module: bool(spec(full.get(path, path), module))


def _shared_tables(twin: nn.Module, stack_blocks: dict[str, list[Block]]) -> set[str]:
    """Parameters of an ``nn.Embedding`` in block 0 whose place no other block of the stack fills (T5)."""
    local: dict[str, set[str]] = {}  # block member -> its parameter names, relative to it
    members = {m for blocks in stack_blocks.values() for block in blocks for m in block}
    for name, _ in twin.named_parameters():
        for anc in ancestors(name.rpartition(".")[0]):
            if anc in members:
                local.setdefault(anc, set()).add(name[len(anc) + 1 :])
                break
    shared = set()
    for blocks in stack_blocks.values():
        if len(blocks) < 2:
            continue
        others = {name for block in blocks[1:] for member in block for name in local.get(member, ())}
        for member in blocks[0]:
            for path, module in twin.get_submodule(member).named_modules():
                if isinstance(module, nn.Embedding):
                    shared |= {
                        f"{member}.{path}.{n}" if path else f"{member}.{n}"
                        for n, _ in module.named_parameters()
                        if (f"{path}.{n}" if path else n) not in others
                    }
    return shared


def _override_depth(value: int | str, pattern: str, num_layers: int) -> int:
    if value == STEM:
        return 0
    if value == HEAD:
        return num_layers + 1
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= num_layers + 1:
        return value
    raise ValueError(
        f"depth_overrides[{pattern!r}]={value!r} is not a depth: use an int in [0, {num_layers + 1}], 'stem' or 'head'."
    )


def _cross_check(model: nn.Module | None, stacks: dict[str, Stack]) -> None:
    """Without a trace: compare the blocks found with the config's depth (a log line, not an error)."""
    found = sum(s.num_layers for s in stacks.values())
    expected = expected_layers(getattr(model, "config", None))
    if expected and found not in expected:
        logger.warning(
            "found %d blocks (%s) but the config declares %s layers; models that reuse one set of weights "
            "for several layers (ALBERT) get one depth per stored block.",
            found,
            ", ".join(f"{s.name}: {s.num_layers}" for s in stacks.values()),
            " or ".join(map(str, expected)),
        )

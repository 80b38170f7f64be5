"""Where each parameter sits: its stack of blocks and its depth in that stack.

This module is the one place where a parameter's depth is decided. The convention, for a stack of ``L``
blocks:

* depth ``0``: the stem, everything that feeds the first block (token/position/patch embeddings, cls and
  mask tokens, relative-position tables shared by all blocks);
* depth ``i + 1``: block ``i`` (0-based), including anything that runs between block ``i - 1`` and block
  ``i`` (a Swin patch-merging layer, a SegFormer stage's patch embedding);
* depth ``L + 1``: everything that runs after the last block (final norm, pooler, classifier, projection
  heads).

``depth_source="flow"`` (the default) decides from the data flow: :mod:`llrd.flow` runs one forward pass of
a meta-device twin of the model and records when each module and parameter first runs; :mod:`llrd.blocks`
picks the blocks whose count matches the config. A parameter inside a block takes the block's depth, except
a lookup table that only block 0 has (T5's relative-position bias, shared by every block): stem. Any other
parameter is placed by when it is first used relative to the blocks of its stack. Where the model cannot
be traced, or a parameter is not reached by the trace, the module-tree rules of llrd 0.1 decide and the
reason says so. ``depth_source="structure"`` uses those rules alone (checkpoints written by llrd 0.1).

Every :class:`ParamDepth` carries a ``reason``; ``llrd inspect --explain`` prints them. Names are only a
cross-check and the handle for user overrides.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from torch import nn

from .blocks import Block, Blocks, BlockSpec, ancestors, first_starts, inside, structural_blocks, traced_blocks
from .blocks import expected_layers as _expected_layers
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

# llrd 0.1: parameters that live inside block 0 but are shared by every block of the stack, by name.
_SHARED_IN_BLOCK = re.compile(r"(?:^|\.)relative_attention_bias\.")

# llrd 0.1: modules that sit beside the blocks, not before them in the module tree, but feed every block.
# Keyed by the class of the module holding them; value: attribute -> depth (0 = stem, 1 = first block).
_BESIDE_BLOCKS: dict[str, dict[str, int]] = {
    "DebertaV2Encoder": {"rel_embeddings": 0, "LayerNorm": 0, "conv": 1},
    "DebertaEncoder": {"rel_embeddings": 0, "LayerNorm": 0},
}

# Path segments that name an embedding/stem module (BART ``layernorm_embedding`` sits after the layer list
# in the module tree but runs before it).
_STEM_SEGMENT = re.compile(r"(?<!un)embed", re.IGNORECASE)
# Tokens and position tables registered as bare parameters (``pos_embed``, ``cls_token``, ``mask_token``).
_STEM_LEAF = re.compile(r"(?<!un)embed|(?:^|_)token$", re.IGNORECASE)


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
    forward pass first used each parameter (empty without a trace).

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
    ):
        self.params = params
        self.stacks = stacks
        self.raw_names = raw_names  # raw -> clean
        self.source = source
        self.note = note
        self.ticks = ticks or {}

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
        raise ValueError(f"depth_source={depth_source!r}: use 'flow' (default) or 'structure' (llrd 0.1 depths).")
    named = list(model.named_parameters())
    _check_flat([n for n, _ in named])
    placer: _Tree | _Flow | None = None
    source, note = "structure", "module tree (depth_source='structure', the llrd 0.1 rule)"
    if depth_source == "flow":
        try:
            placer = _Flow.build(model, trace(model), block_pattern)
            source, note = "flow", placer.note
        except TraceError as err:
            source, note = "fallback", f"module tree (fallback: {err})"
            logger.warning("%s: depth from the module tree, not the data flow: %s", type(model).__name__, err)
        except ValueError:
            raise  # llrd's own errors about the user's settings (block_pattern, ...)
        except Exception as err:  # noqa: BLE001 - never crash on a foreign model: fall back, loudly
            why = f"llrd could not use the trace ({type(err).__name__}: {err}); please report this model"
            source, note = "fallback", f"module tree (fallback: {why})"
            logger.warning("%s: depth from the module tree, not the data flow: %s", type(model).__name__, why)
    if placer is None:
        placer = _Tree.build(model, block_pattern, prefix="fallback: " if source == "fallback" else "")
    stacks = placer.stacks

    overrides = [(re.compile(rx), d) for rx, d in (depth_overrides or {}).items()]
    used: set[str] = set()
    params: dict[str, ParamDepth] = {}
    raw_names: dict[str, str] = {}
    ticks: dict[str, int] = {}
    for raw, _ in named:
        clean = normalize_name(raw)
        stack, depth, reason = placer.place(raw)
        if isinstance(placer, _Flow) and (tick := placer.tick(raw)) is not None:
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
    return LayerMap(params, stacks, raw_names, source=source, note=note, ticks=ticks)


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


def _towers(stack_blocks: dict[str, list[Block]]) -> dict[str, str]:
    """Per stack, the highest module that contains its blocks and no other stack's blocks."""
    towers = {}
    for stack, own in stack_blocks.items():
        mine = [m for block in own for m in block]
        others = [m for s, bs in stack_blocks.items() if s != stack for block in bs for m in block]
        parts = mine[0].split(".")
        towers[stack] = mine[0]
        for i in range(len(parts) - 1, -1, -1):
            candidate = ".".join(parts[:i])
            if not all(inside(m, candidate) for m in mine) or any(inside(m, candidate) for m in others):
                break
            towers[stack] = candidate
    return towers


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


@dataclass
class _Tree:
    """The module tree of one model, with its stacks: decides (stack, depth, reason) by llrd 0.1's rules."""

    modules: dict[str, nn.Module]
    order: dict[str, int]  # module path -> position in `named_modules()`
    stack_blocks: dict[str, list[Block]]  # stack -> block member paths
    towers: dict[str, str]  # stack -> highest module holding only that stack
    trunk: str  # the base model (`model.base_model`)
    model_path: str  # the transformers model inside any wrapper
    stacks: dict[str, Stack]
    prefix: str = ""  # "fallback: " when flow was asked for

    @classmethod
    def build(cls, model: nn.Module, spec: BlockSpec, prefix: str = "") -> _Tree:
        modules = dict(model.named_modules())
        found = structural_blocks(modules, spec)
        stacks, keys = _make_stacks(found, {}, type(model).__name__)
        stack_blocks = {name: found.stacks[key] for name, key in keys.items()}
        model_path, trunk = _trunk_and_model(modules)
        order = {p: i for i, p in enumerate(modules)}
        tree = cls(modules, order, stack_blocks, _towers(stack_blocks), trunk, model_path, stacks, prefix)
        _cross_check(model, stacks)
        return tree

    def __post_init__(self) -> None:
        # member path -> (stack, 1-based depth): blocks never nest, so a path has at most one of them above it
        self.block_depth = {
            m: (s, i + 1) for s, blocks in self.stack_blocks.items() for i, b in enumerate(blocks) for m in b
        }

    def place(self, raw: str) -> tuple[str, int, str]:
        return self.locate(raw, raw.rpartition(".")[0])

    def locate(self, raw: str, owner: str) -> tuple[str, int, str]:
        """(stack, depth, reason) of one parameter; see the module docstring for the rules."""
        stack, depth, why = self._locate(raw, owner)
        return stack, depth, self.prefix + why

    def _locate(self, raw: str, owner: str) -> tuple[str, int, str]:
        # 1. inside a block (a lookup per path prefix, so the cost does not grow with the number of blocks)
        for anc in ancestors(owner):
            if anc in self.block_depth:
                stack, depth = self.block_depth[anc]
                if _SHARED_IN_BLOCK.search(raw):
                    return stack, 0, f"named relative_attention_bias, in block {depth - 1} -> shared table -> stem"
                return stack, depth, f"in block {depth - 1}"
        stack = self.stack_of(raw, owner)
        blocks = self.stack_blocks[stack]
        head = len(blocks) + 1
        # 2. task heads outside the base model (XLM-R registers its classifier before the encoder)
        if self.trunk != self.model_path and not inside(owner, self.trunk):
            return stack, head, "outside the base model (a task head) -> head"
        # 3. shared inputs that sit beside the blocks
        for anc in ancestors(owner):
            table = _BESIDE_BLOCKS.get(type(self.modules[anc]).__name__) if anc in self.modules else None
            attr = (raw[len(anc) + 1 :] if anc else raw).split(".")[0]
            if table and attr in table:
                return stack, table[attr], f"{attr} of {type(self.modules[anc]).__name__} feeds every block"
        # 4. embeddings, wherever they are registered
        if _is_stem(raw, owner, self.modules, self.trunk):
            return stack, 0, "an embedding or token (by type or name) -> stem"
        # 5. position in the module tree relative to this stack's blocks
        if any(inside(m, owner) for b in blocks for m in b):
            return stack, head, "a direct parameter of a module holding the blocks -> head"
        position = self.order.get(owner, 0)
        for index, block in enumerate(blocks):
            if position < min(self.order[m] for m in block):  # the stem, or a downsampling layer feeding it
                if index == 0:
                    return stack, 0, "registered before the blocks -> stem"
                return stack, index + 1, f"registered between block {index - 1} and block {index} -> block {index}"
        return stack, head, "registered after the blocks -> head"

    def stack_of(self, raw: str, owner: str) -> str:
        """The stack whose tower holds the parameter; else the one it names; else the one it follows."""
        names = list(self.stack_blocks)
        for stack in names:
            if self.towers[stack] and inside(raw, self.towers[stack]):
                return stack
        if len(names) == 1:
            return names[0]
        tokens = set(re.split(r"[._]", normalize_name(raw).lower()))
        for stack in names:
            if re.split(r"[._]", stack.lower())[0] in tokens:
                return stack
        if not owner:
            return names[-1]
        position = self.order.get(owner, 0)
        before = [s for s in names if min(self.order[m] for m in self.stack_blocks[s][0]) <= position]
        return before[-1] if before else names[0]


@dataclass
class _Flow:
    """Depths from a trace: block membership, shared tables, then when a parameter is first used."""

    trace: Trace
    tree: _Tree  # llrd 0.1 rules on the twin, for what the trace did not reach
    stacks: dict[str, Stack]
    spans: dict[str, list[tuple[int, int]] | None]  # stack -> (first start, last end) per block; None: not run
    shared: set[str]  # twin parameter names: lookup tables only block 0 of a stack has
    first_inside: int  # position in named_parameters() of the traced model's first parameter
    raw_order: dict[str, int]  # raw parameter name -> position in named_parameters()
    note: str

    @classmethod
    def build(cls, model: nn.Module, traced: Trace, spec: BlockSpec) -> _Flow:
        twin = traced.twin
        modules = dict(twin.named_modules())
        root = traced.root
        full = {p: normalize_name(f"{root}.{p}" if root and p else root or p) for p in modules}
        if spec is not None:
            spec = _on_clean_paths(spec, full)
            if not any(spec(p, m) for p, m in modules.items() if p):
                raise TraceError("block_pattern matches no module of the traced transformers model")
        found = traced_blocks(modules, traced, twin.config, spec)
        stacks, keys = _make_stacks(found, full, type(model).__name__)
        stack_blocks = {name: found.stacks[key] for name, key in keys.items()}
        order = {p: i for i, p in enumerate(modules)}
        trunk = next((p for p, m in modules.items() if m is getattr(twin, "base_model", twin)), "")
        tree = _Tree(modules, order, stack_blocks, _towers(stack_blocks), trunk, "", stacks, "fallback: ")
        first = first_starts(traced)
        spans: dict[str, list[tuple[int, int]] | None] = {}
        for name, blocks in stack_blocks.items():
            if all(m in first and m in traced.end for b in blocks for m in b):
                spans[name] = [(min(first[m] for m in b), max(traced.end[m] for m in b)) for b in blocks]
            else:
                spans[name] = None
        raw_names = [n for n, _ in model.named_parameters()]
        mine = [i for i, n in enumerate(raw_names) if inside(n, root)]
        note = f"{traced.describe()}; {found.note}"
        repeated = sum(traced.calls.get(b[0], 0) > 1 for blocks in stack_blocks.values() for b in blocks)
        if repeated and "shared weights" not in found.note:
            note += f"; {repeated} blocks run more than once per forward pass (shared weights or loops)"
        if "but the config declares" in found.note:
            logger.warning("%s: %s", type(model).__name__, found.note)
        elif "shared weights" in found.note:
            logger.info("%s: %s", type(model).__name__, found.note)
        return cls(
            traced,
            tree,
            stacks,
            spans,
            _shared_tables(twin, stack_blocks),
            min(mine, default=0),
            {n: i for i, n in enumerate(raw_names)},
            note,
        )

    def relative(self, raw: str) -> str | None:
        """The twin's name for a raw parameter name; ``None`` outside the traced model."""
        root = self.trace.root
        if not inside(raw, root):
            return None
        return normalize_name(raw[len(root) + 1 :] if root else raw)

    def tick(self, raw: str) -> int | None:
        rel = self.relative(raw)
        return None if rel is None else self.trace.first_use.get(rel)

    def place(self, raw: str) -> tuple[str, int, str]:
        rel = self.relative(raw)
        if rel is None:
            return self._outside(raw)
        owner = next(a for a in ancestors(rel.rpartition(".")[0]) if a in self.tree.modules)
        for anc in ancestors(owner):
            if anc in self.tree.block_depth:
                stack, depth = self.tree.block_depth[anc]
                if rel in self.shared:
                    return stack, 0, "a lookup table only block 0 has (the other blocks lack it) -> shared -> stem"
                user = _block_running_at(self.trace.first_use.get(rel), self.spans[stack])
                if user is not None and user != depth - 1:  # a module shared by several blocks (Zamba2)
                    return stack, user + 1, f"in block {depth - 1}, but first used by block {user} -> block {user}"
                return stack, depth, f"in block {depth - 1}"
        stack = self.tree.stack_of(rel, owner)
        spans = self.spans[stack]
        tick, what = self.trace.first_use.get(rel), "used"
        if tick is None and owner in self.trace.start and not self._holds_blocks(owner):
            tick, what = self.trace.start[owner], "its module runs"
        if spans is None or tick is None:
            why = "not reached by the traced forward pass" if tick is None else f"stack {stack} did not run"
            stack, depth, rule = self.tree.locate(rel, owner)
            return stack, depth, f"{rule} ({why})"
        return (stack, *_by_time(tick, spans, what))

    def _holds_blocks(self, path: str) -> bool:
        return any(inside(member, path) for member in self.tree.block_depth)

    def _outside(self, raw: str) -> tuple[str, int, str]:
        """A parameter of a wrapper around the traced model (a PEFT prompt encoder, a SentenceTransformer's
        Dense layer, a loss module's classifier): the module-tree rules, relative to the whole model."""
        names = list(self.stacks)
        clean = normalize_name(raw)
        if _STEM_LEAF.search(clean.rpartition(".")[2]) or any(_STEM_SEGMENT.search(p) for p in clean.split(".")[:-1]):
            return names[0], 0, "outside the traced transformers model, an embedding or token by name -> stem"
        if self.raw_order[raw] < self.first_inside:
            return names[0], 0, "outside the traced transformers model, registered before it -> stem"
        head = self.stacks[names[-1]].num_layers + 1
        return names[-1], head, "outside the traced transformers model, registered after it -> head"


def _block_running_at(tick: int | None, spans: list[tuple[int, int]] | None) -> int | None:
    """Index of the block whose forward pass was running at ``tick`` (the innermost, latest one)."""
    if tick is None or spans is None:
        return None
    inside_ = [i for i, (start, end) in enumerate(spans) if start <= tick <= end]
    return inside_[-1] if inside_ else None


def _on_clean_paths(spec: BlockSpec, full: dict[str, str]):
    """``block_pattern`` sees the clean path in the user's model, not the twin's relative one."""
    if isinstance(spec, str):
        pattern = re.compile(spec)
        return lambda path, module: pattern.fullmatch(full.get(path, path)) is not None
    return lambda path, module: bool(spec(full.get(path, path), module))


def _by_time(tick: int, spans: list[tuple[int, int]], what: str) -> tuple[int, str]:
    """Depth of something first used at ``tick``, given the (start, end) ticks of the blocks of its stack."""
    last = len(spans) - 1
    if tick < spans[0][0]:
        return 0, f"{what} before block 0 -> stem"
    if tick > spans[-1][1]:
        return last + 2, f"{what} after block {last}, the last -> head"
    for index, (start, end) in enumerate(spans):
        if tick < start:
            return index + 1, f"{what} between block {index - 1} and block {index} -> block {index}"
        if tick <= end:
            if index == 0:
                return 0, f"{what} inside block 0 but owned outside the blocks -> shared by them -> stem"
            return index + 1, f"{what} inside block {index} but owned outside the blocks -> block {index}"
    return last + 2, f"{what} after block {last}, the last -> head"


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


def _is_stem(raw: str, owner: str, modules: dict[str, nn.Module], trunk: str) -> bool:
    """Embedding modules (by type, class name or attribute name) and root-level tokens below the trunk."""
    if _STEM_LEAF.search(raw.rpartition(".")[2]):
        return True
    for anc in ancestors(owner):
        if anc == trunk or not inside(anc, trunk):
            break
        module = modules.get(anc)
        if isinstance(module, nn.Embedding) or _STEM_SEGMENT.search(anc.rpartition(".")[2]):
            return True
        if module is not None and "Embedding" in type(module).__name__:
            return True
    return False


def _cross_check(model: nn.Module, stacks: dict[str, Stack]) -> None:
    """llrd 0.1: compare the blocks found with the config's depth (a log line, not an error)."""
    found = sum(s.num_layers for s in stacks.values())
    expected = _expected_layers(getattr(model, "config", None))
    if expected and found not in expected:
        logger.warning(
            "found %d blocks (%s) but the config declares %s layers; models that reuse one set of weights "
            "for several layers (ALBERT) get one depth per stored block.",
            found,
            ", ".join(f"{s.name}: {s.num_layers}" for s in stacks.values()),
            " or ".join(map(str, expected)),
        )

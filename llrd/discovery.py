"""Where each parameter sits: its stack of blocks and its depth in that stack.

This module is the one place where a parameter's depth is decided. The convention, for a stack of ``L``
blocks:

* depth ``0``: the stem, everything that feeds the first block (token/position/patch embeddings, cls and
  mask tokens, relative-position tables shared by all blocks);
* depth ``i + 1``: block ``i`` (0-based), including anything between block ``i - 1`` and block ``i``
  (a Swin patch-merging or ConvNeXt downsampling layer belongs to the block it feeds);
* depth ``L + 1``: everything after the last block (final norm, pooler, classifier, projection heads).

Blocks are found from the model's structure: the innermost
:class:`transformers.modeling_layers.GradientCheckpointingLayer` instances, or, for models without them
(ALBERT, ConvNeXt, custom modules), the children of the innermost homogeneous ``nn.ModuleList`` /
``nn.Sequential``. Blocks under one outermost list form one stack (Swin stages chain into one stack);
separate lists form separate stacks (encoder and decoder, text and vision towers), each with its own depth
counter. Names are only a cross-check and the handle for user overrides.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

from torch import nn

from .naming import normalize_name

__all__ = ["LayerMap", "ParamDepth", "Stack", "layer_ids", "BlockSpec", "DepthOverrides"]

logger = logging.getLogger(__name__)

STEM = "stem"
HEAD = "head"

#: A regex that fully matches block module paths (clean names), or a predicate ``(path, module) -> bool``.
BlockSpec = str | Callable[[str, nn.Module], bool] | None
#: ``{regex: depth}``; the regex is searched in the clean parameter name, the depth is an ``int`` or
#: ``"stem"`` / ``"head"``.
DepthOverrides = Mapping[str, int | str] | None

# Parameters that live inside block 0 but are shared by every block of the stack (T5 computes its relative
# position bias in block 0 and hands it to all later blocks): they belong to the stem.
_SHARED_IN_BLOCK = re.compile(r"(?:^|\.)relative_attention_bias\.")

# Modules that sit beside the blocks, not before them in the module tree, but feed every block. Keyed by
# the class of the module holding them; value: attribute -> depth (0 = stem, 1 = first block).
_BESIDE_BLOCKS: dict[str, dict[str, int]] = {
    # DeBERTa: relative-position embeddings (+ their LayerNorm) are read by every layer; the optional
    # ConvLayer mixes its output into the output of layer 0.
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
    """

    name: str
    blocks: tuple[str, ...]

    @property
    def num_layers(self) -> int:
        return len(self.blocks)


@dataclass(frozen=True)
class ParamDepth:
    """Depth of one parameter. ``depth`` runs from 0 (stem) to ``num_layers + 1`` (head)."""

    name: str
    stack: str
    depth: int
    num_layers: int

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

    Raw names (with ``module.``, ``_orig_mod.``, ... prefixes) are accepted as keys too.

    Example:
        >>> lm = layer_ids(model)            # doctest: +SKIP
        >>> lm["bert.encoder.layer.0.output.dense.weight"], lm.num_layers
        (1, 12)
    """

    def __init__(self, params: dict[str, ParamDepth], stacks: dict[str, Stack], raw_names: dict[str, str]):
        self.params = params
        self.stacks = stacks
        self.raw_names = raw_names  # raw -> clean

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
        return f"LayerMap({len(self)} parameters; {stacks})"


def _is_block_list(module: nn.Module) -> bool:
    """A list of >= 1 same-class, non-trivial modules that hold parameters."""
    if not isinstance(module, (nn.ModuleList, nn.Sequential)) or len(module) == 0:
        return False
    kinds = {type(child) for child in module}
    if len(kinds) != 1:
        return False
    kind = kinds.pop()
    if kind.__module__.startswith("torch.nn"):
        return False  # a list of bare Linear/LayerNorm is a head or a projection bank, not a block stack
    return all(any(True for _ in child.parameters()) for child in module)


def _find_blocks(modules: dict[str, nn.Module], spec: BlockSpec) -> list[str]:
    """Paths of the block modules, in module-tree order."""
    paths = list(modules)
    if isinstance(spec, str):
        pattern = re.compile(spec)
        found = [p for p in paths if p and pattern.fullmatch(normalize_name(p))]
        if not found:
            raise ValueError(
                f"block_pattern={spec!r} matches no module of the model. It must fully match clean module paths "
                f"such as {normalize_name(paths[min(len(paths) - 1, 3)])!r}; list them with "
                "`[n for n, _ in model.named_modules()]`."
            )
        return _outermost(found)
    if callable(spec):
        found = [p for p in paths if p and spec(normalize_name(p), modules[p])]
        if not found:
            raise ValueError("block_pattern (a callable) returned True for no module of the model.")
        return _outermost(found)

    from transformers.modeling_layers import GradientCheckpointingLayer

    gc_layers = [p for p in paths if isinstance(modules[p], GradientCheckpointingLayer)]
    if gc_layers:
        return _innermost(gc_layers)
    lists = _innermost([p for p in paths if _is_block_list(modules[p])])
    return [f"{lst}.{i}" if lst else str(i) for lst in lists for i in range(len(modules[lst]))]


def _inside(path: str, ancestor: str) -> bool:
    return ancestor == "" or path == ancestor or path.startswith(ancestor + ".")


def _proper_ancestors(path: str) -> list[str]:
    return _ancestors(path)[1:]


def _innermost(paths: list[str]) -> list[str]:
    """The paths that contain no other path of the list (linear in the list, not quadratic)."""
    enclosing = {a for q in paths for a in _proper_ancestors(q)}
    return [p for p in paths if p not in enclosing]


def _outermost(paths: list[str]) -> list[str]:
    """The paths that lie inside no other path of the list."""
    members = set(paths)
    return [p for p in paths if not any(a in members for a in _proper_ancestors(p))]


def _group_stacks(blocks: list[str], modules: dict[str, nn.Module]) -> dict[str, list[str]]:
    """Group blocks by their outermost enclosing list (so Swin stages chain into one stack)."""
    stacks: dict[str, list[str]] = {}
    for block in blocks:
        parts = block.split(".")
        key = block.rpartition(".")[0]
        for i in range(len(parts) - 1, 0, -1):
            parent = ".".join(parts[:i])
            if isinstance(modules.get(parent), (nn.ModuleList, nn.Sequential)):
                key = parent
        stacks.setdefault(key, []).append(block)
    return stacks


def _short_names(keys: list[str]) -> list[str]:
    """Drop the path segments shared by all stacks: ``model.encoder.layers`` / ``model.decoder.layers`` ->
    ``encoder`` / ``decoder``."""
    clean = [normalize_name(k).split(".") for k in keys]
    if len(clean) == 1:
        return [".".join(clean[0]) or "blocks"]
    while all(len(c) > 1 for c in clean) and len({c[0] for c in clean}) == 1:
        clean = [c[1:] for c in clean]
    while all(len(c) > 1 for c in clean) and len({c[-1] for c in clean}) == 1:
        clean = [c[:-1] for c in clean]
    names = [".".join(c) for c in clean]
    return names if len(set(names)) == len(names) else [normalize_name(k) for k in keys]


def _towers(stack_blocks: dict[str, list[str]]) -> dict[str, str]:
    """Per stack, the highest module that contains its blocks and no other stack's blocks."""
    towers = {}
    for stack, own in stack_blocks.items():
        others = [b for s, bs in stack_blocks.items() if s != stack for b in bs]
        parts = own[0].split(".")
        towers[stack] = own[0]
        for i in range(len(parts) - 1, -1, -1):
            candidate = ".".join(parts[:i])
            if not all(_inside(b, candidate) for b in own) or any(_inside(b, candidate) for b in others):
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


def _expected_blocks(config) -> int | None:
    if config is None:
        return None
    if getattr(config, "depths", None):
        return int(sum(config.depths))
    pairs = [("encoder_layers", "decoder_layers"), ("num_layers", "num_decoder_layers")]
    for enc, dec in pairs:
        if isinstance(getattr(config, enc, None), int) and isinstance(getattr(config, dec, None), int):
            return getattr(config, enc) + getattr(config, dec)
    subs = [getattr(config, k) for k in ("text_config", "vision_config", "audio_config") if getattr(config, k, None)]
    if subs:
        counts = [_expected_blocks(s) for s in subs]
        return None if None in counts else sum(counts)
    try:
        return int(config.num_hidden_layers)
    except (AttributeError, TypeError):
        return None


def _check_flat(names: list[str]) -> None:
    flat = [n for n in names if n.endswith("_flat_param")]
    if flat:
        raise ValueError(
            f"parameter {flat[0]!r} is an FSDP1 flat parameter: one tensor holds many layers, so per-layer "
            "learning rates are impossible. Use FSDP2 (`fsdp_version: 2`) or FSDP1 with `use_orig_params: true`."
        )


def layer_ids(
    model: nn.Module,
    *,
    block_pattern: BlockSpec = None,
    depth_overrides: DepthOverrides = None,
) -> LayerMap:
    """Find the blocks of ``model`` and give every parameter a stack and a depth.

    Args:
        model: any ``nn.Module``; usually a ``transformers`` model, possibly wrapped by DDP, FSDP,
            ``torch.compile`` or PEFT.
        block_pattern: overrides block discovery: a regex that fully matches the clean paths of the block
            modules (``r"bert\\.encoder\\.layer\\.\\d+"``), or a callable ``(path, module) -> bool``.
        depth_overrides: ``{regex: depth}``; the first regex found (``re.search``) in a clean parameter name
            sets its depth (``int``, ``"stem"`` or ``"head"``). A regex that matches no parameter is an error.

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
    modules = dict(model.named_modules())
    paths = list(modules)
    order = {p: i for i, p in enumerate(paths)}
    named = list(model.named_parameters())
    _check_flat([n for n, _ in named])

    blocks = _find_blocks(modules, block_pattern)
    if not blocks:
        raise ValueError(
            f"no transformer blocks found in {type(model).__name__}: it has no GradientCheckpointingLayer and no "
            "list of repeated modules. Pass block_pattern=r'<regex fully matching block module paths>' "
            "(e.g. r'encoder\\.layers\\.\\d+') or a callable (path, module) -> bool."
        )
    grouped = _group_stacks(blocks, modules)
    keys = sorted(grouped, key=lambda k: order[grouped[k][0]])
    stacks = {
        short: Stack(short, tuple(normalize_name(b) for b in grouped[key]))
        for short, key in zip(_short_names(keys), keys, strict=True)
    }
    stack_blocks = {short: grouped[key] for short, key in zip(stacks, keys, strict=True)}
    model_path, trunk = _trunk_and_model(modules)
    tree = _Tree(modules, order, stack_blocks, _towers(stack_blocks), trunk, model_path)

    overrides = [(re.compile(rx), d) for rx, d in (depth_overrides or {}).items()]
    used: set[str] = set()
    params: dict[str, ParamDepth] = {}
    raw_names: dict[str, str] = {}
    for raw, _ in named:
        clean = normalize_name(raw)
        owner = raw.rpartition(".")[0]
        stack, depth = tree.locate(raw, owner)
        for rx, value in overrides:
            if rx.search(clean):
                used.add(rx.pattern)
                depth = _override_depth(value, rx.pattern, stacks[stack].num_layers)
                break
        params[clean] = ParamDepth(clean, stack, depth, stacks[stack].num_layers)
        raw_names[raw] = clean
    unused = [rx.pattern for rx, _ in overrides if rx.pattern not in used]
    if unused:
        raise ValueError(
            f"depth_overrides pattern(s) {unused} match no parameter of {type(model).__name__}. Patterns are searched "
            "in clean parameter names (e.g. 'classifier\\.'); list them with "
            "`[n for n, _ in model.named_parameters()]`."
        )
    _cross_check(model, stacks)
    return LayerMap(params, stacks, raw_names)


@dataclass
class _Tree:
    """The module tree of one model, with its stacks: decides (stack, depth) for one parameter."""

    modules: dict[str, nn.Module]
    order: dict[str, int]  # module path -> position in `named_modules()`
    stack_blocks: dict[str, list[str]]  # stack -> raw block paths
    towers: dict[str, str]  # stack -> highest module holding only that stack
    trunk: str  # the base model (`model.base_model`)
    model_path: str  # the transformers model inside any wrapper

    def __post_init__(self) -> None:
        # block path -> (stack, 1-based depth): blocks never nest, so a parameter's path has at most one of them
        self.block_depth = {b: (s, i + 1) for s, blocks in self.stack_blocks.items() for i, b in enumerate(blocks)}

    def locate(self, raw: str, owner: str) -> tuple[str, int]:
        """(stack, depth) of one parameter; see the module docstring for the rules."""
        # 1. inside a block (a lookup per path prefix, so the cost does not grow with the number of blocks)
        for anc in _ancestors(owner):
            if anc in self.block_depth:
                stack, depth = self.block_depth[anc]
                return stack, 0 if _SHARED_IN_BLOCK.search(raw) else depth
        stack = self.stack_of(raw, owner)
        blocks = self.stack_blocks[stack]
        # 2. task heads outside the base model (XLM-R registers its classifier before the encoder)
        if self.trunk != self.model_path and not _inside(owner, self.trunk):
            return stack, len(blocks) + 1
        # 3. shared inputs that sit beside the blocks
        for anc in _ancestors(owner):
            table = _BESIDE_BLOCKS.get(type(self.modules[anc]).__name__) if anc in self.modules else None
            attr = (raw[len(anc) + 1 :] if anc else raw).split(".")[0]
            if table and attr in table:
                return stack, table[attr]
        # 4. embeddings, wherever they are registered
        if _is_stem(raw, owner, self.modules, self.trunk):
            return stack, 0
        # 5. position in the module tree relative to this stack's blocks
        if any(_inside(b, owner) for b in blocks):
            return stack, len(blocks) + 1  # a direct parameter of a module holding the blocks (CLIP logit_scale)
        position = self.order.get(owner, 0)
        for index, block in enumerate(blocks):
            if position < self.order[block]:  # before block `index`: the stem, or a downsampling layer feeding it
                return stack, 0 if index == 0 else index + 1
        return stack, len(blocks) + 1

    def stack_of(self, raw: str, owner: str) -> str:
        """The stack whose tower holds the parameter; else the one it names; else the one it follows."""
        names = list(self.stack_blocks)
        for stack in names:
            if self.towers[stack] and _inside(raw, self.towers[stack]):
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
        before = [s for s in names if self.order[self.stack_blocks[s][0]] <= position]
        return before[-1] if before else names[0]


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


def _ancestors(path: str) -> list[str]:
    parts = path.split(".") if path else []
    return [".".join(parts[:i]) for i in range(len(parts), -1, -1)]


def _is_stem(raw: str, owner: str, modules: dict[str, nn.Module], trunk: str) -> bool:
    """Embedding modules (by type, class name or attribute name) and root-level tokens below the trunk."""
    if _STEM_LEAF.search(raw.rpartition(".")[2]):
        return True
    for anc in _ancestors(owner):
        if anc == trunk or not _inside(anc, trunk):
            break
        module = modules.get(anc)
        if isinstance(module, nn.Embedding) or _STEM_SEGMENT.search(anc.rpartition(".")[2]):
            return True
        if module is not None and "Embedding" in type(module).__name__:
            return True
    return False


def _cross_check(model: nn.Module, stacks: dict[str, Stack]) -> None:
    """Compare the blocks found with the config's depth; the names must end in a list index."""
    found = sum(s.num_layers for s in stacks.values())
    expected = _expected_blocks(getattr(model, "config", None))
    if expected is not None and expected != found:
        logger.warning(
            "found %d blocks (%s) but the config declares %d layers; models that reuse one set of weights "
            "for several layers (ALBERT) get one depth per stored block.",
            found,
            ", ".join(f"{s.name}: {s.num_layers}" for s in stacks.values()),
            expected,
        )
    for stack in stacks.values():
        odd = [b for b in stack.blocks if not b.rpartition(".")[2].isdigit()]
        if odd:
            logger.debug("blocks of %s not named by a list index: %s", stack.name, odd[:3])

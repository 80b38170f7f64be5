"""Which modules are the blocks: the repeated units the data passes through in sequence.

Two finders, both returning ``{stack key: [block, ...]}`` where a block is a tuple of module paths (one
module, or the i-th elements of parallel lists such as XLM's ``attentions`` / ``ffns``):

* :func:`structural_blocks` (no trace: ``depth_source="structure"`` and the fallback), tower by tower (each
  module holding a config with a layer count, on its own modules): the innermost ``GradientCheckpointingLayer``
  instances; else, in a tower below the model, the nesting level its config's count matches (as below), else
  the children of its innermost lists of same-class modules; the model's own such lists only where no tower
  has transformers layers (llrd 0.1). Blocks under one outermost list form one stack.
* :func:`traced_blocks`: every candidate list of the module tree (lists of transformers layers or of
  same-class modules; a list of lists, as Funnel groups its layers by index; sibling lists of equal length that
  the forward pass visits index by index form one list, each such group under its own key), arranged in
  nesting levels (Swin stages, then the blocks inside them). Each list belongs to its innermost config tower
  (:func:`config_towers`: the model, or a module holding another config: a vision/text/audio tower, a
  backbone, a DETR decoder). Per tower, it picks for each outermost list the level (or none) such that the
  block count equals one the tower's config declares (``num_hidden_layers``, ``depths``, encoder + decoder
  layers; for the model itself, without the sub-configs that towers of their own build), preferring
  transformers' own layer marking, then fewer lists, then (only where several lists tie) the lists that grow
  in a twin built with the counts one larger, then the most parameters. A coincidental sum never joins towers: a
  tower that matches no count keeps its innermost layers, and lists of the model's own that match nothing
  are no stack once some tower matched. Blocks are ordered as the forward pass runs them.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .flow import Trace
from .naming import normalize_name

__all__ = ["BlockSpec", "Blocks", "structural_blocks", "traced_blocks", "expected_layers"]

logger = logging.getLogger(__name__)

#: A regex that fully matches block module paths (clean names), or a predicate ``(path, module) -> bool``.
BlockSpec = str | Callable[[str, nn.Module], bool] | None
Block = tuple[str, ...]

_LISTS = (nn.ModuleList, nn.Sequential)
# Other fields that count layers, read only where a config has none of the usual ones; not thresholds, indices
# or counts of layers that are not blocks (conv feature extractors, adapters, multi-token prediction).
_OTHER_COUNT = re.compile(r"(?:num_|n_)?(?!.*(?:max|window|shared|nextn|predict|feat_extract|adapter))\w*_layers")
# Config fields that count the main stack's layers, the first one present wins.
_COUNT_KEYS = ("num_hidden_layers", "n_layer", "n_layers", "num_layers", "depth")
# Config fields that add a second stack's layers to the model's own count.
_DECODER_COUNTS = ("decoder_layers", "num_decoder_layers", "decoder_num_hidden_layers", "decoder_num_layers")


@dataclass
class Blocks:
    """The blocks found, per stack (key: the path of the outermost list holding them), and how."""

    stacks: dict[str, list[Block]]
    note: str = ""
    #: how the count was checked: "config", "mismatch", "shared weights", "no count", "block_pattern", "structure"
    check: str = "structure"
    #: stack key -> path of the innermost config tower holding it ("": the model)
    towers: dict[str, str] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------------
# llrd 0.1: module tree only


def structural_blocks(modules: dict[str, nn.Module], spec: BlockSpec, config: Any = None) -> Blocks:
    """Blocks from the module tree alone (see the module docstring); paths are raw ``named_modules`` keys.
    With ``config``, tower by tower (:func:`config_towers`, those whose config declares a layer count): each
    tower's own modules (not its inner towers') get the rule on their own, so each tower with repeated blocks
    is its own stack with its own numbering, as on the traced path."""
    if spec is not None:
        stacks = _group_stacks(_spec_blocks(modules, spec), modules)
        return Blocks({key: [(b,) for b in found] for key, found in stacks.items()})
    towers = {  # a block holding its config (CLVP's attention blocks) is no tower
        p: c
        for p, c in config_towers(modules, config).items()
        if not p or (expected_layers(c) and not isinstance(modules.get(p.rpartition(".")[0]), _LISTS))
    }
    owned: dict[str, dict[str, nn.Module]] = {t: {} for t in towers}
    for path, module in modules.items():
        owned[next(t for t in ancestors(path) if t in owned)][path] = module
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = {t for t, mine in owned.items() if any(isinstance(m, GradientCheckpointingLayer) for m in mine.values())}
    found, tower_of = {}, {}
    for tower, mine in owned.items():
        # no transformers layers: a sub-tower's level its count matches, else its innermost lists; the model's
        # own lists (llrd 0.1) unless transformers layers mark the blocks elsewhere in the model
        picked = None if tower in layers or not tower else _tower_levels(mine, towers[tower], bool(layers))
        plain = tower in layers or not layers or bool(tower)
        own = picked or ([b for b in _default_blocks(mine) if b in mine] if plain else [])  # not an inner tower
        for key, blocks in _group_stacks(own, mine).items():
            found[key], tower_of[key] = [(b,) for b in blocks], tower
    order = {path: i for i, path in enumerate(modules)}
    stacks = {k: found[k] for k in sorted(found, key=lambda k: order[found[k][0][0]])}
    return Blocks(stacks, towers={k: tower_of[k] for k in stacks})


def _tower_levels(mine: dict[str, nn.Module], config: Any, strict: bool) -> list[str] | None:
    """A tower without transformers layers (a ResNet backbone): the nesting level of its lists whose block
    count its config declares, chosen as :func:`traced_blocks` does (module order, no trace); its other lists
    keep their innermost level unless ``strict`` (transformers layers elsewhere mark the blocks); None: no
    level matches."""
    levels = _levels(_candidates(mine, {}))
    options = {r: [_score(level, {}) for level in by] for r, by in levels.items()}
    matches = [(len(p[0]), p[1], p[0]) for t in expected_layers(config) if (p := _pick(options, t)) is not None]
    if not matches:
        return None
    units = max(matches, key=lambda m: m[:2])[2]
    if not strict:
        units |= _innermost_levels({r: by for r, by in levels.items() if r not in units})
    return [b[0] for blocks in units.values() for b in blocks if len(b) == 1 and b[0] in mine]


def _spec_blocks(modules: dict[str, nn.Module], spec: BlockSpec) -> list[str]:
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
        return outermost(found)
    found = [p for p in paths if p and spec(normalize_name(p), modules[p])]
    if not found:
        raise ValueError("block_pattern (a callable) returned True for no module of the model.")
    return outermost(found)


def _default_blocks(modules: dict[str, nn.Module]) -> list[str]:
    from transformers.modeling_layers import GradientCheckpointingLayer

    paths = list(modules)
    gc_layers = [p for p in paths if isinstance(modules[p], GradientCheckpointingLayer)]
    if gc_layers:
        return innermost(gc_layers)
    lists = innermost([p for p in paths if _is_block_list(modules[p])])
    return [_child(lst, str(i)) for lst in lists for i in range(len(modules[lst]))]


def _is_block_list(module: nn.Module) -> bool:
    """A list of >= 1 same-class, non-trivial modules that hold parameters."""
    if not isinstance(module, _LISTS) or len(module) == 0:
        return False
    kinds = {type(child) for child in module}
    if len(kinds) != 1:
        return False
    if _is_torch_layer(kinds.pop()):
        return False  # a list of bare Linear/LayerNorm is a head or a projection bank, not a block stack
    return all(any(True for _ in child.parameters()) for child in module)


def _group_stacks(blocks: list[str], modules: dict[str, nn.Module]) -> dict[str, list[str]]:
    """Group blocks by their outermost enclosing list (so Swin stages chain into one stack)."""
    stacks: dict[str, list[str]] = {}
    for block in blocks:
        parts = block.split(".")
        key = block.rpartition(".")[0]
        for i in range(len(parts) - 1, 0, -1):
            parent = ".".join(parts[:i])
            if isinstance(modules.get(parent), _LISTS):
                key = parent
        stacks.setdefault(key, []).append(block)
    return stacks


# ---------------------------------------------------------------------------------------------------------
# data flow: candidates checked against the trace and the config


@dataclass
class _List:
    """A candidate list: its units (blocks) and where it sits."""

    path: str  # the list (or, for parallel lists, their parent)
    units: list[Block]
    layer_marked: bool  # transformers marks its units as layers (GradientCheckpointingLayer)
    parent: _List | None = None

    def holds(self, path: str) -> bool:
        return any(inside(path, member) for unit in self.units for member in unit)


def traced_blocks(
    modules: dict[str, nn.Module], trace: Trace, config: Any, spec: BlockSpec = None, rebuild: Rebuild | None = None
) -> Blocks:
    """Blocks of a meta twin (``modules``: its ``named_modules``, clean paths) chosen with its trace, tower by
    tower: each list is checked against the layer counts of the innermost config tower that holds it.

    ``rebuild(config)`` builds the twin's class from another config on the meta device (its ``named_modules``);
    it is called only when several lists of a tower have the count its config declares (see :func:`grown_lists`).
    """
    first = first_starts(trace)
    if spec is not None:
        found = structural_blocks(modules, spec)
        stacks = {k: _in_run_order(v, first) for k, v in found.stacks.items()}
        return Blocks(stacks, "blocks from block_pattern", "block_pattern")
    lists = _candidates(modules, first)
    levels = _levels(lists)
    params: dict[str, int] = {}  # module path -> parameters below it, in one pass over the parameters
    for name, param in modules[""].named_parameters():
        for anc in ancestors(name.rpartition(".")[0]):
            params[anc] = params.get(anc, 0) + param.numel()
    towers = config_towers(modules, config)
    targets = {path: _tower_targets(cfg, path, towers) for path, cfg in towers.items()}
    by_tower: dict[str, dict[str, list]] = {}  # tower -> root list -> its levels' scores
    for root, by_depth in levels.items():
        member = by_depth[0][0].units[0][0]
        tower = next(t for t in ancestors(member) if t in towers and (targets[t] or t == ""))
        by_tower.setdefault(tower, {})[root] = [_score(level, params) for level in by_depth]
    chosen: dict[str, list[Block]] = {}
    notes, unmatched = [], []
    for tower, options in by_tower.items():
        if rebuild is not None and _ambiguous(options, targets[tower]):
            grown = grown_lists(modules, config, towers[tower], rebuild)
            options = {root: [_score(level, params, grown) for level in levels[root]] for root in options}
        matches = [(t, *p) for t in targets[tower] if (p := _pick(options, t)) is not None]
        if tower:  # a tower: the count that covers most of its lists, then transformers' layers (T5Stack's 6
            matches = sorted(matches, key=lambda m: (-len(m[1]), -m[2][0], -m[2][3]))[:1]  # blocks, not 12 sublayers)
        picked = matches[0][:2] if matches else None
        label = f"{tower} ({type(towers[tower]).__name__})" if tower else "the model"
        if picked is not None:
            chosen |= picked[1]
            part = "" if picked[0] == targets[tower][0] else f" (of the {targets[tower][0]} layers it declares)"
            notes.append(f"{label}: {picked[0]} blocks, as its config declares{part}")
        elif tower and targets[tower]:  # a tower whose count matches no level: its innermost layers
            chosen |= _innermost_levels({r: levels[r] for r in options})
            unmatched.append(tower)
    built = ", ".join(n for n in _unbuilt(config, towers))
    tail = f"; sub-configs not built by the class: {built}" if built else ""
    if chosen and not unmatched:
        order = list(levels)
        stacks = {r: _in_run_order(chosen[r], first) for r in sorted(chosen, key=order.index)}
        return Blocks(stacks, "; ".join(notes) + tail, "config", _tower_of(stacks, towers))
    if not chosen:
        chosen = _innermost_levels(levels)
    order = list(levels)
    stacks = {r: _in_run_order(chosen[r], first) for r in sorted(chosen, key=order.index)}
    found = sum(len(u) for u in stacks.values())
    flat = [t for tower in by_tower for t in targets[tower]]
    note, check = _mismatch(found, flat, stacks, trace)
    return Blocks(stacks, note + tail, check, _tower_of(stacks, towers))


def config_towers(modules: dict[str, nn.Module], config: Any) -> dict[str, Any]:
    """Module path -> config: ``""`` for the model, and the outermost module holding each other config (a
    vision/text/audio tower, a backbone, cross-modal layers built from a sub-config)."""
    from transformers import PretrainedConfig

    towers: dict[str, Any] = {"": config}
    seen = {id(config)}
    for path, module in modules.items():
        cfg = module.__dict__.get("config")
        if path and isinstance(cfg, PretrainedConfig) and id(cfg) not in seen:
            seen.add(id(cfg))
            towers[path] = cfg
    return towers


def _tower_targets(config: Any, path: str, towers: dict[str, Any]) -> list[int]:
    """Block counts a tower may have: its config's; for a tower with towers inside (the model, a vision tower
    around a backbone), without the sub-configs that those towers build."""
    if not any(p != path and inside(p, path) for p in towers):  # no tower of its own inside
        found = expected_layers(config)
        blocks = vars(config).get("num_blocks")  # a sub-config's block count (Phi-4-multimodal's audio encoder)
        return found or ([blocks] if path and type(blocks) is int and blocks > 0 else [])
    own, base, decoder = _own_layers(config)
    rest = [t for sub in _unbuilt(config, towers, objects=True) if (t := _total_layers(sub))]
    return list(dict.fromkeys(t for t in (own, base, decoder, *_subset_sums(rest)) if t))


def _unbuilt(config: Any, towers: dict[str, Any], objects: bool = False) -> list[Any]:
    """The sub-configs of ``config`` that no module holds (by class: models may copy their sub-configs)."""
    held = {type(c) for p, c in towers.items() if p}
    subs = [(k, v) for k, v in vars(config).items() if any(v is s for s in _sub_configs(config))]
    return [v if objects else k for k, v in subs if type(v) not in held]


def _tower_of(stacks: dict[str, list[Block]], towers: dict[str, Any]) -> dict[str, str]:
    """Stack key -> the innermost config tower holding its blocks."""
    return {key: next(t for t in ancestors(units[0][0]) if t in towers) for key, units in stacks.items()}


def _candidates(modules: dict[str, nn.Module], first: dict[str, int]) -> list[_List]:
    """Lists of transformers layers or same-class modules; interleaved sibling lists merged into one."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    kids: dict[str, list[str]] = {}  # list path -> child paths
    plain, found = {}, {}
    for path, module in modules.items():
        if not isinstance(module, _LISTS) or len(module) == 0:
            continue
        children = [(_child(path, key), child) for key, child in module.named_children()]
        if not all(p in modules and any(True for _ in c.parameters()) for p, c in children):
            continue  # an element without parameters, or one registered elsewhere too (shared)
        kids[path] = [p for p, _ in children]
        marked = all(isinstance(c, GradientCheckpointingLayer) for _, c in children)
        nested = all(isinstance(c, _LISTS) for _, c in children)  # blocks grouped by index only (Funnel)
        if marked or nested or not any(_is_torch_layer(type(c)) for _, c in children):  # LeViT mixes 2 classes
            found[path] = _List(path, [(p,) for p in kids[path]], marked)
        else:
            plain[path] = kids[path]
    # parallel lists: siblings of one length whose elements the forward pass visits index by index (XLM)
    siblings: dict[tuple[str, int], list[str]] = {}
    for path in [*found, *plain]:
        siblings.setdefault((path.rpartition(".")[0], len(kids[path])), []).append(path)
    for (parent, length), paths in siblings.items():
        if len(paths) < 2 or length < 2 or not any(p in found for p in paths):
            continue
        members = [kids[p] for p in paths]
        units = [tuple(m[i] for m in members) for i in range(length)]
        if _interleaved(units, first):
            marked = all(found[p].layer_marked for p in paths if p in found)
            for p in paths:
                found.pop(p, None)
            # several groups under one parent (BridgeTower's cross-modal pairs and link towers) each keep a key
            prefix = os.path.commonprefix([p.rpartition(".")[2] for p in paths]).strip("_")
            key = _child(parent, prefix) if prefix and _child(parent, prefix) not in modules else parent
            key = key if key not in found else _child(parent, paths[0].rpartition(".")[2])
            found[key] = _List(key, units, marked)
    order = {path: i for i, path in enumerate(modules)}
    lists = sorted(found.values(), key=lambda lst: order[lst.units[0][0]])
    for lst in lists:  # nesting: the innermost other list holding this one
        holders = [o for o in lists if o is not lst and o.holds(lst.units[0][0])]
        lst.parent = max(holders, key=lambda o: len(o.units[0][0]), default=None)
    return lists


def first_starts(trace: Trace) -> dict[str, int]:
    """Module path -> first tick at which it or anything below it started (lists themselves never run)."""
    first: dict[str, int] = {}
    for path, tick in trace.start.items():
        for anc in ancestors(path):
            if first.get(anc, tick + 1) > tick:
                first[anc] = tick
    return first


def _interleaved(units: list[Block], first: dict[str, int]) -> bool:
    starts = [[first.get(m) for m in unit] for unit in units]
    if any(s is None for unit in starts for s in unit):
        return False
    return all(max(a) < min(b) for a, b in zip(starts, starts[1:], strict=False))


def _levels(lists: list[_List]) -> dict[str, list[list[_List]]]:
    """Per outermost list: the lists at each nesting level below it (level 0: itself)."""
    levels: dict[str, list[list[_List]]] = {}
    for lst in lists:
        depth, top = 0, lst
        while top.parent is not None:
            depth, top = depth + 1, top.parent
        by_depth = levels.setdefault(top.path, [])
        while len(by_depth) <= depth:
            by_depth.append([])
        by_depth[depth].append(lst)
    return levels


Score = tuple[int, int, int, int]  # (marked as layers, minus the lists, built by the count, parameters covered)
Rebuild = Callable[[Any], dict[str, nn.Module]]


def _score(level: list[_List], params: dict[str, int], grown: set[str] = frozenset()) -> tuple[int, Score, list]:
    """A level's blocks and score: transformers' own layers first; then fewer lists, since the blocks of one
    stack are one list (or one list per stage) and a count reached only by adding up more lists is a
    coincidence (RT-DETR: 2 FPN + 2 downsampling + 2 PAN modules against its 6 decoder layers); then the units
    of lists the config's count builds (``grown``, see :func:`grown_lists`); then size."""
    units = [unit for lst in level for unit in lst.units]
    marked = sum(len(lst.units) for lst in level if lst.layer_marked)
    built = sum(len(lst.units) for lst in level if lst.path in grown or lst.units[0][0].rpartition(".")[0] in grown)
    covered = sum(params.get(member, 0) for unit in units for member in unit)
    return len(units), (marked, -len(level), built, covered), units


def _ambiguous(options: dict[str, list[tuple[int, Score, list[Block]]]], targets: list[int]) -> bool:
    """Whether several single lists of a tower have the count its config declares first, equally marked."""
    if not targets:
        return False
    alike = [score[:2] for levels in options.values() for count, score, _ in levels if count == targets[0]]
    return len(alike) > len(set(alike))


def grown_lists(modules: dict[str, nn.Module], config: Any, tower: Any, rebuild: Rebuild) -> set[str]:
    """The lists a tower's layer counts build: paths of the lists that are one longer in a twin whose config has
    every count field of ``tower`` (the model's config or one of its sub-configs) one larger. RT-DETR with
    ``decoder_layers=2`` has 2 FPN, 2 PAN, 2 lateral and 2 downsampling modules too; only its decoder layers
    follow the count. Empty when the class cannot be built from the changed config.

    Example:
        >>> grown_lists(dict(twin.named_modules()), twin.config, twin.config, rebuild)  # doctest: +SKIP
        {'model.decoder.layers'}
    """
    import copy

    changed = copy.deepcopy(config)
    target = _same_config(config, changed, tower)
    fields = [k for k in (*_COUNT_KEYS, *_DECODER_COUNTS) if type(getattr(target, k, None)) is int]
    if target is None or not fields:
        return set()
    try:
        for key in fields:
            setattr(target, key, getattr(target, key) + 1)
        other = rebuild(changed)
    except Exception as err:  # noqa: BLE001 - a class may validate its config: then the counts cannot decide
        logger.debug("no twin with %s one larger: %s", fields, err)
        return set()
    return {p for p, m in modules.items() if isinstance(m, _LISTS) and p in other and len(other[p]) == len(m) + 1}


def _same_config(config: Any, copied: Any, wanted: Any) -> Any:
    """The sub-config of ``copied`` at the place ``wanted`` has in ``config`` (``config`` itself included)."""
    if config is wanted:
        return copied
    for key, value in vars(config).items():
        if any(value is sub for sub in _sub_configs(config)) and (
            found := _same_config(value, getattr(copied, key, None), wanted)
        ):
            return found
    return None


def _pick(options: dict[str, list[tuple[int, Score, list[Block]]]], target: int):
    """For each outermost list a level or nothing, with ``target`` blocks in all; best score wins (DP)."""
    best: dict[int, tuple[Score, dict[str, int]]] = {0: ((0, 0, 0, 0), {})}
    for root, levels in options.items():
        step = dict(best)
        for total, (score, picks) in best.items():
            for index, (count, level_score, _) in enumerate(levels):
                new_total = total + count
                if new_total > target:
                    continue
                new_score = tuple(a + b for a, b in zip(score, level_score, strict=True))
                if new_total not in step or new_score > step[new_total][0]:
                    step[new_total] = (new_score, {**picks, root: index})
        best = step
    if target not in best or not best[target][1]:
        return None
    score, picks = best[target]
    return {root: options[root][index][2] for root, index in picks.items()}, score


def _innermost_levels(levels: dict[str, list[list[_List]]]) -> dict[str, list[Block]]:
    """No count matches the config: the innermost transformers layers, else the innermost lists (llrd 0.1)."""
    marked = any(lst.layer_marked for by_depth in levels.values() for level in by_depth for lst in level)
    chosen = {}
    for root, by_depth in levels.items():
        usable = [level for level in by_depth if not marked or any(lst.layer_marked for lst in level)]
        if usable:
            chosen[root] = [unit for lst in usable[-1] for unit in lst.units]
    return chosen


def _in_run_order(units: list[Block], first: dict[str, int]) -> list[Block]:
    """Blocks in the order the forward pass first runs them; if it did not reach them all, module order."""
    if not all(m in first for u in units for m in u):
        return list(units)
    return sorted(units, key=lambda u: min(first[m] for m in u))


def _mismatch(found: int, targets: list[int], stacks: dict[str, list[Block]], trace: Trace) -> tuple[str, str]:
    """The note and the check of blocks whose count matches no config count."""
    if not targets:
        return f"{found} blocks; the config declares no layer count to check them against", "no count"
    calls = {trace.calls.get(u[0], 0) for units in stacks.values() for u in units}
    if len(calls) == 1 and (runs := calls.pop()) > 1 and found * runs == targets[0]:
        return (
            f"{found} stored block(s), each run {runs} times ({targets[0]} layers): shared weights (ALBERT), "
            "one depth per stored block"
        ), "shared weights"
    return f"{found} blocks, but the config declares {' or '.join(map(str, targets))} layers", "mismatch"


def expected_layers(config: Any) -> list[int]:
    """Block counts the config allows, most specific first: its own (+ decoder), all sub-configs' (vision,
    text, audio, ...), both, then the main stack or decoder alone, then any subset of sub-configs (a model may
    build only some of the towers its config describes).

    Example:
        >>> expected_layers(T5Config(num_layers=2, num_decoder_layers=3))      # doctest: +SKIP
        [5, 2, 3]
    """
    if config is None:
        return []
    own, base, decoder = _own_layers(config)
    subs = [t for t in map(_total_layers, _sub_configs(config)) if t]
    total = sum(subs)
    targets = [own, total, own + total if own and total else None, base, decoder, *_subset_sums(subs)]
    if not any(targets):  # no usual field: the other layer-count fields, any of them (a class may build fewer)
        targets += _subset_sums([v for k, v in vars(config).items() if _OTHER_COUNT.fullmatch(k) and type(v) is int])
    return list(dict.fromkeys(t for t in targets if t))


def _subset_sums(counts: list[int]) -> list[int]:
    """Sums of the non-empty subsets of ``counts`` (at most 6 of them), largest subsets first."""
    counts = counts[:6]
    masks = sorted(range(1, 2 ** len(counts)), key=lambda m: -bin(m).count("1"))
    return [sum(c for i, c in enumerate(counts) if mask >> i & 1) for mask in masks]


def _total_layers(config: Any) -> int:
    """The config's own layers, else the sum over its sub-configs (a PaliGemma inside ColPali), else the sum of
    its other layer-count fields (VideoPrism's ``num_spatial_layers`` + ``num_temporal_layers``)."""
    own = _own_layers(config)[0] or sum(map(_total_layers, _sub_configs(config)))
    return own or sum(v for k, v in vars(config).items() if _OTHER_COUNT.fullmatch(k) and type(v) is int)


def _sub_configs(config: Any) -> list[Any]:
    from transformers import PretrainedConfig

    return [v for v in vars(config).values() if isinstance(v, PretrainedConfig)][:8]


def _own_layers(config: Any) -> tuple[int | None, int | None, int | None]:
    """(all of the config's own layers, the main stack's, the decoder's)."""
    fields = vars(config)
    for key in ("depths", "depth"):
        value = fields.get(key)
        if isinstance(value, (list, tuple)) and value and all(isinstance(v, int) for v in value):
            return int(sum(value)), int(sum(value)), None
    count = None
    for key in _COUNT_KEYS:
        try:
            value = getattr(config, key)
        except AttributeError:
            continue
        if isinstance(value, int) and not isinstance(value, bool):
            count = value
            break
    decoder = sum(fields[k] for k in _DECODER_COUNTS if isinstance(fields.get(k), int)) or None
    if count is None:
        return decoder, None, decoder
    return count + (decoder or 0), count, decoder


# ---------------------------------------------------------------------------------------------------------
# path helpers


def _is_torch_layer(kind: type) -> bool:
    return kind.__module__.startswith("torch.nn")


def _child(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def inside(path: str, ancestor: str) -> bool:
    """``path`` is ``ancestor`` or lies below it (``""`` is the root)."""
    return ancestor == "" or path == ancestor or path.startswith(ancestor + ".")


def ancestors(path: str) -> list[str]:
    """``"a.b.c"`` -> ``["a.b.c", "a.b", "a", ""]``."""
    parts = path.split(".") if path else []
    return [".".join(parts[:i]) for i in range(len(parts), -1, -1)]


def innermost(paths: list[str]) -> list[str]:
    """The paths that contain no other path of the list (linear in the list, not quadratic)."""
    enclosing = {a for q in paths for a in ancestors(q)[1:]}
    return [p for p in paths if p not in enclosing]


def outermost(paths: list[str]) -> list[str]:
    """The paths that lie inside no other path of the list."""
    members = set(paths)
    return [p for p in paths if not any(a in members for a in ancestors(p)[1:])]

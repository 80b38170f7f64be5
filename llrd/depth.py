"""The depth rule: which stack a parameter belongs to, its depth there, and why. One return shape,
``(stack, depth, reason)``, and one reason per branch.

For a stack of ``L`` blocks: depth ``0`` is the stem (what feeds block 0), ``i + 1`` is block ``i`` (with what
runs between block ``i - 1`` and block ``i``, such as a downsampling layer), ``L + 1`` the head (what runs after
the last block). With a trace, a parameter outside the blocks is placed by when the traced forward pass first
uses it (or, for a parameter nothing reads, when its module first runs), against its stack's blocks as they
ran the first time. Without one (the model cannot be traced, or the pass did not reach the parameter), the
module tree decides: registration order around the blocks, ``nn.Embedding`` modules feed the blocks, task
heads outside the base model come last.

The stack of a parameter outside every block: the stack whose tower (the highest module holding its blocks and
no other stack's) holds it; else one of the stacks of its config tower (the innermost module holding a
config: the model, a vision/text/audio tower, a backbone), chosen by time: the stack running then, else the
one that ran last before, else the next to run. Names never decide: only the user's ``block_pattern`` and
``depth_overrides`` do.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from .blocks import Block, ancestors, inside

__all__ = ["Rule", "Placement", "outside"]

Placement = tuple[str, int, str]  # (stack, depth, reason)
Span = tuple[int, int]  # (first start, end of the first call) of one block, in trace ticks


@dataclass
class Rule:
    """Everything the rule reads; paths are relative to the traced (or bare) model."""

    modules: dict[str, nn.Module]
    stack_blocks: dict[str, list[Block]]  # stack -> its blocks, in forward order
    config_tower: dict[str, str]  # stack -> the innermost module holding a config above its blocks
    config_paths: set[str]  # every module holding a config ("" for the model)
    base: str = ""  # the base model (``model.base_model``): task heads lie outside it
    spans: dict[str, list[Span] | None] = field(default_factory=dict)  # stack -> spans; None: did not run
    first_use: dict[str, int] = field(default_factory=dict)  # parameter -> tick of its first use
    start: dict[str, int] = field(default_factory=dict)  # module -> tick of its first call
    shared: set[str] = field(default_factory=set)  # lookup tables only block 0 of a stack has
    prefix: str = ""  # "fallback: " when a trace was asked for and none could be made

    def __post_init__(self) -> None:
        self.order = {p: i for i, p in enumerate(self.modules)}
        self.block_depth = {m: (s, i + 1) for s, bs in self.stack_blocks.items() for i, b in enumerate(bs) for m in b}
        self.own_tower = _own_towers(self.stack_blocks)
        self.starts = sorted((start, s) for s, spans in self.spans.items() for start, _ in spans or ())

    def place(self, name: str) -> Placement:
        """``(stack, depth, reason)`` of the parameter ``name``."""
        owner = next(a for a in ancestors(name.rpartition(".")[0]) if a in self.modules)
        tick = self.first_use.get(name)
        for anc in ancestors(owner):
            if anc in self.block_depth:
                stack, depth = self.block_depth[anc]
                if name in self.shared:
                    return stack, 0, "a lookup table only block 0 has (the other blocks lack it) -> shared -> stem"
                user = _running(tick, self.spans.get(stack))
                if user is not None and user != depth - 1:  # a module shared by several blocks (Zamba2)
                    return stack, user + 1, f"in block {depth - 1}, but first used by block {user} -> block {user}"
                return stack, depth, f"in block {depth - 1}"
        what = "used"
        if tick is None and owner in self.start and not any(inside(m, owner) for m in self.block_depth):
            tick, what = self.start[owner], "its module runs"
        stack = self.stack_of(name, owner, tick)
        spans = self.spans.get(stack)
        if tick is not None and spans:
            depth, why = _by_time(tick, spans, what)
            feeds = next((s for start, s in self.starts if start > tick), stack)
            if 0 < depth <= len(spans) and tick < spans[depth - 1][0] and feeds != stack:  # BridgeTower's ln_post
                where = why.rpartition(" ->")[0]
                return stack, len(spans) + 1, f"{where}, then stack {feeds} runs -> takes its output there -> head"
            return stack, depth, why
        why = (
            ""
            if not self.spans
            else " (not reached by the traced forward pass)"
            if tick is None
            else (f" (stack {stack} did not run)")
        )
        depth, rule = self._by_tree(name, owner, stack)
        return stack, depth, f"{self.prefix}{rule}{why}"

    def stack_of(self, name: str, owner: str, tick: int | None) -> str:
        """The stack of a parameter outside every block (see the module docstring)."""
        for stack, tower in self.own_tower.items():
            if tower and inside(name, tower):
                return stack
        for tower in ancestors(owner):
            if tower not in self.config_paths:
                continue
            mine = [s for s, t in self.config_tower.items() if t == tower] or [
                s for s, t in self.config_tower.items() if inside(t, tower)
            ]
            if mine:
                return mine[0] if len(mine) == 1 else self._by_when(mine, owner, tick)
        return self._by_when(list(self.stack_blocks), owner, tick)

    def _by_when(self, stacks: list[str], owner: str, tick: int | None) -> str:
        ran = {s: sp for s in stacks if (sp := self.spans.get(s))}
        if tick is not None and ran:
            running = [s for s, sp in ran.items() if sp[0][0] <= tick <= sp[-1][1]]
            if running:
                return max(running, key=lambda s: ran[s][0][0])
            before = [s for s, sp in ran.items() if sp[-1][1] < tick]
            if before:
                return max(before, key=lambda s: ran[s][-1][1])
            return min(ran, key=lambda s: ran[s][0][0])
        position = self.order.get(owner, 0)
        earlier = [s for s in stacks if min(self.order[m] for m in self.stack_blocks[s][0]) <= position]
        return earlier[-1] if earlier else stacks[0]

    def _by_tree(self, name: str, owner: str, stack: str) -> tuple[int, str]:
        """Depth from the module tree alone, relative to the blocks of ``stack``."""
        blocks = self.stack_blocks[stack]
        head = len(blocks) + 1
        if self.base and not inside(owner, self.base):
            return head, "outside the base model (a task head) -> head"
        if any(isinstance(self.modules.get(a), nn.Embedding) for a in ancestors(owner) if inside(a, self.base)):
            return 0, "an nn.Embedding outside the blocks -> feeds them -> stem"
        if any(inside(m, owner) for b in blocks for m in b):  # a cls/mask token or a position table, mostly
            return 0, "a direct parameter of a module holding the blocks -> an input-side table or token -> stem"
        position = self.order.get(owner, 0)
        for index, block in enumerate(blocks):
            if position < min(self.order[m] for m in block):
                if index == 0:
                    return 0, "registered before the blocks -> stem"
                return index + 1, f"registered between block {index - 1} and block {index} -> block {index}"
        return head, "registered after the blocks -> head"


def _own_towers(stack_blocks: dict[str, list[Block]]) -> dict[str, str]:
    """Per stack, the highest module that contains its blocks and no other stack's blocks."""
    towers = {}
    for stack, own in stack_blocks.items():
        mine = [m for block in own for m in block]
        others = [m for s, bs in stack_blocks.items() if s != stack for block in bs for m in block]
        parts = mine[0].split(".")
        towers[stack] = mine[0]
        for i in range(len(parts) - 1, -1, -1):
            candidate = ".".join(parts[:i])
            if any(inside(m, candidate) for m in others):
                break
            if all(inside(m, candidate) for m in mine):  # stages: the blocks of one lie in several lists
                towers[stack] = candidate
    return towers


def _running(tick: int | None, spans: list[Span] | None) -> int | None:
    """Index of the block whose (first) forward pass was running at ``tick`` (the innermost, latest one)."""
    if tick is None or not spans:
        return None
    found = [i for i, (start, end) in enumerate(spans) if start <= tick <= end]
    return found[-1] if found else None


def _by_time(tick: int, spans: list[Span], what: str) -> tuple[int, str]:
    """Depth of something first used at ``tick``, given the spans of the blocks of its stack."""
    last = len(spans) - 1
    if tick < spans[0][0]:
        return 0, f"{what} before block 0 -> stem"
    for index, (start, end) in enumerate(spans):
        if tick < start:
            return index + 1, f"{what} between block {index - 1} and block {index} -> block {index}"
        if tick <= end:
            if index == 0:
                return 0, f"{what} inside block 0 but owned outside the blocks -> shared by them -> stem"
            return index + 1, f"{what} inside block {index} but owned outside the blocks -> block {index}"
    return last + 2, f"{what} after block {last}, the last -> head"


def outside(modules: dict[str, nn.Module], name: str, before: bool, stacks: list[str], head: int) -> Placement:
    """A parameter of a wrapper around the traced model (a PEFT prompt encoder, a SentenceTransformer's Dense
    layer, a loss module's classifier); ``modules`` are the whole model's, ``before``: registered before it."""
    owner = next(a for a in ancestors(name.rpartition(".")[0]) if a in modules)
    if any(isinstance(modules[a], nn.Embedding) for a in ancestors(owner) if a in modules):
        return stacks[0], 0, "outside the traced transformers model, an nn.Embedding -> stem"
    if before:
        return stacks[0], 0, "outside the traced transformers model, registered before it -> stem"
    return stacks[-1], head, "outside the traced transformers model, registered after it -> head"

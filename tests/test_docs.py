"""README.md and docs/*.md: generated blocks equal what their results files give, every relative link and
``#anchor`` resolves, and no page talks about the machine a figure came from (only its hardware class)."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import docs_blocks  # noqa: E402

PAGES = [ROOT / "README.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").glob("*.md"))]
DOC_PAGES = ["depth", "architectures", "trainer", "controls", "engines", "resume", "sweep", "benchmarks", "recipes"]
FENCE = re.compile(r"^(```|~~~)")
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
MACHINE_TALK = re.compile(
    r"load average|load_average|idle machine|\blent\b|other jobs|this machine|this session|happened to be|"
    r"not drawn|was available|were available|\bidle\b|contended|contention|\bbusy\b|shared with other|machine's load",
    re.IGNORECASE,
)


def prose(text: str) -> list[tuple[int, str]]:
    """(line number, line) outside fenced code blocks."""
    out, fenced = [], False
    for number, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line.strip()):
            fenced = not fenced
            continue
        if not fenced:
            out.append((number, line))
    return out


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: rendered text, lower case, punctuation dropped, spaces to hyphens.

    >>> slug("`llrd sweep`: does it pay off on *your* data?")
    'llrd-sweep-does-it-pay-off-on-your-data'
    """
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link renders as its text
    text = re.sub(r"<[^>]+>", "", text).replace("`", "").replace("*", "")
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """The anchors of a page's headings; a repeated heading gets ``-1``, ``-2``, ... as on GitHub."""
    seen: dict[str, int] = {}
    out = set()
    for _, line in prose(page.read_text()):
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            base = slug(m.group(1))
            n = seen.get(base, 0)
            out.add(base if n == 0 else f"{base}-{n}")
            seen[base] = n + 1
    return out


def links(page: Path) -> list[tuple[int, str]]:
    out = []
    for number, line in prose(page.read_text()):
        line = re.sub(r"`[^`]*`", "", line)  # code spans are not links
        out += [(number, m.group(1)) for m in LINK.finditer(line)]
    return out


def test_the_reference_pages_exist():
    for name in DOC_PAGES:
        assert (ROOT / "docs" / f"{name}.md").read_text().startswith("# "), name


def test_the_slugs_follow_github():
    assert slug("Install, main job, tests") == "install-main-job-tests"
    assert slug("Engines: DDP, DeepSpeed ZeRO, FSDP2") == "engines-ddp-deepspeed-zero-fsdp2"
    assert slug("Quality — `python scripts/bench_quality.py`") == "quality--python-scriptsbench_qualitypy"
    assert slug("The depth convention, in short") == "the-depth-convention-in-short"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_relative_link_and_anchor_resolves(page):
    broken = []
    for number, target in links(page):
        if re.match(r"^(https?|mailto):", target):
            continue  # external: allowed, not fetched
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"line {number}: {target} (no file {dest})")
        elif anchor and (dest.suffix != ".md" or anchor not in anchors(dest)):
            broken.append(f"line {number}: {target} (no heading #{anchor} in {dest.name})")
    assert not broken, "\n".join(broken)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_no_page_talks_about_the_machine(page):
    talk = [f"line {n}: {line}" for n, line in enumerate(page.read_text().splitlines(), 1) if MACHINE_TALK.search(line)]
    assert not talk, "\n".join(talk)


@pytest.mark.parametrize("name", sorted(docs_blocks.BLOCKS))
def test_each_generated_block_is_what_its_results_file_gives(name):
    page, _ = docs_blocks.BLOCKS[name]
    block = docs_blocks.read_block(page, name)
    assert block == docs_blocks.generate(name), f"run: python scripts/docs_blocks.py {name}"
    assert "CPU cores" in block or name in docs_blocks.UNTIMED  # the hardware class, never the load
    assert not MACHINE_TALK.search(block)


def test_the_generated_blocks_show_the_results_they_name():
    """A few facts of the blocks, from the results files, so that a renderer that drops rows fails."""
    engines = docs_blocks.read_block(docs_blocks.BLOCKS["engine_agreement"][0], "engine_agreement")
    report = json.loads((docs_blocks.RESULTS / "engine_agreement.json").read_text())
    assert set(report["runs"]) >= {"features/zero1", "offload/zero3_offload", "model_changes/zero3"}
    assert engines.count("\n| ") == len(report["runs"]) + 1  # one row per run, after the header
    quality = docs_blocks.read_block(docs_blocks.DOCS / "benchmarks.md", "quality")
    expect = docs_blocks.read_block(ROOT / "README.md", "expect")
    summary = docs_blocks.read_block(docs_blocks.DOCS / "benchmarks.md", "quality_summary")
    for key in docs_blocks.DATASETS:
        out = docs_blocks.RESULTS / f"sweep_{key}"
        line = json.loads((out / "results.json").read_text())["verdict"]["line"]
        assert line in (out / "table.md").read_text() and f"```\n{line}\n```" in quality
        assert f"(../scripts/results/sweep_{key}/sweep.png)" in quality and (out / "sweep.png").stat().st_size > 10_000
        assert f"(scripts/results/sweep_{key}/table.md)" in expect
        rows = [r for r in summary.splitlines() if f"(../scripts/results/sweep_{key}/table.md)" in r]
        gain = json.loads((out / "results.json").read_text())["verdict"]["gain"]
        assert len(rows) == 1 and f"{gain['mean']:+.4f} [{gain['low']:+.4f}, {gain['high']:+.4f}]" in rows[0]
    summary = json.loads((docs_blocks.RESULTS / "architectures.json").read_text())["summary"]
    arch = docs_blocks.read_block(docs_blocks.DOCS / "architectures.md", "sweep_architectures")
    assert f"{summary['types']} model types" in arch and f"| FAIL | {summary['counts'].get('FAIL', 0)} |" in arch


def test_the_readme_is_short_and_starts_with_the_commands():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 300
    head = "\n".join(lines[:40])
    for command in ('pip install -e ".[test]"', "python recipes/text_classification.py", "python -m pytest"):
        assert command in head, command


def test_the_changelog_has_this_version():
    import llrd

    text = (ROOT / "CHANGELOG.md").read_text()
    assert f"## {llrd.__version__}" in text and "Old checkpoints" in text
    assert f'version = "{llrd.__version__}"' in (ROOT / "pyproject.toml").read_text()

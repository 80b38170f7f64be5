"""``sweep.png``: the validation metric over optimizer steps, one band per setting (mean line, min-max band over
seeds); the plain arm dashed, the other arms solid (one colour map each), the chosen settings drawn thicker."""

from __future__ import annotations

import os
import statistics
import tempfile
from pathlib import Path


def bands(records: list[dict], setting: dict) -> tuple[list[int], list[float], list[float], list[float]]:
    """(steps, mean, min, max) over the seeds of one setting's successful tuning trials, on the steps every
    seed evaluated.

    Example:
        >>> recs = [{"status": "ok", "setting": {"a": 1}, "curve": [[10, v], [20, v + 0.1]]}
        ...         for v in (0.5, 0.7)]
        >>> bands(recs, {"a": 1})[0:2]
        ([10, 20], [0.6, 0.7])
    """
    curves = [
        dict((int(s), v) for s, v in r["curve"]) for r in records if r["status"] == "ok" and r["setting"] == setting
    ]
    if not curves:
        return [], [], [], []
    steps = sorted(set.intersection(*(set(c) for c in curves)))
    cols = [[c[s] for c in curves] for s in steps]
    return steps, [round(statistics.mean(c), 10) for c in cols], [min(c) for c in cols], [max(c) for c in cols]


def plot(rows: list[dict], records: list[dict], chosen: list[str], metric: str, title: str, path: Path) -> None:
    """Draw every setting of ``rows`` and write ``path`` atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5))
    arms = list(dict.fromkeys(r["arm"] for r in rows))
    maps = ("autumn", "cool", "summer", "spring", "copper", "Wistia")
    styles = [
        ([r for r in rows if r["arm"] == arm], plt.get_cmap("winter" if arm == "plain" else maps[i % len(maps)]),
         "--" if arm == "plain" else "-")
        for i, arm in enumerate(a for a in arms)
    ]  # fmt: skip
    for group, cmap, style in styles:
        for i, row in enumerate(group):
            steps, mean, low, high = bands(records, row["setting"])
            if not steps:
                continue
            color = cmap(i / max(1, len(group) - 1) * 0.85)
            picked = row["label"] in chosen
            name = f"{row['arm']}: {row['label'].replace('layer_decay=1, ', '')}" + (" (chosen)" if picked else "")
            ax.plot(steps, mean, style, color=color, lw=2.6 if picked else 1.2, marker="o", ms=3, label=name)
            ax.fill_between(steps, low, high, color=color, alpha=0.12)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(f"validation {metric}")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fd, tmp = tempfile.mkstemp(prefix=f".{Path(path).stem}.", suffix=".png", dir=Path(path).parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=100)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.unlink(tmp)

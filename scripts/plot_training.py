"""Plot per-depth learning rate and gradient norm over steps from a finished run's trainer_state.json.

    python scripts/plot_training.py runs/minilm_sst2/trainer_state.json training.png

Needs a run of LLRDTrainer with layer_stats='grad_norm' or 'all' (opt-in); with 'lr' (the default) only the lr panel
has lines.
"""

from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def series(log_history: list[dict], prefix: str) -> dict[str, tuple[list[int], list[float]]]:
    """``{depth key: (steps, values)}`` for log keys ``<prefix>/<depth key>``."""
    out: dict[str, tuple[list[int], list[float]]] = defaultdict(lambda: ([], []))
    for entry in log_history:
        for key, value in entry.items():
            if key.startswith(prefix + "/"):
                steps, values = out[key[len(prefix) + 1 :]]
                steps.append(entry["step"])
                values.append(value)
    return dict(sorted(out.items(), key=lambda kv: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", kv[0])]))


def plot(state_path: str, png: str) -> None:
    with open(state_path) as f:
        history = json.load(f)["log_history"]
    if not series(history, "lr"):
        raise SystemExit(
            f"error: {state_path} has no per-depth logs (lr/<depth>): train with LLRDTrainer and layer_stats "
            "'all' or 'lr', with logging_steps smaller than the run."
        )
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, prefix, label in ((axes[0], "lr", "learning rate"), (axes[1], "grad_norm", "gradient norm")):
        lines = series(history, prefix)
        cmap = plt.get_cmap("viridis", max(len(lines), 2))
        for i, (depth, (steps, values)) in enumerate(lines.items()):
            ax.plot(steps, values, color=cmap(i), label=depth)
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.set_title(f"{label} per depth")
        ax.grid(True, which="both", alpha=0.3)
        if lines:
            ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trainer_state", help="path to trainer_state.json")
    parser.add_argument("png", help="output PNG")
    ns = parser.parse_args()
    plot(ns.trainer_state, ns.png)
    print(f"wrote {ns.png}")


if __name__ == "__main__":
    main()

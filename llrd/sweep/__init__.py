"""``llrd sweep``: does layer-wise lr decay pay off on *my* data? An equal-budget A/B against plain fine-tuning.

Example:
    >>> from llrd.sweep import SweepSpec, run_sweep
    >>> result = run_sweep(SweepSpec(config=cfg, grid={"layer_decay": [0.8]}, output_dir=Path("out")))  # doctest: +SKIP
"""

from .core import SweepSpec, run_sweep

__all__ = ["SweepSpec", "run_sweep"]

"""Per-depth training logs: what each level logs, on which steps, what it costs, and the training plot."""

from __future__ import annotations

import glob
import subprocess
import sys
from pathlib import Path

import pytest
import tiny_models
import torch
from PIL import Image
from test_trainer import args, text_data

from llrd import LLRDTrainer
from llrd.monitor import LayerMonitor

ROOT = Path(__file__).resolve().parents[1]
LR, DECAY = 1e-3, 0.5


def _train(tmp_path, n=16, **kw):
    base = dict(layer_decay=DECAY, max_steps=4, logging_steps=2)
    base.update(kw)
    trainer = LLRDTrainer(
        model=tiny_models.make("bert"), train_dataset=text_data(n), args=args(str(tmp_path / "out"), **base)
    )
    trainer.train()
    return trainer, [h for h in trainer.state.log_history if "loss" in h]


def test_default_logs_rates_only_and_reaches_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    trainer, logs = _train(tmp_path, report_to="tensorboard", lr_scheduler_type="constant")
    assert trainer.args.layer_stats == "lr"
    assert [h["step"] for h in logs] == [2, 4]
    for h in logs:
        assert [h[f"lr/depth_{d:02d}"] for d in range(4)] == [LR * DECAY ** (3 - d) for d in range(4)]
        assert not any(k.startswith(("grad_norm/", "update_ratio/")) for k in h)  # the default reads no tensor
    events = glob.glob(str(tmp_path / "out" / "**" / "events.out.tfevents.*"), recursive=True)
    assert events
    acc = EventAccumulator(str(Path(events[0]).parent))
    acc.Reload()
    assert "train/lr/depth_00" in set(acc.Tags()["scalars"])
    assert [e.value for e in acc.Scalars("train/lr/depth_00")] == pytest.approx([1.25e-4, 1.25e-4])


def test_grad_norms_are_the_norms_of_each_depths_gradients(tmp_path):
    from transformers import TrainerCallback

    seen = {}

    class Record(TrainerCallback):
        def on_pre_optimizer_step(self, a, state, control, model=None, **kw):
            if state.global_step + 1 == 2:
                for name, p in model.named_parameters():
                    seen[name] = p.grad.detach().clone()

    trainer = LLRDTrainer(
        model=tiny_models.make("bert"),
        train_dataset=text_data(16),
        args=args(str(tmp_path / "out"), layer_decay=DECAY, max_steps=2, logging_steps=2, layer_stats="grad_norm"),
        callbacks=[Record()],
    )
    trainer.train()
    log = next(h for h in trainer.state.log_history if "loss" in h)
    for depth in range(4):
        names = [n for n, d in trainer.llrd_layer_map(trainer.model).items() if d == depth]
        expected = torch.linalg.vector_norm(torch.stack([seen[n].norm() for n in names]))
        assert log[f"grad_norm/depth_{depth:02d}"] == pytest.approx(float(expected), rel=1e-6)


def test_update_ratio_is_opt_in(tmp_path):
    _, logs = _train(tmp_path, layer_stats="all")
    for h in logs:
        assert all(0 < h[f"update_ratio/depth_{d:02d}"] < 1 for d in range(4))
        assert all(h[f"grad_norm/depth_{d:02d}"] > 0 for d in range(4))


def test_layer_stats_can_be_raised_or_turned_off(tmp_path):
    _, logs = _train(tmp_path, layer_stats="grad_norm")
    assert all(h[f"grad_norm/depth_{d:02d}"] > 0 for h in logs for d in range(4))
    assert not any(k.startswith("update_ratio/") for k in logs[0])  # grad_norm copies no weights
    _, logs = _train(tmp_path, layer_stats="none")
    assert not any("/" in k for k in logs[0])


class CountComputations(LLRDTrainer):
    """Counts the steps on which the monitor computed statistics."""

    computed: list[int]

    def _llrd_attach(self, *a, **kw):
        super()._llrd_attach(*a, **kw)
        monitor = next(s for s in self._llrd_driver.stages if isinstance(s, LayerMonitor))
        original, self.computed = monitor.before_step, []

        def counting(ctx):
            monitor.pending = {}
            original(ctx)
            if monitor.pending:
                self.computed.append(ctx.state.global_step + 1)

        monitor.before_step = counting


@pytest.mark.parametrize(
    "strategy,extra,logged,level",
    [
        ("steps", dict(logging_steps=3), [3, 6], "grad_norm"),
        ("steps", dict(logging_steps=3, logging_first_step=True), [1, 3, 6], "grad_norm"),
        ("steps", dict(logging_steps=3, logging_first_step=True), [1, 3, 6], "lr"),  # the step pre-hook path
        ("epoch", dict(), [4, 7], "grad_norm"),  # 8 rows, batch 2: 4 steps per epoch; max_steps=7 ends mid-epoch 2
        ("epoch", dict(), [4, 7], "lr"),
        ("no", dict(), [], "grad_norm"),
    ],
)
def test_stats_follow_trainers_logging_decision(strategy, extra, logged, level, tmp_path):
    trainer = CountComputations(
        model=tiny_models.make("bert"),
        train_dataset=text_data(8),
        args=args(
            str(tmp_path / "out"), layer_decay=DECAY, max_steps=7, logging_strategy=strategy, layer_stats=level, **extra
        ),
    )
    trainer.train()
    losses = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["step"] for h in losses] == logged
    assert trainer.computed == logged  # computed exactly on the logged steps, never for nothing
    for h in losses:  # and each log carries the statistics of its own step
        assert {f"{level}/depth_{d:02d}" for d in range(4)} <= set(h)


def test_plot_training_script(tmp_path):
    trainer, _ = _train(tmp_path)
    trainer.save_state()
    png = tmp_path / "training.png"
    proc = subprocess.run(
        [sys.executable, "scripts/plot_training.py", str(tmp_path / "out" / "trainer_state.json"), str(png)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    with Image.open(png) as img:
        img.verify()

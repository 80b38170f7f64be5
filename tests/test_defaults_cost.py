"""The default per-depth output costs nothing: rates from the group dicts, no engine internal, Trainer's console
line; the 2-D mesh refusal applies to the opt-in norms only, and the setting it suggests trains."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import tiny_models
import torch
from test_trainer import args, text_data
from transformers import Trainer, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from llrd import LLRDTrainer, param_groups
from llrd.engines import StepDriver
from llrd.monitor import DepthQuietPrinter, DepthQuietProgress, LayerMonitor, depth_key

ROOT = Path(__file__).resolve().parents[1]


class ZeroTripwire:
    """Looks like DeepSpeed's ZeRO optimizer from outside (``.optimizer``, ``param_groups``, ``step``); reading any
    other attribute (``averaged_gradients``, ``loss_scale``, partitions ...) fails the test."""

    def __init__(self, inner: torch.optim.Optimizer):
        self.optimizer = inner
        self.read: list[str] = []

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    def step(self):
        self.optimizer.step()

    def __getattr__(self, name):
        self.read.append(name)
        raise AssertionError(f"read ZeRO internal {name!r}")


def _driver_on_tripwire(level: str):
    model = tiny_models.make("bert")
    groups = param_groups(model, lr=1e-3, layer_decay=0.5, per_depth=True)
    zero = ZeroTripwire(torch.optim.SGD(groups, lr=1e-3))
    key_of = {n: depth_key(g["stack"], g["layer_id"], False) for g in groups for n in g["param_names"]}
    monitor = LayerMonitor(level)
    driver = StepDriver([monitor], key_of, lambda g: depth_key(g["stack"], g["layer_id"], False))
    targs = SimpleNamespace(logging_strategy="steps", logging_steps=1, logging_first_step=False, eval_strategy="no",
                            save_strategy="no", eval_steps=None, save_steps=500, eval_delay=0, max_steps=2)  # fmt: skip
    state = TrainerState(max_steps=2, logging_steps=1)
    control = TrainerControl()
    driver.on_train_begin(targs, state, control, optimizer=zero)
    driver.on_step_begin(targs, state, control)
    model(input_ids=torch.tensor([[1, 2, 3]]), labels=torch.tensor([0])).loss.backward()
    zero.step()
    driver.on_train_end(targs, state, control)
    return zero, monitor.pop()


def test_default_level_reads_no_zero_internal_and_leaves_its_step_alone():
    zero, stats = _driver_on_tripwire("lr")
    assert zero.read == [] and "step" not in vars(zero)  # never wrapped, never probed
    assert stats == {f"lr/depth_{d:02d}": 1e-3 * 0.5 ** (3 - d) for d in range(4)}  # read in the step pre-hook


def test_opt_in_gradient_norms_do_read_zero_internals():
    """The tripwire works: the opt-in level goes inside ZeRO (its cost, named in the layer_stats help)."""
    with pytest.raises(AssertionError, match="read ZeRO internal"):
        _driver_on_tripwire("grad_norm")


def test_console_line_is_trainers_and_the_depth_keys_go_to_the_state(tmp_path, capsys):
    trainer = LLRDTrainer(model=tiny_models.make("bert"), train_dataset=text_data(8),
                          args=args(str(tmp_path / "out"), layer_decay=0.5, max_steps=2))  # fmt: skip
    trainer.train()
    printed = [ast.literal_eval(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{'loss'")]
    assert len(printed) == 2 and all(set(p) == {"loss", "grad_norm", "learning_rate", "epoch"} for p in printed)
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert all({f"lr/depth_{d:02d}" for d in range(4)} <= set(h) for h in logged)  # trainer_state.json, report_to
    types = [type(c) for c in trainer.callback_handler.callbacks]
    plain = Trainer(model=tiny_models.make("bert"), args=TrainingArguments(str(tmp_path / "t"), disable_tqdm=True))
    at = [type(c) for c in plain.callback_handler.callbacks].index(PrinterCallback)
    assert types[at] is DepthQuietPrinter and PrinterCallback not in types  # in PrinterCallback's own place


def test_progress_bar_line_leaves_the_depth_keys_out(tmp_path, capsys):
    a = args(str(tmp_path / "out"), layer_decay=0.5, max_steps=2, disable_tqdm=False)
    trainer = LLRDTrainer(model=tiny_models.make("bert"), train_dataset=text_data(8), args=a)
    trainer.train()
    assert [type(c) for c in trainer.callback_handler.callbacks if isinstance(c, ProgressCallback)] == [
        DepthQuietProgress
    ]
    out = capsys.readouterr()
    lines = [line for line in (out.out + out.err).splitlines() if "'loss'" in line]
    assert lines and not any("depth_" in line for line in lines)


def _mesh2d(tmp_path, level: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}", "MASTER_PORT": str(29500 + os.getpid() % 500)}
    return subprocess.run([sys.executable, str(ROOT / "tests" / "mesh2d_job.py"), str(tmp_path / level), level],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)  # fmt: skip


def test_two_d_mesh_refuses_only_the_norms_and_its_suggestion_trains(tmp_path):
    """FSDP2 on a 2-D (1 x 1) mesh: per-depth norms are refused in one line naming the setting; the rates it
    suggests (layer_stats='lr', the default) train and log."""
    refused = _mesh2d(tmp_path, "grad_norm")
    assert refused.returncode != 0
    lines = [line for line in refused.stderr.splitlines() if "ValueError: layer_stats='grad_norm'" in line]
    assert lines and "2-D device mesh" in lines[0] and "Use layer_stats='lr'" in lines[0], refused.stderr[-2000:]
    suggested = _mesh2d(tmp_path, "lr")
    assert suggested.returncode == 0, suggested.stderr[-3000:]
    assert json.loads(suggested.stdout.strip().splitlines()[-1]) == [f"lr/depth_{d:02d}" for d in range(4)]

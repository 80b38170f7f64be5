"""The check that the per-layer rates survived the launch: each way they collapse past the config guards."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import tiny_models
import torch
from test_trainer import args as make_args
from test_trainer import text_data
from transformers import Trainer, TrainerCallback

from llrd import LLRDTrainer, create_optimizer
from llrd.launch_check import RatesCollapsed

ROOT = Path(__file__).resolve().parents[1]


def _trainer(tmp_out, cls=LLRDTrainer, **kw):
    a = make_args(tmp_out, layer_decay=0.5, max_steps=2, lr_scheduler_type="constant")
    return cls(model=tiny_models.make("bert"), args=a, train_dataset=text_data(8), **kw)


def test_passing_check_logs_one_line(tmp_out, caplog):
    with caplog.at_level(logging.INFO, logger="llrd"):
        _trainer(tmp_out).train()
    lines = [r.getMessage() for r in caplog.records if "rates verified" in r.getMessage()]
    assert lines == [
        "LLRD rates verified after step 1: 8 groups on AdamW under single process step at 0.000125..0.001, as built."
    ]


def test_optimizer_passed_through_optimizers_is_caught(tmp_out):
    model = tiny_models.make("bert")
    a = make_args(tmp_out, layer_decay=0.5, max_steps=2, lr_scheduler_type="constant")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    trainer = LLRDTrainer(model=model, args=a, train_dataset=text_data(8), optimizers=(opt, None))
    with pytest.raises(RatesCollapsed, match=r"\(AdamW under single process, 1 group\(s\)\) was not built by LLRD: .* "
                       r"Cause: it was passed through optimizers=\(\.\.\.\)"):  # fmt: skip
        trainer.train()


def test_optimizer_from_llrd_create_optimizer_passes_and_gets_the_stages(tmp_out, caplog):
    model = tiny_models.make("bert")
    a = make_args(
        tmp_out, max_steps=2, lr_scheduler_type="constant", adaptive_lr=True, gradual_unfreeze_every=1,
        layer_stats="grad_norm",
    )  # fmt: skip
    opt = create_optimizer(model, torch.optim.AdamW, {"lr": 1e-3}, layer_decay=0.5, per_depth=True)
    before = model.bert.embeddings.word_embeddings.weight.detach().clone()
    trainer = LLRDTrainer(model=model, args=a, train_dataset=text_data(8), optimizers=(opt, None))
    with caplog.at_level(logging.INFO, logger="llrd"):
        trainer.train()
    assert any("rates verified after step 1: 8 groups" in r.getMessage() for r in caplog.records)
    assert trainer.llrd_layout is not None  # the resume check knows its layout
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert all("lr_factor/depth_03" in h and "grad_norm/depth_03" in h for h in logs)  # adaptive rates, monitor
    assert torch.equal(model.bert.embeddings.word_embeddings.weight, before)  # still frozen by the unfreezing


def test_foreign_optimizer_says_the_step_time_features_are_off(tmp_out, caplog):
    model = tiny_models.make("bert")
    a = make_args(tmp_out, max_steps=1, layer_stats="all")  # layer_decay 1: no rates to verify, but logs asked for
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with caplog.at_level(logging.WARNING, logger="llrd"):
        LLRDTrainer(model=model, args=a, train_dataset=text_data(8), optimizers=(opt, None)).train()
    assert any(
        "has no LLRD param groups" in r.getMessage() and "layer_stats='all'" in r.getMessage() for r in caplog.records
    )


class EagerTrainer(LLRDTrainer):
    """A subclass that builds Trainer's own optimizer in __init__, before LLRD's create_optimizer can run."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.optimizer = Trainer.create_optimizer(self)


def test_optimizer_built_eagerly_by_a_subclass_is_caught(tmp_out):
    with pytest.raises(RatesCollapsed, match=r"2 group\(s\)\) was not built by LLRD.*before LLRD's create_optim"):
        _trainer(tmp_out, cls=EagerTrainer).train()


class Rewriter(TrainerCallback):
    def on_step_begin(self, args, state, control, optimizer=None, **kw):
        for group in optimizer.param_groups:
            group["lr"] = 1e-3


def test_callback_rewriting_rates_is_caught(tmp_out):
    with pytest.raises(RatesCollapsed, match=r"all 8 groups stepped at the same lr 0.001.*most likely a callback "
                       r"\(callbacks not from transformers or llrd: Rewriter\)"):  # fmt: skip
        _trainer(tmp_out, callbacks=[Rewriter()]).train()


def test_check_can_be_turned_off(tmp_out):
    a = make_args(tmp_out, layer_decay=0.5, max_steps=2, lr_scheduler_type="constant", verify_rates=False)
    LLRDTrainer(model=tiny_models.make("bert"), args=a, train_dataset=text_data(8), callbacks=[Rewriter()]).train()


def test_warmup_from_zero_is_checked_at_the_first_non_zero_step(tmp_out, caplog):
    a = make_args(tmp_out, layer_decay=0.5, max_steps=4, warmup_steps=2, lr_scheduler_type="linear")
    with caplog.at_level(logging.INFO, logger="llrd"):
        LLRDTrainer(model=tiny_models.make("bert"), args=a, train_dataset=text_data(8)).train()
    assert any("rates verified after step 2" in r.getMessage() for r in caplog.records)  # step 1 ran at lr 0


@pytest.mark.slow
@pytest.mark.parametrize(
    "cause,message",
    [
        ("ds_scheduler", "Cause: a DeepSpeed scheduler (WarmupLR) writes its rates into every group"),
        ("ds_optimizer", "Cause: the DeepSpeed config has an 'optimizer' section"),
    ],
)
def test_deepspeed_collapses_are_caught(cause, message, tmp_path):
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    torchrun = str(Path(sys.executable).parent / "torchrun")
    proc = subprocess.run(
        [torchrun, "--standalone", "--nproc_per_node", "1", "tests/collapse_job.py", str(tmp_path), cause],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode != 0
    assert "llrd.launch_check.RatesCollapsed" in proc.stderr and message in proc.stderr, proc.stderr[-3000:]


@pytest.mark.slow
def test_deepspeed_without_zero_refuses_step_time_controls(tmp_path):
    """ZeRO stage 0: the engine steps inside backward, where adaptive rates cannot act: refused with one line."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    torchrun = str(Path(sys.executable).parent / "torchrun")
    proc = subprocess.run(
        [torchrun, "--standalone", "--nproc_per_node", "1", "tests/collapse_job.py", str(tmp_path), "ds_stage0"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode != 0
    assert "ValueError: adaptive_lr needs to act between backward and the optimizer step" in proc.stderr, proc.stderr[
        -3000:
    ]


def _same_data_job(tmp_path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1", "PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}"}
    torchrun = str(Path(sys.executable).parent / "torchrun")
    return subprocess.run(
        [torchrun, "--standalone", "--nproc_per_node", "2", "tests/same_data_job.py", str(tmp_path), *extra],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip


@pytest.mark.slow
def test_ranks_training_on_the_same_data_are_stopped_and_the_fix_works(tmp_path):
    """torchrun, 2 gloo ranks, TrainingArguments(deepspeed=...) on CPU without use_cpu: accelerate counts 1 process,
    so each rank would iterate all 16 rows (8 steps instead of 4). Stopped with one line naming use_cpu; with it,
    the same job shards the data and takes 4 steps."""
    proc = _same_data_job(tmp_path)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if "llrd.launch_check.SameDataOnEveryRank:" in line]
    assert lines, proc.stderr[-3000:]
    assert "torch.distributed has 2 processes but the trainer shards data over 1" in lines[0]
    assert "pass use_cpu=True (--use_cpu)" in lines[0] and "steps=" not in proc.stdout
    fixed = _same_data_job(tmp_path, "--use_cpu")
    assert fixed.returncode == 0, fixed.stderr[-3000:]
    assert fixed.stdout.count("steps=4") == 2 and "steps=8" not in fixed.stdout, fixed.stdout[-2000:]  # each rank

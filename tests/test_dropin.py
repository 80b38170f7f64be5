"""Issue 19: with every LLRD setting at its default, LLRDTrainer is Trainer, bit for bit; with LLRD on, only what
LLRD adds (its groups, llrd_layout.json, the launch check, per-depth rates) and what the user turned on differs.

The categories follow a Trainer test suite nobody on this project wrote: block-less models (a regression MLP,
nn.Sequential), the callback list and event order, gradient accumulation, resume, best-model reload, a user
optimizer, optuna search, and 2 CPU processes (test_two_processes_*)."""

from __future__ import annotations

import dataclasses
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import tiny_models
import torch
import transformers as tf
from test_trainer import text_data
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments

from llrd import LLRDArguments, LLRDMixin, LLRDTrainer, LLRDTrainingArguments
from llrd.args import _REFINES, llrd_field_names
from llrd.launch_check import RateCheck
from llrd.manifest import LAYOUT_FILE

ROOT = Path(__file__).resolve().parents[1]
# Keys of the log history that measure time, not training.
TIMED = (
    "train_runtime",
    "train_samples_per_second",
    "train_steps_per_second",
    "eval_runtime",
    "eval_samples_per_second",
    "eval_steps_per_second",
)


# --- block-less models, as in transformers' own Trainer tests ---------------------------------------------------
class RegressionMLP(nn.Module):
    """y = MLP(x), MSE loss: no blocks, no config, a forward without **kwargs."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2 = nn.Linear(4, 8), nn.Linear(8, 1)

    def forward(self, input_x, labels=None):
        y = self.fc2(torch.relu(self.fc1(input_x))).squeeze(-1)
        return {"loss": nn.functional.mse_loss(y, labels), "logits": y} if labels is not None else {"logits": y}


def regression_data(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    y = x.sum(-1) + 0.1 * torch.randn(n, generator=g)
    return [{"input_x": x[i], "labels": y[i]} for i in range(n)]


def sequential():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))


def sequential_data(n=16):
    return [{"input": r["input_x"], "labels": r["labels"]} for r in regression_data(n)]


def mse(outputs, labels, num_items_in_batch=None):
    return nn.functional.mse_loss(outputs.squeeze(-1), labels)


MODELS = {  # model, data, trainer keywords, TrainingArguments fields
    "regression_mlp": (RegressionMLP, regression_data, {}, {}),
    "sequential": (
        sequential,
        sequential_data,
        {"compute_loss_func": mse},
        {"remove_unused_columns": False, "label_names": ["labels"]},
    ),
}


def base_args(out, **kw):
    a = dict(
        output_dir=str(out),
        learning_rate=1e-2,
        per_device_train_batch_size=4,
        max_steps=4,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        weight_decay=0.01,
    )
    a.update(kw)
    return a


class Events(TrainerCallback):
    """Records every callback event, in order."""

    def __init__(self):
        self.seen = []

    def __getattribute__(self, name):
        if name.startswith("on_"):
            self.seen.append(name)
            return lambda *a, **k: None
        return super().__getattribute__(name)


def train(cls, out, model_fn, data, trainer_kw=None, llrd_args_class=True, resume=None, **args_kw):
    """Train with ``cls`` and return what must match: log history, weights, groups, callbacks, events, files."""
    arguments = (LLRDTrainingArguments if cls is not Trainer and llrd_args_class else TrainingArguments)(
        **base_args(out, **args_kw)
    )
    model = model_fn()
    events = Events()
    trainer = cls(model=model, args=arguments, train_dataset=data, callbacks=[events], **(trainer_kw or {}))
    callbacks = trainer.callback_handler.callback_list
    trainer.train(resume_from_checkpoint=resume)
    return dict(
        logs=[{k: v for k, v in h.items() if k not in TIMED} for h in trainer.state.log_history],
        weights={n: p.detach().clone() for n, p in trainer.model.named_parameters()},
        groups=[
            (
                [n for n, q in trainer.model.named_parameters() if any(q is p for p in g["params"])],
                {k: v for k, v in g.items() if k != "params"},
            )
            for g in trainer.optimizer.param_groups
        ],
        callbacks=callbacks,
        events=events.seen,
        files=sorted(str(p.relative_to(out)) for p in Path(out).rglob("*") if p.is_file()),
        best=trainer.state.best_model_checkpoint and Path(trainer.state.best_model_checkpoint).name,
        trainer=trainer,
    )


def assert_same(ours, ref):
    assert ours["logs"] == ref["logs"]
    assert ours["weights"].keys() == ref["weights"].keys()
    for name in ref["weights"]:
        assert torch.equal(ours["weights"][name], ref["weights"][name]), name  # bit for bit
    assert ours["groups"] == ref["groups"]
    assert ours["callbacks"] == ref["callbacks"]
    assert ours["events"] == ref["events"]
    assert ours["files"] == ref["files"]
    assert ours["best"] == ref["best"]


@pytest.mark.parametrize("kind", list(MODELS))
@pytest.mark.parametrize("arguments", ["LLRDTrainingArguments", "TrainingArguments"])
def test_block_less_models_train_as_with_trainer(kind, arguments, tmp_path):
    model_fn, data_fn, kw, extra = MODELS[kind]
    common = dict(gradient_accumulation_steps=2, save_strategy="steps", save_steps=2, **extra)
    ref = train(Trainer, tmp_path / "ref", model_fn, data_fn(), kw, **common)
    ours = train(
        LLRDTrainer,
        tmp_path / "ours",
        model_fn,
        data_fn(),
        kw,
        llrd_args_class=arguments == "LLRDTrainingArguments",
        **common,
    )
    assert_same(ours, ref)
    assert not any(LAYOUT_FILE in f for f in ours["files"])
    assert ours["trainer"].llrd_layout is None


def test_smallest_case_gives_trainers_two_groups(tmp_path):
    model = nn.Sequential(nn.Linear(128, 64))
    ours = LLRDTrainer(model=model, args=TrainingArguments(tmp_path, report_to="none")).create_optimizer()
    ref = Trainer(model=model, args=TrainingArguments(tmp_path, report_to="none")).create_optimizer()
    assert type(ours) is type(ref) and len(ours.param_groups) == len(ref.param_groups) == 2
    assert [[id(p) for p in g["params"]] for g in ours.param_groups] == [
        [id(p) for p in g["params"]] for g in ref.param_groups
    ]
    assert [{k: v for k, v in g.items() if k != "params"} for g in ours.param_groups] == [
        {k: v for k, v in g.items() if k != "params"} for g in ref.param_groups
    ]


def test_with_layer_decay_a_block_less_model_stops_with_the_clear_error(tmp_path):
    trainer = LLRDTrainer(
        model=RegressionMLP(),
        args=LLRDTrainingArguments(**base_args(tmp_path, layer_decay=0.8)),
        train_dataset=regression_data(),
    )
    with pytest.raises(ValueError, match="no transformer blocks found in RegressionMLP"):
        trainer.train()


def test_gradient_accumulation_of_a_head_that_averages_its_loss_matches_trainer(tmp_path, caplog):
    def bert():
        torch.manual_seed(0)
        return tf.BertForSequenceClassification(tf.BertConfig(num_hidden_layers=2, **tiny_models.TEXT))

    common = dict(gradient_accumulation_steps=2, max_steps=2, per_device_train_batch_size=2)
    ref = train(Trainer, tmp_path / "ref", bert, text_data(8), **common)
    with caplog.at_level(logging.WARNING, logger="llrd"):
        ours = train(LLRDTrainer, tmp_path / "ours", bert, text_data(8), **common)
    assert_same(ours, ref)
    assert ours["trainer"].model_accepts_loss_kwargs is ref["trainer"].model_accepts_loss_kwargs is True
    warned = [r.getMessage() for r in caplog.records if "fix_loss_scaling" in r.getMessage()]
    assert len(warned) == 1 and "2x too large" in warned[0] and "BertForSequenceClassification" in warned[0]
    assert "fix_loss_scaling=True (--fix_loss_scaling)" in warned[0]


def test_the_loss_scaling_warning_of_a_mixin_subclass_names_llrd_args(tmp_path, caplog):
    class MixinTrainer(LLRDMixin, Trainer):
        pass

    bert = tf.BertForSequenceClassification(tf.BertConfig(num_hidden_layers=1, **tiny_models.TEXT))
    with caplog.at_level(logging.WARNING, logger="llrd"):
        MixinTrainer(model=bert, args=TrainingArguments(tmp_path, gradient_accumulation_steps=4, report_to="none"))
    warned = [r.getMessage() for r in caplog.records if "fix_loss_scaling" in r.getMessage()]
    assert len(warned) == 1 and "4x too large" in warned[0]
    assert "llrd_args=LLRDArguments(fix_loss_scaling=True)" in warned[0]  # its args class has no such field


def test_loss_scaling_fix_is_opt_in_and_matches_a_larger_batch(tmp_path, caplog):
    def bert():
        torch.manual_seed(0)
        cfg = tf.BertConfig(
            num_hidden_layers=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **tiny_models.TEXT
        )
        return tf.BertForSequenceClassification(cfg)

    common = dict(max_steps=1, optim="sgd", lr_scheduler_type="constant", max_grad_norm=0.0)
    big = train(Trainer, tmp_path / "big", bert, text_data(8), per_device_train_batch_size=8, **common)
    with caplog.at_level(logging.WARNING, logger="llrd"):
        fixed = train(
            LLRDTrainer,
            tmp_path / "fix",
            bert,
            text_data(8),
            per_device_train_batch_size=2,
            gradient_accumulation_steps=4,
            fix_loss_scaling=True,
            **common,
        )
    assert not [r for r in caplog.records if "too large" in r.getMessage()]  # the fix is on: no warning
    assert fixed["trainer"].model_accepts_loss_kwargs is False
    loss = [h["loss"] for h in fixed["logs"] if "loss" in h][0]
    assert loss == pytest.approx([h["loss"] for h in big["logs"] if "loss" in h][0], rel=1e-5)
    for name, w in big["weights"].items():
        torch.testing.assert_close(fixed["weights"][name], w, rtol=1e-5, atol=1e-6, msg=name)


def test_no_loss_scaling_warning_without_accumulation_or_for_a_head_using_num_items(tmp_path, caplog):
    gpt2 = tf.GPT2LMHeadModel(tf.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=32))
    with caplog.at_level(logging.WARNING, logger="llrd"):
        LLRDTrainer(model=gpt2, args=TrainingArguments(tmp_path, gradient_accumulation_steps=4, report_to="none"))
        bert = tf.BertForSequenceClassification(tf.BertConfig(num_hidden_layers=1, **tiny_models.TEXT))
        LLRDTrainer(model=bert, args=TrainingArguments(tmp_path, report_to="none"))
    assert not [r for r in caplog.records if "fix_loss_scaling" in r.getMessage()]


class _OwnLossTrainer(LLRDMixin, Trainer):
    """A subclass that computes its own (mean) loss and says so through Trainer's ``loss_is_scaled_for_ga``."""

    loss_is_scaled_for_ga = False  # Trainer divides it by the accumulation steps itself

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs.pop("labels")
        outputs = model(**inputs)
        loss = nn.functional.cross_entropy(outputs["logits"], labels)
        return (loss, outputs) if return_outputs else loss


@pytest.mark.parametrize("case", ["label_smoothing", "loss_is_scaled_for_ga"])
def test_no_loss_scaling_warning_or_fix_where_trainer_scales_the_loss_itself(case, tmp_path, caplog):
    """Trainer's label smoother normalises by num_items_in_batch, and a subclass that sets loss_is_scaled_for_ga
    has said how its loss is scaled: the head's own mean is not what is scaled, so nothing is too large."""
    bert = tf.BertForSequenceClassification(tf.BertConfig(num_hidden_layers=1, **tiny_models.TEXT))
    cls, extra = (LLRDTrainer, {"label_smoothing_factor": 0.1}) if case == "label_smoothing" else (_OwnLossTrainer, {})
    for fix in (False, True):
        args = LLRDTrainingArguments(
            tmp_path, gradient_accumulation_steps=4, report_to="none", fix_loss_scaling=fix, **extra
        )
        with caplog.at_level(logging.WARNING, logger="llrd"):
            trainer = cls(model=bert, args=args)
        assert trainer.model_accepts_loss_kwargs is True  # Trainer's own value, untouched
    assert not [r for r in caplog.records if "fix_loss_scaling" in r.getMessage()]


def test_resume_from_a_checkpoint_matches_trainer(tmp_path):
    common = dict(save_strategy="steps", save_steps=2, max_steps=4)
    for cls in (Trainer, LLRDTrainer):
        out = tmp_path / cls.__name__
        train(Trainer, out, RegressionMLP, regression_data(), **common)  # both resume Trainer's checkpoint
    ref = train(
        Trainer,
        tmp_path / "Trainer",
        RegressionMLP,
        regression_data(),
        resume=str(tmp_path / "Trainer" / "checkpoint-2"),
        **common,
    )
    ours = train(
        LLRDTrainer,
        tmp_path / "LLRDTrainer",
        RegressionMLP,
        regression_data(),
        resume=str(tmp_path / "LLRDTrainer" / "checkpoint-2"),
        **common,
    )
    assert_same(ours, ref)


def test_best_model_reload_matches_trainer(tmp_path):
    common = dict(
        save_strategy="steps",
        save_steps=1,
        eval_strategy="steps",
        eval_steps=1,
        max_steps=4,
        load_best_model_at_end=True,
        metric_for_best_model="loss",
        learning_rate=0.3,
    )
    ref = train(
        Trainer, tmp_path / "ref", RegressionMLP, regression_data(), {"eval_dataset": regression_data(8, 1)}, **common
    )
    ours = train(
        LLRDTrainer,
        tmp_path / "ours",
        RegressionMLP,
        regression_data(),
        {"eval_dataset": regression_data(8, 1)},
        **common,
    )
    assert ref["best"] is not None
    assert_same(ours, ref)


def test_a_user_optimizer_via_optimizers_matches_trainer(tmp_path):
    def run(cls, out):
        model = RegressionMLP()
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
        arguments = (TrainingArguments if cls is Trainer else LLRDTrainingArguments)(**base_args(out))
        trainer = cls(model=model, args=arguments, train_dataset=regression_data(), optimizers=(opt, sched))
        trainer.train()
        return trainer, [h.get("loss") for h in trainer.state.log_history], dict(model.named_parameters())

    (t_ref, l_ref, w_ref), (t_ours, l_ours, w_ours) = run(Trainer, tmp_path / "a"), run(LLRDTrainer, tmp_path / "b")
    assert l_ours == l_ref and all(torch.equal(w_ours[n], w_ref[n]) for n in w_ref)
    assert t_ours.callback_handler.callback_list == t_ref.callback_handler.callback_list


def test_optuna_search_matches_trainer(tmp_path):
    optuna = pytest.importorskip("optuna")

    def search(cls):
        out = tmp_path / cls.__name__
        arguments = (TrainingArguments if cls is Trainer else LLRDTrainingArguments)(**base_args(out))
        trainer = cls(
            model_init=RegressionMLP,
            args=arguments,
            train_dataset=regression_data(),
            eval_dataset=regression_data(8, 1),
        )
        best = trainer.hyperparameter_search(
            hp_space=lambda trial: {"learning_rate": trial.suggest_float("learning_rate", 1e-3, 1e-1, log=True)},
            backend="optuna",
            n_trials=2,
            direction="minimize",
            sampler=optuna.samplers.TPESampler(seed=0),
        )
        return best, trainer

    (ref, t_ref), (ours, t_ours) = search(Trainer), search(LLRDTrainer)
    assert ours.hyperparameters == ref.hyperparameters and ours.objective == ref.objective
    assert t_ours.callback_handler.callback_list == t_ref.callback_handler.callback_list


def test_optuna_search_over_layer_decay_turns_llrd_on_per_trial(tmp_path):
    """A trial that sets layer_decay gets LLRD's groups and callbacks; the trainer's own settings come back."""
    optuna = pytest.importorskip("optuna")
    seen = []

    class Spy(TrainerCallback):
        def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
            seen.append((args.layer_decay, len(optimizer.param_groups)))

    def bert():
        torch.manual_seed(0)
        return tf.BertForSequenceClassification(tf.BertConfig(num_hidden_layers=2, **tiny_models.TEXT))

    trainer = LLRDTrainer(
        model_init=bert,
        args=LLRDTrainingArguments(**base_args(tmp_path, max_steps=1)),
        train_dataset=text_data(8),
        eval_dataset=text_data(4),
        callbacks=[Spy()],
    )
    trainer.hyperparameter_search(
        hp_space=lambda t: {"layer_decay": t.suggest_categorical("layer_decay", [1.0, 0.5])},
        backend="optuna",
        n_trials=2,
        direction="minimize",
        sampler=optuna.samplers.BruteForceSampler(seed=0),  # each value exactly once: no unseeded draw to flake
    )
    assert sorted(d for d, _ in seen) == [0.5, 1.0]
    assert all(n == 2 for d, n in seen if d == 1.0) and all(n > 2 for d, n in seen if d == 0.5)
    assert trainer.llrd_args.layer_decay == 1.0


# --- LLRD on adds exactly its part --------------------------------------------------------------------------
def _bert():
    torch.manual_seed(0)
    return tf.BertForSequenceClassification(tf.BertConfig(num_hidden_layers=2, **tiny_models.TEXT))


def test_llrd_on_adds_exactly_its_groups_layout_file_launch_check_and_rates(tmp_path):
    common = dict(save_strategy="steps", save_steps=2, max_steps=2, per_device_train_batch_size=2)
    ref = train(Trainer, tmp_path / "ref", _bert, text_data(8), **common)
    ours = train(LLRDTrainer, tmp_path / "ours", _bert, text_data(8), layer_decay=0.5, **common)
    trainer = ours["trainer"]
    extra = list(trainer.callback_handler.callbacks)
    for theirs in ref["trainer"].callback_handler.callbacks:  # each of Trainer's, in its place or as a subclass
        extra.remove(next(c for c in extra if isinstance(c, type(theirs))))
    added = {type(c).__name__ for c in extra}
    assert all(type(c).__module__.startswith("llrd.") for c in extra)
    assert {"LayoutSaver", "RateCheck"} <= added <= {"LayoutSaver", "RateCheck", "StepDriver"}  # the monitor's driver
    assert ours["files"] == sorted(ref["files"] + ["checkpoint-2/llrd_layout.json"])
    assert len(trainer.optimizer.param_groups) > len(ref["trainer"].optimizer.param_groups)
    for mine, theirs in zip(ours["logs"], ref["logs"], strict=True):
        extra = set(mine) - set(theirs)
        assert set(theirs) <= set(mine) and all(k.split("/")[0] in ("lr", "grad_norm", "update_ratio") for k in extra)
    assert any(k.startswith("lr/depth_") for k in ours["logs"][0])  # per-depth rates reach report_to


def test_resuming_an_llrd_off_checkpoint_with_llrd_on_is_one_line(tmp_path):
    common = dict(save_strategy="steps", save_steps=2, max_steps=2, per_device_train_batch_size=2)
    train(LLRDTrainer, tmp_path, _bert, text_data(8), **common)
    assert not (tmp_path / "checkpoint-2" / LAYOUT_FILE).exists()
    with pytest.raises(ValueError, match=LAYOUT_FILE) as err:
        train(
            LLRDTrainer,
            tmp_path,
            _bert,
            text_data(8),
            resume=str(tmp_path / "checkpoint-2"),
            layer_decay=0.5,
            **{**common, "max_steps": 4},
        )
    message = str(err.value)
    assert "\n" not in message and "written with LLRD off" in message and "checkpoint-2" in message
    # resume_from_checkpoint=True finds the same checkpoint and the same error
    with pytest.raises(ValueError, match="written with LLRD off"):
        train(LLRDTrainer, tmp_path, _bert, text_data(8), resume=True, layer_decay=0.5, **{**common, "max_steps": 4})


def test_an_llrd_off_checkpoint_without_optimizer_state_resumes_with_llrd_on(tmp_path):
    common = dict(save_strategy="steps", save_steps=2, per_device_train_batch_size=2, save_only_model=True)
    train(LLRDTrainer, tmp_path, _bert, text_data(8), max_steps=2, **common)
    assert not any(p.name.startswith("optimizer") for p in (tmp_path / "checkpoint-2").iterdir())
    resumed = train(LLRDTrainer, tmp_path, _bert, text_data(8), resume=True, layer_decay=0.5, max_steps=4, **common)
    assert resumed["trainer"].state.global_step == 4 and "checkpoint-4/llrd_layout.json" in resumed["files"]


# --- every setting: at its default Trainer, at a non-default value its effect --------------------------------
def _groups(trainer):
    return trainer.create_optimizer().param_groups


def _started(trainer):
    trainer._llrd_start(trainer.model)  # what train() does first
    return trainer


def _top_block_changed(trainer):
    before = trainer.model.bert.encoder.layer[1].output.dense.weight.clone()
    pooler = trainer.model.bert.pooler.dense.weight.clone()
    _started(trainer)
    return not torch.equal(before, trainer.model.bert.encoder.layer[1].output.dense.weight), not torch.equal(
        pooler, trainer.model.bert.pooler.dense.weight
    )


def _logged_prefixes(trainer):
    trainer.train()
    keys = {k.split("/")[0] for h in trainer.state.log_history for k in h if "/depth_" in k}
    return keys


def _stage(trainer, name):
    _groups(trainer)
    return next(s for s in trainer._llrd_driver.stages if type(s).__name__ == name)


ON = {"layer_decay": 0.5}  # what a refinement needs to act
# setting -> (non-default value, extra settings it needs, check(trainer) that its effect is active)
EFFECTS = {
    "layer_decay": (0.5, {}, lambda t: sorted({g["lr_scale"] for g in _groups(t)}) == [0.125, 0.25, 0.5, 1.0]),
    "block_pattern": (r"bert\.encoder\.layer\.0", ON, lambda t: t.llrd_layer_map(t.model).num_layers == 1),
    "depth_overrides": (
        {r"^classifier\.": 0},
        ON,
        lambda t: next(g for g in _groups(t) if "classifier.weight" in g["param_names"])["layer_id"] == 0,
    ),
    "depth_source": ("structure", ON, lambda t: t.llrd_layer_map(t.model).source == "structure"),
    "layer_stats": (None, ON, None),  # every other choice: see test_layer_stats_choices
    "stack_decay": ({"bert": 0.25}, {}, lambda t: min(g["lr_scale"] for g in _groups(t)) == 0.25**3),
    "layer_decay_min_scale": (0.3, ON, lambda t: min(g["lr_scale"] for g in _groups(t)) == 0.3),
    "head_lr_scale": (2.0, {}, lambda t: max(g["lr_scale"] for g in _groups(t)) == 2.0),
    "lr_multipliers": ({"classifier": 3.0}, {}, lambda t: any(g["lr_scale"] == 3.0 for g in _groups(t))),
    "freeze_below_scale": (
        0.3,
        ON,
        lambda t: not _started(t).model.bert.embeddings.word_embeddings.weight.requires_grad,
    ),
    "gradual_unfreeze_every": (2.0, {}, lambda t: _stage(t, "GradualUnfreezer") is not None),
    "gradual_unfreeze_unit": (
        "epochs",
        {"gradual_unfreeze_every": 1.0},
        lambda t: _stage(t, "GradualUnfreezer").unit == "epochs",
    ),
    "gradual_unfreeze_depths": (
        2,
        {"gradual_unfreeze_every": 1.0},
        lambda t: _stage(t, "GradualUnfreezer").depths == 2,
    ),
    "reinit_top_blocks": (1, {}, lambda t: _top_block_changed(t) == (True, True)),
    "reinit_pooler": (False, {"reinit_top_blocks": 1}, lambda t: _top_block_changed(t) == (True, False)),
    "adaptive_lr": (True, {}, lambda t: _groups(t) and t._llrd_adaptive is not None),
    "verify_rates": (
        False,
        ON,
        lambda t: not any(isinstance(c, RateCheck) for c in _started(t).callback_handler.callbacks),
    ),
    "fix_loss_scaling": (True, {}, lambda t: t.model_accepts_loss_kwargs is False),
    # LoRA+ needs a peft LoRA model: at default, alone and acting in tests/test_loraplus.py
    "loraplus_lr_ratio": (16.0, {}, None),
    "loraplus_lr_embedding": (1e-4, {"loraplus_lr_ratio": 16.0}, None),
    "loraplus_weight_decay": (0.1, {"loraplus_lr_ratio": 16.0}, None),
}


def test_every_setting_is_walked():
    assert set(EFFECTS) == set(llrd_field_names())


@pytest.mark.parametrize("name", sorted(n for n in EFFECTS if EFFECTS[n][2] is not None))
def test_each_setting_at_default_is_trainer_and_otherwise_acts(name, tmp_path, caplog):
    default = next(f.default for f in dataclasses.fields(LLRDArguments) if f.name == name)
    model = _bert()
    at_default = LLRDTrainer(model=model, args=LLRDTrainingArguments(**base_args(tmp_path, **{name: default})))
    ref = Trainer(model=model, args=TrainingArguments(**base_args(tmp_path)))
    mine, theirs = at_default.create_optimizer(), ref.create_optimizer()
    assert [[id(p) for p in g["params"]] for g in mine.param_groups] == [
        [id(p) for p in g["params"]] for g in theirs.param_groups
    ]
    _started(at_default)
    assert at_default.callback_handler.callback_list == ref.callback_handler.callback_list
    assert at_default._llrd_driver is None and at_default.llrd_layout is None

    value, needs, active = EFFECTS[name]
    trainer = LLRDTrainer(
        model=_bert(),
        args=LLRDTrainingArguments(**base_args(tmp_path, **needs, **{name: value})),
        train_dataset=text_data(8),
    )
    assert active(trainer), f"{name}={value!r} had no effect"
    if name in _REFINES:  # alone, a refinement does nothing: Trainer, and one warning that names what it needs
        with caplog.at_level(logging.WARNING, logger="llrd"):
            alone = LLRDTrainer(model=_bert(), args=LLRDTrainingArguments(**base_args(tmp_path, **{name: value})))
        assert not alone.llrd_args.active or name == "layer_stats"
        assert any(name in r.getMessage() and "no effect" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("choice", ["none", "lr", "grad_norm", "all"])
def test_layer_stats_choices(choice, tmp_path):
    default = next(f.default for f in dataclasses.fields(LLRDArguments) if f.name == "layer_stats")
    expected = {"none": set(), "lr": {"lr"}, "grad_norm": {"lr", "grad_norm"}}
    expected["all"] = {"lr", "grad_norm", "update_ratio"}
    alone = LLRDTrainer(
        model=_bert(),
        args=LLRDTrainingArguments(**base_args(tmp_path, max_steps=1, layer_stats=choice)),
        train_dataset=text_data(8),
    )
    logged = _logged_prefixes(alone)
    if choice in ("none", default):  # alone: LLRD stays off, Trainer's logs
        assert not alone.llrd_args.active and logged == set()
    else:  # alone it turns LLRD on: per-depth logging at Trainer's rates
        assert alone.llrd_args.active and logged == expected[choice]
    on = LLRDTrainer(
        model=_bert(),
        args=LLRDTrainingArguments(**base_args(tmp_path, max_steps=1, layer_decay=0.5, layer_stats=choice)),
        train_dataset=text_data(8),
    )
    assert _logged_prefixes(on) == expected[choice]


# --- the thin adapter ------------------------------------------------------------------------------------------
def test_the_optimizer_is_built_by_trainers_own_create_optimizer(tmp_path, monkeypatch):
    calls = []
    original = Trainer.create_optimizer

    def spy(self, model=None):
        calls.append(self.optimizer is None)
        return original(self, model)

    monkeypatch.setattr(Trainer, "create_optimizer", spy)
    trainer = LLRDTrainer(model=_bert(), args=LLRDTrainingArguments(**base_args(tmp_path, layer_decay=0.5)))
    opt = trainer.create_optimizer()
    assert calls == [True]  # Trainer built it (not an llrd copy of its body)
    assert all("lr_scale" in g for g in opt.param_groups) and opt.defaults["lr"] == 1e-2
    assert trainer.optimizer_cls_and_kwargs is None  # restored


def test_optimizer_cls_and_kwargs_keeps_its_class_and_kwargs(tmp_path):
    own = (torch.optim.SGD, {"lr": 1e-2, "momentum": 0.9})
    trainer = LLRDTrainer(
        model=_bert(), args=LLRDTrainingArguments(**base_args(tmp_path, layer_decay=0.5)), optimizer_cls_and_kwargs=own
    )
    opt = trainer.create_optimizer()
    assert type(opt) is torch.optim.SGD and all(g["momentum"] == 0.9 for g in opt.param_groups)
    assert sorted({g["lr_scale"] for g in opt.param_groups}) == [0.125, 0.25, 0.5, 1.0]
    assert trainer.optimizer_cls_and_kwargs is own and own[1] == {"lr": 1e-2, "momentum": 0.9}


def test_the_rate_of_optimizer_cls_and_kwargs_is_the_heads_rate_as_under_trainer(tmp_path):
    own = (torch.optim.SGD, {"lr": 5e-2})  # not args.learning_rate (1e-2): Trainer trains at 5e-2
    ref = Trainer(model=_bert(), args=TrainingArguments(**base_args(tmp_path)), optimizer_cls_and_kwargs=own)
    assert {g["lr"] for g in ref.create_optimizer().param_groups} == {5e-2}
    args = LLRDTrainingArguments(**base_args(tmp_path, layer_decay=0.5))
    opt = LLRDTrainer(model=_bert(), args=args, optimizer_cls_and_kwargs=own).create_optimizer()
    assert sorted({g["lr"] for g in opt.param_groups}) == [5e-2 * 0.5**k for k in (3, 2, 1, 0)]
    assert opt.defaults["lr"] == 5e-2 and own[1] == {"lr": 5e-2}


def test_an_optimizer_factory_is_refused_with_llrd_on_and_used_with_llrd_off(tmp_path):
    class Factory:  # Trainer calls Factory()(model, **kwargs) (Muon, Dion)
        def __call__(self, model, **kwargs):
            return torch.optim.SGD(model.parameters(), lr=kwargs["lr"])

    on = LLRDTrainer(
        model=_bert(),
        args=LLRDTrainingArguments(**base_args(tmp_path, layer_decay=0.5)),
        optimizer_cls_and_kwargs=(Factory, {"lr": 1e-2}),
    )
    with pytest.raises(ValueError, match="a factory, not an Optimizer class"):
        on.create_optimizer()
    off = LLRDTrainer(
        model=_bert(),
        args=LLRDTrainingArguments(**base_args(tmp_path)),
        optimizer_cls_and_kwargs=(Factory, {"lr": 1e-2}),
    )
    assert type(off.create_optimizer()) is torch.optim.SGD


# --- one way to pass settings ----------------------------------------------------------------------------------
def test_bare_keywords_warn_and_name_the_release_that_removes_them(tmp_path):
    with pytest.warns(FutureWarning, match=r"removed in llrd 0\.3\.0.*LLRDTrainingArguments") as record:
        trainer = LLRDTrainer(model=_bert(), args=TrainingArguments(tmp_path, report_to="none"), layer_decay=0.8)
    assert trainer.llrd_args.layer_decay == 0.8 and "layer_decay=0.8" in str(record[0].message)


def test_training_arguments_and_llrd_args_need_no_warning(tmp_path, recwarn):
    class MySeq2Seq(LLRDMixin, tf.Seq2SeqTrainer):
        pass

    LLRDTrainer(model=_bert(), args=LLRDTrainingArguments(**base_args(tmp_path, layer_decay=0.8)))
    sub = MySeq2Seq(
        model=_bert(),
        args=tf.Seq2SeqTrainingArguments(tmp_path, report_to="none"),
        llrd_args=LLRDArguments(layer_decay=0.8),
    )
    assert sub.llrd_args.layer_decay == 0.8
    assert not [w for w in recwarn if issubclass(w.category, FutureWarning) and "llrd" in str(w.message)]


# --- 2 CPU processes -------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_two_processes_match_trainer_and_split_groups_by_mesh(tmp_path):
    """One torchrun launch of 2 gloo ranks: DDP training of a block-less model, LLRDTrainer vs Trainer, bit for
    bit; and LLRD's groups over DTensors on two device meshes are split by mesh, as Trainer splits its own."""
    sys.path.insert(0, str(ROOT / "scripts"))
    from engine_agreement import ENV, free_port

    torchrun = str(Path(sys.executable).parent / "torchrun")
    cmd = [torchrun, "--nproc_per_node", "2", "--master_port", str(free_port()), "tests/dropin_job.py", str(tmp_path)]
    done = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    assert (tmp_path / "ok-0").read_text() == (tmp_path / "ok-1").read_text() == "ok"


# --- the recipes with LLRD off -----------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.usefixtures("shared_data")
def test_the_text_recipe_runs_with_llrd_off_and_records_trainers_groups(tmp_path):
    """The sweep's plain arm: layer_decay=1 is Trainer, so the recipe records Trainer's two groups."""
    from test_recipes import RECIPES, SST2, common_flags, run, tiny_text_model

    model, out = tiny_text_model(tmp_path / "model"), tmp_path / "out"
    proc = run(sys.executable, str(RECIPES / "text_classification.py"), "--model_name_or_path", str(model),
               "--train_file", str(SST2 / "train.csv"), "--max_train_samples", "32", "--max_seq_length", "32",
               *common_flags(out, decay="1.0"))  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    groups = json.loads((out / "llrd_groups.json").read_text())
    assert [(g["group_name"], g["lr_scale"], g["layer_id"]) for g in groups] == [(None, 1.0, None)] * 2
    names = [n for g in groups for n in g["param_names"]]
    assert len(names) == len(set(names)) and "classifier.weight" in names and None not in names

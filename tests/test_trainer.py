"""LLRDTrainer as a drop-in Trainer: real training loops on tiny models."""

from __future__ import annotations

import logging

import pytest
import tiny_models
import torch
import transformers as tf
from transformers import Trainer, TrainerCallback, TrainingArguments

from llrd import LLRDTrainer, LLRDTrainingArguments

LR, DECAY = 1e-3, 0.5


def text_data(n=16, seq=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 99, (n, seq), generator=g)
    labels = torch.randint(0, 2, (n,), generator=g)
    return [
        {"input_ids": ids[i], "attention_mask": torch.ones(seq, dtype=torch.long), "labels": labels[i]}
        for i in range(n)
    ]


def image_data(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    pix = torch.randn(n, 3, 32, 32, generator=g)
    labels = torch.randint(0, 3, (n,), generator=g)
    return [{"pixel_values": pix[i], "labels": labels[i]} for i in range(n)]


def args(out, **kw):
    base = dict(
        output_dir=out,
        learning_rate=LR,
        per_device_train_batch_size=2,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        logging_steps=1,
        disable_tqdm=True,
        seed=0,
    )
    base.update(kw)
    return LLRDTrainingArguments(**base)


class RecordLR(TrainerCallback):
    def __init__(self):
        self.rows = []

    def on_step_end(self, args, state, control, optimizer=None, **kw):
        self.rows.append((state.global_step, [(g["lr"], g["lr_scale"]) for g in optimizer.param_groups]))


@pytest.mark.parametrize("family,data", [("bert", text_data), ("vit", image_data)])
def test_drop_in_training_keeps_scheduler_times_scale(family, data, tmp_out):
    model = tiny_models.make(family)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    rec = RecordLR()
    trainer = LLRDTrainer(
        model=model,
        args=args(
            tmp_out, layer_decay=DECAY, max_steps=6, warmup_steps=2, lr_scheduler_type="linear", weight_decay=0.01
        ),
        train_dataset=data(),
        callbacks=[rec],
    )
    trainer.train()
    assert len(trainer.optimizer.param_groups) == 8  # 2 blocks: (L + 2) depths x (decay, no decay)
    assert trainer.optimizer.defaults["lr"] == LR

    def schedule(step):  # linear warmup over 2 steps, then linear decay to 0 at step 6
        return step / 2 if step < 2 else (6 - step) / 4

    assert [r[0] for r in rec.rows] == [1, 2, 3, 4, 5, 6]
    for step, groups in rec.rows:
        for lr, scale in groups:
            assert lr == pytest.approx(LR * schedule(step) * scale, rel=1e-9, abs=1e-15)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert changed == {n for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("optim", ["adamw_torch", "adamw_torch_fused", "adafactor", "sgd"])
def test_trainer_optimizer_factory_is_reused(optim, tmp_out):
    trainer = LLRDTrainer(model=tiny_models.make("bert"), args=args(tmp_out, optim=optim, layer_decay=DECAY))
    opt = trainer.create_optimizer()
    expected = {"adamw_torch": "AdamW", "adamw_torch_fused": "AdamW", "adafactor": "Adafactor", "sgd": "SGD"}[optim]
    assert type(opt).__name__ == expected
    assert [g["lr"] for g in opt.param_groups] == [LR * DECAY ** (k // 2) for k in range(8)]
    if optim == "adamw_torch_fused":
        assert all(g["fused"] for g in opt.param_groups)


def test_optimizers_with_their_own_structure_are_refused(tmp_out):
    model = tiny_models.make("bert")
    trainer = LLRDTrainer(
        model=model,
        args=args(tmp_out, layer_decay=DECAY),
        optimizer_cls_and_kwargs=(torch.optim.AdamW, {"params": list(model.parameters()), "lr": LR}),
    )
    with pytest.raises(ValueError, match=r"builds its own parameter structure \(\['params'\]\)"):
        trainer.create_optimizer()


def test_plain_training_arguments_with_keyword_override(tmp_out):
    plain = TrainingArguments(tmp_out, learning_rate=3e-4, weight_decay=0.1, use_cpu=True, report_to="none")
    trainer = LLRDTrainer(model=tiny_models.make("bert"), args=plain, layer_decay=0.8)
    assert trainer.args is plain  # never converted: the settings live in trainer.llrd_args
    assert trainer.llrd_args.layer_decay == 0.8
    assert (trainer.args.learning_rate, trainer.args.weight_decay) == (3e-4, 0.1)
    assert trainer.create_optimizer().param_groups[-1]["lr"] == pytest.approx(3e-4 * 0.8**3)
    with pytest.raises(ValueError, match="layer_decay=1.5"):
        LLRDTrainer(model=tiny_models.make("bert"), args=plain, layer_decay=1.5)


def test_layer_decay_one_gives_trainer_groups(tmp_out):
    model = tiny_models.make("bert")
    ours = LLRDTrainer(model=model, args=args(tmp_out, weight_decay=0.01)).create_optimizer()
    ref = Trainer(model=model, args=TrainingArguments(tmp_out, learning_rate=LR, weight_decay=0.01)).create_optimizer()
    assert type(ours) is type(ref)
    assert [[id(p) for p in g["params"]] for g in ours.param_groups] == [
        [id(p) for p in g["params"]] for g in ref.param_groups
    ]
    assert [(g["lr"], g["weight_decay"]) for g in ours.param_groups] == [
        (g["lr"], g["weight_decay"]) for g in ref.param_groups
    ]


def test_summary_is_logged_when_training_starts(tmp_out, caplog):
    trainer = LLRDTrainer(
        model=tiny_models.make("bert"), args=args(tmp_out, layer_decay=DECAY, max_steps=1), train_dataset=text_data()
    )
    with caplog.at_level(logging.INFO, logger="llrd"):
        trainer.train()
    assert any(r.getMessage().startswith("LLRD: 8 param groups over depths 0-3") for r in caplog.records)


def _no_dropout_bert():
    torch.manual_seed(0)
    cfg = tf.BertConfig(
        num_hidden_layers=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **tiny_models.TEXT
    )
    return tf.BertForSequenceClassification(cfg)


def _one_step(cls, out, batch, accumulation, **extra):
    model = _no_dropout_bert()
    a = dict(
        output_dir=out,
        learning_rate=0.1,
        optim="sgd",
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=accumulation,
        max_steps=1,
        max_grad_norm=0.0,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        lr_scheduler_type="constant",
    )
    a.update(extra)
    trainer = cls(
        model=model,
        args=(LLRDTrainingArguments if cls is LLRDTrainer else TrainingArguments)(**a),
        train_dataset=text_data(8),
    )
    trainer.train()
    loss = next(h["loss"] for h in trainer.state.log_history if "loss" in h)
    return loss, {n: p.detach().clone() for n, p in model.named_parameters()}


def test_gradient_accumulation_matches_a_larger_batch(tmp_out):
    # fix_loss_scaling is opt-in (issue 19): without it LLRDTrainer scales the loss as Trainer does (test_dropin.py)
    loss_big, w_big = _one_step(LLRDTrainer, tmp_out, 8, 1, layer_decay=DECAY, fix_loss_scaling=True)
    loss_acc, w_acc = _one_step(LLRDTrainer, tmp_out, 2, 4, layer_decay=DECAY, fix_loss_scaling=True)
    assert loss_acc == pytest.approx(loss_big, rel=1e-5)
    for name in w_big:
        torch.testing.assert_close(w_acc[name], w_big[name], rtol=1e-5, atol=1e-6, msg=name)
    # The trap this guards against: plain Trainer (transformers 5.24) reports and steps with a 4x larger loss
    # here. Not asserted, so an upstream fix does not break this test; any other difference would be new.
    loss_trainer, _ = _one_step(Trainer, tmp_out, 2, 4)
    if loss_trainer != pytest.approx(loss_big, rel=1e-4):
        assert loss_trainer == pytest.approx(4 * loss_big, rel=1e-4), "plain Trainer differs, but not by the known 4x"

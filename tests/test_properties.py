"""Invariants of the groups over random tiny models (hypothesis)."""

from __future__ import annotations

import json
import subprocess
import sys

import torch
import transformers as tf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llrd import layer_ids, param_groups

SMALL = dict(vocab_size=50, num_attention_heads=2, intermediate_size=16, max_position_embeddings=32)


def build(family: str, depth: int, tied: bool):
    torch.manual_seed(0)
    if family == "bert":
        return tf.BertForMaskedLM(
            tf.BertConfig(hidden_size=8, num_hidden_layers=depth, tie_word_embeddings=tied, **SMALL)
        )
    if family == "gpt2":
        return tf.GPT2LMHeadModel(
            tf.GPT2Config(vocab_size=50, n_embd=8, n_layer=depth, n_head=2, n_positions=32, tie_word_embeddings=tied)
        )
    if family == "llama":
        return tf.LlamaForCausalLM(
            tf.LlamaConfig(
                hidden_size=8, num_hidden_layers=depth, num_key_value_heads=1, tie_word_embeddings=tied, **SMALL
            )
        )
    return tf.T5ForConditionalGeneration(
        tf.T5Config(
            vocab_size=50,
            d_model=8,
            d_kv=4,
            d_ff=16,
            num_layers=depth,
            num_decoder_layers=max(1, depth - 1),
            num_heads=2,
            tie_word_embeddings=tied,
        )
    )


models = st.tuples(st.sampled_from(["bert", "gpt2", "llama", "t5"]), st.integers(1, 8), st.booleans())
decays = st.floats(min_value=0.05, max_value=1.0, allow_nan=False)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(models, decays, st.data())
def test_invariants(spec, decay, data):
    model = build(*spec)
    params = list(model.named_parameters())
    frozen = data.draw(st.sets(st.integers(0, len(params) - 1), max_size=len(params) - 1))
    for i in frozen:
        params[i][1].requires_grad_(False)
    groups = param_groups(model, lr=1e-3, layer_decay=decay, weight_decay=0.01)
    placed = [id(p) for g in groups for p in g["params"]]
    trainable = [id(p) for _, p in params if p.requires_grad]
    assert sorted(placed) == sorted(trainable) and len(set(placed)) == len(placed)  # exactly once, frozen in none
    assert all(g["params"] for g in groups)  # no empty group
    if decay < 1:  # rates never decrease towards the top, within each stack
        by_stack: dict[str, dict[int, float]] = {}
        for g in groups:
            by_stack.setdefault(g["stack"], {})[g["layer_id"]] = g["lr"]
        for depths in by_stack.values():
            ordered = [depths[d] for d in sorted(depths)]
            assert ordered == sorted(ordered)
        assert [g["lr"] for g in groups] == sorted((g["lr"] for g in groups), reverse=True)  # head first
    again = param_groups(model, lr=1e-3, layer_decay=decay, weight_decay=0.01)  # deterministic order
    assert [g["param_names"] for g in again] == [g["param_names"] for g in groups]


@settings(max_examples=15, deadline=None)
@given(models)
def test_decay_one_is_trainer(spec):
    from transformers import Trainer, TrainingArguments

    model = build(*spec)
    ref = Trainer(model=model, args=TrainingArguments("o", weight_decay=0.01, learning_rate=1e-3, report_to="none"))
    ref_groups = [g for g in ref.create_optimizer().param_groups if g["params"]]
    ours = param_groups(model, lr=1e-3, layer_decay=1.0, weight_decay=0.01)
    assert [[id(p) for p in g["params"]] for g in ours] == [[id(p) for p in g["params"]] for g in ref_groups]
    assert [(g["lr"], g["weight_decay"]) for g in ours] == [(g["lr"], g["weight_decay"]) for g in ref_groups]


LAYOUT = """
import json, sys
sys.path.insert(0, "tests")
from test_properties import build
from llrd import param_groups
groups = param_groups(build("t5", 3, True), lr=1e-3, layer_decay=0.7, weight_decay=0.01)
print(json.dumps([(g["group_name"], g["lr"], g["param_names"]) for g in groups]))
"""


def test_same_layout_across_processes():
    runs = [
        subprocess.run(
            [sys.executable, "-c", LAYOUT],
            capture_output=True,
            text=True,
            timeout=120,
            env={"PYTHONHASHSEED": str(seed), "PATH": "/usr/bin:/bin"},
        )
        for seed in (1, 2)
    ]
    assert all(r.returncode == 0 for r in runs), runs[0].stderr[-1000:]
    assert runs[0].stdout == runs[1].stdout
    groups = param_groups(build("t5", 3, True), lr=1e-3, layer_decay=0.7, weight_decay=0.01)
    assert json.loads(runs[0].stdout) == [[g["group_name"], g["lr"], g["param_names"]] for g in groups]
    assert layer_ids(build("t5", 3, True)).num_layers == 5

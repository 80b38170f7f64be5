"""Every ``# snippet: NAME`` block of README.md and docs/*.md runs as written (the README's quickstart; docs/trainer.md
holds the examples for other trainers and loops).

A snippet is a fenced ``python`` block whose first line is ``# snippet: NAME``. Each name has a test here that
runs it; a snippet without one, a name used twice, or fewer snippets than :data:`MIN_SNIPPETS` fails.

The names a snippet uses but does not define (``t5``, ``llama``, ``model``, ``train``, ...) are tiny stand-ins made
here; the arguments classes get CPU- and test-sized defaults (``use_cpu``, two steps), nothing else changes.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import tiny_models
import torch
import transformers as tf
from datasets import Dataset
from subclass_fixtures import SENTENCES, assert_depth_rates, tiny_llama, tokenizer
from test_trainer import text_data

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MIN_SNIPPETS = 6  # the README held 5 before it moved them to docs/trainer.md (issue 18), plus its quickstart
FOUND = [
    (m.group(1), m.group(2), page.relative_to(ROOT).as_posix())
    for page in PAGES
    for m in re.finditer(r"```python\n# snippet: (\w+)\n(.*?)```", page.read_text(), re.DOTALL)
]
SNIPPETS = {name: code for name, code, _ in FOUND}
WHERE = {name: page for name, _, page in FOUND}
SMALL = dict(use_cpu=True, max_steps=2, per_device_train_batch_size=2, report_to="none", save_strategy="no")


def _small(cls):
    """``cls`` with CPU- and test-sized defaults (a subclass, so isinstance and dataclass tools keep working)."""

    def __init__(self, *args, **kwargs):
        cls.__init__(self, *args, **{**SMALL, **kwargs})

    return type(cls.__name__, (cls,), {"__init__": __init__})


@pytest.fixture
def run(tmp_path, monkeypatch):
    """Exec a README snippet in ``tmp_path`` with stand-ins; return its namespace."""
    import sentence_transformers
    import trl

    monkeypatch.chdir(tmp_path)
    classes = [(tf, "Seq2SeqTrainingArguments"), (trl, "SFTConfig"),
               (sentence_transformers, "SentenceTransformerTrainingArguments")]  # fmt: skip
    for module, name in classes:  # the snippets' own arguments classes only (imported before they are patched)
        monkeypatch.setattr(module, name, _small(getattr(module, name)))

    def execute(name: str, **names):
        assert name in SNIPPETS, f"README.md and docs/*.md have no snippet {name!r}; they have {sorted(SNIPPETS)}"
        namespace = {"__name__": f"snippet_{name}", **names}
        exec(compile(SNIPPETS[name], f"{WHERE[name]}:{name}", "exec"), namespace)  # noqa: S102
        return namespace

    return execute


def test_every_snippet_is_collected_and_has_a_test():
    names = [name for name, _, _ in FOUND]
    assert len(names) >= MIN_SNIPPETS, f"only {len(names)} snippets in README.md and docs/*.md: {FOUND}"
    assert len(set(names)) == len(names), f"a snippet name is used twice: {sorted(names)}"
    tested = {n.removeprefix("test_") for n in globals() if n.startswith("test_")}
    assert set(names) <= tested, f"snippets without a test here: {sorted(set(names) - tested)}"
    assert {
        "quickstart",
        "seq2seq",
        "sft_lora",
        "sentence_transformers",
        "optimizers_argument",
        "accelerate_loop",
    } <= set(names)
    assert WHERE["quickstart"] == "README.md"


def test_quickstart(run, monkeypatch):
    import llrd

    for module, name in [(llrd, "LLRDTrainingArguments"), (tf, "TrainingArguments")]:
        monkeypatch.setattr(module, name, _small(getattr(module, name)))
    model = tiny_models.make("bert")
    ns = run(
        "quickstart",
        model=model,
        ds=text_data(8),
        causal_lm=tiny_llama(),
        chat_ds=Dataset.from_dict({"text": SENTENCES * 2}),
        tokenizer=tokenizer(),
    )
    assert ns["args"].layer_decay == 0.8 and ns["trainer"].llrd_args.layer_decay == 0.8
    assert ns["sft"].state.global_step == 2 and ns["sft"].llrd_args.layer_decay == 0.85
    assert_depth_rates(ns["sft"], 2e-4, 0.85)
    ns["trainer"].create_optimizer()  # TrainingArguments' default rate, 5e-5, decayed by 0.8 per depth
    assert_depth_rates(ns["trainer"], 5e-5, 0.8)
    lrs = [g["lr"] for g in ns["opt"].param_groups]
    assert lrs == pytest.approx([1e-4 * 0.8 ** (k // 2) for k in range(8)], rel=1e-12)
    assert ns["layer_ids"](model).num_layers == 2


def test_seq2seq(run):
    torch.manual_seed(0)
    t5 = tf.T5ForConditionalGeneration(
        tf.T5Config(vocab_size=99, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=2, decoder_start_token_id=0)
    )
    train = [{"input_ids": torch.arange(2, 8), "labels": torch.arange(3, 7)}] * 4
    ns = run("seq2seq", t5=t5, train=train)
    assert type(ns["trainer"].args).__name__ == "Seq2SeqTrainingArguments" and ns["trainer"].args.predict_with_generate
    assert_depth_rates(ns["trainer"], 1e-4, 0.9)


def test_sft_lora(run):
    data = Dataset.from_dict({"text": SENTENCES * 2})
    ns = run("sft_lora", llama=tiny_llama(), chat_data=data, tokenizer=tokenizer())
    trainer = ns["trainer"]
    assert_depth_rates(trainer, 2e-4, 0.85)
    assert all(".lora_" in n for g in trainer.optimizer.param_groups for n in g["param_names"])


def test_sentence_transformers(run):
    pairs = Dataset.from_dict({"sentence1": ["a good film", "a bad film"] * 2, "sentence2": ["great", "awful"] * 2,
                               "score": [1.0, 0.0] * 2})  # fmt: skip
    ns = run("sentence_transformers", pairs=pairs)
    assert_depth_rates(ns["trainer"], 5e-5, 0.8)
    assert ns["trainer"].llrd_layer_map(ns["trainer"].llrd_module(ns["model"])).num_layers == 6


def test_optimizers_argument(run, tmp_path):
    model = tiny_models.make("bert")
    args = tf.TrainingArguments(str(tmp_path / "out"))
    ns = run("optimizers_argument", model=model, args=args, train=text_data(8))
    groups = ns["trainer"].optimizer.param_groups
    assert [g["initial_lr"] for g in groups] == pytest.approx([1e-4 * 0.8 ** (k // 2) for k in range(8)], rel=1e-12)


def test_accelerate_loop(run):
    model = tiny_models.make("bert")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    loader = torch.utils.data.DataLoader(text_data(8), batch_size=4)
    ns = run("accelerate_loop", model=model, loader=loader)
    lrs = [g["lr"] for g in ns["opt"].param_groups]
    assert lrs == pytest.approx([1e-3] * 2 + [1e-4 * 0.8 ** (k // 2) for k in range(2, 8)], rel=1e-12)  # head x10
    assert all(not torch.equal(p.detach(), before[n]) for n, p in model.named_parameters())
    assert os.environ.get("ACCELERATE_USE_DEEPSPEED", "false") != "true"

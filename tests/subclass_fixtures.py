"""Tiny models, a word-level tokenizer and data for the Trainer-subclass tests (no Hub)."""

from __future__ import annotations

import pytest
import torch
import transformers as tf

WORDS = "the a cat dog sat ran on mat fast slow good bad film movie was is very not".split()
SENTENCES = ["the cat sat on the mat", "a dog ran fast", "the film was very good", "the movie is not bad"]


def tokenizer() -> tf.PreTrainedTokenizerFast:
    """A word-level tokenizer built in memory (the tokenizers library), wrapped for transformers."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", "<s>", "</s>", *WORDS])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return tf.PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


def llama_config(**kw) -> tf.LlamaConfig:
    base = dict(
        vocab_size=4 + len(WORDS),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        intermediate_size=37,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
    )
    return tf.LlamaConfig(**{**base, **kw})


def tiny_llama(cls=tf.LlamaForCausalLM, **kw):
    torch.manual_seed(0)
    return cls(llama_config(**kw))


def assert_depth_rates(trainer, lr: float, decay: float, mapped: dict[str, float] | None = None) -> None:
    """Every trainable tensor of the optimized module is in one group whose base rate is its depth's
    ``lr * decay ** (L + 1 - depth)`` (or the mapped absolute rate)."""
    module = trainer.llrd_module(trainer.model)
    layer_map = trainer.llrd_layer_map(module)
    trainable = {layer_map.raw_names[n] for n, p in module.named_parameters() if p.requires_grad}
    seen: dict[str, float] = {}
    for group in trainer.optimizer.param_groups:
        for name in group["param_names"]:
            assert name not in seen, f"{name} is in two groups"
            seen[name] = group.get("initial_lr", group["lr"])
    assert set(seen) == trainable
    for name, rate in seen.items():
        info = layer_map.info(name)
        hit = next((r for rx, r in (mapped or {}).items() if rx in name), None)
        expected = hit if hit is not None else lr * decay ** (info.num_layers + 1 - info.depth)
        assert rate == pytest.approx(expected, rel=1e-12), name


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}


def moved(module: torch.nn.Module, before: dict[str, torch.Tensor]) -> set[str]:
    now = dict(module.named_parameters())
    return {n for n, old in before.items() if not torch.equal(now[n].detach(), old)}

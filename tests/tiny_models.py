"""Tiny, randomly initialised models of every supported family, built from configs (no downloads)."""

from __future__ import annotations

from collections.abc import Callable

import transformers as tf

TEXT = dict(vocab_size=99, hidden_size=32, num_attention_heads=2, intermediate_size=37, max_position_embeddings=64)


def _bert(**kw):
    return tf.BertForSequenceClassification(tf.BertConfig(num_hidden_layers=2, **TEXT, **kw))


def _roberta():
    return tf.RobertaForSequenceClassification(tf.RobertaConfig(num_hidden_layers=2, **TEXT))


def _xlmr():
    return tf.XLMRobertaForSequenceClassification(tf.XLMRobertaConfig(num_hidden_layers=2, **TEXT))


def _electra():
    cfg = tf.ElectraConfig(num_hidden_layers=2, embedding_size=16, **TEXT)
    return tf.ElectraForSequenceClassification(cfg)


def _distilbert():
    cfg = tf.DistilBertConfig(vocab_size=99, dim=32, n_layers=2, n_heads=2, hidden_dim=37, max_position_embeddings=64)
    return tf.DistilBertForSequenceClassification(cfg)


def _deberta():
    cfg = tf.DebertaV2Config(
        num_hidden_layers=2,
        relative_attention=True,
        position_buckets=8,
        norm_rel_ebd="layer_norm",
        pos_att_type=["p2c", "c2p"],
        **TEXT,
    )
    return tf.DebertaV2ForSequenceClassification(cfg)


def _albert():
    cfg = tf.AlbertConfig(num_hidden_layers=3, embedding_size=16, **TEXT)
    return tf.AlbertForSequenceClassification(cfg)


def _modernbert():
    cfg = tf.ModernBertConfig(
        vocab_size=99,
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=2,
        intermediate_size=37,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        cls_token_id=1,
        sep_token_id=2,
    )
    return tf.ModernBertForSequenceClassification(cfg)


VISION = dict(image_size=32, patch_size=8, num_channels=3, hidden_size=32, num_attention_heads=2, intermediate_size=37)


def _vit():
    return tf.ViTForImageClassification(tf.ViTConfig(num_hidden_layers=2, num_labels=3, **VISION))


def _deit():
    return tf.DeiTForImageClassification(tf.DeiTConfig(num_hidden_layers=2, num_labels=3, **VISION))


def _beit():
    cfg = tf.BeitConfig(
        num_hidden_layers=2, num_labels=3, use_relative_position_bias=True, layer_scale_init_value=0.1, **VISION
    )
    return tf.BeitForImageClassification(cfg)


def _dinov2():
    return tf.Dinov2ForImageClassification(
        tf.Dinov2Config(
            num_hidden_layers=2,
            num_labels=3,
            mlp_ratio=2,
            **{k: v for k, v in VISION.items() if k != "intermediate_size"},
        )
    )


def _swin():
    cfg = tf.SwinConfig(
        image_size=32, patch_size=4, embed_dim=8, depths=[2, 1, 2], num_heads=[1, 1, 2], window_size=2, num_labels=3
    )
    return tf.SwinForImageClassification(cfg)


def _convnext():
    cfg = tf.ConvNextConfig(hidden_sizes=[8, 16, 16], depths=[1, 2, 1], num_stages=3, num_labels=3, image_size=32)
    return tf.ConvNextForImageClassification(cfg)


def _clip():
    text = dict(
        vocab_size=99,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        max_position_embeddings=16,
    )
    vision = dict(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=37
    )
    return tf.CLIPModel(tf.CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))


DECODER = dict(
    vocab_size=99,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=37,
    max_position_embeddings=64,
    pad_token_id=0,
)


def _gpt2():
    cfg = tf.GPT2Config(vocab_size=99, n_embd=32, n_layer=2, n_head=2, n_positions=64, pad_token_id=0)
    return tf.GPT2ForSequenceClassification(cfg)


def _llama():
    return tf.LlamaForSequenceClassification(tf.LlamaConfig(num_key_value_heads=1, **DECODER))


def _qwen2():
    return tf.Qwen2ForSequenceClassification(tf.Qwen2Config(num_key_value_heads=1, **DECODER))


def _t5():
    cfg = tf.T5Config(
        vocab_size=99,
        d_model=32,
        d_kv=8,
        d_ff=37,
        num_layers=2,
        num_decoder_layers=3,
        num_heads=2,
        decoder_start_token_id=0,
    )
    return tf.T5ForConditionalGeneration(cfg)


def _bart():
    cfg = tf.BartConfig(
        vocab_size=99,
        d_model=32,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=37,
        decoder_ffn_dim=37,
        max_position_embeddings=64,
    )
    return tf.BartForSequenceClassification(cfg)


def _whisper():
    cfg = tf.WhisperConfig(
        vocab_size=99,
        d_model=32,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=37,
        decoder_ffn_dim=37,
        num_mel_bins=8,
        max_source_positions=16,
        max_target_positions=32,
        decoder_start_token_id=1,
        pad_token_id=0,
    )
    return tf.WhisperForConditionalGeneration(cfg)


FACTORIES: dict[str, Callable[[], tf.PreTrainedModel]] = {
    "bert": _bert,
    "roberta": _roberta,
    "xlm-roberta": _xlmr,
    "electra": _electra,
    "distilbert": _distilbert,
    "deberta-v2": _deberta,
    "albert": _albert,
    "modernbert": _modernbert,
    "vit": _vit,
    "deit": _deit,
    "beit": _beit,
    "dinov2": _dinov2,
    "swin": _swin,
    "convnext": _convnext,
    "clip": _clip,
    "gpt2": _gpt2,
    "llama": _llama,
    "qwen2": _qwen2,
    "t5": _t5,
    "bart": _bart,
    "whisper": _whisper,
}


def make(name: str) -> tf.PreTrainedModel:
    """Build the tiny model of family ``name`` with a fixed seed."""
    import torch

    torch.manual_seed(0)
    return FACTORIES[name]()

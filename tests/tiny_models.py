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


# Architectures whose data flow differs from their module registration order (issue 11).


def _opt():
    cfg = tf.OPTConfig(
        vocab_size=99,
        hidden_size=32,
        num_hidden_layers=2,
        ffn_dim=37,
        num_attention_heads=2,
        max_position_embeddings=64,
        word_embed_proj_dim=16,  # adds project_in / project_out
    )
    return tf.OPTForCausalLM(cfg)


def _swinv2():
    cfg = tf.Swinv2Config(
        image_size=32, patch_size=4, embed_dim=8, depths=[2, 1, 2], num_heads=[1, 1, 2], window_size=2, num_labels=3
    )
    return tf.Swinv2ForImageClassification(cfg)


# A 2-layer speech encoder behind a 2-layer conv feature extractor (Wav2Vec2, HuBERT, WavLM, ...).
AUDIO = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=37,
    conv_dim=(8, 8),
    conv_stride=(5, 4),
    conv_kernel=(10, 4),
    num_conv_pos_embeddings=16,
    num_conv_pos_embedding_groups=2,
)


def _wav2vec2(stable_layer_norm: bool):
    cfg = tf.Wav2Vec2Config(
        do_stable_layer_norm=stable_layer_norm,
        feat_extract_norm="layer" if stable_layer_norm else "group",
        classifier_proj_size=16,
        num_labels=3,
        **AUDIO,
    )
    return tf.Wav2Vec2ForSequenceClassification(cfg)


def _wavlm():
    return tf.WavLMModel(tf.WavLMConfig(num_buckets=8, **AUDIO))


SEQ2SEQ = dict(vocab_size=99, d_model=32, d_kv=8, d_ff=37, num_heads=2, decoder_start_token_id=0)


def _umt5():
    return tf.UMT5ForConditionalGeneration(tf.UMT5Config(num_layers=2, num_decoder_layers=3, **SEQ2SEQ))


def _longt5_tglobal():
    cfg = tf.LongT5Config(num_layers=2, num_decoder_layers=2, encoder_attention_type="transient-global", **SEQ2SEQ)
    return tf.LongT5Model(cfg)


def _deepseek_v3():
    """Block 0 alone has a dense MLP (``first_k_dense_replace=1``), the others mixtures of experts."""
    cfg = tf.DeepseekV3Config(
        num_hidden_layers=3,
        num_key_value_heads=2,
        moe_intermediate_size=16,
        n_routed_experts=4,
        num_experts_per_tok=2,
        n_group=1,
        topk_group=1,
        first_k_dense_replace=1,
        q_lora_rank=16,
        kv_lora_rank=16,
        qk_rope_head_dim=8,
        qk_nope_head_dim=8,
        v_head_dim=8,
        **TEXT,
    )
    return tf.DeepseekV3ForCausalLM(cfg)


def _xlm():
    cfg = tf.XLMConfig(vocab_size=99, emb_dim=32, n_layers=3, n_heads=2, max_position_embeddings=64, num_labels=3)
    return tf.XLMForSequenceClassification(cfg)


# Two stages of 1 and 2 blocks, each opened by a patch embedding (PoolFormer, SegFormer).
STAGES = dict(
    image_size=32, num_encoder_blocks=2, depths=[1, 2], hidden_sizes=[8, 16], patch_sizes=[3, 3], strides=[2, 2]
)


def _poolformer():
    cfg = tf.PoolFormerConfig(padding=[1, 1], mlp_ratio=2.0, num_labels=3, **STAGES)
    return tf.PoolFormerForImageClassification(cfg)


def _segformer():
    cfg = tf.SegformerConfig(
        sr_ratios=[2, 1], num_attention_heads=[1, 2], mlp_ratios=[2, 2], decoder_hidden_size=16, num_labels=3, **STAGES
    )
    return tf.SegformerForSemanticSegmentation(cfg)


def _vit_mae():
    cfg = tf.ViTMAEConfig(
        decoder_hidden_size=16,
        decoder_num_hidden_layers=3,
        decoder_num_attention_heads=2,
        decoder_intermediate_size=20,
        num_hidden_layers=2,
        **VISION,
    )
    return tf.ViTMAEForPreTraining(cfg)


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
    "opt": _opt,
    "swinv2": _swinv2,
    "wav2vec2": lambda: _wav2vec2(stable_layer_norm=False),
    "wav2vec2-stable": lambda: _wav2vec2(stable_layer_norm=True),
    "umt5": _umt5,
    "xlm": _xlm,
    "poolformer": _poolformer,
    "segformer": _segformer,
    "vit-mae": _vit_mae,
    "wavlm": _wavlm,
    "longt5-tglobal": _longt5_tglobal,
    "deepseek-v3": _deepseek_v3,
}


def make(name: str) -> tf.PreTrainedModel:
    """Build the tiny model of family ``name`` with a fixed seed."""
    import torch

    torch.manual_seed(0)
    return FACTORIES[name]()

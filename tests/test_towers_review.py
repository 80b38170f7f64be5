"""Review of issue 20 on families its tests did not cover: depths that are wrong against the forward code.

Each expectation is written by hand from transformers 5.25 (``transformers/models/<family>/``), never from
llrd's output. Strict xfails: each must start passing (and then lose its mark) when the defect is fixed.
"""

from __future__ import annotations

import pytest
import transformers as tf

from llrd import layer_ids, param_groups

LR, DECAY = 1e-3, 0.5


def _rt_detr(decoder_layers: int) -> tf.RTDetrForObjectDetection:
    """Tiny RT-DETR with the default's shape: 3 feature levels, so the hybrid encoder builds
    len(encoder_in_channels) - 1 = 2 lateral convs, FPN blocks, downsample convs and PAN blocks each."""
    cfg = tf.RTDetrConfig(
        backbone_config=dict(
            model_type="rt_detr_resnet",
            embedding_size=8,
            hidden_sizes=[8, 16, 24, 32],
            depths=[1, 1, 1, 1],
            out_features=["stage2", "stage3", "stage4"],
        ),
        encoder_hidden_dim=16,
        encoder_in_channels=[16, 24, 32],
        d_model=16,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        encoder_layers=1,
        decoder_layers=decoder_layers,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        decoder_in_channels=[16, 16, 16],
        num_queries=5,
        num_labels=3,
    )
    return tf.RTDetrForObjectDetection(cfg)


# Coincidences the rule must not take (review 20b): decoder_layers=6 is RT-DETR's default, and 2 FPN + 2
# downsample + 2 PAN lists also sum to 6 (fewer lists win); with decoder_layers=3 the 3 input projections have
# the count too, and with decoder_layers=2 the FPN, PAN, lateral and downsampling lists each do (the lists that
# grow with decoder_layers win, blocks.grown_lists).
@pytest.mark.parametrize("decoder_layers", [6, 3, 2])
def test_rt_detr_decoder_layers_are_a_stack(decoder_layers):
    # modeling_rt_detr.py (5.25): RTDetrDecoder.__init__ l. 1197 builds
    #   self.layers = nn.ModuleList([RTDetrDecoderLayer(config) for _ in range(config.decoder_layers)])
    # and RTDetrDecoder.forward l. 1250 runs them in order (`for idx, decoder_layer in enumerate(self.layers)`),
    # after the hybrid encoder (RTDetrModel.forward l. 1603) and the encoder heads (enc_score_head, l. 1680).
    # So model.decoder.layers.{i} is block i of a stack of decoder_layers blocks: depth i + 1, rate
    # LR * DECAY ** (decoder_layers - i).
    model = _rt_detr(decoder_layers)
    lm = layer_ids(model)
    assert lm.source == "flow", lm.note
    name = "model.decoder.layers.{}.mlp.fc1.weight"
    stacks = {lm.info(name.format(i)).stack for i in range(decoder_layers)}
    assert len(stacks) == 1, stacks
    stack = lm.stacks[stacks.pop()]
    assert stack.blocks == tuple(f"model.decoder.layers.{i}" for i in range(decoder_layers)), stack.blocks
    lr_of = {n: g["lr"] for g in param_groups(model, lr=LR, layer_decay=DECAY, layer_map=lm) for n in g["param_names"]}
    for i in range(decoder_layers):
        assert lm[name.format(i)] == i + 1, lm.info(name.format(i)).reason
        assert lr_of[name.format(i)] == LR * DECAY ** (decoder_layers - i)


def test_grown_lists_are_the_lists_a_count_builds_and_nothing_when_the_class_refuses():
    # RT-DETR at decoder_layers=2: a twin with decoder_layers=3 grows model.decoder.layers (and the per-layer heads
    # the decoder builds with it: modeling_rt_detr.py l. 1197 and its class_embed / bbox_embed lists),
    # never the FPN/PAN lists, whose length is len(encoder_in_channels) - 1
    from llrd.blocks import grown_lists
    from llrd.discovery import _rebuilt_modules

    model = _rt_detr(2)
    modules = dict(model.named_modules())
    grown = grown_lists(modules, model.config, model.config, lambda cfg: _rebuilt_modules(type(model), cfg))
    assert "model.decoder.layers" in grown
    assert not grown & {f"model.encoder.{n}" for n in ("fpn_blocks", "pan_blocks", "lateral_convs", "downsample_convs")}

    def refuse(cfg):
        raise ValueError("this class validates its config")

    assert grown_lists(modules, model.config, model.config, refuse) == set()

"""Every parameter of every supported family gets the depth and the exact learning rate of the convention.

The expected depths below are written by hand from the model's documented structure, independently of
the library: a list of (regex, stack, depth) rules per family, first match wins, and every parameter must
match a rule. ``"b"`` means "block index + 1" from the regex's groups.
"""

from __future__ import annotations

import re

import pytest
import tiny_models

from llrd import layer_ids, param_groups

LR, DECAY = 1e-3, 0.5  # powers of 0.5 are exact in binary: exact float comparisons below


def swin_depth(match: re.Match) -> int:
    depths = [2, 1, 2]
    stage, block = int(match[1]), int(match[2])
    return sum(depths[:stage]) + block + 1


def convnext_depth(match: re.Match) -> int:
    depths = [1, 2, 1]
    stage, block = int(match[1]), int(match[2])
    return sum(depths[:stage]) + block + 1


S = "single"
EXPECTED: dict[str, tuple[dict[str, int], list[tuple[str, str, object]]]] = {
    "bert": (
        {S: 2},
        [
            (r"^bert\.embeddings\.", S, 0),
            (r"^bert\.encoder\.layer\.(\d+)\.", S, "b"),
            (r"^(bert\.pooler|classifier)\.", S, "h"),
        ],
    ),
    "roberta": (
        {S: 2},
        [(r"^roberta\.embeddings\.", S, 0), (r"^roberta\.encoder\.layer\.(\d+)\.", S, "b"), (r"^classifier\.", S, "h")],
    ),
    "xlm-roberta": (
        {S: 2},
        [(r"^roberta\.embeddings\.", S, 0), (r"^roberta\.encoder\.layer\.(\d+)\.", S, "b"), (r"^classifier\.", S, "h")],
    ),
    "electra": (
        {S: 2},
        [
            (r"^electra\.embeddings(_project)?\.", S, 0),
            (r"^electra\.encoder\.layer\.(\d+)\.", S, "b"),
            (r"^classifier\.", S, "h"),
        ],
    ),
    "distilbert": (
        {S: 2},
        [
            (r"^distilbert\.embeddings\.", S, 0),
            (r"^distilbert\.transformer\.layer\.(\d+)\.", S, "b"),
            (r"^(pre_classifier|classifier)\.", S, "h"),
        ],
    ),
    "deberta-v2": (
        {S: 2},
        [
            (r"^deberta\.embeddings\.", S, 0),
            (r"^deberta\.encoder\.(rel_embeddings|LayerNorm)\.", S, 0),
            (r"^deberta\.encoder\.layer\.(\d+)\.", S, "b"),
            (r"^(pooler|classifier)\.", S, "h"),
        ],
    ),
    # one stored layer reused 3 times: one block
    "albert": (
        {S: 1},
        [
            (r"^albert\.(embeddings|encoder\.embedding_hidden_mapping_in)\.", S, 0),
            (r"^albert\.encoder\.albert_layer_groups\.0\.albert_layers\.(\d+)\.", S, "b"),
            (r"^(albert\.pooler|classifier)\.", S, "h"),
        ],
    ),
    "modernbert": (
        {S: 3},
        [
            (r"^model\.embeddings\.", S, 0),
            (r"^model\.layers\.(\d+)\.", S, "b"),
            (r"^(model\.final_norm|head|classifier)\.", S, "h"),
        ],
    ),
    "vit": (
        {S: 2},
        [
            (r"^vit\.embeddings\.", S, 0),
            (r"^vit\.layers\.(\d+)\.", S, "b"),
            (r"^(vit\.layernorm|classifier)\.", S, "h"),
        ],
    ),
    "deit": (
        {S: 2},
        [
            (r"^deit\.embeddings\.", S, 0),
            (r"^deit\.layers\.(\d+)\.", S, "b"),
            (r"^(deit\.layernorm|classifier)\.", S, "h"),
        ],
    ),
    "beit": (
        {S: 2},
        [
            (r"^beit\.embeddings\.", S, 0),
            (r"^beit\.layers\.(\d+)\.", S, "b"),
            (r"^(beit\.pooler|classifier)\.", S, "h"),
        ],
    ),
    "dinov2": (
        {S: 2},
        [
            (r"^dinov2\.embeddings\.", S, 0),
            (r"^dinov2\.encoder\.layer\.(\d+)\.", S, "b"),
            (r"^(dinov2\.layernorm|classifier)\.", S, "h"),
        ],
    ),
    "swin": (
        {S: 5},
        [
            (r"^swin\.embeddings\.", S, 0),
            (r"^swin\.encoder\.layers\.(\d+)\.blocks\.(\d+)\.", S, swin_depth),
            (r"^swin\.encoder\.layers\.(\d+)\.downsample\.", S, None),
            (r"^(swin\.layernorm|classifier)\.", S, "h"),
        ],
    ),
    "convnext": (
        {S: 4},
        [
            (r"^convnext\.embeddings\.", S, 0),
            (r"^convnext\.encoder\.stages\.(\d+)\.layers\.(\d+)\.", S, convnext_depth),
            (r"^convnext\.encoder\.stages\.(\d+)\.downsampling_layer\.", S, None),
            (r"^(convnext\.layernorm|classifier)\.", S, "h"),
        ],
    ),
    "clip": (
        {"text_model": 2, "vision_model": 3},
        [
            (r"^text_model\.embeddings\.", "text_model", 0),
            (r"^text_model\.encoder\.layers\.(\d+)\.", "text_model", "b"),
            (r"^(text_model\.final_layer_norm|text_projection)\.", "text_model", "h"),
            (r"^vision_model\.(embeddings|pre_layrnorm)\.", "vision_model", 0),
            (r"^vision_model\.encoder\.layers\.(\d+)\.", "vision_model", "b"),
            (r"^(vision_model\.post_layernorm\.|visual_projection\.)", "vision_model", "h"),
            # CLIPModel.forward (modeling_clip.py 5.25, l. 783-805) runs get_image_features, then
            # get_text_features, then scales the logits by logit_scale: used after the text tower, which ran last
            (r"^logit_scale$", "text_model", "h"),
        ],
    ),
    "gpt2": (
        {S: 2},
        [
            (r"^transformer\.(wte|wpe)\.", S, 0),
            (r"^transformer\.h\.(\d+)\.", S, "b"),
            (r"^(transformer\.ln_f|score)\.", S, "h"),
        ],
    ),
    "llama": (
        {S: 2},
        [(r"^model\.embed_tokens\.", S, 0), (r"^model\.layers\.(\d+)\.", S, "b"), (r"^(model\.norm|score)\.", S, "h")],
    ),
    "qwen2": (
        {S: 2},
        [(r"^model\.embed_tokens\.", S, 0), (r"^model\.layers\.(\d+)\.", S, "b"), (r"^(model\.norm|score)\.", S, "h")],
    ),
    # encoder and decoder: independent stacks; the shared (tied) embedding appears once, in the encoder's stem;
    # T5's relative-position table lives in block 0 but serves every block: stem.
    "t5": (
        {"encoder": 2, "decoder": 3},
        [
            (r"^shared\.", "encoder", 0),
            (r"^encoder\.block\.0\..*relative_attention_bias\.", "encoder", 0),
            (r"^encoder\.block\.(\d+)\.", "encoder", "b"),
            (r"^encoder\.final_layer_norm\.", "encoder", "h"),
            (r"^decoder\.block\.0\..*relative_attention_bias\.", "decoder", 0),
            (r"^decoder\.block\.(\d+)\.", "decoder", "b"),
            (r"^decoder\.final_layer_norm\.", "decoder", "h"),
        ],
    ),
    "bart": (
        {"encoder": 2, "decoder": 2},
        [
            (r"^model\.shared\.", "encoder", 0),
            (r"^model\.encoder\.(embed_positions|layernorm_embedding)\.", "encoder", 0),
            (r"^model\.encoder\.layers\.(\d+)\.", "encoder", "b"),
            (r"^model\.decoder\.(embed_positions|layernorm_embedding)\.", "decoder", 0),
            (r"^model\.decoder\.layers\.(\d+)\.", "decoder", "b"),
            (r"^classification_head\.", "decoder", "h"),
        ],
    ),
    "whisper": (
        {"encoder": 2, "decoder": 2},
        [
            (r"^model\.encoder\.(conv1|conv2|embed_positions)\.", "encoder", 0),
            (r"^model\.encoder\.layers\.(\d+)\.", "encoder", "b"),
            (r"^model\.encoder\.layer_norm\.", "encoder", "h"),
            (r"^model\.decoder\.(embed_tokens|embed_positions)\.", "decoder", 0),
            (r"^model\.decoder\.layers\.(\d+)\.", "decoder", "b"),
            (r"^model\.decoder\.layer_norm\.", "decoder", "h"),
        ],
    ),
}


def stage_depth(depths: list[int]):
    """Depth of block ``b`` of stage ``s`` (``match[1]``, ``match[2]``) when blocks are counted across stages."""
    return lambda m: sum(depths[: int(m[1])]) + int(m[2]) + 1


def stage_entry(depths: list[int]):
    """Depth of what runs at the start of stage ``s`` (``match[1]``): its first block's, or the stem for stage 0."""
    return lambda m: sum(depths[: int(m[1])]) + 1 if int(m[1]) else 0


def stage_exit(depths: list[int]):
    """Depth of what runs at the end of stage ``s``: the next stage's first block, or the head after the last."""
    return lambda m: sum(depths[: int(m[1]) + 1]) + 1


# Architectures whose data flow differs from the order their modules are registered in: each expectation
# below follows the forward pass as the model's code is written (issue 11).
FLOW_EXPECTED: dict[str, tuple[dict[str, int], list[tuple[str, str, object]]]] = {
    # final_layer_norm and project_out are registered before `layers` but run after them
    "opt": (
        {S: 2},
        [
            (r"^model\.decoder\.(embed_tokens|embed_positions|project_in)\.", S, 0),
            (r"^model\.decoder\.layers\.(\d+)\.", S, "b"),
            (r"^model\.decoder\.(final_layer_norm|project_out)\.", S, "h"),
        ],
    ),
    # transformers marks the stage as the checkpointing layer; the blocks inside it are the 5 layers
    "swinv2": (
        {S: 5},
        [
            (r"^swinv2\.embeddings\.", S, 0),
            (r"^swinv2\.encoder\.layers\.(\d+)\.blocks\.(\d+)\.", S, stage_depth([2, 1, 2])),
            (r"^swinv2\.encoder\.layers\.(\d+)\.downsample\.", S, stage_exit([2, 1, 2])),
            (r"^(swinv2\.layernorm|classifier)\.", S, "h"),
        ],
    ),
    # the conv feature extractor is the stem, not a stack; post-LN: the encoder norm runs before the layers
    "wav2vec2": (
        {S: 2},
        [
            (r"^wav2vec2\.(masked_spec_embed$|feature_extractor\.|feature_projection\.)", S, 0),
            (r"^wav2vec2\.encoder\.(pos_conv_embed|layer_norm)\.", S, 0),
            (r"^wav2vec2\.encoder\.layers\.(\d+)\.", S, "b"),
            (r"^(projector|classifier)\.", S, "h"),
        ],
    ),
    # pre-LN (do_stable_layer_norm): the encoder norm runs after the layers
    "wav2vec2-stable": (
        {S: 2},
        [
            (r"^wav2vec2\.(masked_spec_embed$|feature_extractor\.|feature_projection\.)", S, 0),
            (r"^wav2vec2\.encoder\.pos_conv_embed\.", S, 0),
            (r"^wav2vec2\.encoder\.layers\.(\d+)\.", S, "b"),
            (r"^(wav2vec2\.encoder\.layer_norm|projector|classifier)\.", S, "h"),
        ],
    ),
    # every block has its own relative_attention_bias: per block, unlike T5's shared one
    "umt5": (
        {"encoder": 2, "decoder": 3},
        [
            (r"^shared\.", "encoder", 0),
            (r"^encoder\.block\.(\d+)\.", "encoder", "b"),
            (r"^encoder\.final_layer_norm\.", "encoder", "h"),
            (r"^decoder\.block\.(\d+)\.", "decoder", "b"),
            (r"^decoder\.final_layer_norm\.", "decoder", "h"),
        ],
    ),
    # four parallel lists, visited index by index: one stack of 3 blocks
    "xlm": (
        {S: 3},
        [
            (r"^transformer\.(position_embeddings|embeddings|layer_norm_emb)\.", S, 0),
            (r"^transformer\.(?:attentions|layer_norm1|ffns|layer_norm2)\.(\d+)\.", S, "b"),
            (r"^sequence_summary\.", S, "h"),
        ],
    ),
    # the list of patch embeddings runs stage by stage, each before its stage's blocks
    "poolformer": (
        {S: 3},
        [
            (r"^poolformer\.encoder\.patch_embeddings\.(\d+)\.", S, stage_entry([1, 2])),
            (r"^poolformer\.encoder\.block\.(\d+)\.(\d+)\.", S, stage_depth([1, 2])),
            (r"^(norm|classifier)\.", S, "h"),
        ],
    ),
    # a stage's patch embedding feeds its first block; the stage's closing norm feeds the next stage
    "segformer": (
        {S: 3},
        [
            (r"^segformer\.stages\.(\d+)\.patch_embeddings\.", S, stage_entry([1, 2])),
            (r"^segformer\.stages\.(\d+)\.blocks\.(\d+)\.", S, stage_depth([1, 2])),
            (r"^segformer\.stages\.(\d+)\.layer_norm\.", S, stage_exit([1, 2])),
            (r"^decode_head\.", S, "h"),
        ],
    ),
    # the pre-training decoder is its own stack: its mask token, position table and input projection are its stem
    "vit-mae": (
        {"vit.layers": 2, "decoder.decoder_layers": 3},
        [
            (r"^vit\.embeddings\.", "vit.layers", 0),
            (r"^vit\.layers\.(\d+)\.", "vit.layers", "b"),
            (r"^vit\.layernorm\.", "vit.layers", "h"),
            (r"^decoder\.(mask_token$|decoder_pos_embed$|decoder_embed\.)", "decoder.decoder_layers", 0),
            (r"^decoder\.decoder_layers\.(\d+)\.", "decoder.decoder_layers", "b"),
            (r"^decoder\.(decoder_norm|decoder_pred)\.", "decoder.decoder_layers", "h"),
        ],
    ),
}

# downsampling layers: Swin stage s (patch merging at its end) feeds stage s+1; ConvNeXt stage s starts with it.
DOWNSAMPLE = {
    "swin": lambda m: sum([2, 1, 2][: int(m[1]) + 1]) + 1,
    "convnext": lambda m: sum([1, 2, 1][: int(m[1])]) + 1,
}


# Families whose boundaries the module tree alone cannot see (names no longer decide): DeBERTa-v2 registers
# rel_embeddings and LayerNorm after its layer list but uses them before block 0; BART registers
# layernorm_embedding after its layers; CLIP's projections sit on the root beside both towers. The trace places
# them (the flow rows above); without one, registration order does.
TREE_BLIND = {"deberta-v2", "bart", "clip"}


def expected_depths(family: str, names: list[str]) -> dict[str, tuple[str, int]]:
    counts, rules = {**EXPECTED, **FLOW_EXPECTED}[family]
    out = {}
    for name in names:
        for pattern, stack, depth in rules:
            m = re.search(pattern, name)
            if m is None:
                continue
            num_layers = counts[stack]
            if depth == "h":
                value = num_layers + 1
            elif depth == "b":
                value = int(m[1]) + 1
            elif depth is None:
                value = DOWNSAMPLE[family](m)
            elif callable(depth):
                value = depth(m)
            else:
                value = depth
            out[name] = (stack, value)
            break
        else:
            raise AssertionError(f"{family}: no expectation covers parameter {name!r}")
    return out


@pytest.mark.parametrize(
    "family,source",
    [(f, "flow") for f in [*EXPECTED, *FLOW_EXPECTED]] + [(f, "structure") for f in EXPECTED if f not in TREE_BLIND],
)
def test_depth_and_exact_lr_of_every_parameter(family, source):
    """Data-flow depths for every family; the module tree alone gives the same depths where it can see them."""
    model = tiny_models.make(family)
    names = [n for n, _ in model.named_parameters()]
    expected = expected_depths(family, names)
    counts = {**EXPECTED, **FLOW_EXPECTED}[family][0]

    lm = layer_ids(model, depth_source=source)
    assert lm.source == source, lm.note  # traced, not a silent fallback
    stack_alias = {S: next(iter(lm.stacks))} if S in counts else {s: s for s in counts}
    assert {stack_alias[s]: n for s, n in counts.items()} == {s.name: s.num_layers for s in lm.stacks.values()}
    for name in names:
        stack, depth = expected[name]
        assert (lm.info(name).stack, lm[name]) == (stack_alias[stack], depth), name

    groups = param_groups(model, lr=LR, layer_decay=DECAY, weight_decay=0.01, depth_source=source)
    lr_of = {n: g["lr"] for g in groups for n in g["param_names"]}
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert sorted(lr_of) == sorted(trainable)  # every trainable parameter exactly once, frozen ones in none
    assert sum(len(g["params"]) for g in groups) == len(trainable)
    for name in trainable:
        stack, depth = expected[name]
        assert lr_of[name] == LR * DECAY ** (counts[stack] + 1 - depth), name
    # head first, no empty group, one group per (stack, depth, decay) bucket
    assert groups[0]["lr"] == LR and all(g["params"] for g in groups)
    buckets = {(g["stack"], g["layer_id"], g["weight_decay"] > 0) for g in groups}
    assert len(buckets) == len(groups)


def test_tied_embeddings_appear_once():
    import transformers as tf

    model = tf.BertForMaskedLM(tf.BertConfig(num_hidden_layers=2, **tiny_models.TEXT))
    assert model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight
    groups = param_groups(model, lr=LR, layer_decay=DECAY)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    lr_of = {n: g["lr"] for g in groups for n in g["param_names"]}
    # policy: a tied tensor takes the depth of its first name, the input embedding
    assert lr_of["bert.embeddings.word_embeddings.weight"] == LR * DECAY**3
    assert "cls.predictions.decoder.weight" not in lr_of

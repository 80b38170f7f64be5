"""Fine-tune an image classifier (ViT, DeiT, BEiT, Swin, ConvNeXt, DINOv2, ...) with layer-wise lr decay.

    python recipes/image_classification.py recipes/configs/vit_base_imagefolder.yaml
    accelerate launch --config_file recipes/accelerate/ddp_bf16.yaml recipes/image_classification.py \
        --model_name_or_path google/vit-base-patch16-224-in21k --train_dir imgs/train --validation_dir imgs/val \
        --output_dir out --layer_decay 0.65 --learning_rate 1e-3

Flags follow transformers' run_image_classification.py (image folders: one sub-folder per class), plus every
LLRDTrainingArguments flag. Needs Pillow (torchvision optional).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import torch
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
from transformers import AutoImageProcessor, AutoModelForImageClassification, HfArgumentParser, set_seed

from llrd import LLRDTrainer, LLRDTrainingArguments
from llrd.checkpoints import resolve_checkpoint

logger = logging.getLogger("llrd.recipes.image")


@dataclass
class DataArguments:
    dataset_name: str | None = field(default=None, metadata={"help": "Hub dataset, used when no folder is given."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "Configuration of the Hub dataset."})
    train_dir: str | None = field(default=None, metadata={"help": "Image folder: one sub-folder per class."})
    validation_dir: str | None = field(default=None, metadata={"help": "Image folder for evaluation."})
    test_dir: str | None = field(default=None, metadata={"help": "Image folder for the final test."})
    image_column_name: str = field(default="image", metadata={"help": "Column holding the images."})
    label_column_name: str = field(
        default="label", metadata={"help": "Column holding the labels: a ClassLabel, or ints/strings (classes)."}
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N training images."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use only the first N eval/test images."})


def load_splits(data: DataArguments):
    from datasets import load_dataset

    dirs = {
        s: d for s, d in (("train", data.train_dir), ("validation", data.validation_dir), ("test", data.test_dir)) if d
    }
    missing = [d for d in dirs.values() if not os.path.isdir(d)]
    if dirs and not missing:
        return load_dataset("imagefolder", data_files={s: os.path.join(d, "**") for s, d in dirs.items()})
    if data.dataset_name:
        try:
            return load_dataset(data.dataset_name, data.dataset_config_name)
        except Exception as err:  # noqa: BLE001 - any failure to reach the Hub ends here
            stop(
                f"cannot load Hub dataset {data.dataset_name!r} ({type(err).__name__}); pass --train_dir/"
                "--validation_dir image folders (one sub-folder per class)."
            )
    stop(f"image folders not found: {missing or 'none given'}; pass --train_dir/--validation_dir/--test_dir.")


def class_names(raw, label_col: str) -> tuple[list[str], dict[str, int] | None]:
    """The class names, and how to map label values to ids: a ``ClassLabel`` (image folders, most Hub datasets)
    brings its names and ids; any other column (ints, strings) gets names from its values, as in the text
    recipe, and a mapping from ``str(value)`` to id (``None`` for a ClassLabel, whose values are the ids)."""
    from datasets import ClassLabel

    feature = raw["train"].features[label_col]
    if isinstance(feature, ClassLabel):
        return list(feature.names), None
    names = label_names(raw["train"][label_col])
    check_labels(raw, label_col, names)
    return names, {name: i for i, name in enumerate(names)}


@user_errors
def main():
    parser = HfArgumentParser((ModelArguments, DataArguments, LLRDTrainingArguments))
    model_args, data_args, args = parse(parser)
    setup_logging(args)
    set_seed(args.seed)  # before the model is built: the new head's initialisation depends on it

    raw = load_splits(data_args)
    if "train" not in raw:
        stop("no training split: pass --train_dir or a --dataset_name with a train split.")
    image_col, label_col = data_args.image_column_name, data_args.label_column_name
    for col, flag in ((image_col, "--image_column_name"), (label_col, "--label_column_name")):
        if col not in raw["train"].column_names:
            stop(f"{flag}={col!r} is not a column of the training data ({raw['train'].column_names}).")
    names, label2id = class_names(raw, label_col)

    path = resolve_checkpoint(model_args.model_name_or_path)
    config = label_config(path, names, model_args, "ForImageClassification")
    processor = AutoImageProcessor.from_pretrained(path, trust_remote_code=model_args.trust_remote_code)
    model = load_model(
        AutoModelForImageClassification,
        path,
        config=config,
        ignore_mismatched_sizes=model_args.ignore_mismatched_sizes,
        trust_remote_code=model_args.trust_remote_code,
        distributed_config=model_args.distributed_config(),
    )

    def transform(batch):
        images = [im.convert("RGB") for im in batch[image_col]]
        labels = batch[label_col] if label2id is None else [label2id[str(v)] for v in batch[label_col]]
        return {"pixel_values": processor(images, return_tensors="pt")["pixel_values"], "labels": labels}

    def prepare(split, limit):
        if split not in raw:
            return None
        ds = raw[split] if limit is None else raw[split].select(range(min(limit, len(raw[split]))))
        return ds.with_transform(transform)

    def collate(rows):
        return {
            "pixel_values": torch.stack([r["pixel_values"] for r in rows]),
            "labels": torch.tensor([r["labels"] for r in rows]),
        }

    args.remove_unused_columns = False  # the transform needs the image column
    train = prepare("train", data_args.max_train_samples)
    validation = prepare("validation", data_args.max_eval_samples)
    test = prepare("test", data_args.max_eval_samples)
    trainer = LLRDTrainer(
        model=model,
        args=args,
        train_dataset=train,
        eval_dataset=validation,
        processing_class=processor,
        data_collator=collate,
        compute_metrics=metrics_fn(len(names)),
    )
    result = trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    trainer.save_metrics("train", result.metrics)
    finish(trainer, {"eval": validation, "test": test})


if __name__ == "__main__":
    main()

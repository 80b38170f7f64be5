"""Fine-tune an image classifier (ViT, DeiT, BEiT, Swin, ConvNeXt, DINOv2, ...) with layer-wise lr decay.

    python recipes/image_classification.py recipes/configs/vit_base_imagefolder.yaml
    accelerate launch --config_file recipes/accelerate/ddp_bf16.yaml recipes/image_classification.py \
        --model_name_or_path google/vit-base-patch16-224-in21k --train_dir imgs/train --validation_dir imgs/val \
        --output_dir out --layer_decay 0.65 --learning_rate 1e-3

Flags follow transformers' run_image_classification.py (image folders: one sub-folder per class), plus every
LLRDTrainingArguments flag. Needs Pillow (torchvision optional).
"""

from __future__ import annotations

import inspect
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import fashion_mnist
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
    dataset_name: str | None = field(
        default=None,
        metadata={"help": "Hub dataset (e.g. zalando-datasets/fashion_mnist), used when no local data is there."},
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "Configuration of the Hub dataset."})
    train_file: str | None = field(
        default=None,
        metadata={
            "help": "CSV with an image path column and a label column (what `python recipes/fashion_mnist.py` "
            "writes and `llrd sweep` samples); relative image paths are relative to the CSV's folder."
        },
    )
    validation_file: str | None = field(default=None, metadata={"help": "CSV for evaluation, as --train_file."})
    test_file: str | None = field(default=None, metadata={"help": "CSV for the final test, as --train_file."})
    train_dir: str | None = field(default=None, metadata={"help": "Image folder: one sub-folder per class."})
    validation_dir: str | None = field(default=None, metadata={"help": "Image folder for evaluation."})
    test_dir: str | None = field(default=None, metadata={"help": "Image folder for the final test."})
    fashion_mnist_dir: str | None = field(
        default=None,
        metadata={
            "help": "Folder with Fashion-MNIST's four gzipped IDX files (train/t10k images and labels); when it "
            "holds none of them, --dataset_name is tried."
        },
    )
    image_column_name: str = field(default="image", metadata={"help": "Column holding the images."})
    label_column_name: str = field(
        default="label", metadata={"help": "Column holding the labels: a ClassLabel, or ints/strings (classes)."}
    )
    class_names: list[str] | None = field(
        default=None,
        metadata={
            "help": "All class names, in id order, for a label column of plain strings (CSV files): a sampled "
            "training file may lack a class. Default: the training labels' values, sorted."
        },
    )
    validation_split_size: int | None = field(
        default=None,
        metadata={
            "help": "When the data has no validation split: hold out the LAST N training images as one (the "
            "first --max_train_samples of the rest train)."
        },
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N training images."})
    max_eval_samples: int | None = field(
        default=None,
        metadata={"help": "Use only the first N validation images (and test images, unless --max_test_samples)."},
    )
    max_test_samples: int | None = field(default=None, metadata={"help": "Use only the first N test images."})


@dataclass
class VisionArguments:
    image_size: int | None = field(
        default=None,
        metadata={
            "help": "Resize (shortest edge) and centre-crop to N x N, overriding the processor's size. N must be a "
            "multiple of the patch size; position embeddings are interpolated (DINOv2 does it itself; ViT, DeiT, "
            "BEiT, Swin ... get interpolate_pos_encoding=True). Models with fixed-size inputs are refused."
        },
    )
    random_init: bool = field(
        default=False,
        metadata={"help": "Train the checkpoint's architecture from random weights (a baseline for pre-training)."},
    )


def split_rows(n: int, validation_size: int | None, max_train: int | None) -> tuple[range, range | None]:
    """(training rows, validation rows) of an ``n``-row training split: validation = the last ``validation_size``
    rows, training = the first ``max_train`` of the others; never overlapping.

    Example:
        >>> split_rows(60000, 500, 1000)
        (range(0, 1000), range(59500, 60000))
    """
    if validation_size is not None and not 0 < validation_size < n:
        stop(f"--validation_split_size={validation_size}: the training split has {n} rows; pass 1 to {n - 1}.")
    rest = n - (validation_size or 0)
    train = range(min(rest, max_train) if max_train is not None else rest)
    return train, (range(rest, n) if validation_size else None)


def load_csv_splits(data: DataArguments):
    """``{split: Dataset}`` from image,label CSV files; the image column becomes an ``Image`` feature (decoded on
    access) of paths that must exist (relative ones are relative to their CSV's folder)."""
    from datasets import Image, load_dataset

    files = {
        s: f
        for s, f in (("train", data.train_file), ("validation", data.validation_file), ("test", data.test_file))
        if f
    }
    for split, path in files.items():
        if not os.path.isfile(path):
            stop(f"--{split}_file={path!r} not found.")
    raw = load_dataset("csv", data_files=files)
    col = data.image_column_name
    for split, path in files.items():
        if col not in raw[split].column_names:
            stop(f"--image_column_name={col!r} is not a column of {path} ({raw[split].column_names}).")
        folder = os.path.dirname(os.path.abspath(path))
        paths = [p if os.path.isabs(p) else os.path.join(folder, p) for p in raw[split][col]]
        lost = next((p for p in paths if not os.path.isfile(p)), None)
        if lost:
            stop(
                f"{path}, line {paths.index(lost) + 2}: image {lost!r} not found (relative image paths are "
                "relative to the CSV's folder)."
            )
        raw[split] = raw[split].remove_columns(col).add_column(col, paths).cast_column(col, Image())
    return raw


def load_splits(data: DataArguments):
    """The splits, from the first source that is there: CSV files, image folders, Fashion-MNIST's IDX files,
    the Hub dataset; one ``error:`` line naming what was looked for when none is."""
    from datasets import load_dataset

    if data.train_file or data.validation_file or data.test_file:
        if not data.train_file:
            stop("--validation_file/--test_file need a --train_file (CSV with image and label columns).")
        return select(load_csv_splits(data), data)
    dirs = {
        s: d for s, d in (("train", data.train_dir), ("validation", data.validation_dir), ("test", data.test_dir)) if d
    }
    missing = [d for d in dirs.values() if not os.path.isdir(d)]
    if dirs and not missing:
        return select(load_dataset("imagefolder", data_files={s: os.path.join(d, "**") for s, d in dirs.items()}), data)
    looked = [f"image folders {missing}"] if dirs else []
    if data.fashion_mnist_dir:
        lacking = fashion_mnist.missing_files(data.fashion_mnist_dir)
        if not lacking:
            return load_fashion_mnist(data)
        if len(lacking) < 4:
            stop(
                f"--fashion_mnist_dir={data.fashion_mnist_dir!r} lacks {', '.join(lacking)}; put all four IDX "
                "files there."
            )
        looked.append(f"Fashion-MNIST IDX files in {data.fashion_mnist_dir}")
    if data.dataset_name:
        try:
            raw = load_dataset(data.dataset_name, data.dataset_config_name)
        except Exception as err:  # noqa: BLE001 - any failure to reach the Hub ends here
            why = str(err).strip().splitlines()[0][:120] if str(err).strip() else ""
            local = f"no {' and no '.join(looked)}, and " if looked else ""
            stop(
                f"{local}cannot load Hub dataset {data.dataset_name!r} ({type(err).__name__}: {why}); pass local "
                "data (--fashion_mnist_dir IDX files, --train_file CSVs or --train_dir image folders) or go online."
            )
        return select(raw, data)
    if looked:
        stop(f"no {' and no '.join(looked)}; pass --dataset_name for the Hub, or local data.")
    stop("no data: pass --train_file CSVs, --train_dir image folders, --fashion_mnist_dir or --dataset_name.")


def load_fashion_mnist(data: DataArguments):
    """Fashion-MNIST from its IDX files, decoding only the rows this run uses (see ``split_rows``)."""
    folder = data.fashion_mnist_dir
    n_train, n_test = (len(fashion_mnist.read_idx(Path(folder) / fashion_mnist.FILES[s][1])) for s in ("train", "test"))
    train, validation = split_rows(n_train, data.validation_split_size, data.max_train_samples)
    rows: dict = {"train": train}
    if validation is not None:
        rows["validation"] = ("train", validation[: data.max_eval_samples])
    test_limit = data.max_test_samples if data.max_test_samples is not None else data.max_eval_samples
    rows["test"] = range(min(test_limit, n_test) if test_limit is not None else n_test)
    logger.info(
        "Fashion-MNIST from %s: %s",
        data.fashion_mnist_dir,
        {k: len(v[1] if isinstance(v, tuple) else v) for k, v in rows.items()},
    )
    return fashion_mnist.load(data.fashion_mnist_dir, rows)


def select(raw, data: DataArguments):
    """``raw`` with a validation split held out of train (``--validation_split_size``, when it has none) and each
    split cut to its ``--max_*_samples``."""
    from datasets import DatasetDict

    raw = DatasetDict(raw)
    if "train" in raw and data.validation_split_size:
        if "validation" in raw:
            logger.warning(
                "--validation_split_size=%d ignored: the data has a validation split", data.validation_split_size
            )
        else:
            train, validation = split_rows(len(raw["train"]), data.validation_split_size, None)
            raw["validation"] = raw["train"].select(validation)
            raw["train"] = raw["train"].select(train)
    test_limit = data.max_test_samples if data.max_test_samples is not None else data.max_eval_samples
    for split, limit in (
        ("train", data.max_train_samples),
        ("validation", data.max_eval_samples),
        ("test", test_limit),
    ):
        if split in raw and limit is not None:
            raw[split] = raw[split].select(range(min(limit, len(raw[split]))))
    return raw


def class_names(raw, label_col: str, given: list[str] | None = None) -> tuple[list[str], dict[str, int] | None]:
    """The class names, and how to map label values to ids: a ``ClassLabel`` (image folders, most Hub datasets)
    brings its names and ids; any other column (ints, strings) gets ``given`` (``--class_names``, in that order)
    or names from its values, as in the text recipe, and a mapping from ``str(value)`` to id (``None`` for a
    ClassLabel, whose values are the ids)."""
    from datasets import ClassLabel

    feature = raw["train"].features[label_col]
    if isinstance(feature, ClassLabel):
        return list(feature.names), None
    names = list(given) if given else label_names(raw["train"][label_col])
    check_labels(raw, label_col, names)
    return names, {name: i for i, name in enumerate(names)}


SELF_INTERPOLATING = ("dinov2", "dinov2_with_registers")  # resize their position embeddings in every forward
FIXED_SIZE_PARAMS = ("position_embed", "pos_embed", "attention_bias")  # parameters tied to one input size


def _size(value) -> int | None:
    return value[0] if isinstance(value, list | tuple) else value


def size_inputs(model, size: int) -> dict:
    """What the model's forward needs to take ``size`` x ``size`` inputs: ``{"interpolate_pos_encoding": True}``
    for ViT, DeiT, BEiT, Swin ...; ``{}`` at its own size, for DINOv2 (interpolates itself) and for models
    without position embeddings (ConvNeXt, ResNet ...). Stops on a size that is not a multiple of the patch,
    and on a model whose input size is fixed (CLIP, LeViT ...).

    Example:
        >>> size_inputs(ViTForImageClassification(ViTConfig(image_size=224, patch_size=16)), 64)  # doctest: +SKIP
        {'interpolate_pos_encoding': True}
    """
    cfg = model.config
    vision = getattr(cfg, "vision_config", None) or cfg  # CLIP, SigLIP ...: the vision tower's settings
    patch = _size(getattr(vision, "patch_size", None))
    if size < 1:
        stop(f"--image_size={size}: pass a positive size in pixels.")
    if patch and size % patch:
        stop(
            f"--image_size={size} is not a multiple of {cfg.model_type}'s patch size {patch}; pass a "
            f"multiple, e.g. {max(1, size // patch) * patch} or {(size // patch + 1) * patch}."
        )
    native = _size(getattr(vision, "image_size", None))
    if size == native:
        return {}
    if "interpolate_pos_encoding" in inspect.signature(model.forward).parameters:
        return {"interpolate_pos_encoding": True}
    if cfg.model_type in SELF_INTERPOLATING:
        return {}
    fixed = next((n for n, _ in model.named_parameters() if any(k in n for k in FIXED_SIZE_PARAMS)), None)
    if fixed:
        stop(
            f"--image_size={size}: {cfg.model_type} cannot change its input size ({fixed} is fixed to "
            f"{native} px); leave --image_size out."
        )
    return {}


def set_image_size(processor, size: int) -> None:
    """Make ``processor`` resize to ``size`` (shortest edge, or height x width) and centre-crop to size x size."""

    def get(d, key):
        return d.get(key) if isinstance(d, dict) else getattr(d, key, None)

    resize = getattr(processor, "size", None)
    if resize is not None and get(resize, "shortest_edge") is not None:
        processor.size = {"shortest_edge": size}
    else:
        processor.size = {"height": size, "width": size}
    if getattr(processor, "crop_size", None) is not None:
        processor.crop_size = {"height": size, "width": size}


def make_transform(processor, image_col: str, label_col: str, label2id: dict[str, int] | None):
    """The batch transform: images (grayscale, RGBA, palette ...) to 3-channel pixel values, labels to ids."""

    def transform(batch):
        images = [im.convert("RGB") for im in batch[image_col]]
        labels = batch[label_col] if label2id is None else [label2id[str(v)] for v in batch[label_col]]
        return {"pixel_values": processor(images, return_tensors="pt")["pixel_values"], "labels": labels}

    return transform


def make_collate(extra: dict):
    """Stack pixel values and labels; ``extra`` (e.g. ``interpolate_pos_encoding``) goes into every batch, so
    Trainer passes it to the model's forward in training and evaluation alike."""

    def collate(rows):
        return {
            "pixel_values": torch.stack([r["pixel_values"] for r in rows]),
            "labels": torch.tensor([r["labels"] for r in rows]),
            **extra,
        }

    return collate


@user_errors
def main():
    parser = HfArgumentParser((ModelArguments, DataArguments, VisionArguments, LLRDTrainingArguments))
    model_args, data_args, vision_args, args = parse(parser)
    setup_logging(args)
    set_seed(args.seed)  # before the model is built: the new head's initialisation depends on it

    raw = load_splits(data_args)
    if "train" not in raw:
        stop("no training split: pass --train_file, --train_dir or a --dataset_name with a train split.")
    image_col, label_col = data_args.image_column_name, data_args.label_column_name
    for col, flag in ((image_col, "--image_column_name"), (label_col, "--label_column_name")):
        if col not in raw["train"].column_names:
            stop(f"{flag}={col!r} is not a column of the training data ({raw['train'].column_names}).")
    names, label2id = class_names(raw, label_col, data_args.class_names)

    path = resolve_checkpoint(model_args.model_name_or_path)
    config = label_config(path, names, model_args, "ForImageClassification")
    processor = AutoImageProcessor.from_pretrained(path, trust_remote_code=model_args.trust_remote_code)
    if vision_args.random_init:
        logger.info("random init: %s's architecture, none of its weights", path)
        model = AutoModelForImageClassification.from_config(config, trust_remote_code=model_args.trust_remote_code)
    else:
        model = load_model(
            AutoModelForImageClassification,
            path,
            config=config,
            ignore_mismatched_sizes=model_args.ignore_mismatched_sizes,
            trust_remote_code=model_args.trust_remote_code,
            distributed_config=model_args.distributed_config(),
        )
    extra = {}
    if vision_args.image_size is not None:
        extra = size_inputs(model, vision_args.image_size)
        set_image_size(processor, vision_args.image_size)

    transform = make_transform(processor, image_col, label_col, label2id)
    args.remove_unused_columns = False  # the transform needs the image column
    train, validation, test = (
        raw[s].with_transform(transform) if s in raw else None for s in ("train", "validation", "test")
    )
    trainer = LLRDTrainer(
        model=model,
        args=args,
        train_dataset=train,
        eval_dataset=validation,
        processing_class=processor,
        data_collator=make_collate(extra),
        compute_metrics=metrics_fn(len(names)),
    )
    result = trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    trainer.save_metrics("train", result.metrics)
    finish(trainer, {"eval": validation, "test": test})


if __name__ == "__main__":
    main()

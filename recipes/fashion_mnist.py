"""Fashion-MNIST from its original gzipped IDX files: a loader for the image recipe, and a converter to PNG files
plus ``image,label`` CSV files (what ``llrd sweep`` samples).

    python recipes/fashion_mnist.py ../shared/data/fashion_mnist --out data/fashion_mnist
    # -> data/fashion_mnist/{train,test}.csv (absolute PNG paths, class names) and data/fashion_mnist/{train,test}/*.png

The loader gives the Hub dataset's schema (``zalando-datasets/fashion_mnist``): an ``image`` column (PIL,
grayscale 28 x 28) and a ``label`` ClassLabel with the 10 class names. Independent of llrd.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import logging
import os
import struct
import zlib
from pathlib import Path

import numpy as np

logger = logging.getLogger("llrd.recipes.fashion_mnist")

CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
HUB_ID = "zalando-datasets/fashion_mnist"


def read_idx(path: str | Path) -> np.ndarray:
    """One IDX file (gzipped or plain) of unsigned bytes as an array of the shape its header states.

    Raises ValueError naming the file when it is truncated, corrupt or not a uint8 IDX file.

    Example:
        >>> read_idx("../shared/data/fashion_mnist/t10k-labels-idx1-ubyte.gz").shape  # doctest: +SKIP
        (10000,)
    """
    path = Path(path)
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            raw = f.read()
    except (EOFError, gzip.BadGzipFile, zlib.error) as err:
        raise ValueError(f"{path}: truncated or corrupt gzip file ({err}); download it again") from err
    if len(raw) < 4 or raw[:2] != b"\x00\x00" or raw[2] != 0x08:
        raise ValueError(f"{path}: not an IDX file of unsigned bytes (magic {raw[:4].hex() or 'missing'})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header ({len(raw)} bytes, {ndim} dimensions need {header})")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    need = int(np.prod(shape))
    if len(raw) - header != need:
        raise ValueError(
            f"{path}: truncated IDX file: its header says {' x '.join(map(str, shape))} = {need} bytes of data, "
            f"the file has {len(raw) - header}; download it again"
        )
    return np.frombuffer(raw, np.uint8, offset=header).reshape(shape)


def missing_files(folder: str | Path) -> list[str]:
    """The IDX files the folder lacks (all four when it does not exist)."""
    return [name for pair in FILES.values() for name in pair if not (Path(folder) / name).is_file()]


def load_arrays(folder: str | Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images (N, 28, 28) uint8, labels (N,) int64) of ``split`` ("train" or "test"), checked against each other."""
    images_file, labels_file = (Path(folder) / name for name in FILES[split])
    images, labels = read_idx(images_file), read_idx(labels_file)
    if images.ndim != 3 or labels.ndim != 1:
        raise ValueError(f"{images_file}/{labels_file}: expected (N, rows, cols) images and (N,) labels")
    if len(images) != len(labels):
        raise ValueError(f"{images_file} has {len(images)} images but {labels_file} {len(labels)} labels")
    if labels.size and labels.max() >= len(CLASSES):
        raise ValueError(f"{labels_file}: label {int(labels.max())} is not one of the 10 Fashion-MNIST classes")
    return images, labels.astype(np.int64)


def features():
    """The Hub dataset's features: ``image`` (Image) and ``label`` (ClassLabel with the 10 names)."""
    from datasets import ClassLabel, Features, Image

    return Features({"image": Image(), "label": ClassLabel(names=CLASSES)})


def to_dataset(images: np.ndarray, labels: np.ndarray):
    """A ``datasets.Dataset`` with the Hub's schema (PIL images on access)."""
    from datasets import Dataset
    from PIL import Image

    rows = {"image": [Image.fromarray(a) for a in images], "label": labels.tolist()}
    return Dataset.from_dict(rows, features=features())


def load(folder: str | Path, rows: dict[str, range] | None = None):
    """A ``DatasetDict`` of the splits in ``rows`` (``{split: range of source rows}``; default: all of train
    and test). Only the selected rows are decoded, so a 1,000-image slice costs no more than 1,000 images.

    A split name other than train/test (e.g. "validation") needs its ``source`` prefix: ``"validation":
    ("train", range(59500, 60000))``.

    Example:
        >>> load("../shared/data/fashion_mnist", {"train": range(1000)})["train"][0]["label"]  # doctest: +SKIP
        9
    """
    from datasets import DatasetDict

    missing = missing_files(folder)
    if missing:
        raise ValueError(f"{folder}: Fashion-MNIST IDX files missing: {', '.join(missing)}")
    rows = rows or {"train": range(60000), "test": range(10000)}
    arrays: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    out = {}
    for split, spec in rows.items():
        source, picked = spec if isinstance(spec, tuple) else (split, spec)
        if source not in arrays:
            arrays[source] = load_arrays(folder, source)
        images, labels = arrays[source]
        idx = np.asarray(picked, dtype=np.int64)
        if idx.size and idx.max() >= len(images):
            raise ValueError(f"{split}: row {int(idx.max())} asked for, the {source} split has {len(images)}")
        out[split] = to_dataset(images[idx], labels[idx])
    return DatasetDict(out)


def convert(folder: str | Path, out: str | Path, max_rows: dict[str, int] | None = None) -> dict[str, Path]:
    """Write each split as PNG files under ``out/<split>/`` and ``out/<split>.csv`` with columns ``image``
    (absolute path, so a sampled copy of the CSV elsewhere still finds its images) and ``label`` (class name).

    Example:
        >>> convert("../shared/data/fashion_mnist", "data/fashion_mnist", {"train": 2000})  # doctest: +SKIP
        {'train': PosixPath('data/fashion_mnist/train.csv'), 'test': PosixPath('data/fashion_mnist/test.csv')}
    """
    from PIL import Image

    missing = missing_files(folder)
    if missing:
        raise ValueError(f"{folder}: Fashion-MNIST IDX files missing: {', '.join(missing)}")
    out = Path(out)
    written = {}
    for split in FILES:
        images, labels = load_arrays(folder, split)
        n = min(len(images), (max_rows or {}).get(split) or len(images))
        image_dir = (out / split).resolve()
        image_dir.mkdir(parents=True, exist_ok=True)
        csv_path = out / f"{split}.csv"
        tmp = csv_path.with_suffix(".csv.tmp")
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow(["image", "label"])
            for i in range(n):
                png = image_dir / f"{i:05d}.png"
                Image.fromarray(images[i]).save(png)
                writer.writerow([str(png), CLASSES[labels[i]]])
        os.replace(tmp, csv_path)
        written[split] = csv_path
        logger.info("%s: %d images -> %s", split, n, csv_path)
    return written


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Convert Fashion-MNIST's IDX files to PNG files and image,label CSVs.")
    p.add_argument("folder", help="folder with the four gzipped IDX files (e.g. ../shared/data/fashion_mnist)")
    p.add_argument("--out", default="data/fashion_mnist", help="output folder (default: %(default)s)")
    p.add_argument("--max_train", type=int, default=None, help="write only the first N training images")
    p.add_argument("--max_test", type=int, default=None, help="write only the first N test images")
    ns = p.parse_args(argv)
    logging.basicConfig(format="%(message)s", level=logging.INFO)
    try:
        written = convert(ns.folder, ns.out, {"train": ns.max_train, "test": ns.max_test})
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    logger.info("train_file: %s  test_file: %s", written["train"].resolve(), written["test"].resolve())


if __name__ == "__main__":
    main()

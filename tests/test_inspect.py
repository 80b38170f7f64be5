"""`llrd inspect`: table, JSON, plot and errors of the command line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import tiny_models
from PIL import Image

from llrd import param_groups
from llrd.__main__ import main

ROOT = Path(__file__).resolve().parents[1]


def cli(*argv):
    return subprocess.run(
        [sys.executable, "-m", "llrd", *argv],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
        timeout=300,
    )


@pytest.mark.parametrize("family", ["bert", "swin"])
def test_table_and_json_match_param_groups(family, tmp_path, capsys):
    model = tiny_models.make(family)
    model.save_pretrained(tmp_path / "m")
    capsys.readouterr()  # save_pretrained may import DeepSpeed, which prints its accelerator to stdout
    flags = ["--layer_decay", "0.8", "--learning_rate", "2e-4", "--weight_decay", "0.05"]
    assert main(["inspect", str(tmp_path / "m"), *flags, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    groups = param_groups(model, lr=2e-4, layer_decay=0.8, weight_decay=0.05)
    assert len(report["groups"]) == len(groups)
    for row, group in zip(report["groups"], groups, strict=True):
        assert row["group_name"] == group["group_name"]
        assert (row["depth"], row["stack"]) == (group["layer_id"], group["stack"])
        assert row["tensors"] == len(group["params"])
        assert row["params"] == sum(p.numel() for p in group["params"])
        assert (row["lr"], row["lr_scale"], row["weight_decay"]) == (
            group["lr"],
            group["lr_scale"],
            group["weight_decay"],
        )
    # the table shows the same rows
    assert main(["inspect", str(tmp_path / "m"), *flags]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[1].startswith("depth from flow: traced one forward pass on the meta device")
    body = [line.split() for line in table[4:-1]]
    assert [int(cells[0]) for cells in body] == [g["layer_id"] for g in groups]
    assert [int(cells[-4].replace(",", "")) for cells in body] == [sum(p.numel() for p in g["params"]) for g in groups]
    assert [float(cells[-3]) for cells in body] == pytest.approx([g["lr"] for g in groups], rel=1e-3)


def test_json_round_trips(capsys):
    assert main(["inspect", "bert", "--config", "num_hidden_layers=3", "--layer_decay", "0.5", "--json"]) == 0
    text = capsys.readouterr().out
    report = json.loads(text)
    assert json.loads(json.dumps(report, indent=1)) == report
    assert report["stacks"] == {"bert.encoder.layer": 3}
    assert [g["depth"] for g in report["groups"][::2]] == [4, 3, 2, 1, 0]


def test_config_takes_several_pairs_after_one_flag(capsys):
    assert main(["inspect", "t5", "--config", "num_layers=2", "num_decoder_layers=3", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["stacks"] == {"encoder": 2, "decoder": 3}
    assert main(["inspect", "t5", "--config", "num_layers=2", "--config", "num_decoder_layers=1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["stacks"] == {"encoder": 2, "decoder": 1}


def test_explain_says_why_each_parameter_outside_the_blocks_has_its_depth(capsys):
    flags = ["--config", "num_hidden_layers=2", "hidden_size=32", "ffn_dim=37", "num_attention_heads=2"]
    assert main(["inspect", "opt", *flags, "word_embed_proj_dim=16", "--task", "causal-lm", "--explain"]) == 0
    out = capsys.readouterr().out
    why = out.split("Why each parameter outside the blocks has its depth:\n")[1].splitlines()
    rows = {line.split()[0]: line for line in why[2:]}
    assert set(rows) == {
        "model.decoder.embed_tokens.weight",
        "model.decoder.embed_positions.weight",
        "model.decoder.project_in.weight",
        "model.decoder.project_out.weight",
        "model.decoder.final_layer_norm.weight",
        "model.decoder.final_layer_norm.bias",
    }
    assert rows["model.decoder.final_layer_norm.weight"].split()[2:] == "3 used after block 1, the last -> head".split()
    assert rows["model.decoder.project_in.weight"].split()[2:] == "0 used before block 0 -> stem".split()
    assert main(["inspect", "opt", *flags, "--task", "causal-lm", "--explain", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["depth"]["source"] == "flow"
    explained = {r["name"]: (r["depth"], r["reason"]) for r in report["explain"]}
    assert explained["model.decoder.final_layer_norm.bias"] == (3, "used after block 1, the last -> head")


def test_inspect_shows_the_fallback(tmp_path, capsys):
    """A model the trace cannot run says so in the output, and why."""
    from llrd.inspect import inspect_model

    class Args:  # what inspect reads from LLRDTrainingArguments
        block_pattern = depth_overrides = None
        depth_source = "structure"

        def group_kwargs(self):
            return {"lr": 1e-3, "layer_decay": 0.5}

    model = tiny_models.make("opt")
    _, layer_map = inspect_model(model, Args())
    assert layer_map.source == "structure" and layer_map["model.decoder.final_layer_norm.weight"] == 0
    Args.depth_source = "flow"
    _, layer_map = inspect_model(model, Args())
    assert layer_map["model.decoder.final_layer_norm.weight"] == 3


def test_meta_device_llama_80_layers_stays_small():
    code = (
        "import psutil, torch, transformers\n"
        "from llrd.inspect import empty_model, load_config, inspect_rows\n"
        "from llrd import layer_ids, param_groups\n"
        "before = psutil.Process().memory_info().rss\n"
        "cfg = load_config('llama', ['num_hidden_layers=80', 'hidden_size=8192', 'intermediate_size=28672',"
        " 'num_attention_heads=64', 'num_key_value_heads=8'])\n"
        "m = empty_model(cfg, 'causal-lm')\n"
        "lm = layer_ids(m)\n"
        "rows = inspect_rows(param_groups(m, lr=1e-4, layer_decay=0.9, layer_map=lm), lm)\n"
        "after = psutil.Process().memory_info().rss\n"
        "print(sum(r['params'] for r in rows), lm.num_layers, (after - before) // 2**20)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    params, layers, grown_mb = map(int, out.stdout.split())
    assert layers == 80 and params > 60e9  # a ~69B-parameter model ...
    assert grown_mb < 300  # ... that costs no more than a few hundred MB to inspect


def test_plot_is_a_valid_png(tmp_path, capsys):
    png = tmp_path / "lr.png"
    assert (
        main(
            [
                "inspect",
                "t5",
                "--config",
                "num_layers=2",
                "--config",
                "num_decoder_layers=3",
                "--layer_decay",
                "0.7",
                "--plot",
                str(png),
            ]
        )
        == 0
    )
    with Image.open(png) as img:
        img.verify()
        assert img.format == "PNG"


@pytest.mark.parametrize(
    "argv,message",
    [
        (["inspect", "no_such_model_type_x"], "unknown model 'no_such_model_type_x'"),
        (["inspect", "bert", "--layer_decay", "0"], "layer_decay=0.0 is outside (0, 1]"),
        (["inspect", "bert", "--no_such_flag", "1"], "not used by the HfArgumentParser"),
        (["inspect", "bert", "--block_pattern", "nothing"], "block_pattern='nothing' matches no module"),
        (["frobnicate"], "unknown command"),
    ],
)
def test_errors_exit_2_with_a_clear_message(argv, message):
    proc = cli(*argv)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert message in proc.stderr


def test_model_with_no_blocks_exits_2(tmp_path):
    # a config whose model has no repeated blocks: a 0-layer BERT
    proc = cli("inspect", "bert", "--config", "num_hidden_layers=0")
    assert proc.returncode == 2 and "no transformer blocks found" in proc.stderr

"""LLRDTrainingArguments: CLI flags, validation, serialization."""

from __future__ import annotations

import json

import pytest
from transformers import HfArgumentParser

from llrd import LLRDTrainingArguments


def parse(*argv):
    return HfArgumentParser(LLRDTrainingArguments).parse_args_into_dataclasses(["--output_dir", "o", *argv])[0]


def test_cli_flags_and_serialization():
    args = parse("--layer_decay", "0.8", "--learning_rate", "1e-4", "--depth_overrides", '{"^pooler\\\\.": "head"}')
    assert args.layer_decay == 0.8 and args.depth_overrides == {r"^pooler\.": "head"}
    saved = json.loads(args.to_json_string())
    assert saved["layer_decay"] == 0.8 and saved["depth_overrides"] == {r"^pooler\.": "head"}
    assert LLRDTrainingArguments(**{**args.to_dict(), "output_dir": "o"}).layer_decay == 0.8


def test_default_is_off():
    assert LLRDTrainingArguments(output_dir="o").layer_decay == 1.0


@pytest.mark.parametrize("value", ["0", "-0.1", "1.01", "nan"])
def test_out_of_range_from_cli(value):
    with pytest.raises(ValueError, match=rf"layer_decay={float(value)!r} is outside \(0, 1\]"):
        parse("--layer_decay", value)


def test_string_from_cli_is_rejected_by_the_parser(capsys):
    with pytest.raises(SystemExit) as err:
        parse("--layer_decay", "high")
    assert err.value.code == 2
    assert "--layer_decay" in capsys.readouterr().err


@pytest.mark.parametrize("value", [0, -1.0, 2, float("nan"), "0.8"])
def test_out_of_range_in_python(value):
    with pytest.raises(ValueError, match="layer_decay="):
        LLRDTrainingArguments(output_dir="o", layer_decay=value)


def test_bad_block_pattern_regex():
    with pytest.raises(ValueError, match=r"block_pattern='\(' is not a valid regex"):
        LLRDTrainingArguments(output_dir="o", block_pattern="(")

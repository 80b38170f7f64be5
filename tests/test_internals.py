"""llrd/internals.py lists every outside internal llrd uses; each one missing fails in one line naming the version."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import tiny_models
from test_trainer import args, text_data

from llrd import internals
from llrd.internals import INTERNALS, ZERO_ATTRIBUTES, UnsupportedVersion, check, check_deepspeed, locate

ROOT = Path(__file__).resolve().parents[1]


def _one_line(err: pytest.ExceptionInfo, package: str, what: str) -> str:
    line = str(err.value)
    assert "\n" not in line
    version = internals._version(package)
    assert f"which {package} {version} does not have" in line or f"{package} {version} is outside" in line, line
    assert what in line and "pip install" in line, line
    return line


def test_every_listed_internal_is_there_on_the_installed_versions():
    check()
    check_deepspeed()


@pytest.mark.parametrize("internal", INTERNALS, ids=lambda i: i.path)
def test_each_internal_removed_fails_in_one_line_naming_the_version(internal, monkeypatch):
    parent_path, name = internal.path.rsplit(".", 1)
    monkeypatch.delattr(locate(parent_path), name)
    with pytest.raises(UnsupportedVersion) as err:
        check(internal.package)
    _one_line(err, internal.package, internal.path)
    assert internal.used_in in str(err.value)


@pytest.mark.parametrize("internal", INTERNALS, ids=lambda i: i.path)
def test_the_list_matches_the_code(internal):
    """Each entry names a file that uses it: an internal the code stops using must leave the list."""
    source = (ROOT / internal.used_in).read_text()
    assert re.search(rf"\b{re.escape(internal.used_name)}\b", source), internal


@pytest.mark.parametrize("internal", [i for i in INTERNALS if i.probe is not None], ids=lambda i: i.path)
def test_each_probed_behaviour_changed_fails_in_one_line(internal, monkeypatch):
    """A stand-in with the same name but not the behaviour: an init function that writes marked tensors too, and
    for the source probes a function whose source lacks what they look for."""
    parent_path, name = internal.path.rsplit(".", 1)

    def stand_in(*a, **k):
        return a[0].fill_(1.0) if a else None

    stand_in.__module__ = f"{internal.package}.stand_in"  # as if the package shipped it
    monkeypatch.setattr(locate(parent_path), name, stand_in)
    with pytest.raises(UnsupportedVersion) as err:
        check(internal.package)
    _one_line(err, internal.package, f"{internal.path} as it behaved")


def test_trainer_refuses_to_start_on_a_transformers_without_an_internal(monkeypatch, tmp_path):
    from transformers import Trainer

    from llrd import LLRDTrainer

    monkeypatch.delattr(Trainer, "_clip_grad_norm")
    with pytest.raises(UnsupportedVersion) as err:
        LLRDTrainer(model=tiny_models.make("bert"), args=args(str(tmp_path)), train_dataset=text_data(4))
    _one_line(err, "transformers", "transformers.Trainer._clip_grad_norm")


@pytest.mark.parametrize("version", ["0.20.0", "0.19.7", "1.0.0"])
def test_deepspeed_outside_the_range_is_refused_in_one_line(version, monkeypatch):
    import deepspeed

    monkeypatch.setattr(deepspeed, "__version__", version)
    with pytest.raises(UnsupportedVersion) as err:
        check_deepspeed()
    line = _one_line(err, "deepspeed", ">=0.19.8,<0.20")
    assert "layer_stats='lr'" in line  # the default reads no ZeRO internal


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_optimizer_missing_an_attribute_is_named(stage):
    names = ZERO_ATTRIBUTES["all"] + ZERO_ATTRIBUTES["3" if stage == 3 else "1/2"]
    internals.check_zero_optimizer(SimpleNamespace(**dict.fromkeys(names)), stage)  # all there: silent
    for gone in names:
        zero = SimpleNamespace(**{n: None for n in names if n != gone})
        with pytest.raises(UnsupportedVersion) as err:
            internals.check_zero_optimizer(zero, stage)
        _one_line(err, "deepspeed", f"SimpleNamespace.{gone}")


def test_deepspeed_pin_matches_the_runtime_range():
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert f'"deepspeed{",".join(internals.DEEPSPEED_RANGE)}"' in pyproject

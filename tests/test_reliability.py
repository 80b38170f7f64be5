"""Exact resume after SIGKILL, layout checks on resume, atomic writes, safety."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from safetensors.torch import load_file

from llrd.files import atomic_write_text
from llrd.manifest import check_layout

ROOT = Path(__file__).resolve().parents[1]
JOB = ROOT / "tests" / "resume_job.py"
# A bare environment, but the same llrd as this test process (a checkout on PYTHONPATH, not an installed copy).
PYTHONPATH = {"PYTHONPATH": os.environ["PYTHONPATH"]} if os.environ.get("PYTHONPATH") else {}


def job(out, mode, *flags):
    return subprocess.run(
        [sys.executable, str(JOB), str(out), mode, *flags],
        capture_output=True,
        text=True,
        timeout=300,
        env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "PYTHONHASHSEED": "0", **PYTHONPATH},
    )


@pytest.mark.parametrize("mode", ["plain", "unfreeze", "adaptive", "reinit"])
def test_sigkill_then_resume_is_bit_for_bit(tmp_path, mode):
    full = job(tmp_path / "full", mode)
    assert full.returncode == 0, full.stderr[-2000:]
    killed = job(tmp_path / "cut", mode, "--kill_at", "5")
    assert killed.returncode == -signal.SIGKILL
    assert sorted(p.name for p in (tmp_path / "cut").glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert not (tmp_path / "cut" / "final.safetensors").exists()
    resumed = job(tmp_path / "cut", mode, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = load_file(tmp_path / "full" / "final.safetensors"), load_file(tmp_path / "cut" / "final.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].equal(b[name]), name  # bit for bit
    assert json.loads((tmp_path / "full" / "final_lrs.json").read_text()) == json.loads(
        (tmp_path / "cut" / "final_lrs.json").read_text()
    )
    layout = json.loads((tmp_path / "cut" / "checkpoint-4" / "llrd_layout.json").read_text())
    assert layout[0]["group_name"].endswith("head/decay") and layout[0]["param_names"]


def test_resume_with_other_settings_fails_and_says_what_changed(tmp_path):
    assert job(tmp_path / "run", "plain", "--kill_at", "3").returncode == -signal.SIGKILL
    other_decay = job(tmp_path / "run", "plain", "--resume", "--layer_decay", "0.8")
    assert other_decay.returncode != 0
    assert re.search(r"cannot resume from .*checkpoint-2.*lr_scale 0.5 in the checkpoint, 0.8 now", other_decay.stderr)
    other_model = job(tmp_path / "run", "plain", "--resume", "--layers", "3")
    assert other_model.returncode != 0
    # members and depths come from the checkpoint's layout (issue 20), so a third block shows as tensors it lacks
    assert re.search(
        r"cannot resume from .*checkpoint-2.*group \d+ \([^)]*block_1/decay\) holds other parameters: "
        r"missing \[\], new \['bert\.encoder\.layer\.2\.",
        other_model.stderr,
    )


def test_check_layout_same_counts_different_members():
    saved = [{"group_name": "a", "layer_id": 1, "lr_scale": 0.5, "weight_decay": 0.0, "param_names": ["x", "y"]}]
    now = [{"group_name": "a", "layer_id": 1, "lr_scale": 0.5, "weight_decay": 0.0, "param_names": ["x", "z"]}]
    check_layout(saved, saved, "ckpt")
    with pytest.raises(ValueError, match=r"group 0 \(a\) holds other parameters: missing \['y'\], new \['z'\]"):
        check_layout(saved, now, "ckpt")


def test_atomic_write_keeps_the_old_file_when_the_write_fails(tmp_path, monkeypatch):
    target = tmp_path / "results.json"
    atomic_write_text(target, '{"ok": 1}')

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr("os.replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_text(target, '{"ok": 2, "half": ')
    assert json.loads(target.read_text()) == {"ok": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]  # no temp file left behind


def test_atomic_write_from_two_threads_to_one_path(tmp_path):
    """Each thread's temporary file is its own: no writer removes or renames another's, and a reader only ever
    sees one whole version (the old pid-named temp file failed here with FileNotFoundError)."""
    target = tmp_path / "status.json"
    payloads = [json.dumps({"writer": w, "pad": str(w) * 200_000}) for w in (0, 1)]
    atomic_write_text(target, payloads[0])
    errors, seen = [], set()

    def write(text):
        try:
            for _ in range(100):
                atomic_write_text(target, text)
        except Exception as err:  # noqa: BLE001 - collected and asserted below
            errors.append(err)

    threads = [threading.Thread(target=write, args=(p,)) for p in payloads]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        seen.add(target.read_text())
    for t in threads:
        t.join()
    assert errors == []
    assert seen <= set(payloads) and target.read_text() in payloads
    assert [p.name for p in tmp_path.iterdir()] == ["status.json"]  # no temp file left behind


def test_no_unsafe_loading_in_the_code():
    sources = [p for d in ("llrd", "recipes", "scripts") for p in (ROOT / d).rglob("*.py")]
    for path in sources:
        text = path.read_text()
        assert "import pickle" not in text and "pickle.load" not in text, path
        for call in re.findall(r"torch\.load\([^)]*\)", text):
            assert "weights_only=True" in call, (path, call)
        assert "trust_remote_code=True" not in text, path


def test_recipes_default_to_no_remote_code_and_safetensors(tmp_path):
    sys.path.insert(0, str(ROOT / "recipes"))
    from test_recipes import load_recipe

    for name in ("text_classification", "image_classification"):
        assert load_recipe(name).ModelArguments.__dataclass_fields__["trust_remote_code"].default is False

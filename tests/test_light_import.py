"""``from llrd import param_groups`` stays light: torch and llrd's pure functions, no Trainer, no datasets."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("transformers.trainer", "transformers.training_args", "datasets", "accelerate", "deepspeed")


def _loaded_after(statement: str) -> list[str]:
    probe = f"import json, sys\n{statement}\nprint(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", probe], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_pure_functions_load_neither_trainer_nor_datasets():
    assert _loaded_after("from llrd import param_groups, layer_ids, create_optimizer, LayerMap") == []


def test_trainer_names_still_import_from_the_package():
    loaded = _loaded_after("from llrd import LLRDTrainer, LLRDTrainingArguments")
    assert "transformers.trainer" in loaded  # lazily, on first use: the probe itself can fail

import os
import sys
from pathlib import Path

# Tests never reach the Hub: fail fast instead of retrying.
for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_EVALUATE_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(var, "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")

sys.path.insert(0, str(Path(__file__).parent))

import pytest  # noqa: E402
from shared_data import DATA, missing_data  # noqa: E402


@pytest.fixture
def tmp_out(tmp_path):
    return str(tmp_path / "out")


@pytest.fixture
def shared_data() -> Path:
    """The real data sets; a test using them (``@needs_data``) is skipped with the reason when they are missing,
    or fails under ``LLRD_REQUIRE_DATA=1`` (CI)."""
    outcome = missing_data()
    if outcome is not None:
        kind, reason = outcome
        if kind == "fail":
            pytest.fail(reason, pytrace=False)
        pytest.skip(reason)
    return DATA

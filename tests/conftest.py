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


# --- suite time per marker -------------------------------------------------------------------------------
# With LLRD_SUITE_TIMES=path, the session writes how long the fast and the slow tests took (setup + call +
# teardown of each test, summed per marker) and the session's wall time; .ci/run sets it, and docs/benchmarks.md's
# generated suite-times block (scripts/docs_blocks.py) is built from the file it wrote.
_SUITE: dict = {"fast": {"tests": 0, "seconds": 0.0}, "slow": {"tests": 0, "seconds": 0.0}}
_SLOW_IDS: set[str] = set()


def pytest_collection_modifyitems(config, items):
    _SLOW_IDS.update(item.nodeid for item in items if item.get_closest_marker("slow"))


def pytest_runtest_logreport(report):
    kind = "slow" if report.nodeid in _SLOW_IDS else "fast"
    _SUITE[kind]["seconds"] += report.duration
    files = _SUITE.setdefault("files", {})
    name = report.nodeid.split("::")[0]
    files[name] = files.get(name, 0.0) + report.duration
    if report.when == "call" or (report.when == "setup" and report.skipped):
        _SUITE[kind]["tests"] += 1


def pytest_sessionstart(session):
    import time

    _SUITE["start"] = time.time()


def pytest_sessionfinish(session, exitstatus):
    path = os.environ.get("LLRD_SUITE_TIMES")
    if not path:
        return
    import json
    import platform
    import time

    record = {
        "command": "python -m pytest -q -ra (from .ci/run)",
        "exit_status": int(exitstatus),
        "wall_seconds": round(time.time() - _SUITE["start"], 1),
        "ci_install_seconds": int(os.environ["LLRD_CI_INSTALL_SECONDS"])
        if "LLRD_CI_INSTALL_SECONDS" in os.environ
        else None,
        "fast": {"tests": _SUITE["fast"]["tests"], "seconds": round(_SUITE["fast"]["seconds"], 1)},
        "slow": {"tests": _SUITE["slow"]["tests"], "seconds": round(_SUITE["slow"]["seconds"], 1)},
        "seconds_per_file": {k: round(v, 1) for k, v in sorted(_SUITE.get("files", {}).items(), key=lambda kv: -kv[1])},
        "cpus": os.cpu_count(),
        "hardware": f"{os.cpu_count()} CPU cores, {platform.machine()}",
        "python": platform.python_version(),
        "finished": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    from llrd.files import atomic_write_text

    atomic_write_text(Path(path), json.dumps(record, indent=1) + "\n")

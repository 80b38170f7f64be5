"""Where the tests find the real data sets (``../shared/data`` beside the checkout, or ``$LLRD_TEST_DATA``), and
what happens when they are missing: a skip with its reason for a user's partial checkout, a failure in CI
(``LLRD_REQUIRE_DATA=1``, set by ``.ci/run``)."""

from __future__ import annotations

import os
from pathlib import Path

DATA = Path(os.environ.get("LLRD_TEST_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")
SST2 = DATA / "sst2"
AGNEWS = DATA / "agnews"


def missing_data(env: dict | None = None) -> tuple[str, str] | None:
    """``None`` when the data is there; else ``("fail" | "skip", reason)``.

    Example:
        >>> missing_data({"LLRD_REQUIRE_DATA": "1"})  # doctest: +SKIP
        ('fail', 'the data sets are missing: ... LLRD_REQUIRE_DATA=1 (CI) requires them')
    """
    env = os.environ if env is None else env
    if SST2.is_dir():
        return None
    reason = f"the data sets are missing: {SST2} is not a folder (put ../shared/data beside the checkout)"
    if env.get("LLRD_REQUIRE_DATA") == "1":
        return "fail", f"{reason}; LLRD_REQUIRE_DATA=1 (CI) requires them"
    return "skip", f"{reason}; set LLRD_REQUIRE_DATA=1 to fail instead"

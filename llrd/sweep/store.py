"""The sweep's state in an optuna storage: one study per sweep, one optuna trial per attempt of a (setting, seed).

The worker that creates the study writes its fingerprint and enqueues every (setting, seed) as a WAITING trial;
every worker (that one included) takes WAITING trials only, one at a time, marking it RUNNING in one storage
transaction, so two workers never take the same one. A running trial has a heartbeat; a live worker that finds a
trial whose heartbeat stopped (its worker died) marks it failed and enqueues it again (a new optuna trial, so a
fresh folder). The record a finished trial leaves (evaluations, test scores, time, error) is the trial's
``record`` user attribute; its value is the last validation score.

SQLite serialises writers, but Python's sqlite3 opens a transaction only at the first write, so optuna's
read-then-update of a trial's state could interleave between two processes; here every transaction on an SQLite
storage starts with ``BEGIN IMMEDIATE`` (the write lock first), which makes the take atomic.

Example:
    >>> storage = open_storage("sqlite:///out/sweep.db", heartbeat=30)  # doctest: +SKIP
    >>> study, created = join(storage, "llrd-sweep", fingerprint, keys)  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import threading
import time
from collections.abc import Iterator
from typing import Any

logger = logging.getLogger("llrd.sweep")

READY = "llrd_enqueued"  # study user attribute: how many trials the creator enqueued (absent while it enqueues)
FINGERPRINT = "llrd_fingerprint"
DUPLICATE = "duplicate_of"  # trial user attribute: a second copy of a lost trial, dropped when taken


def key_of(arm: str, setting: dict, seed: int) -> str:
    """The identity of a (setting, seed) across attempts.

    Example:
        >>> key_of("llrd", {"layer_decay": 0.8}, 1)
        'llrd|{"layer_decay": 0.8}|1'
    """
    return f"{arm}|{json.dumps(setting, sort_keys=True)}|{seed}"


def redact(url: str) -> str:
    """``url`` without its password (for logs and results files).

    Example:
        >>> redact("postgresql://me:secret@db:5432/sweeps")
        'postgresql://me:***@db:5432/sweeps'
    """
    head, sep, tail = url.partition("://")
    if "@" not in tail:
        return url
    cred, _, host = tail.rpartition("@")
    user, has_pw, _ = cred.partition(":")
    return f"{head}{sep}{user}{':***' if has_pw else ''}@{host}"


def open_storage(url: str, heartbeat: int):
    """An optuna ``RDBStorage`` at ``url`` with heartbeats every ``heartbeat`` seconds (a trial whose worker
    stopped beating for ``2 * heartbeat`` s is stale) and stale trials enqueued again."""
    import optuna
    from sqlalchemy.exc import IntegrityError, ProgrammingError

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    given, url = url, driver_url(url)
    sqlite = url.startswith("sqlite")
    kwargs = {"connect_args": {"isolation_level": None, "timeout": 120}} if sqlite else {}
    attempts = 5
    for attempt in range(attempts):  # workers creating a new database's tables at once: the losers retry
        try:
            with quiet_experimental():
                storage = optuna.storages.RDBStorage(
                    url,
                    engine_kwargs=kwargs,
                    heartbeat_interval=heartbeat,
                    grace_period=2 * heartbeat,
                    heartbeat_stale_trial_callback=requeue,
                )
            break
        except ImportError as err:
            raise ValueError(
                f"--storage {redact(given)}: its database driver is not installed ({err.__cause__ or err}); for "
                "PostgreSQL: pip install 'llrd[sweep-cluster]' (psycopg2), for MySQL: pip install pymysql"
            ) from err
        except Exception as err:  # noqa: BLE001 - a table created by the other worker meanwhile; a refused login
            racing = sqlite or isinstance(err, IntegrityError | ProgrammingError)  # duplicate table or type
            if attempt == attempts - 1 or not racing:
                cause = str(err.__cause__ or err).strip().splitlines()[0][:300]
                raise ValueError(f"--storage {redact(given)}: cannot open it ({type(err).__name__}: {cause})") from err
            time.sleep(0.2 + random.random())
    if sqlite:
        from sqlalchemy import event

        @event.listens_for(storage.engine, "begin")
        def _immediate(conn) -> None:
            conn.exec_driver_sql("BEGIN IMMEDIATE")

    return storage


def driver_url(url: str) -> str:
    """``postgresql://`` with the driver that is installed: SQLAlchemy 2.1 reads it as psycopg 3, earlier
    versions as psycopg2 (what ``llrd[sweep-cluster]`` installs); an explicit ``postgresql+DRIVER://`` is kept.

    Example:
        >>> driver_url("sqlite:///out/sweep.db")
        'sqlite:///out/sweep.db'
    """
    import importlib.util

    if url.startswith("postgresql://") and importlib.util.find_spec("psycopg") is None:
        if importlib.util.find_spec("psycopg2") is not None:
            return "postgresql+psycopg2://" + url.removeprefix("postgresql://")
    return url


@contextlib.contextmanager
def quiet_experimental() -> Iterator[None]:
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*heartbeat_interval.*")
        warnings.filterwarnings("ignore", category=UserWarning, module="optuna")
        warnings.filterwarnings("ignore", message=".*is experimental.*")
        yield


def join(storage, name: str, fingerprint: dict, entries: list[dict], wait: float = 120.0):
    """Create the study ``name`` and enqueue ``entries`` (one per (setting, seed): ``arm``, ``setting``,
    ``seed``), or load it when another worker created it; returns (study, created).

    Raises ValueError when the study was created with another fingerprint (naming the first difference) or when
    its creator never finished enqueueing within ``wait`` seconds.
    """
    import optuna

    try:
        study = optuna.create_study(study_name=name, storage=storage, direction="maximize")
        created = True
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(study_name=name, storage=storage)
        created = False
    if created:
        study.set_user_attr(FINGERPRINT, fingerprint)
        for entry in entries:
            study.enqueue_trial({}, user_attrs={**entry, "key": key_of(entry["arm"], entry["setting"], entry["seed"])})
        study.set_user_attr(READY, len(entries))
        return study, True
    deadline = time.monotonic() + wait
    while True:
        attrs = study.user_attrs
        if FINGERPRINT in attrs:
            theirs = json.loads(json.dumps(attrs[FINGERPRINT]))
            mine = json.loads(json.dumps(fingerprint))
            if theirs != mine:
                raise ValueError(
                    f"study {name!r} in this storage holds a sweep with other settings ({difference(theirs, mine)}); "
                    "this worker does not join it: run it with the same config, script and data, or pass another "
                    "--study_name (or --storage) for a new sweep"
                )
        if READY in attrs:
            return study, False
        if time.monotonic() > deadline:
            raise ValueError(
                f"study {name!r} exists but its creator has not finished enqueueing its trials after {wait:g} s "
                "(did it die while creating it?); delete the study (optuna delete-study) and start again"
            )
        time.sleep(0.5)


def difference(old: Any, new: Any, where: str = "") -> str:
    """The first difference between two JSON values, as ``path: old there, new here``.

    Example:
        >>> difference({"config": {"max_steps": 40}}, {"config": {"max_steps": 30}})
        'config.max_steps: 40 there, 30 here'
    """
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new)):
            if old.get(key) != new.get(key):
                return difference(old.get(key), new.get(key), f"{where}{key}.")
    return f"{where.rstrip('.')}: {old!r} there, {new!r} here"


def requeue(study, trial) -> None:
    """Enqueue ``trial``'s (setting, seed) again as a new WAITING trial (its own folder); optuna calls this for
    each trial it marks failed because its worker stopped beating, and a worker for its interrupted trial."""
    attrs = {k: v for k, v in trial.user_attrs.items() if k not in ("record", DUPLICATE)}
    attrs.update(attempt=int(attrs.get("attempt", 1)) + 1, requeued_from=trial.number)
    study.enqueue_trial({}, user_attrs=attrs)
    logger.info("trial %d (%s) lost its worker: enqueued again", trial.number, attrs.get("key"))


def take(study):
    """A WAITING trial of ``study``, now RUNNING and this worker's (with its first heartbeat), or None.

    It beats once before it marks the trial RUNNING: a worker dying between the two leaves a heartbeat that goes
    stale (optuna never fails a RUNNING trial that has none, and every worker would wait for it forever)."""
    from optuna.exceptions import StorageInternalError, UpdateFinishedTrialError
    from optuna.trial import TrialState

    storage = study._storage
    for trial in study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        try:
            storage.record_heartbeat(trial._trial_id)
            if storage.set_trial_state_values(trial._trial_id, TrialState.RUNNING):
                storage.record_heartbeat(trial._trial_id)
                earlier = _live_earlier_attempt(study, trial)
                if earlier is None:
                    return storage.get_trial(trial._trial_id)
                storage.set_trial_user_attr(trial._trial_id, DUPLICATE, earlier)
                storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
                logger.info("trial %d: its (setting, seed) is already trial %d's: dropped", trial.number, earlier)
        except (UpdateFinishedTrialError, StorageInternalError):
            continue
    return None


def _live_earlier_attempt(study, trial) -> int | None:
    """The number of an earlier waiting, running or complete attempt of ``trial``'s (setting, seed), if any: then
    ``trial`` is a second copy (two workers enqueued one lost trial at once) and is dropped. Only the later copy
    is ever dropped, so exactly one runs."""
    from optuna.trial import TrialState

    live = (TrialState.WAITING, TrialState.RUNNING, TrialState.COMPLETE)
    key = trial.user_attrs.get("key")
    for other in study.get_trials(deepcopy=False, states=live):
        if other.number < trial.number and other.user_attrs.get("key") == key and DUPLICATE not in other.user_attrs:
            return other.number
    return None


class Heartbeat:
    """Beats for one trial every ``interval`` seconds in a thread, while the trial's process runs."""

    def __init__(self, storage, trial_id: int, interval: float):
        self.storage, self.trial_id, self.interval = storage, trial_id, interval
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._beat, daemon=True, name=f"llrd-heartbeat-{trial_id}")

    def _beat(self) -> None:
        while not self.stop.wait(self.interval):
            try:
                self.storage.record_heartbeat(self.trial_id)
            except Exception as err:  # noqa: BLE001 - a busy database: the next beat tries again
                logger.warning("heartbeat of trial %d not recorded: %s", self.trial_id, err)

    def __enter__(self) -> Heartbeat:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()


def finish(study, trial, record: dict) -> bool:
    """Store ``record`` on ``trial`` and mark it COMPLETE (value: the last validation score) or FAIL; False when
    the trial was meanwhile failed as stale (its result is dropped: the re-queued copy runs instead)."""
    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.trial import TrialState

    storage = study._storage
    try:
        storage.set_trial_user_attr(trial._trial_id, "record", record)
        if record["status"] == "ok":
            storage.set_trial_state_values(trial._trial_id, TrialState.COMPLETE, values=[float(record["final"])])
        else:
            storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
    except UpdateFinishedTrialError:
        logger.warning("trial %d was failed as stale while it ran (no heartbeat): its result is dropped", trial.number)
        return False
    return True


def interrupted(study, trial) -> None:
    """Mark this worker's running ``trial`` failed and enqueue it again (Ctrl-C, SIGTERM)."""
    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.trial import TrialState

    with contextlib.suppress(UpdateFinishedTrialError):
        if study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL):
            requeue(study, study._storage.get_trial(trial._trial_id))


def _latest(study) -> dict[str, Any]:
    """Per (setting, seed): its complete trials and its latest attempt."""
    from optuna.trial import TrialState

    out: dict[str, Any] = {}
    for t in study.get_trials(deepcopy=False):
        key = t.user_attrs.get("key")
        if key is None or DUPLICATE in t.user_attrs:
            continue
        entry = out.setdefault(key, {"complete": [], "latest": t, "attempts": 0})
        entry["attempts"] += 1
        if t.state == TrialState.COMPLETE:
            entry["complete"].append(t)
        if t.number > entry["latest"].number:
            entry["latest"] = t
    return out


def state(study) -> dict[str, Any]:
    """What the storage holds now: ``records`` (one per (setting, seed) that finished: its complete trial, else
    its latest attempt when that failed with a record), ``waiting``, ``running``, ``attempts`` and ``duplicates``
    (keys complete more than once: never, if the take is atomic)."""
    from optuna.trial import TrialState

    records, waiting, running, attempts, pending = {}, 0, 0, 0, 0
    for key, entry in _latest(study).items():
        latest = entry["latest"]
        attempts += entry["attempts"]
        if entry["complete"]:
            records[key] = entry["complete"][0].user_attrs["record"]
        elif latest.state == TrialState.FAIL and "record" in latest.user_attrs:
            records[key] = latest.user_attrs["record"]
        waiting += latest.state == TrialState.WAITING
        running += latest.state == TrialState.RUNNING
        pending += _orphaned(entry)
    dups = sorted(key for key, entry in _latest(study).items() if len(entry["complete"]) > 1)
    return {"records": records, "waiting": waiting, "running": running, "pending": pending, "attempts": attempts,
            "duplicates": dups}  # fmt: skip


def _orphaned(entry: dict) -> bool:
    """Whether a (setting, seed) was lost: its latest attempt failed without a record (failed as stale, or
    interrupted) and nothing enqueued it again (the worker that failed it died first)."""
    from optuna.trial import TrialState

    latest = entry["latest"]
    return not entry["complete"] and latest.state == TrialState.FAIL and "record" not in latest.user_attrs


def requeue_orphans(study, grace: float) -> int:
    """Enqueue again every lost (setting, seed) (:func:`_orphaned`) whose attempt failed more than ``grace``
    seconds ago (sooner, the worker that failed it may still be enqueueing it); returns how many. Two workers
    doing so at once enqueue it twice; :func:`take` drops the later copy.

    Example:
        >>> requeue_orphans(study, grace=60)  # doctest: +SKIP
        0
    """
    import datetime

    count = 0
    now = datetime.datetime.now()
    for entry in _latest(study).values():
        latest = entry["latest"]
        if _orphaned(entry) and latest.datetime_complete and (now - latest.datetime_complete).total_seconds() > grace:
            requeue(study, latest)
            count += 1
    return count


def retry_failed(study) -> int:
    """Enqueue again every (setting, seed) whose latest attempt failed with an error (``--retry_failed``);
    returns how many."""
    from optuna.trial import TrialState

    latest = _latest(study)
    if any(e["latest"].state in (TrialState.WAITING, TrialState.RUNNING) for e in latest.values()):
        raise ValueError(
            "--retry_failed: the sweep still has waiting or running trials; retry when every worker has finished"
        )
    count = 0
    for entry in latest.values():
        trial = entry["latest"]
        if not entry["complete"] and trial.state == TrialState.FAIL:
            attrs = {k: v for k, v in trial.user_attrs.items() if k != "record"}
            study.enqueue_trial({}, user_attrs={**attrs, "attempt": int(attrs.get("attempt", 1)) + 1})
            count += 1
    return count

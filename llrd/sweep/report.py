"""Pure arithmetic on trial records: per-setting summaries, selection on validation (which never sees a test
score), the paired verdict on test with every named arm against plain (Holm's correction when there are
several), and the markdown table. No I/O, so each piece is tested on made-up results."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from typing import Any

from .grid import is_plain, label

# metric names (after ``eval_``) where lower is better, besides every name ending in "loss"
LOWER_IS_BETTER = ("mse", "mae", "rmse", "perplexity", "error", "error_rate", "wer", "cer")


def greater_is_better(metric: str, override: bool | None = None) -> bool:
    """Whether a higher ``metric`` is better: ``override`` when given (``--greater_is_better``), else False for
    losses and the error-like names of ``LOWER_IS_BETTER`` (``mse``, ``wer``, ...), True for everything else.

    Example:
        >>> greater_is_better("accuracy"), greater_is_better("loss"), greater_is_better("mse")
        (True, False, False)
    """
    if override is not None:
        return override
    return not (metric.endswith("loss") or metric in LOWER_IS_BETTER)


def steps_to(curve: list[list[float]], target: float, greater: bool = True) -> int | None:
    """First evaluated step whose value reaches ``target`` (None if none does).

    Example:
        >>> steps_to([[20, 0.7], [40, 0.82], [60, 0.81]], 0.8)
        40
    """
    return next((int(step) for step, value in curve if (value >= target if greater else value <= target)), None)


def summarize(
    settings: list[dict],
    records: list[dict],
    greater: bool = True,
    target: float | None = None,
    value: Callable[[dict], float] = lambda r: r["final"],
    arm: str | None = None,
) -> list[dict]:
    """One row per setting over its trials (of ``arm``, when given): ``value`` per seed (default: the last
    validation value), mean, std, worst and best seed, steps to ``target`` per seed, failed seeds.

    Example:
        >>> recs = [{"setting": {"layer_decay": 0.8}, "seed": s, "status": "ok", "final": v,
        ...          "curve": [[10, v]], "seconds": 1.0} for s, v in ((0, 0.8), (1, 0.9))]
        >>> row = summarize([{"layer_decay": 0.8}], recs)[0]
        >>> round(row["mean"], 3), row["worst"], row["best"]
        (0.85, [0, 0.8], [1, 0.9])
    """
    rows = []
    for setting in settings:
        runs = sorted(
            (r for r in records if r["setting"] == setting and (arm is None or r.get("arm", arm) == arm)),
            key=lambda r: r["seed"],
        )
        ok = [r for r in runs if r["status"] == "ok"]
        finals = {r["seed"]: value(r) for r in ok}
        row: dict[str, Any] = {
            "setting": setting,
            "label": label(setting),
            "arm": arm if arm is not None else "plain" if is_plain(setting) else "llrd",
            "finals": finals,
            "failed": [r["seed"] for r in runs if r["status"] != "ok"],
            "mean": statistics.mean(finals.values()) if finals else None,
            "std": statistics.stdev(finals.values()) if len(finals) > 1 else 0.0 if finals else None,
            "seconds_mean": statistics.mean(r["seconds"] for r in ok) if ok else None,
        }
        if finals:
            ordered = sorted(finals.items(), key=lambda kv: kv[1] if greater else -kv[1])  # worst first
            row["worst"], row["best"] = list(ordered[0]), list(ordered[-1])
        else:
            row["worst"] = row["best"] = None
        if target is not None:
            row["steps_to_target"] = {r["seed"]: steps_to(r["curve"], target, greater) for r in ok}
        rows.append(row)
    return rows


def without_test(records: list[dict]) -> list[dict]:
    """Copies of ``records`` without their test scores: what selection gets."""
    return [{k: v for k, v in r.items() if k != "test"} for r in records]


def select(arms: dict[str, list[dict]], records: list[dict], greater: bool = True) -> dict[str, dict | None]:
    """Each arm's chosen row (best mean validation value, see :func:`choose`), from ``records`` with their test
    scores stripped first: the choice cannot depend on test.

    Example:
        >>> recs = [{"arm": "llrd", "setting": {"layer_decay": d}, "seed": 0, "status": "ok", "final": v,
        ...          "curve": [], "seconds": 1.0, "test": {"accuracy": 1 - v}} for d, v in ((0.8, 0.7), (0.9, 0.8))]
        >>> select({"llrd": [{"layer_decay": 0.8}, {"layer_decay": 0.9}]}, recs)["llrd"]["label"]
        'layer_decay=0.9'
    """
    blind = without_test(records)
    return {arm: choose(summarize(settings, blind, greater, arm=arm), greater) for arm, settings in arms.items()}


def choose(rows: list[dict], greater: bool = True) -> dict | None:
    """The row with the best mean validation value (the first in grid order on a tie); None if none ran.

    Only settings whose every seed finished are eligible, so means over different seeds are never compared;
    when no setting of the arm finished every seed, the rows with results compete (the table's notes say so).

    Example:
        >>> choose([{"label": "a", "mean": 0.8, "failed": []}, {"label": "b", "mean": 0.9, "failed": []},
        ...         {"label": "c", "mean": 0.95, "failed": [1]}, {"label": "d", "mean": None, "failed": [0]}])["label"]
        'b'
    """
    ran = [r for r in rows if r["mean"] is not None]
    complete = [r for r in ran if not r.get("failed")]
    pool = complete or ran
    if not pool:
        return None
    return max(pool, key=lambda r: _key(r["mean"]) if greater else -_key(r["mean"]))


def _key(mean: float) -> float:
    """A mean rounded to 10 significant digits: two settings whose k/N values sum the same tie exactly."""
    return float(f"{mean:.10g}")


def t_quantile(p: float, df: int) -> float:
    """Student's t quantile (scipy).

    Example:
        >>> round(t_quantile(0.975, 4), 4)
        2.7764
    """
    from scipy.stats import t

    return float(t.ppf(p, df))


def paired_interval(diffs: list[float], confidence: float = 0.95) -> dict:
    """Mean of paired differences with its two-sided Student-t confidence interval
    (mean ± t_{(1+c)/2, n-1} · sd / √n); bounds are None with fewer than 2 pairs, or when every difference is
    the same (sd 0: no spread to build an interval from).

    Example:
        >>> ci = paired_interval([0.02, 0.01, 0.03, 0.02, 0.02])
        >>> round(ci["mean"], 4), round(ci["low"], 4), round(ci["high"], 4)
        (0.02, 0.0112, 0.0288)
    """
    n = len(diffs)
    out = {"n": n, "confidence": confidence, "mean": statistics.mean(diffs) if diffs else None, "low": None}
    out["high"] = None
    if n >= 2:
        sd = statistics.stdev(diffs)
        out["sd"] = sd
        # equal differences (a metric in steps of 1/N) give no spread: no interval rather than a zero-width one
        out["no_spread"] = sd <= 1e-12 * max(1.0, abs(out["mean"]))
        if not out["no_spread"]:
            half = t_quantile((1 + confidence) / 2, n - 1) * sd / math.sqrt(n)
            out.update(low=out["mean"] - half, high=out["mean"] + half, p=paired_p(out["mean"], sd, n))
    return out


def paired_p(mean: float, sd: float, n: int) -> float:
    """Two-sided p-value of the paired t-test of mean difference 0 (scipy's t distribution).

    Example:
        >>> round(paired_p(0.02, 0.01, 3), 4)
        0.0742
    """
    from scipy.stats import t

    return float(2 * t.sf(abs(mean) / (sd / math.sqrt(n)), n - 1))


def holm(p_values: dict[str, float | None]) -> dict[str, float | None]:
    """Holm's step-down adjustment of several p-values (family-wise error rate): the i-th smallest of m becomes
    max over j <= i of min(1, (m - j + 1) p_(j)); None (no test possible) stays None and is not counted.

    Example:
        >>> holm({"a": 0.01, "b": 0.04, "c": 0.03, "d": None})
        {'a': 0.03, 'b': 0.06, 'c': 0.06, 'd': None}
    """
    tested = sorted((p, name) for name, p in p_values.items() if p is not None)
    m, out, running = len(tested), {name: None for name in p_values}, 0.0
    for i, (p, name) in enumerate(tested):
        running = max(running, min(1.0, (m - i) * p))
        out[name] = float(f"{running:.12g}")
    return out


def verdict(
    plain: dict,
    llrd: dict,
    test_plain: dict[int, float],
    test_llrd: dict[int, float],
    metric: str,
    greater: bool = True,
    confidence: float = 0.95,
    name: str = "LLRD",
    holm_p: float | None = None,
    family: int = 1,
) -> dict:
    """The one-line answer. ``plain``/``llrd`` are the arms' chosen rows (on validation); the gain is LLRD's
    (arm ``name``'s) over plain on the test split, paired by seed (positive = LLRD better, also for losses).
    With ``family`` > 1 arms compared against plain, the conclusion follows the Holm-adjusted p-value
    ``holm_p`` at level ``1 - confidence`` (the interval printed stays the unadjusted per-arm t-interval).

    Example:
        >>> v = verdict({"label": "lr=5e-05", "mean": 0.85}, {"label": "decay=0.8", "mean": 0.87},
        ...             {0: 0.77, 1: 0.78}, {0: 0.79, 1: 0.81}, "accuracy")
        >>> v["recommended"], round(v["gain"]["mean"], 3), v["excludes_zero"]
        ('llrd', 0.025, False)
    """
    seeds = sorted(set(test_plain) & set(test_llrd))
    sign = 1 if greater else -1
    ci = paired_interval([sign * (test_llrd[s] - test_plain[s]) for s in seeds], confidence)
    m_llrd, m_plain = _key(llrd["mean"]), _key(plain["mean"])  # means of k/N values: compare at 10 digits
    llrd_wins = (m_llrd > m_plain) if greater else (m_llrd < m_plain)
    best, other = (llrd, plain) if llrd_wins else (plain, llrd)
    mean_llrd = statistics.mean(test_llrd[s] for s in seeds) if seeds else math.nan
    mean_plain = statistics.mean(test_plain[s] for s in seeds) if seeds else math.nan
    what = f"{confidence * 100:g}% t-interval over {len(seeds)} paired seed{'s' if len(seeds) != 1 else ''}"
    if ci.get("no_spread"):
        interval, excludes = f"no interval ({what}: every paired difference is {ci['mean']:+.4f}, no spread)", False
        conclusion = "no spread between seeds to judge from: not a conclusion; run more seeds or a larger test set"
    elif ci["low"] is None:
        interval, excludes, conclusion = f"no interval ({what}: needs at least 2)", False, "too few seeds to tell"
    elif family > 1:
        interval = f"{what} [{ci['low']:+.4f}, {ci['high']:+.4f}] (unadjusted)"
        alpha = 1 - confidence
        excludes = holm_p is not None and holm_p < alpha
        side = f"{name} better" if ci["mean"] > 0 else "plain better"
        conclusion = f"Holm-adjusted p {holm_p:.3g} over {family} arms {'<' if excludes else '>='} {alpha:g}: " + (
            side if excludes else "no difference detected"
        )
    else:
        interval = f"{what} [{ci['low']:+.4f}, {ci['high']:+.4f}]"
        excludes = ci["low"] > 0 or ci["high"] < 0
        conclusion = (
            f"excludes 0: {name} better"
            if ci["low"] > 0
            else "excludes 0: plain better"
            if ci["high"] < 0
            else "includes 0: no difference detected"
        )
    gain = f"{ci['mean']:+.4f}" if ci["mean"] is not None else "n/a"
    tie = m_llrd == m_plain
    head = (
        f"use {best['label']} (best on validation)"
        if llrd_wins
        else f"use plain fine-tuning, {best['label']} (best on validation)"
        if not tie
        else f"use plain fine-tuning, {best['label']} (validation tie: the simpler arm)"
    )
    compared = (
        f"vs the best plain setting ({other['label']})" if llrd_wins else f"the best LLRD setting ({other['label']})"
    )
    line = (
        f"verdict: {head}; {compared}: test {metric} {mean_llrd:.4f} ({name}) vs {mean_plain:.4f} (plain), "
        f"paired gain {gain}, {interval}: {conclusion}."
    )
    if excludes and not tie and (ci["mean"] > 0) != llrd_wins:  # validation chose one arm, test favours the other
        line += (
            " Validation and test disagree: the arm chosen on validation is worse on test; check that the "
            "validation split resembles the data you care about."
        )
    return {
        "recommended": "llrd" if llrd_wins else "plain",
        "best": best["label"],
        "plain": plain["label"],
        "llrd": llrd["label"],
        "seeds": seeds,
        "test_plain": [test_plain[s] for s in seeds],
        "test_llrd": [test_llrd[s] for s in seeds],
        "gain": ci,
        "excludes_zero": excludes,
        "holm_p": holm_p,
        "line": line,
    }


def compare(
    chosen: dict[str, dict],
    records: list[dict],
    metric: str,
    greater: bool = True,
    confidence: float = 0.95,
) -> dict:
    """Every arm's chosen setting against plain's, on test, paired by seed: one :func:`verdict` per arm, with
    Holm's correction over the arms when there are several; the overall ``line`` is the one arm's line, or a
    head (the best arm on validation) followed by each arm's line.

    Example:
        >>> compare(chosen, records, "accuracy")["line"]  # doctest: +SKIP
        'verdict: use layer_decay=0.8, learning_rate=0.0003 (best on validation); ...'
    """
    plain = chosen["plain"]
    others = [arm for arm in chosen if arm != "plain"]

    def tests(row: dict) -> dict[int, float]:
        return {r["seed"]: r["test"][metric] for r in records
                if r.get("arm") == row["arm"] and r["setting"] == row["setting"] and r["status"] == "ok"}  # fmt: skip

    sign = 1 if greater else -1
    raw_p = {}
    for arm in others:
        tp, ta = tests(plain), tests(chosen[arm])
        seeds = sorted(set(tp) & set(ta))
        raw_p[arm] = paired_interval([sign * (ta[s] - tp[s]) for s in seeds], confidence).get("p")
    adjusted = holm(raw_p)
    family = len(others)
    verdicts = {
        arm: verdict(plain, chosen[arm], tests(plain), tests(chosen[arm]), metric, greater, confidence,
                     name="LLRD" if arm == "llrd" else arm, holm_p=adjusted[arm], family=family)
        for arm in others
    }  # fmt: skip
    if family == 1:
        return {**verdicts[others[0]], "arms": verdicts, "correction": "none (one arm against plain)"}
    ranked = sorted(chosen.values(), key=lambda r: _key(r["mean"]) if greater else -_key(r["mean"]), reverse=True)
    best = ranked[0]
    head = (
        f"verdict: use {best['label']} ({best['arm']} arm, best on validation of {len(chosen)} arms); each arm "
        f"against plain on test, Holm's correction over {family} comparisons:"
    )
    lines = [head] + [f"  {arm}: {v['line'].removeprefix('verdict: ')}" for arm, v in verdicts.items()]
    return {
        "recommended": best["arm"],
        "best": best["label"],
        "seeds": sorted(set().union(*(v["seeds"] for v in verdicts.values()))),
        "arms": verdicts,
        "correction": f"Holm step-down over {family} arms against plain, family-wise level {1 - confidence:g}",
        "excludes_zero": any(v["excludes_zero"] for v in verdicts.values()),
        "line": "\n".join(lines),
    }


def edge_notes(chosen: dict, arm: list[dict]) -> list[str]:
    """Warnings when an arm's chosen value of a swept field lies at the edge of what that arm tried.

    Example:
        >>> arm = [{"layer_decay": 1.0, "learning_rate": r} for r in (5e-5, 1e-4)]
        >>> edge_notes({"label": "x", "setting": arm[0], "arm": "plain"}, arm)
        ['the best plain setting has the lowest learning_rate tried (5e-05): the optimum may lie beyond the grid']
    """
    notes = []
    for key, value in chosen["setting"].items():
        tried = sorted({s[key] for s in arm if isinstance(s[key], int | float) and not isinstance(s[key], bool)})
        if len(tried) < 2 or value not in tried or value not in (tried[0], tried[-1]):
            continue
        edge = "lowest" if value == tried[0] else "highest"
        notes.append(
            f"the best {chosen['arm']} setting has the {edge} {key} tried ({value:g}): the optimum may lie "
            "beyond the grid"
        )
    return notes


def _fmt(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _spread(row: dict) -> str:
    if not row.get("worst"):
        return "-"
    (ws, wv), (bs, bv) = row["worst"], row["best"]
    return f"{wv:.4f} (seed {ws}) – {bv:.4f} (seed {bs})"


def _reach(row: dict) -> str:
    steps = row.get("steps_to_target") or {}
    reached = [s for s in steps.values() if s is not None]
    if not steps:
        return "-"
    if not reached:
        return f"never (0/{len(steps)})"
    return f"{statistics.median(reached):g} ({len(reached)}/{len(steps)})"


def markdown(
    header: list[str],
    rows: list[dict],
    test_rows: list[dict],
    metric: str,
    target: float | None,
    footer: list[str],
    greater: bool = True,
) -> str:
    """``table.md``: every setting on validation, the two chosen settings on test, then ``footer`` lines
    (notes and the verdict)."""
    lines = [*header, ""]
    lines += [
        f"**Validation** ({metric} at the last evaluation; selection uses only this table):",
        "",
        f"| arm | setting | seeds | val {metric} mean ± std | worst – best seed | steps to val {metric} "
        f"{'≥' if greater else '≤'} {_fmt(target)} (median; seeds reaching) | time / trial |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        seeds = f"{len(r['finals'])}" + (f" ({len(r['failed'])} failed)" if r["failed"] else "")
        mean = "-" if r["mean"] is None else f"{r['mean']:.4f} ± {r['std']:.4f}"
        secs = "-" if r["seconds_mean"] is None else f"{r['seconds_mean']:.0f} s"
        lines.append(f"| {r['arm']} | {r['label']} | {seeds} | {mean} | {_spread(r)} | {_reach(r)} | {secs} |")
    if test_rows:
        lines += [
            "",
            "**Test** (for the setting each arm chose on validation: the test split evaluated once at the end of "
            "each of its trials, on the model whose validation score is above):",
            "",
            f"| arm | chosen setting | test {metric} mean ± std | worst – best seed | per seed |",
            "|---|---|---|---|---|",
        ]
        for r in test_rows:
            per_seed = ", ".join(f"{v:.4f}" for v in r["finals"].values())
            mean = "-" if r["mean"] is None else f"{r['mean']:.4f} ± {r['std']:.4f}"
            lines.append(f"| {r['arm']} | {r['label']} | {mean} | {_spread(r)} | {per_seed} |")
    return "\n".join([*lines, "", *footer]) + "\n"

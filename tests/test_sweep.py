"""``llrd sweep``: the arithmetic on made-up trial results (exact numbers), the grid and its equal budget, the
data splits, the trial commands, and the mechanics in real subprocesses with a stand-in recipe
(``tests/fake_recipe.py``): failed trials, resume, changed settings, a launcher. The real run on the bundled
MiniLM is ``test_bench_quality_quick`` in tests/test_benchmarks.py."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from llrd.sweep import data, report, trials
from llrd.sweep.cli import build_spec, parse_grid
from llrd.sweep.cli import main as sweep_main
from llrd.sweep.grid import coerce, expand, label, widen

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


def made_up(setting, seeds_values, phase="tune", key="final"):
    return [
        {"phase": phase, "setting": setting, "seed": s, "status": "ok", "seconds": 10.0, "curve": [[20, v - 0.05],
         [40, v]], "final": v, **({"test": {"accuracy": v}} if phase == "test" else {})}
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
    files = {s: {"path": f"/d/{s}.csv"} for s in ("train", "validation", "test")}
    base = {"test_file": "x.csv", "dataset_name": "stanfordnlp/sst2", "learning_rate": 1e-4, "save_strategy": "steps"}
    tune = trials.trial_config(base, trials.Trial("tune", LLRD_A, 3), Path("/o"), files)
    assert "test_file" not in tune and "dataset_name" not in tune  # the test split stays sealed while tuning
    assert tune["learning_rate"] == 3e-4 and tune["seed"] == 3 and tune["save_strategy"] == "no"
    assert tune["output_dir"] == "/o/trials/tune/layer_decay-0.8_learning_rate-0.0003__seed-3"
    test = trials.trial_config(base, trials.Trial("test", LLRD_A, 3), Path("/o"), files)
    assert test["test_file"] == "/d/test.csv" and test["output_dir"].startswith("/o/trials/test/")
    assert trials.command("r.py", Path("c.json")) == [sys.executable, "r.py", "c.json"]
    launcher = ["accelerate", "launch", "--config_file", "recipes/accelerate/cpu_2proc.yaml"]
    assert trials.command("r.py", Path("c.json"), launcher) == [*launcher, "r.py", "c.json"]
    assert trials.failure_line("Traceback\n  ...\nKeyError: 'x'\n", 1) == "exit code 1: KeyError: 'x'"


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


def sweep(tmp_path: Path, *extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """``python -m llrd sweep`` in a real subprocess; every trial call is logged to calls.txt."""
    argv = [sys.executable, "-m", "llrd", "sweep", *sweep_args(tmp_path, *extra)]
    run_env = {**os.environ, "PYTHONPATH": str(ROOT), "FAKE_CALLS": str(tmp_path / "calls.txt"), **(env or {})}
    return subprocess.run(argv, cwd=ROOT, env=run_env, capture_output=True, text=True, timeout=300)


def calls(tmp_path: Path) -> list[str]:
    path = tmp_path / "calls.txt"
    return path.read_text().splitlines() if path.exists() else []


def test_sweep_records_a_failed_trial_goes_on_and_resumes_without_rerunning(tmp_path, capsys):
    grid = ["--seeds", "3", "--layer_decay", "0.8", "--learning_rate", "1e-4", "2e-4", "0.000777"]
    proc = sweep(tmp_path, *grid)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "out"
    res = json.loads((out / "results.json").read_text())
    # 6 settings x 3 seeds, then the 2 chosen x 3 seeds with the test split; the fake lr 0.000777 always fails
    assert len(res["trials"]) == 24 and len(calls(tmp_path)) == 24
    failed = [t for t in res["trials"] if t["status"] == "failed"]
    assert len(failed) == 6 and {t["error"] for t in failed} == {"exit code 1: error: boom"}
    assert all(t["setting"]["learning_rate"] == 0.000777 for t in failed)
    assert res["chosen"] == {
        "plain": "layer_decay=1, learning_rate=0.0001",
        "llrd": "layer_decay=0.8, learning_rate=0.0001",
    }
    # the fake: quality 0.85 at lr 1e-4, +0.02 for LLRD; test = quality - 0.05 + (seed % 3 - 1) / 200
    assert res["verdict"]["test_plain"] == [0.795, 0.8, 0.805] and res["verdict"]["test_llrd"] == [0.815, 0.822, 0.829]
    assert res["verdict"]["gain"]["mean"] == pytest.approx(0.022) and res["verdict"]["excludes_zero"]
    assert proc.stdout.strip().splitlines()[-1] == res["verdict"]["line"]
    assert "[24/24]" in proc.stderr and "min left" in proc.stderr
    # tuning trials never saw the test file; test runs did, and reproduced their tuning run's validation curve
    tune = json.loads((out / "trials/tune/layer_decay-1_learning_rate-0.0001__seed-0/config.json").read_text())
    assert "test_file" not in tune and tune["seed"] == 0
    assert not any("did not reproduce" in n for n in res["notes"])
    assert not list(out.glob("trials/*/*/model.safetensors"))  # weights deleted by default
    table = (out / "table.md").read_text()
    assert "| plain | layer_decay=1, learning_rate=0.000777 | 0 (3 failed) |" in table
    assert "failed: tune layer_decay=1, learning_rate=0.000777, seeds [0, 1, 2]: exit code 1: error: boom" in table
    assert (out / "sweep.png").stat().st_size > 10_000

    # resume: finished trials are reused, only the failed ones run again (and fail again)
    before = len(calls(tmp_path))
    proc = sweep(tmp_path, *grid)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(calls(tmp_path)) - before == 6 and "finished earlier, reused" in proc.stderr
    assert json.loads((out / "results.json").read_text())["verdict"] == res["verdict"]

    # an interrupted trial (no trial.json) is run again from scratch
    victim = out / "trials/tune/layer_decay-0.8_learning_rate-0.0002__seed-1"
    (victim / "trial.json").unlink()
    (victim / "trainer_state.json").write_text("stale")
    before = len(calls(tmp_path))
    assert sweep(tmp_path, *grid).returncode == 0
    assert calls(tmp_path)[before:].count("tune/layer_decay-0.8_learning_rate-0.0002__seed-1") == 1
    assert json.loads((victim / "trial.json").read_text())["status"] == "ok"

    # the same folder with other settings: refused, nothing run
    before = len(calls(tmp_path))
    assert sweep_main(sweep_args(tmp_path, *grid, "--max_steps", "30")) == 2
    assert "max_steps: 40 there, 30 now" in capsys.readouterr().err
    assert len(calls(tmp_path)) == before

    # resumed with another --metric: the reused records are scored on that metric, not on the one they ran with
    proc = sweep(tmp_path, *grid, "--metric", "loss")
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert {t["final"] for t in res["trials"] if t["status"] == "ok"} == {0.6}  # the fake's eval_loss at step 40
    assert "| plain | layer_decay=1, learning_rate=0.0001 | 3 | 0.6000 ± 0.0000 |" in (out / "table.md").read_text()

    # a second sweep on the same folder while one runs is refused
    import fcntl

    with open(out / ".lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert sweep_main(sweep_args(tmp_path, *grid)) == 2
        assert "another llrd sweep is running there" in capsys.readouterr().err


def test_a_metric_the_script_does_not_log_stops_the_sweep_after_one_trial(tmp_path):
    proc = sweep(tmp_path, "--seeds", "2", "--layer_decay", "0.8", "--metric", "f1")
    assert proc.returncode == 2 and "--metric f1: no eval_f1" in proc.stderr and "eval_accuracy" in proc.stderr
    assert len(calls(tmp_path)) == 1


def test_the_plain_arm_drops_llrd_settings_and_llrd_only_axes_vary_the_llrd_arm():
    files = {s: {"path": f"/d/{s}.csv"} for s in ("train", "validation", "test")}
    base = {"learning_rate": 1e-4, "head_lr_scale": 10.0, "reinit_top_blocks": 1, "layer_stats": "none"}
    plain = trials.trial_config(base, trials.Trial("tune", PLAIN_A, 0), Path("/o"), files)
    assert "head_lr_scale" not in plain and "reinit_top_blocks" not in plain and plain["layer_stats"] == "none"
    llrd = trials.trial_config(base, trials.Trial("tune", LLRD_A, 0), Path("/o"), files)
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
        (["--script", "no/such.py"], "--script no/such.py: no such file"),
        (["--test_file", "~/no-such-file.csv"], "no-such-file.csv: file not found"),
        (["--learning_rate", "0"], "--learning_rate 0.0: a learning rate must be a positive number"),
        (["--plain_learning_rate", "nan"], "--plain_learning_rate nan: a learning rate must be a positive number"),
        (["--test_file", str(tmp_path / "train.csv")], "test_file and train_file are the same file"),
        (["--test_file", str(tmp_path / "empty.csv")], "empty.csv: no data rows"),
        (["--test_file", str(tmp_path / "ragged.csv")], "ragged.csv: row 3 does not have the header's 2 fields"),
    ):
        assert sweep_main(sweep_args(tmp_path, "--layer_decay", "0.8", *extra)) == 2, extra
        assert message in capsys.readouterr().err, extra
    assert not (tmp_path / "out" / "trials").exists()


def test_transient_failures_are_retried_on_resume(tmp_path):
    flag = tmp_path / "failing"
    flag.write_text("")
    proc = sweep(tmp_path, "--seeds", "2", "--layer_decay", "0.8", env={"FAKE_FAIL_ONCE": str(flag)})
    assert proc.returncode == 1 and "every plain trial failed: no verdict" in proc.stderr
    flag.unlink()
    proc = sweep(tmp_path, "--seeds", "2", "--layer_decay", "0.8", env={"FAKE_FAIL_ONCE": str(flag)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / "out/results.json").read_text())
    assert all(t["status"] == "ok" for t in res["trials"]) and len(calls(tmp_path)) == 4 + 8
    assert "2 paired seeds" in res["verdict"]["line"]


def test_no_verdict_when_the_chosen_settings_fail_on_test(tmp_path):
    proc = sweep(tmp_path, "--seeds", "2", "--layer_decay", "0.8", env={"FAKE_FAIL_TEST": "1"})
    assert proc.returncode == 1 and "no seed has test results for both chosen settings" in proc.stderr
    res = json.loads((tmp_path / "out/results.json").read_text())
    assert [t["status"] for t in res["trials"]] == ["ok"] * 4 + ["failed"] * 4
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
    files = data.prepare({"train_file": str(tmp_path / "train.csv")}, tmp_path, validation_size=5)
    trial = trials.Trial("tune", {"layer_decay": 0.8, "learning_rate": 1e-4}, 0)
    cfg = trials.trial_config({"max_steps": 20, "eval_steps": 10}, trial, tmp_path, files)
    launcher = [accelerate, "launch", "--config_file", "recipes/accelerate/cpu_2proc.yaml", "--main_process_port", "0"]
    expected = trials.fingerprint(cfg, FAKE, launcher, files, "tune")
    record = trials.run_trial(trial, cfg, expected, (FAKE, launcher), "accuracy", timeout=240, cwd=ROOT)
    assert record["status"] == "ok", (Path(cfg["output_dir"]) / "log.txt").read_text()[-3000:]
    assert record["command"][:2] == [accelerate, "launch"]
    assert (Path(cfg["output_dir"]) / "world_size.txt").read_text() == "2"
    assert trials.load_record(Path(cfg["output_dir"]), expected) == json.loads(
        (Path(cfg["output_dir"]) / "trial.json").read_text()
    )


def test_a_hung_trial_is_killed_at_its_timeout(tmp_path):
    script = tmp_path / "hang.py"
    script.write_text("import time\nprint('started', flush=True)\ntime.sleep(600)\n")
    files = {s: {"path": str(tmp_path / f"{s}.csv"), "sha": "x"} for s in ("train", "validation")}
    trial = trials.Trial("tune", {"layer_decay": 0.8}, 0)
    cfg = trials.trial_config({}, trial, tmp_path, files)
    record = trials.run_trial(trial, cfg, {}, (str(script), None), "accuracy", timeout=3)
    assert record["status"] == "failed" and record["error"] == "timed out after 3 s (--trial_timeout)"
    assert record["seconds"] < 30

"""``fedpeft attack --run``: the attacks read what a real split run recorded (save_crossings), score it
against the recorded true inputs and write RUN/privacy/attack.json; its refusals name the setting.

Thresholds: chance for a token of tiny-llama's byte-level vocabulary (259 ids) is ≈ 0.004, so EIA's
token accuracy ≥ 0.5 on the clean run's crossings is over 100× chance. With the run's own defence
activation_noise σ = 0.5 — about 25× the standard deviation of the clean cut-1 activations of this
model (≈ 0.02, checked below) — the observed activations are mostly noise and accuracy must fall
below 0.2 and at least 0.3 below the clean run's."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedpeft.attacks import recorded
from fedpeft.attacks.metrics import token_accuracy
from fedpeft.cli import app
from fedpeft.federation.engine import run_experiment
from fedpeft.strategies import sfl

TINY = str(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml")
BASE = ["federation.rounds=1", "evaluation.every_rounds=0", "evaluation.before_training=false",
        "output.report=false"]
runner = CliRunner()


def _split_run(run_dir, *extra):
    run_experiment(TINY, [*BASE, "method.name=sfl", "method.options.cut=1-2", *extra], run_dir=run_dir)
    return run_dir


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("recorded")
    return {"clean": _split_run(root / "clean", "method.options.save_crossings=1"),
            "noisy": _split_run(root / "noisy", "method.options.save_crossings=1",
                                "method.options.activation_noise=0.5"),
            "unsaved": _split_run(root / "unsaved")}


def _attack(run_dir, *args):
    return runner.invoke(app, ["attack", "--run", str(run_dir), "--attacks", "eia", "--steps", "300", *args])


def test_crossings_dir_name_matches_the_writer():
    assert recorded.CROSSINGS_DIR == sfl.CROSSINGS_DIR


def test_eia_on_recorded_crossings_recovers_the_input_and_drops_under_the_runs_noise(runs):
    jobs = recorded.load_crossings(runs["clean"] / "split_crossings")
    assert 0.01 < float(jobs[0].batches[0]["act_up"].std()) < 0.04  # the scale the thresholds assume
    result = _attack(runs["clean"])
    assert result.exit_code == 0, result.output
    clean = json.loads((runs["clean"] / "privacy" / "attack.json").read_text())
    assert (runs["clean"] / "privacy" / "attack.md").is_file()
    (row,) = clean["results"]
    assert row["attack"] == "eia" and row["defence"] == "none" and row["cut"] == "1-2"
    # 2 jobs (clients_per_round) x 1 micro-batch x batch_size 4 sequences, each scored against its own inputs
    assert row["sequences"] == 8
    assert row["token_accuracy"] >= 0.5

    assert _attack(runs["noisy"]).exit_code == 0
    noisy = json.loads((runs["noisy"] / "privacy" / "attack.json").read_text())["results"][0]
    assert noisy["defence"] == "activation_noise=0.5"
    assert noisy["token_accuracy"] < 0.2 and noisy["token_accuracy"] <= row["token_accuracy"] - 0.3
    assert noisy["rouge_l_f"] < row["rouge_l_f"]


def test_scores_are_recomputed_from_the_recorded_inputs(runs):
    """Independent check of the scoring: recovering the recorded ids themselves scores 1; ids shifted by
    one position score what token_accuracy says on the masked positions."""
    from fedpeft.models.registry import tiny_llama

    _, tok = tiny_llama()
    batch = recorded.load_crossings(runs["clean"] / "split_crossings")[0].batches[0]
    ids, mask = batch["input_ids"], batch["attention_mask"]
    perfect = recorded._score(tok, ids, ids.clone(), mask)
    assert all(s == (1.0, pytest.approx(s[1]), 1.0) for s in perfect) and all(s[0] == 1.0 for s in perfect)
    wrong = (ids + 1) % 259
    assert all(s[2] == 0.0 for s in recorded._score(tok, ids, wrong, mask))
    assert token_accuracy(ids[0], ids[0]) == 1.0


def test_refusals_name_the_setting(runs, tmp_path):
    result = _attack(runs["unsaved"])
    assert result.exit_code == 2 and "method.options.save_crossings" in result.output
    fedit = tmp_path / "fedit"
    run_experiment(TINY, BASE, run_dir=fedit)
    result = _attack(fedit)
    assert result.exit_code == 2 and "method.name='fedit'" in result.output and "method.name: sfl" in result.output
    result = runner.invoke(app, ["attack", "--run", str(runs["clean"]), "--attacks", "sip"])
    assert result.exit_code == 2 and "--aux-source" in result.output
    result = runner.invoke(app, ["attack", "--run", str(runs["clean"]), "--attacks", "tag-split", "--steps", "1"])
    assert result.exit_code == 2 and "method.options.cut" in result.output  # cut 2 after the last block


def test_tag_on_the_recorded_top_gradient_recovers_targets_far_above_chance(tmp_path):
    """Cut 0-1 on the 2-block model leaves block 1 above cut 2, so TAG can match grad_up. Threshold 0.1 is
    25× chance (1/259); with cut a = 0 act_up is the input embedding itself, so EIA reads it back exactly
    (nearest embedding rows; tiny-llama's rows are distinct)."""
    run_experiment(TINY, [*BASE, "method.name=sfl", "method.options.cut=0-1", "method.options.save_crossings=1"],
                   run_dir=tmp_path / "c01")
    result = runner.invoke(app, ["attack", "--run", str(tmp_path / "c01"), "--attacks", "eia,tag-split", "--steps", "200"])
    assert result.exit_code == 0, result.output
    rows = {r["attack"]: r for r in json.loads((tmp_path / "c01" / "privacy" / "attack.json").read_text())["results"]}
    assert rows["eia"]["token_accuracy"] == 1.0
    assert rows["tag-split"]["token_accuracy"] >= 0.1


def test_report_shows_the_privacy_section_and_fedpeft_report_regenerates_it(runs):
    run = runs["clean"]
    if not (run / "privacy" / "attack.json").is_file():
        assert _attack(run).exit_code == 0
    rows = json.loads((run / "privacy" / "attack.json").read_text())["results"]
    result = runner.invoke(app, ["report", str(run)])
    assert result.exit_code == 0, result.output
    text = (run / "report" / "report.md").read_text()
    assert "## Privacy: attack success" in text and "pre-trained base model only" in text
    row = rows[0]  # the table shows the json's numbers, rounded to 3 places
    assert f"| eia | none | 8 | {row['rouge_l_f']:.3f} | {row['meteor']:.3f} | {row['token_accuracy']:.3f} |" in text
    runner.invoke(app, ["report", str(runs["unsaved"])])
    assert "## Privacy" not in (runs["unsaved"] / "report" / "report.md").read_text()


def test_sip_trained_on_auxiliary_data_inverts_the_recorded_activations(runs, tmp_path):
    """SIP's inversion model learns on auxiliary tasks the clients do not have (sort_numbers, count_items vs
    the run's arithmetic, reverse, uppercase). Thresholds: ≥ 0.4 token accuracy clean (100× chance; measured
    0.74), < 0.2 on the run with activation noise (measured 0.04), which it never saw in training."""
    args = ["--attacks", "sip", "--aux-source", "generated", "--aux-tasks", "sort_numbers,count_items",
            "--sip-steps", "200", "--max-tokens", "64"]
    accuracy = {}
    for name in ("clean", "noisy"):
        run = tmp_path / name  # a copy: the other tests' privacy/attack.json stay as they wrote them
        shutil.copytree(runs[name], run)
        result = runner.invoke(app, ["attack", "--run", str(run), *args])
        assert result.exit_code == 0, result.output
        accuracy[name] = json.loads((run / "privacy" / "attack.json").read_text())["results"][0]["token_accuracy"]
    assert accuracy["clean"] >= 0.4 and accuracy["noisy"] < 0.2


def test_crossings_option_without_recordings_is_refused(runs, tmp_path):
    empty = tmp_path / "nothing"
    empty.mkdir()
    result = runner.invoke(app, ["attack", "--run", str(runs["clean"]), "--crossings", str(empty)])
    assert result.exit_code == 2 and "no recorded crossings in" in result.output
    assert "method.options.save_crossings" in result.output

"""``fedpeft attack``: its refusals (before any model loads) and one small run whose table agrees with
the scores recomputed from the reconstruction it reports."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from fedpeft.attacks.metrics import meteor_exact, rouge_l_f
from fedpeft.attacks.runner import AttackSettings
from fedpeft.cli import app

runner = CliRunner()


def _run(*args):
    return runner.invoke(app, ["attack", *args])


def test_unknown_attack_name_is_refused():
    result = _run("--attacks", "eia,zip")
    assert result.exit_code == 2
    assert "--attacks: unknown attack name(s) zip; valid: eia, sip" in result.output


def test_attack_needing_auxiliary_data_without_any_is_refused():
    result = _run("--attacks", "bisr")
    assert result.exit_code == 2
    assert "--aux-source: attack(s) bisr train an inversion model on auxiliary data" in result.output


def test_auxiliary_data_overlapping_the_clients_is_refused():
    result = _run("--attacks", "sip", "--aux-source", "generated", "--aux-tasks", "arithmetic,reverse")
    assert result.exit_code == 2
    assert "overlaps the clients' data" in result.output


def test_bad_noise_levels_are_refused():
    assert "--noise" in _run("--noise", "0,x").output
    with pytest.raises(ValueError, match="--noise"):
        AttackSettings(noise_levels=[-1.0])


def test_cut_outside_the_model_is_refused():
    result = _run("--attacks", "eia", "--cut", "5", "-n", "1")
    assert result.exit_code == 2
    assert "--cut: 5 is outside the model's layers; expected an integer from 1 to 1" in result.output


def test_a_small_run_writes_a_table_that_matches_its_reconstruction(tmp_path):
    result = _run("--attacks", "eia", "-n", "1", "--max-tokens", "12", "--steps", "150", "--noise", "0",
                  "--out", str(tmp_path))
    assert result.exit_code == 0, result.output
    payload = json.loads((tmp_path / "attack.json").read_text())
    (row,) = payload["results"]
    assert row["attack"] == "eia" and row["samples"] == 1 and row["noise"] == 0
    example = row["example"]
    assert row["rouge_l_f"] == pytest.approx(rouge_l_f(example["reference"], example["reconstruction"]))
    assert row["meteor"] == pytest.approx(meteor_exact(example["reference"], example["reconstruction"]))
    assert row["token_accuracy"] > 0.3  # chance is 1/259 per token
    assert "| eia |" in (tmp_path / "attack.md").read_text()

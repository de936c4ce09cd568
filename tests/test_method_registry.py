"""A new method is one module: a method defined here, in the test module, is registered, validated, run
on the tiny model through the engine, reported and refused by SecAgg, without any other file edited."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from pydantic import Field
from typer.testing import CliRunner

from fedpeft.cli import app
from fedpeft.config import ConfigError, load_config
from fedpeft.deploy.flower.secagg import check_secure_method
from fedpeft.federation.engine import run_experiment
from fedpeft.strategies import STRATEGIES, build_strategy, capabilities, method_catalog
from fedpeft.strategies.base import AggregateResult, ClientUpdate
from fedpeft.strategies.common import MethodStrategy
from fedpeft.strategies.registry import MethodOptions, register_method, registered


# --- the new method: this block is all a contributor writes -----------------------------------------
class ShrunkOptions(MethodOptions):
    shrink: float = Field(0.5, gt=0, le=1, description="Share of the averaged update applied: theta + shrink (avg - theta).")


def shrunk_report(run_dir: Path, out_dir: Path) -> list[str]:
    events = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    shrinks = [e["shrink"] for e in events if e["event"] == "aggregate"]
    return ["## Shrunk averaging", "", f"rounds shrunk: {len(shrinks)} (shrink {shrinks[0] if shrinks else 'n/a'})", ""]


class ShrunkAverage(MethodStrategy):
    """theta <- theta + shrink * (sum_k p_k theta_k - theta)."""

    name = "shrunk_average"
    summary = "test method: the averaged update, shrunk"
    Options = ShrunkOptions
    report_section = staticmethod(shrunk_report)

    def aggregate(self, round_idx, global_state, updates):
        averaged = self.average_updates(global_state, updates)
        s = self.opts.shrink
        new = dict(global_state)
        new.update({k: global_state[k].float() + s * (v - global_state[k].float()) for k, v in averaged.items()})
        return AggregateResult(global_state=new, metrics={"shrink": s})


# -----------------------------------------------------------------------------------------------------
@pytest.fixture
def shrunk():
    with registered(ShrunkAverage) as cls:
        yield cls
    assert "shrunk_average" not in STRATEGIES


def test_registered_with_its_options_and_capabilities(shrunk):
    assert STRATEGIES["shrunk_average"] is ShrunkAverage
    caps = capabilities(ShrunkAverage)
    assert not caps.secure_mean and not caps.personalized and caps.composes_with_server_optimizers
    assert caps.peft_types == ("lora",)
    entry = {m["name"]: m for m in method_catalog()}["shrunk_average"]
    assert entry["options"] == ["shrink"] and entry["report_section"]
    listing = CliRunner().invoke(app, ["methods"], env={"COLUMNS": "250"})
    assert listing.exit_code == 0 and "shrunk_average" in listing.output
    detail = CliRunner().invoke(app, ["methods", "shrunk_average"], env={"COLUMNS": "250"})
    assert detail.exit_code == 0 and "shrink" in detail.output and "<= 1" in detail.output and "0.5" in detail.output


def test_config_validates_its_options_naming_field_value_and_expectation(shrunk):
    with pytest.raises(ConfigError, match=r"method.options.shrink: Input should be less than or equal to 1 \(got 2\)"):
        load_config("configs/tiny.yaml", ["method.name=shrunk_average", "method.options.shrink=2"])
    with pytest.raises(ConfigError, match=r"method.options.shrnk is not an option of method 'shrunk_average'; "
                                          r"did you mean 'method.options.shrink'\?"):
        load_config("configs/tiny.yaml", ["method.name=shrunk_average", "method.options.shrnk=0.3"])
    cfg = load_config("configs/tiny.yaml", ["method.name=shrunk_average", "method.options.shrink=0.25"])
    assert build_strategy(cfg.method).opts.shrink == 0.25


def test_its_aggregate_is_the_stated_rule(shrunk):
    strategy = ShrunkAverage({"shrink": 0.25})
    theta = {"w": torch.tensor([1.0, -2.0])}
    ups = [ClientUpdate(0, {"w": torch.tensor([3.0, 0.0])}, 1), ClientUpdate(1, {"w": torch.tensor([-1.0, 4.0])}, 3)]
    got = strategy.aggregate(1, theta, ups).global_state["w"]
    avg = [(3.0 * 1 - 1.0 * 3) / 4, (0.0 * 1 + 4.0 * 3) / 4]  # [0, 3]
    assert got.tolist() == pytest.approx([1.0 + 0.25 * (avg[0] - 1.0), -2.0 + 0.25 * (avg[1] + 2.0)])


def test_runs_through_the_engine_and_reports_its_own_section(shrunk, tmp_path):
    summary = run_experiment("configs/tiny.yaml", [
        "method.name=shrunk_average", "method.options.shrink=0.5", "federation.rounds=2",
        "evaluation.before_training=false", "evaluation.every_rounds=0", "output.report=true"], run_dir=tmp_path / "run")
    events = [json.loads(line) for line in (summary.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [e["shrink"] for e in events if e["event"] == "aggregate"] == [0.5, 0.5]
    report = summary.report_path.read_text()
    assert "## Shrunk averaging" in report and "rounds shrunk: 2 (shrink 0.5)" in report


def test_secagg_refuses_it_and_accepts_a_secure_mean_method(shrunk):
    with pytest.raises(ValueError, match=r"secagg: method 'shrunk_average' needs each client's update on the server.*"
                                         r"supports fedit, fedprox, ffa_lora"):
        check_secure_method("shrunk_average")
    check_secure_method("fedit")


def test_registration_refuses_a_taken_name_and_a_missing_options_model():
    class Impostor(MethodStrategy):
        name = "fedit"
        summary = "another fedit"
        Options = MethodOptions

    with pytest.raises(ValueError, match="'fedit' is already registered by fedpeft.strategies.fedit.FedIT"):
        register_method(Impostor)

    class NoOptions(MethodStrategy):
        name = "no_options"
        summary = "x"
        Options = dict

    with pytest.raises(TypeError, match="Options must subclass"):
        register_method(NoOptions)
    assert "no_options" not in STRATEGIES


def test_fltac_report_section_comes_from_its_registration(tmp_path):
    """The report has no FL-TAC special case: FL-TAC registers its cluster plot as its report section."""
    from fedpeft.strategies.fltac import FLTAC, cluster_report_section

    assert FLTAC.report_section is cluster_report_section
    summary = run_experiment("configs/tiny.yaml", [
        "method.name=fltac", "federation.rounds=1", "evaluation.every_rounds=0", "evaluation.before_training=false",
        "output.report=true"], run_dir=tmp_path / "run")
    report = summary.report_path.read_text()
    assert "## Adapter clusters" in report and (summary.report_path.parent / "adapter_clusters.png").is_file()
    # a method without a section adds none
    assert STRATEGIES["fedit"].report_section is None

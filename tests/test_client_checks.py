"""Per-client checks before anything of a client is kept: a bad client is dropped (``client_failed``),
the round goes on, and the client leaves no private state behind; a round with no accepted update
stops the run with a message and the last checkpoint intact."""

from __future__ import annotations

import math

import pytest
import torch

from fedpeft.config import load_config
from fedpeft.federation.engine import Engine
from fedpeft.federation.transport import RunStopped
from fedpeft.federation.update_checks import StagedStore, check_client_update, update_norm
from fedpeft.strategies import STRATEGIES
from fedpeft.strategies.base import ClientPlan, ClientUpdate
from fedpeft.strategies.fedit import FedIT
from fedpeft.strategies.fedsa_lora import PERSONAL_NAME, FedSALoRA
from fedpeft.strategies.scaffold import CONTROL_NAME, Scaffold
from helpers import run_events

ONE_ROUND = ["federation.num_clients=4", "federation.clients_per_round=4", "federation.rounds=1",
             "evaluation.before_training=false", "output.report=false"]


# --- the checks as a pure function ------------------------------------------------------------------

GLOBAL = {"m.lora_A.default.weight": torch.zeros(2, 3), "m.lora_B.default.weight": torch.zeros(3, 2)}


def _update(**kw):
    tensors = kw.pop("tensors", {k: torch.ones_like(v) for k, v in GLOBAL.items()})
    return ClientUpdate(client_id=7, tensors=tensors, num_examples=kw.pop("num_examples", 5), **kw)


def _check(update, plan=None, **kw):
    check_client_update(FedIT(), plan or ClientPlan(client_id=7, downlink=GLOBAL), GLOBAL, update, **kw)


def test_an_honest_update_passes_every_check():
    _check(_update(), max_examples=5, max_update_norm=math.sqrt(12) + 1e-6)


@pytest.mark.parametrize("n, message", [(-5, "num_examples=-5"), (0, "num_examples=0"), (6, "exceeds the 5"),
                                        (2.5, "not an integer"), (True, "not an integer")])
def test_num_examples_must_be_a_positive_bounded_integer(n, message):
    with pytest.raises(ValueError, match=message):
        _check(_update(num_examples=n), max_examples=5)


def test_keys_must_be_the_ones_the_plan_asked_for():
    full = _update().tensors
    with pytest.raises(ValueError, match=r"missing \['m.lora_B"):
        _check(_update(tensors={"m.lora_A.default.weight": full["m.lora_A.default.weight"]}))
    # a plan that uploads only A: sending B as well is refused
    plan = ClientPlan(client_id=7, downlink=GLOBAL, upload=["m.lora_A.default.weight"])
    with pytest.raises(ValueError, match=r"unexpected \['m.lora_B"):
        _check(_update(), plan=plan)


def test_values_whose_squares_overflow_are_refused_and_the_norm_bound_applies():
    huge = {k: torch.full_like(v, 1e30) for k, v in GLOBAL.items()}
    assert math.isfinite(float(torch.cat([t.flatten() for t in huge.values()]).double().norm()))  # finite in fp64
    with pytest.raises(ValueError, match="overflows float32"):
        _check(_update(tensors=huge))
    # ||ones - zeros|| over 12 entries is sqrt(12) = 3.46...
    assert update_norm(_update().tensors, GLOBAL) == pytest.approx(math.sqrt(12))
    with pytest.raises(ValueError, match="exceeds federation.max_update_norm=3"):
        _check(_update(), max_update_norm=3.0)


def test_controls_and_private_state_are_checked():
    plan = ClientPlan(client_id=7, downlink=GLOBAL, control={k: torch.zeros_like(v) for k, v in GLOBAL.items()})
    bad = {"m.lora_A.default.weight": torch.full((2, 3), float("nan"))}
    with pytest.raises(ValueError, match="control tensor 'm.lora_A.default.weight' holds NaN"):
        _check(_update(control=bad), plan=plan)
    with pytest.raises(ValueError, match="shape"):
        _check(_update(control={"m.lora_A.default.weight": torch.zeros(3, 3)}), plan=plan)
    with pytest.raises(ValueError, match="private state 'mine'.*NaN"):
        _check(_update(private={"mine": bad}))


def test_staged_store_holds_writes_until_commit(tmp_path):
    from fedpeft.federation.client_store import ClientStore

    store = ClientStore(tmp_path)
    store.begin_round(1)
    staged = StagedStore(store, client_id=3)
    staged.put(3, "b", {"x": torch.ones(2)})
    assert store.get(3, "b") is None and torch.equal(staged.get(3, "b")["x"], torch.ones(2))
    with pytest.raises(ValueError, match="client 3's update tried to write client 4's"):
        staged.put(4, "b", {"x": torch.ones(2)})
    update = ClientUpdate(3, {}, 1, private=staged.staged)
    FedIT().commit_private(update, store)
    assert torch.equal(store.get(3, "b")["x"], torch.ones(2))


# --- in the engine: bad clients dropped, the round goes on ------------------------------------------


class HostileFedIT(FedIT):
    """Client 0 drops a key, client 1 reports num_examples=-5, client 2 sends 1e30; client 3 is honest."""

    name = "hostile"

    def client_update(self, round_idx, plan, trained, result, store):
        update = super().client_update(round_idx, plan, trained, result, store)
        if plan.client_id == 0:
            update.tensors.pop(next(iter(update.tensors)))
        elif plan.client_id == 1:
            update.num_examples = -5
        elif plan.client_id == 2:
            update.tensors = {k: torch.full_like(v, 1e30) for k, v in update.tensors.items()}
        return update


def test_hostile_clients_are_dropped_and_the_round_goes_on(tmp_path, monkeypatch):
    monkeypatch.setitem(STRATEGIES, "hostile", HostileFedIT)
    cfg = load_config("configs/tiny.yaml", ONE_ROUND + ["method.name=hostile"])
    summary = Engine(cfg, tmp_path / "run").run()
    failed = {e["client"]: e["error"] for e in run_events(summary.run_dir, "client_failed")}
    assert set(failed) == {0, 1, 2}
    assert "missing" in failed[0] and "num_examples=-5" in failed[1] and "overflows" in failed[2]
    assert run_events(summary.run_dir, "aggregate")[0]["clients"] == [3]
    from safetensors.torch import load_file

    final = load_file(str(summary.final_adapter_dir / "adapter_model.safetensors"))
    assert all(torch.isfinite(v).all() for v in final.values())


class NaNBFedSA(FedSALoRA):
    """FedSA-LoRA whose client 0 ends training with a NaN B (its uploaded A stays finite)."""

    name = "nan_b_fedsa"

    def client_update(self, round_idx, plan, trained, result, store):
        if plan.client_id == 0:
            trained = {k: torch.full_like(v, float("nan")) if "lora_B" in k else v for k, v in trained.items()}
        return super().client_update(round_idx, plan, trained, result, store)


def test_fedsa_client_with_nan_b_leaves_no_stored_b(tmp_path, monkeypatch):
    monkeypatch.setitem(STRATEGIES, "nan_b_fedsa", NaNBFedSA)
    cfg = load_config("configs/tiny.yaml", ONE_ROUND + ["method.name=nan_b_fedsa"])
    engine = Engine(cfg, tmp_path / "run")
    summary = engine.run()
    [failed] = run_events(summary.run_dir, "client_failed")
    assert failed["client"] == 0 and PERSONAL_NAME in failed["error"]
    assert engine.store.get(0, PERSONAL_NAME) is None
    assert not list((tmp_path / "run" / "client_store").glob(f"0/{PERSONAL_NAME}*"))
    for client in (1, 2, 3):
        assert engine.store.get(client, PERSONAL_NAME) is not None
    # the global evaluation state (global A, mean of the stored personal Bs) stays finite
    state = engine.strategy.evaluation_state(engine.state.global_state, engine.store)
    assert all(torch.isfinite(v).all() for v in state.values())


class NaNControlScaffold(Scaffold):
    name = "nan_control_scaffold"

    def client_update(self, round_idx, plan, trained, result, store):
        update = super().client_update(round_idx, plan, trained, result, store)
        if plan.client_id == 1:
            key = next(iter(update.control))
            update.control[key] = torch.full_like(update.control[key], float("nan"))
        return update


def test_scaffold_client_with_nan_control_leaves_no_stored_control(tmp_path, monkeypatch):
    monkeypatch.setitem(STRATEGIES, "nan_control_scaffold", NaNControlScaffold)
    cfg = load_config("configs/tiny.yaml", ONE_ROUND + ["method.name=nan_control_scaffold", "training.optimizer=sgd"])
    engine = Engine(cfg, tmp_path / "run")
    summary = engine.run()
    [failed] = run_events(summary.run_dir, "client_failed")
    assert failed["client"] == 1 and "control tensor" in failed["error"]
    assert engine.store.get(1, CONTROL_NAME) is None
    assert all(engine.store.get(c, CONTROL_NAME) is not None for c in (0, 2, 3))
    assert all(torch.isfinite(v).all() for v in engine.strategy.control.values())


# --- a round with no accepted update stops the run, cleanly -------------------------------------------


class FailsFromRound2(FedIT):
    name = "fails_from_round_2"

    def client_update(self, round_idx, plan, trained, result, store):
        update = super().client_update(round_idx, plan, trained, result, store)
        if round_idx >= 2:
            update.num_examples = 0
        return update


def test_a_round_without_accepted_updates_stops_with_a_message_and_keeps_the_checkpoint(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from fedpeft.cli import app

    monkeypatch.setitem(STRATEGIES, "fails_from_round_2", FailsFromRound2)
    overrides = ["method.name=fails_from_round_2", "federation.rounds=3", "evaluation.before_training=false",
                 "output.report=false"]
    with pytest.raises(RunStopped, match="round 2: no client update was accepted"):
        Engine(load_config("configs/tiny.yaml", overrides), tmp_path / "api").run()
    assert (tmp_path / "api" / "checkpoints" / "LATEST").read_text().strip() == "round_0001"
    assert run_events(tmp_path / "api", "run_stopped")

    result = CliRunner().invoke(app, ["run", "--config", "configs/tiny.yaml", "--run-dir", str(tmp_path / "cli"),
                                      *overrides])
    assert result.exit_code == 1
    assert "run stopped: round 2: no client update was accepted" in result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert (tmp_path / "cli" / "checkpoints" / "LATEST").read_text().strip() == "round_0001"

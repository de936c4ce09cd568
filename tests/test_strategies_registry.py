"""Every method name runs its own rule (no aliases, no silent fallback), compositions are checked, and
strategy state round-trips for resume."""

from __future__ import annotations

import io

import pytest
import torch

from fedpeft.config import MethodConfig, ServerOptimizerConfig
from fedpeft.strategies import STRATEGIES, build_strategy
from strategy_fakes import ALPHA, MODULES, MemoryStore, adapter, base_weights, make, model_weights, run_round

R = 4
SIZES = {0: 10, 1: 30, 2: 20, 3: 40}
HETERO = {"flora", "zero_padding", "hetlora", "flexlora"}
SELECTIVE = ["fltac", "fedls", "fedgpl", "sfl"]  # tested against their own rules in test_fltac/fedls/fedgpl/sfl.py
PERSONALISED = ["ditto", "fedper"]  # tested against their own rules in test_personalised.py
FEDERATED = ["fedit", "fedprox", "scaffold", "ffa_lora", "flora", "fedex_lora", "fedsa_lora", "zero_padding", "hetlora", "flexlora"]
BASELINES = ["centralized", "local_only", "zero_shot"]
MODEL_BOUND = ["fedot", "fedkseed"]  # need the model (emulator, replay): tested in test_fedot.py / test_fedkseed.py
REFUSE_SERVER_OPTIMIZER = {"flora", "fedex_lora", "flexlora", *BASELINES}


def options_for(name):
    opts = {"r": R, "num_clients": 4, "seed": 3}
    if name in HETERO:
        opts["client_ranks"] = [4, 2, 3, 1]
    if name == "fedprox":
        opts["mu"] = 0.5
    if name == "hetlora":
        opts["prune"] = True
    if name == "centralized":
        opts["num_clients"] = 1
    if name == "sfl":
        opts["cut"] = "1-2"
    return opts


def effective_model(strategy, name, rounds=2, clients=(0, 1, 2)):
    """W0 (+ base deltas) + s B A after ``rounds`` simulated rounds, for the model the engine would hold."""
    glob = strategy.init_global(adapter(R, seed=1))
    w0 = base_weights()
    store = MemoryStore()
    for t in range(1, rounds + 1):
        _, _, agg = run_round(strategy, t, list(clients), glob, store, SIZES)
        if agg is None:
            break
        for module, delta in (agg.base_delta or {}).items():
            w0[module] = w0[module] + delta
        glob = agg.global_state
    return model_weights(w0, glob, ALPHA / R)


def test_names_map_to_distinct_classes():
    assert sorted(STRATEGIES) == sorted(FEDERATED + BASELINES + SELECTIVE + PERSONALISED + MODEL_BOUND)
    assert len(set(STRATEGIES.values())) == len(STRATEGIES)
    for name, cls in STRATEGIES.items():
        assert cls.name == name
        assert type(make(name, **options_for(name))) is cls


def test_every_federated_method_produces_its_own_result_on_the_same_input():
    models = {name: effective_model(make(name, **options_for(name)), name) for name in FEDERATED}
    for i, a in enumerate(FEDERATED):
        for b in FEDERATED[i + 1:]:
            diff = max(float((models[a][m] - models[b][m]).abs().max()) for m in MODULES)
            assert diff > 1e-4, f"methods {a} and {b} gave the same model"


def test_unknown_method_lists_every_valid_name():
    with pytest.raises(ValueError) as err:
        build_strategy(MethodConfig(name="fedadagrad"))  # a server optimizer, not a method
    for name in STRATEGIES:
        assert name in str(err.value)


def test_names_are_normalised_not_guessed():
    assert type(build_strategy(MethodConfig(name="FFA-LoRA"))) is STRATEGIES["ffa_lora"]
    with pytest.raises(ValueError, match="unknown method 'ffa'"):
        build_strategy(MethodConfig(name="ffa"))


def test_unknown_option_is_an_error_naming_the_valid_ones():
    with pytest.raises(ValueError, match=r"method.options.mu is not an option of method 'fedit'.*lora_alpha"):
        make("fedit", mu=0.1)
    with pytest.raises(ValueError, match="client_ranks"):
        make("fedex_lora", client_ranks=[4, 2])


@pytest.mark.parametrize("name", sorted(REFUSE_SERVER_OPTIMIZER))
def test_meaningless_compositions_are_refused_with_a_reason(name):
    with pytest.raises(ValueError, match=f"method '{name}' cannot be combined with server optimizer 'fedadam': .{{20,}}"):
        make(name, server_optimizer="fedadam", **options_for(name))


@pytest.mark.parametrize("name", [n for n in FEDERATED if n not in REFUSE_SERVER_OPTIMIZER])
def test_server_optimizers_compose_with_averaging_rules(name):
    plain = effective_model(make(name, **options_for(name)), name, rounds=1)
    adam = effective_model(make(name, server_optimizer="fedadam", **options_for(name)), name, rounds=1)
    assert max(float((plain[m] - adam[m]).abs().max()) for m in MODULES) > 1e-4


def test_fedadam_on_ffa_lora_steps_b_only():
    strategy = make("ffa_lora", server_optimizer="fedadam")
    glob = strategy.init_global(adapter(R, seed=1))
    _, _, agg = run_round(strategy, 1, [0, 1], glob, MemoryStore(), SIZES)
    assert set(strategy.server_optimizer.m) == {k for k in glob if ".lora_A." not in k}  # B and the head
    for k in glob:
        if ".lora_A." in k:
            assert torch.equal(agg.global_state[k], glob[k])


def _roundtrip(state):
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


@pytest.mark.parametrize("name", FEDERATED + BASELINES)
def test_state_dict_round_trips_for_resume(name):
    """Rounds 1-3 uninterrupted == rounds 1-2, save, fresh strategy (no init_global), load, round 3."""
    so = "none" if name in REFUSE_SERVER_OPTIMIZER else "fedyogi"
    clients = [0] if name == "centralized" else [0, 1, 2]
    a = make(name, server_optimizer=so, **options_for(name))
    glob = a.init_global(adapter(R, seed=1))
    store = MemoryStore()
    for t in (1, 2):
        _, _, agg = run_round(a, t, clients, glob, store, SIZES)
        glob = agg.global_state if agg else glob
    saved_state, saved_store = _roundtrip(a.state_dict()), store.copy()
    _, _, ref = run_round(a, 3, clients, glob, store, SIZES)
    b = make(name, server_optimizer=so, **options_for(name))
    b.load_state_dict(saved_state)
    _, _, got = run_round(b, 3, clients, glob, saved_store, SIZES)
    if ref is None:
        assert got is None
        return
    for k in ref.global_state:
        assert torch.equal(ref.global_state[k], got.global_state[k]), k
    for m in ref.base_delta or {}:
        assert torch.equal(ref.base_delta[m], got.base_delta[m])


def test_resume_with_another_server_optimizer_is_refused():
    a = make("fedit", server_optimizer="fedadam")
    glob = a.init_global(adapter(R, seed=1))
    run_round(a, 1, [0, 1], glob, MemoryStore(), SIZES)
    b = build_strategy(MethodConfig(name="fedit", server_optimizer=ServerOptimizerConfig(name="fedyogi")))
    with pytest.raises(ValueError, match="fedadam"):
        b.load_state_dict(a.state_dict())


def test_method_catalog_describes_every_method():
    from fedpeft.strategies import method_catalog

    catalog = {m["name"]: m for m in method_catalog()}
    assert set(catalog) == set(STRATEGIES)
    assert all(m["summary"] for m in catalog.values())
    assert catalog["flora"]["server_optimizer"] != "composes" and catalog["fedit"]["server_optimizer"] == "composes"
    assert "mu" in catalog["fedprox"]["options"] and catalog["fedsa_lora"]["personalized"]


# --- the capability flags agree with what each method does ---------------------------------------------
@pytest.mark.parametrize("name", FEDERATED + BASELINES)
def test_secure_mean_flag_holds_exactly_when_one_mean_update_aggregates_like_the_clients(name):
    """SecAgg+ hands the strategy one update: the weighted mean of the uploads, weight = sum of n_k, and
    carries no control tensors. A method flagged ``secure_mean`` must aggregate that exactly as it
    aggregates the clients' updates, and upload no controls. (The flag is conservative: FedSA-LoRA's A
    passes this check but is not flagged, its personal B and per-client weights are not proven under it.)"""
    from fedpeft.strategies import capabilities
    from fedpeft.strategies.base import ClientUpdate, weighted_average

    clients = [0] if name == "centralized" else [0, 1, 2]
    strategy = make(name, **options_for(name))
    glob = strategy.init_global(adapter(R, seed=1))
    store = MemoryStore()
    _, updates, agg = run_round(strategy, 1, clients, glob, store, SIZES)
    if agg is None or not updates or not updates[0].tensors:
        assert not capabilities(type(strategy)).secure_mean
        return
    total = sum(u.num_examples for u in updates)
    fresh = make(name, **options_for(name))
    fresh.init_global(adapter(R, seed=1))
    try:  # clients of heterogeneous ranks upload tensors of different shapes: no mean to form
        mean = ClientUpdate(client_id=-1, num_examples=total, job=updates[0].job, tensors=weighted_average(
            [u.tensors for u in updates], [u.num_examples / total for u in updates]))
        combined = fresh.aggregate(1, glob, [mean])
        same = all(torch.allclose(combined.global_state[k], agg.global_state[k], atol=1e-5) for k in agg.global_state) \
            and not (combined.base_delta or agg.base_delta)
    except (ValueError, KeyError, RuntimeError):  # a lone mean is not something this method can aggregate
        same = False
    if capabilities(type(strategy)).secure_mean:
        assert same and not any(u.control for u in updates), name
    if not same or any(u.control for u in updates):
        assert not capabilities(type(strategy)).secure_mean, name
    if name in ("fedit", "fedprox", "ffa_lora"):
        assert same  # the mean is all these need


@pytest.mark.parametrize("name", FEDERATED + BASELINES)
def test_edits_base_weights_flag_holds_exactly_when_the_aggregate_changes_base_weights(name):
    from fedpeft.strategies import capabilities

    strategy = make(name, **options_for(name))
    glob = strategy.init_global(adapter(R, seed=1))
    _, _, agg = run_round(strategy, 1, [0] if name == "centralized" else [0, 1, 2], glob, MemoryStore(), SIZES)
    edits = bool(agg is not None and agg.base_delta)
    assert capabilities(type(strategy)).edits_base_weights == edits, name


@pytest.mark.parametrize("name", FEDERATED + BASELINES)
def test_personalised_flag_holds_exactly_when_clients_are_evaluated_with_their_own_state(name):
    from fedpeft.strategies import capabilities

    strategy = make(name, **options_for(name))
    glob = strategy.init_global(adapter(R, seed=1))
    store = MemoryStore()
    clients = [0] if name == "centralized" else [0, 1, 2]
    run_round(strategy, 1, clients, glob, store, SIZES)
    own = strategy.personal_state(clients[0], glob, store)
    differs = own is not None and any(not torch.equal(own[k], glob[k]) for k in glob)
    assert capabilities(type(strategy)).personalized == differs, name

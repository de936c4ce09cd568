"""Client-side behaviour of each method: what is sent, what trains, what persists in the client store."""

from __future__ import annotations

import pytest
import torch

from fedpeft.adapters import state_bytes
from fedpeft.strategies.base import ClientPlan, TrainResult
from strategy_fakes import HEAD, HEAD_SHAPE, MODULES, MemoryStore, a_key, adapter, b_key, make, run_round

R = 4
SIZES = {0: 10, 1: 30, 2: 20, 3: 40}


def result(n=10, steps=3, lr=0.1):
    return TrainResult(steps=steps, examples_seen=0, num_examples=n, mean_loss=1.0, last_loss=1.0, lr=lr, seconds=0.0)


HEAD_BYTES = HEAD_SHAPE[0] * HEAD_SHAPE[1] * 4


def full_bytes(rank):
    """A rank-``rank`` adapter's LoRA bytes (float32), without the head."""
    return sum(rank * (d_in + d_out) * 4 for d_out, d_in in MODULES.values())


# --- FedProx ------------------------------------------------------------------------------------------
def test_fedprox_extra_loss_is_the_proximal_term_and_its_gradient():
    strategy = make("fedprox", mu=0.2)
    glob = adapter(R, seed=1)
    plan = strategy.configure_client(1, 0, glob, None)
    strategy.attach_client_hooks(1, plan, None)  # client side
    params = {k: torch.nn.Parameter(v + 0.5) for k, v in glob.items()}
    loss = plan.extra_loss(params)
    numel = sum(v.numel() for v in glob.values())
    assert float(loss.detach()) == pytest.approx(0.5 * 0.2 * 0.25 * numel, rel=1e-5)
    loss.backward()
    for p in params.values():
        torch.testing.assert_close(p.grad, torch.full_like(p, 0.2 * 0.5))


def test_fedprox_with_mu_zero_matches_fedit():
    glob = adapter(R, seed=1)
    _, _, a = run_round(make("fedprox", mu=0.0), 1, [0, 1], glob, MemoryStore(), SIZES)
    _, _, b = run_round(make("fedit"), 1, [0, 1], glob, MemoryStore(), SIZES)
    for k in glob:
        torch.testing.assert_close(a.global_state[k], b.global_state[k])


# --- SCAFFOLD -----------------------------------------------------------------------------------------
def test_scaffold_controls_follow_option_two():
    """With a constant raw gradient g, the corrected SGD steps give c_k+ = g exactly; the server control
    moves by (1/N) sum of the control deltas; the client controls persist in the store."""
    strategy = make("scaffold", num_clients=4)
    glob = strategy.init_global(adapter(R, seed=1))
    store = MemoryStore()
    g = {k: torch.full_like(v, 0.3) for k, v in glob.items()}
    steps, lr = 5, 0.1
    updates = []
    for cid in (0, 1):
        plan = strategy.configure_client(1, cid, glob, store)
        strategy.attach_client_hooks(1, plan, store)  # client side
        assert set(plan.control) == set(glob) and all(float(v.abs().max()) == 0 for v in plan.control.values())
        params = {k: torch.nn.Parameter(v.clone()) for k, v in glob.items()}
        for _ in range(steps):
            for k, p in params.items():
                p.grad = g[k].clone() * (cid + 1)
            plan.grad_transform(params)
            with torch.no_grad():
                for p in params.values():
                    p -= lr * p.grad
        trained = {k: p.detach().clone() for k, p in params.items()}
        up = strategy.client_update(1, plan, trained, result(SIZES[cid], steps, lr), store)
        assert store.get(cid, "scaffold_control") is None  # c_k+ is kept only once the update is accepted
        strategy.commit_private(up, store)
        for k in glob:
            torch.testing.assert_close(store.get(cid, "scaffold_control")[k], g[k] * (cid + 1))
            torch.testing.assert_close(up.control[k], g[k] * (cid + 1))  # c_k was 0
        assert state_bytes(up.control) == state_bytes(up.tensors)  # the uplink doubles
        updates.append(up)
    strategy.aggregate(1, glob, updates)
    for k in glob:
        torch.testing.assert_close(strategy.control[k], (g[k] * 1 + g[k] * 2) / 4)
    # round 2: the correction c - c_k is applied to the gradient
    plan = strategy.configure_client(2, 0, glob, store)
    strategy.attach_client_hooks(2, plan, store)  # client side
    params = {k: torch.nn.Parameter(v.clone()) for k, v in glob.items()}
    for p in params.values():
        p.grad = torch.zeros_like(p)
    plan.grad_transform(params)
    for k, p in params.items():
        torch.testing.assert_close(p.grad, strategy.control[k] - g[k])


def test_scaffold_mean_gradient_control_is_the_mean_raw_gradient():
    """control_update=mean_gradient: c_k+ = mean of the uncorrected gradients over the local steps,
    whatever optimizer turned them into steps (here: Adam-like unit steps that option II would misread)."""
    strategy = make("scaffold", num_clients=2, control_update="mean_gradient", local_optimizer="adamw")
    glob = strategy.init_global(adapter(R, seed=1))
    store = MemoryStore()
    strategy.control = {k: torch.full_like(v, 0.5) for k, v in glob.items()}  # a non-zero server control
    plan = strategy.configure_client(2, 0, glob, store)
    strategy.attach_client_hooks(2, plan, store)
    params = {k: torch.nn.Parameter(v.clone()) for k, v in glob.items()}
    raw = [0.1, 0.3, 0.2]
    for g in raw:
        for p in params.values():
            p.grad = torch.full_like(p, g)
        plan.grad_transform(params)
        for p in params.values():
            torch.testing.assert_close(p.grad, torch.full_like(p, g + 0.5))  # corrected by c - c_k = 0.5
        with torch.no_grad():
            for p in params.values():
                p -= 1e-3 * torch.sign(p.grad)  # Adam-like: the step does not scale with the gradient
    trained = {k: p.detach().clone() for k, p in params.items()}
    up = strategy.client_update(2, plan, trained, result(10, steps=3, lr=1e-3), store)
    strategy.commit_private(up, store)
    for k in glob:
        torch.testing.assert_close(store.get(0, "scaffold_control")[k], torch.full_like(glob[k], 0.2))
        torch.testing.assert_close(up.control[k], torch.full_like(glob[k], 0.2))  # c_k was 0


def test_scaffold_option_two_is_refused_for_adam_local_steps():
    with pytest.raises(ValueError, match="training.optimizer=sgd.*control_update=mean_gradient"):
        make("scaffold", num_clients=4, local_optimizer="adamw")
    make("scaffold", num_clients=4, local_optimizer="sgd")
    with pytest.raises(ValueError, match="method.options.control_update: Input should be 'option2' or 'mean_gradient' \(got 'option1'\)"):
        make("scaffold", num_clients=4, control_update="option1")


def test_scaffold_needs_num_clients():
    with pytest.raises(ValueError, match="num_clients"):
        make("scaffold")


# --- FFA-LoRA -------------------------------------------------------------------------------------------
def test_ffa_lora_trains_and_sends_only_b():
    strategy = make("ffa_lora")
    glob = strategy.init_global(adapter(R, seed=1))
    plans, updates, agg = run_round(strategy, 1, [0, 1], glob, MemoryStore(), SIZES)
    for plan, up in zip(plans, updates):
        assert set(plan.trainable) == {b_key(m) for m in MODULES} | {HEAD} == set(up.tensors)  # B and the head
        assert set(plan.downlink) == set(up.tensors)
        assert state_bytes(up.tensors) == sum(d_out * R * 4 for d_out, _ in MODULES.values()) + HEAD_BYTES
    for module in MODULES:
        assert torch.equal(agg.global_state[a_key(module)], glob[a_key(module)])  # A frozen


def test_ffa_lora_prepare_model_freezes_a():
    layer = torch.nn.Module()
    layer.base_layer = torch.nn.Linear(5, 6)
    layer.lora_A = torch.nn.ModuleDict({"default": torch.nn.Linear(5, R, bias=False)})
    layer.lora_B = torch.nn.ModuleDict({"default": torch.nn.Linear(R, 6, bias=False)})
    model = torch.nn.Module()
    model.q_proj = layer
    make("ffa_lora").prepare_model(model)
    assert not model.q_proj.lora_A["default"].weight.requires_grad
    assert model.q_proj.lora_B["default"].weight.requires_grad


# --- FedSA-LoRA -------------------------------------------------------------------------------------------
def test_fedsa_lora_shares_a_and_keeps_b_personal():
    strategy = make("fedsa_lora", num_clients=4)
    glob = strategy.init_global(adapter(R, seed=1, zero_b=True))
    store = MemoryStore()
    plans, updates, agg = run_round(strategy, 1, [0, 1], glob, store, SIZES)
    for plan, up in zip(plans, updates):
        assert set(up.tensors) == {a_key(m) for m in MODULES} | {HEAD} == set(plan.downlink)
        assert store.get(plan.client_id, "fedsa_lora_B") is not None
    glob2 = agg.global_state
    assert all(float(glob2[b_key(m)].abs().max()) == 0 for m in MODULES)  # the server never sees B
    # round 2: client 0 starts from the new A and its own B
    plan = strategy.configure_client(2, 0, glob2, store)
    strategy.attach_client_hooks(2, plan, store)  # client side
    personal = store.get(0, "fedsa_lora_B")
    for m in MODULES:
        assert torch.equal(plan.init_state[b_key(m)], personal[b_key(m)])
        assert torch.equal(plan.init_state[a_key(m)], glob2[a_key(m)])
    # evaluation: per client, and global A with the example-weighted mean B (clients 0: n=10, 1: n=30)
    assert strategy.personalized
    own = strategy.personal_state(1, glob2, store)
    mean = strategy.evaluation_state(glob2, store)
    b1 = store.get(1, "fedsa_lora_B")
    for m in MODULES:
        assert torch.equal(own[b_key(m)], b1[b_key(m)])
        torch.testing.assert_close(mean[b_key(m)], 0.25 * personal[b_key(m)] + 0.75 * b1[b_key(m)])


# --- heterogeneous ranks ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["zero_padding", "hetlora", "flexlora", "flora"])
def test_heterogeneous_clients_send_and_train_only_their_rank(name):
    ranks = [4, 2, 1, 2]
    strategy = make(name, client_ranks=ranks)
    glob = strategy.init_global(adapter(R, seed=1))
    plans, updates, _ = run_round(strategy, 1, [0, 1, 2], glob, MemoryStore(), SIZES)
    for plan, up in zip(plans, updates):
        r = ranks[plan.client_id]
        assert state_bytes(up.tensors) == full_bytes(r) + HEAD_BYTES  # the r_k slice and the whole head
        if name != "flora":
            assert state_bytes(plan.downlink) == full_bytes(r) + HEAD_BYTES
        else:
            assert set(plan.downlink) == {HEAD}  # fresh LoRA from a seed: only the head goes down
        for m in MODULES:  # init beyond r_k is zero, so nothing beyond r_k can ever train
            assert float(plan.init_state[a_key(m)][r:].abs().sum()) == 0
            assert float(plan.init_state[b_key(m)][:, r:].abs().sum()) == 0


def test_rank_mask_zeroes_gradients_beyond_rank():
    strategy = make("zero_padding", client_ranks=[2])
    glob = strategy.init_global(adapter(R, seed=1))
    plan = strategy.configure_client(1, 0, glob, None)
    strategy.attach_client_hooks(1, plan, None)  # client side
    params = {k: torch.nn.Parameter(v.clone()) for k, v in glob.items()}
    for p in params.values():
        p.grad = torch.ones_like(p)
    plan.grad_transform(params)
    for m in MODULES:
        assert float(params[a_key(m)].grad[2:].abs().max()) == 0 and float(params[a_key(m)].grad[:2].min()) == 1
        assert float(params[b_key(m)].grad[:, 2:].abs().max()) == 0


def test_client_rank_above_model_rank_is_refused():
    strategy = make("zero_padding", client_ranks=[8, 4])
    with pytest.raises(ValueError, match="peft.r to at least 8"):
        strategy.init_global(adapter(R, seed=1))


def test_check_update_accepts_slices_and_rejects_bad_shapes():
    strategy = make("hetlora", client_ranks=[2])
    glob = strategy.init_global(adapter(R, seed=1))
    from strategy_fakes import update
    from fedpeft.strategies.lora_math import slice_to_rank

    strategy.check_update(glob, update(0, slice_to_rank(glob, 2), 1))
    bad = slice_to_rank(glob, 2)
    bad[a_key(next(iter(MODULES)))] = torch.zeros(3, 5)
    with pytest.raises(ValueError, match="mixes LoRA ranks"):
        strategy.check_update(glob, update(0, bad, 1))
    nan = slice_to_rank(glob, 2)
    nan[b_key(next(iter(MODULES)))][0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        strategy.check_update(glob, update(0, nan, 1))


def test_hetlora_weights_by_update_norm():
    from strategy_fakes import update
    from fedpeft.strategies.lora_math import slice_to_rank

    strategy = make("hetlora", client_ranks=[4, 2])
    glob = strategy.init_global(adapter(R, seed=0, zero_b=True))
    c0 = slice_to_rank(adapter(R, seed=3), 4)
    c1 = {k: 3 * v for k, v in slice_to_rank(adapter(R, seed=3), 2).items()}
    agg = strategy.aggregate(1, glob, [update(0, c0, 1000), update(1, c1, 1)])
    norm = lambda st: sum(float((st[b_key(m)] @ st[a_key(m)]).pow(2).sum()) for m in MODULES) ** 0.5
    n0, n1 = norm(c0), norm(c1)
    assert agg.metrics["weights"] == pytest.approx([n0 / (n0 + n1), n1 / (n0 + n1)], rel=1e-4)


def test_hetlora_self_pruning_shrinks_rank_when_the_tail_shrinks():
    strategy = make("hetlora", client_ranks=[4], prune=True, prune_gamma=0.5, prune_lambda=1.0)
    glob = strategy.init_global(adapter(R, seed=1))
    store = MemoryStore()
    plan = strategy.configure_client(1, 0, glob, store)
    strategy.attach_client_hooks(1, plan, store)  # client side
    assert plan.extra_loss is not None
    params = {k: torch.nn.Parameter(v.clone()) for k, v in plan.init_state.items()}
    assert float(plan.extra_loss(params).detach()) > 0
    trained = {k: v.clone() for k, v in plan.init_state.items()}
    for m in MODULES:
        trained[b_key(m)][:, 2:] *= 0.5  # tail norm went down during training
    up = strategy.client_update(1, plan, trained, result(), store)
    assert up.tensors[a_key(next(iter(MODULES)))].shape[0] == 2
    assert strategy.configure_client(2, 0, glob, store).info["rank"] == 4  # kept only once accepted
    strategy.commit_private(up, store)
    assert strategy.configure_client(2, 0, glob, store).info["rank"] == 2
    # a tail that grew keeps the rank
    plan = strategy.configure_client(3, 0, glob, store)
    strategy.attach_client_hooks(3, plan, store)  # client side
    trained = {k: v.clone() for k, v in plan.init_state.items()}
    for m in MODULES:
        trained[b_key(m)][:, 1:2] *= 2
    strategy.commit_private(strategy.client_update(3, plan, trained, result(), store), store)
    assert strategy.configure_client(4, 0, glob, store).info["rank"] == 2


# --- FLoRA ------------------------------------------------------------------------------------------------
def test_flora_starts_a_fresh_seeded_lora_each_round():
    strategy = make("flora", client_ranks=[4, 2], seed=7)
    glob = strategy.init_global(adapter(R, seed=1))
    p1 = strategy.configure_client(1, 1, glob, None)
    again = make("flora", client_ranks=[4, 2], seed=7).configure_client(1, 1, glob, None)
    p2 = strategy.configure_client(2, 1, glob, None)
    m = next(iter(MODULES))
    assert torch.equal(p1.init_state[a_key(m)], again.init_state[a_key(m)])  # from the seed alone
    assert not torch.equal(p1.init_state[a_key(m)], p2.init_state[a_key(m)])  # fresh every round
    assert float(p1.init_state[b_key(m)].abs().max()) == 0
    bound = 1 / MODULES[m][1] ** 0.5
    assert float(p1.init_state[a_key(m)].abs().max()) <= bound


# --- baselines --------------------------------------------------------------------------------------------
def test_local_only_shares_nothing_and_keeps_each_adapter():
    strategy = make("local_only")
    glob = strategy.init_global(adapter(R, seed=1, zero_b=True))
    store = MemoryStore()
    plans, updates, agg = run_round(strategy, 1, [0, 1], glob, store, SIZES)
    assert all(p.downlink == {} for p in plans) and all(u.tensors == {} for u in updates)
    for k in glob:
        assert torch.equal(agg.global_state[k], glob[k])
    assert strategy.personalized
    own = strategy.personal_state(0, glob, store)
    assert not torch.equal(own[a_key(next(iter(MODULES)))], glob[a_key(next(iter(MODULES)))])
    plan = strategy.configure_client(2, 0, glob, store)
    strategy.attach_client_hooks(2, plan, store)  # client side
    for k in glob:
        assert torch.equal(plan.init_state[k], own[k])  # continues from its own adapter


def test_zero_shot_trains_nothing():
    strategy = make("zero_shot")
    glob = adapter(R, seed=1, zero_b=True)
    assert strategy.configure_round(1, [0, 1], glob, MemoryStore()) == []
    assert strategy.aggregate(1, glob, []).global_state.keys() == glob.keys()


def test_centralized_requires_a_single_client():
    with pytest.raises(ValueError, match="federation.num_clients=1"):
        make("centralized", num_clients=3)
    strategy = make("centralized", num_clients=1)
    glob = adapter(R, seed=1)
    plans, updates, agg = run_round(strategy, 1, [0], glob, MemoryStore(), SIZES)
    for k in glob:
        torch.testing.assert_close(agg.global_state[k], updates[0].tensors[k])


def test_plan_defaults_are_fedit_shaped():
    plan = ClientPlan(client_id=0, downlink={})
    assert plan.scaling is None and plan.init_state is None


@pytest.mark.parametrize("name, key_of, reason", [("ffa_lora", a_key, "A is frozen"),
                                                  ("fedsa_lora", b_key, "B is personal"),
                                                  ("local_only", a_key, "shares nothing")])
def test_a_forbidden_upload_rejects_that_client_only(name, key_of, reason):
    """check_update (per client: the engine drops that client) refuses what the method never sends."""
    from fedpeft.strategies.base import ClientUpdate

    strategy = make(name)
    glob = strategy.init_global(adapter(R, seed=1))
    module = next(iter(MODULES))
    bad = ClientUpdate(client_id=3, tensors={key_of(module): glob[key_of(module)].clone()}, num_examples=5)
    with pytest.raises(ValueError, match=f"{name}: client 3 uploaded .*{reason}"):
        strategy.check_update(glob, bad)

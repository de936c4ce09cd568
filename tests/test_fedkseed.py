"""FedKSeed: the projected gradient is the two-point difference along the seed's direction, the server's
replay of the uploaded scalars reproduces a client's local model bit for bit, the downlink history
brings a new client to the server's model exactly, bytes follow the formulas, no backward pass runs,
and a killed run resumes exactly."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model

from fedpeft.adapters import get_adapter_state, set_trainable
from fedpeft.config import ConfigError, load_config
from fedpeft.federation.engine import run_experiment
from fedpeft.models.registry import tiny_llama
from fedpeft.strategies.base import ClientUpdate
from fedpeft.strategies.fedkseed import (
    G_KEY,
    HISTORY_COEF_KEY,
    HISTORY_INDEX_KEY,
    INDEX_KEY,
    FedKSeed,
    index_dtype,
    replay,
    tuned_tensors,
)
from helpers import TINY_CONFIG, check_fedkseed_bytes, kill_and_resume, reference_run, run_events

LR, STEPS = 1e-3, 4


def _model(seed=0):
    model, tok = tiny_llama(seed=seed, layers=2)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    torch.manual_seed(seed)
    return get_peft_model(model, config), tok


def _batches(tok, seed=0):
    texts = ["12+7=19", "abc -> cba", "HELLO there", "sort: 3 1 2 -> 1 2 3"]
    enc = tok(texts, return_tensors="pt", padding=True)
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    rng = np.random.default_rng(seed)
    while True:
        rows = rng.permutation(len(texts))[:2]
        yield {"input_ids": enc["input_ids"][rows], "attention_mask": enc["attention_mask"][rows], "labels": labels[rows]}


def _strategy(model, **options) -> FedKSeed:
    strategy = FedKSeed(options={"seed": 5, "k": 64, **options})
    strategy.prepare_model(model)
    strategy.round_lr = LR
    return strategy


def _train(strategy, model, tok, client=0, round_idx=1):
    plan = strategy.configure_client(round_idx, client, get_adapter_state(model), None)
    set_trainable(model, plan.trainable)
    result, losses = strategy.train_zeroth_order(model, {}, _batches(tok, client), plan, steps=STEPS,
                                                 grad_accumulation=1, lr=LR, num_examples=10)
    return plan, strategy.client_update(round_idx, plan, get_adapter_state(model), result, None)


def _loss(model, batch):
    with torch.no_grad():
        return float(model(**batch).loss)


@pytest.mark.parametrize("params", ["all", "adapter"])
def test_server_replay_reproduces_the_clients_local_model_bit_for_bit(params):
    client_model, tok = _model()
    server_model = copy.deepcopy(client_model)
    start_global = get_adapter_state(server_model)
    _, update = _train(_strategy(client_model, params=params), client_model, tok)
    server = _strategy(server_model, params=params)
    result = server.aggregate(1, start_global, [update])  # one client: p = 1
    if params == "all":
        client, replayed = tuned_tensors(client_model, "all"), tuned_tensors(server_model, "all")
        assert any(not torch.equal(c, s) for c, s in zip(client, tuned_tensors(_model()[0], "all")))  # it moved
    else:
        client, replayed = list(get_adapter_state(client_model).values()), [result.global_state[k] for k in get_adapter_state(client_model)]
        assert any(not torch.equal(result.global_state[k], start_global[k]) for k in start_global)
    assert len(client) == len(replayed)
    for c, s in zip(client, replayed):
        assert torch.equal(c, s)


def test_projected_gradient_is_the_two_point_difference_along_the_seeded_direction():
    model, tok = _model()
    reference = copy.deepcopy(model)
    strategy = _strategy(model)
    batch = next(_batches(tok, 0))  # the first step's batch
    _, update = _train(strategy, model, tok)
    j, g = int(update.tensors[INDEX_KEY][0]), float(update.tensors[G_KEY][0])
    # Independently: z from the candidate seed, drawn tensor after tensor, w +- eps z on copies.
    eps = strategy.opts.eps
    losses = []
    for sign in (1, -1):
        moved = copy.deepcopy(reference)
        gen = torch.Generator().manual_seed(strategy.seeds[j])
        with torch.no_grad():
            for name, p in moved.named_parameters():
                if "lora_" not in name:
                    p.add_(sign * eps * torch.randn(p.shape, generator=gen))
        moved.eval()
        losses.append(_loss(moved, batch))
    assert g == pytest.approx((losses[0] - losses[1]) / (2 * eps), rel=1e-3, abs=1e-3)


def test_weighting_by_examples_and_history_catch_up_for_a_new_client():
    server_model, tok = _model()
    pristine = copy.deepcopy(server_model)
    server = _strategy(server_model)
    glob = get_adapter_state(server_model)
    for round_idx in (1, 2):
        updates = []
        for client, n in ((0, 10), (1, 30)):
            server.configure_client(round_idx, client, glob, None)  # the server sends it its plan
            trainer_model = copy.deepcopy(server_model)
            plan, update = _train(_strategy(trainer_model), trainer_model, tok, client, round_idx)
            update.num_examples = n
            updates.append(update)
        glob = server.aggregate(round_idx, glob, updates).global_state
    first = server.history[0]
    g0 = float(updates[0].tensors[G_KEY][0])  # the round-2 entries: client 0 (p = 1/4) first
    assert float(server.history[1][1][0]) == float(np.float32(-LR * 0.25 * g0))
    assert first[0].numel() == 2 * STEPS
    # A client sampled for the first time in round 3 gets both rounds' entries and, replaying them on the
    # pre-trained model, holds exactly the server's model.
    plan = server.configure_client(3, 7, glob, None)
    assert plan.control[HISTORY_INDEX_KEY].numel() == 4 * STEPS and plan.control[HISTORY_INDEX_KEY].dtype == torch.uint8
    replay(tuned_tensors(pristine, "all"), server.seeds, plan.control[HISTORY_INDEX_KEY].long(),
           plan.control[HISTORY_COEF_KEY])
    for mine, theirs in zip(tuned_tensors(pristine, "all"), tuned_tensors(server_model, "all")):
        assert torch.equal(mine, theirs)
    # Client 0 already holds round 2's starting model: it needs round 2 only.
    assert server.configure_client(3, 0, glob, None).control[HISTORY_INDEX_KEY].numel() == 2 * STEPS


def test_no_backward_pass_runs_and_no_gradient_is_kept(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("backward called")

    monkeypatch.setattr(torch.autograd, "backward", refuse)
    monkeypatch.setattr(torch.Tensor, "backward", refuse)
    for params in ("all", "adapter"):
        model, tok = _model()
        _train(_strategy(model, params=params), model, tok)
        assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("k,width", [(64, 1), (256, 1), (257, 2), (4096, 2), (32768, 2), (40000, 4)])
def test_index_type_is_the_smallest_that_holds_k(k, width):
    assert torch.zeros(0, dtype=index_dtype(k)).element_size() == width
    assert torch.iinfo(index_dtype(k)).max >= k - 1


def test_check_update_refuses_bad_pairs():
    strategy = FedKSeed(options={"seed": 0, "k": 8})
    good = {INDEX_KEY: torch.tensor([1, 7], dtype=torch.uint8), G_KEY: torch.tensor([0.5, -1.0])}
    strategy.check_update({}, ClientUpdate(0, good, 1))
    for bad, match in [({**good, INDEX_KEY: torch.tensor([1, 8], dtype=torch.uint8)}, "outside 0..7"),
                       ({**good, G_KEY: torch.tensor([0.5, float("nan")])}, "non-finite"),
                       ({**good, G_KEY: torch.tensor([0.5])}, "one entry per step"),
                       ({INDEX_KEY: good[INDEX_KEY]}, "exactly")]:
        with pytest.raises(ValueError, match=match):
            strategy.check_update({}, ClientUpdate(0, bad, 1))


# --- through the engine -----------------------------------------------------------------------------
def test_engine_bytes_equal_the_formulas(tmp_path):
    steps = 3
    run_experiment("configs/tiny.yaml", ["method.name=fedkseed", "method.options.k=1000", "federation.rounds=3",
                                         f"federation.local_steps={steps}", "evaluation.every_rounds=0",
                                         "evaluation.before_training=false"], run_dir=tmp_path / "run")
    entry = 2 + 4  # int16 index (K = 1000) + float32 scalar
    check_fedkseed_bytes(tmp_path / "run", steps, entry)


def test_refusals():
    with pytest.raises(ConfigError, match="method.server_optimizer.name: method 'fedkseed' cannot be combined"):
        load_config("configs/tiny.yaml", ["method.name=fedkseed", "method.server_optimizer.name=fedadam"])
    with pytest.raises(ConfigError, match="method.options.eps"):
        load_config("configs/tiny.yaml", ["method.name=fedkseed", "method.options.eps=0"])


def test_uplink_compression_is_refused_before_training(tmp_path):
    with pytest.raises(ValueError, match="federation.uplink_compression=int8"):
        run_experiment("configs/tiny.yaml", ["method.name=fedkseed", "federation.uplink_compression=int8",
                                             "federation.rounds=1"], run_dir=tmp_path / "run")


def test_state_round_trip_replays_the_history_on_a_fresh_model():
    server_model, tok = _model()
    server = _strategy(server_model)
    trainer_model = copy.deepcopy(server_model)
    _, update = _train(_strategy(trainer_model), trainer_model, tok)
    server.aggregate(1, get_adapter_state(server_model), [update])
    fresh, _ = _model()
    restored = _strategy(fresh)
    restored.load_state_dict(server.state_dict())
    for mine, theirs in zip(tuned_tensors(fresh, "all"), tuned_tensors(server_model, "all")):
        assert torch.equal(mine, theirs)


def test_kill_and_resume_rebuilds_the_replayed_model_exactly(tmp_path):
    overrides = ["method.name=fedkseed", "method.options.k=32", "federation.rounds=2",
                 "federation.local_steps=3", "training.lr=0.01", "evaluation.every_rounds=0"]
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    reference_run(TINY_CONFIG, overrides, ref)
    kill_and_resume(TINY_CONFIG, overrides, killed, "client:2:1")
    # Round 2's losses are evaluated on the base weights rebuilt by replaying round 1 from the checkpoint.
    losses = lambda d: [(e["round"], e["client"], e["losses"]) for e in run_events(d, "client_train")]
    assert losses(ref) == losses(killed)
    assert [e["metrics"] for e in run_events(ref, "eval")] == [e["metrics"] for e in run_events(killed, "eval")]


def test_a_process_whose_model_missed_rounds_refuses_to_train():
    model, _ = _model()
    node = _strategy(model)  # e.g. a Flower node: it never replayed round 1
    plan = node.configure_client(2, 0, get_adapter_state(model), None)
    with pytest.raises(ValueError, match="holds round 1's global model, not round 2's"):
        node.attach_client_hooks(2, plan, None)
    node.attach_client_hooks(1, node.configure_client(1, 1, get_adapter_state(model), None), None)  # round 1: w0

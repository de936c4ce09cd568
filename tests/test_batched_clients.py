"""federation.concurrent_clients: a group of clients trained in one batched pass equals serial training.

The reference is the serial client (``ClientRunner.train`` -> ``local_trainer.train_local``), run on the
same float64 model with a float64 loss: the batched pass must give each client the adapter the serial
loop gives it, to reassociation error (1e-12 here; measured ~1e-15). Clipping is made active (a small
max_grad_norm) so that a group-wide clip would show up as a difference.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fedpeft.adapters import adapter_parameters, get_adapter_state
from fedpeft.config import load_config
from fedpeft.federation.batched_runner import GroupedRunner, batching_refusal, plan_groups
from fedpeft.federation.batched_trainer import train_group
from fedpeft.federation.engine import Engine, run_experiment
from fedpeft.federation.local_trainer import IGNORE_INDEX
from fedpeft.strategies.base import ServerContext
from helpers import TINY_CONFIG as TINY
from helpers import assert_same_tensors, final_adapter, kill_and_resume, reference_run, run_events

QUIET = ["evaluation.every_rounds=0", "evaluation.before_training=false"]
TRAIN = ["federation.grad_accumulation=2", "training.max_grad_norm=0.05", "training.lr=0.02",
         "federation.clients_per_round=3"]
TOL64 = 1e-12


# --- group sizes (memory guard) -------------------------------------------------------------------------
def test_plan_groups_caps_each_pass_at_the_token_budget():
    assert [list(g) for g in plan_groups(5, 2, 256, None)] == [[0, 1], [2, 3], [4]]
    # 4 clients of 256 tokens fit in 1024; the configured 8 would not
    assert [len(g) for g in plan_groups(10, 8, 256, 1024)] == [4, 4, 2]
    # a budget below one client's tokens still trains, one client per pass
    assert [len(g) for g in plan_groups(3, 4, 512, 100)] == [1, 1, 1]
    assert plan_groups(0, 4, 8, None) == []
    with pytest.raises(ValueError, match="concurrent=0"):
        plan_groups(3, 0, 8, None)


def test_config_keys_default_to_serial_and_validate():
    cfg = load_config(TINY)
    assert cfg.federation.concurrent_clients == 1 and cfg.federation.max_tokens_per_pass is None
    with pytest.raises(Exception, match="concurrent_clients"):
        load_config(TINY, ["federation.concurrent_clients=0"])


# --- float64 equality with the serial client -----------------------------------------------------------
def _float64_loss(logits, labels, vocab_size, **_):
    """transformers' causal-LM loss without its float32 upcast, so the serial reference stays float64."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, vocab_size), labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX)


def _engine(tmp_path, overrides):
    cfg = load_config(TINY, [*QUIET, *TRAIN, *overrides])
    engine = Engine(cfg, tmp_path / "run")
    engine._setup()
    engine.model.double()
    engine.model.get_base_model().loss_function = _float64_loss
    return engine


def _plans(engine, clients, global_state, round_idx=1):
    strategy = engine.strategy
    strategy.begin_round(round_idx, ServerContext(
        engine.model, engine.tokenizer, engine.config, engine.data, engine.client_data.batches,
        client_indices=engine.client_indices, labels=engine.labels, run_dir=engine.run_dir))
    return strategy.configure_round(round_idx, clients, global_state, engine.store)


def _serial(engine, plans, global_state, lr):
    out = []
    for plan in plans:
        local = engine.runner.train(1, plan, global_state, lr)
        out.append(({n: p.detach().clone() for n, p in adapter_parameters(engine.model).items()}, local.losses))
    return out


def _batched(engine, plans, global_state, lr):
    grouped = GroupedRunner(engine.runner, len(plans))
    members = [grouped._member(1, plan, global_state, lr) for plan in plans]
    cfg = engine.config
    results = train_group(engine.model, members, steps=cfg.federation.local_steps,
                          grad_accumulation=cfg.federation.grad_accumulation, lr=lr, pad_id=engine.client_data.pad_id,
                          max_grad_norm=cfg.training.max_grad_norm)
    return [(m.adapters.values, results[k][1]) for k, m in enumerate(members)]


def _max_diff(a, b):
    assert a.keys() == b.keys()
    return max(float((a[k].detach() - b[k].detach()).abs().max()) for k in a)


METHODS = {
    "fedit": [],
    "ffa_lora": [],
    "fedprox": ["method.options.mu=0.5"],
    "fltac": ["method.options.save_adapters=false"],
    "hetlora": ["method.options.client_ranks=[4,2,1]", "method.options.rank_scaling=alpha"],
    "scaffold": ["method.options.control_update=mean_gradient"],
    "fedsa_lora": [],
    "flora": ["method.options.client_ranks=[4,2]"],
}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_batched_group_equals_serial_clients_in_float64(tmp_path, method):
    engine = _engine(tmp_path, [f"method.name={method}", *METHODS[method]]
                     + ([f"method.options.artifact_dir={tmp_path / 'art'}"] if method == "fltac" else []))
    assert batching_refusal(engine.model, engine.strategy, engine.config) is None
    global_state = engine.strategy.init_global(get_adapter_state(engine.model))
    lr = engine.config.training.lr
    serial = _serial(engine, _plans(engine, [0, 1, 2], global_state), global_state, lr)
    plans = _plans(engine, [0, 1, 2], global_state)
    batched = _batched(engine, plans, global_state, lr)
    assert len(plans) == len(serial) >= 3
    for (want, want_losses), (got, got_losses) in zip(serial, batched):
        moved = _max_diff(want, {k: v.to(torch.float64) for k, v in got.items()})
        assert moved <= TOL64, (method, moved)
        print(f"{method}: float64 max |batched - serial| = {moved:.2e}")
        assert got_losses == pytest.approx(want_losses, rel=1e-6)  # step losses are float32 sums in both
        # the clients trained (the comparison is not between two untouched starts)
        assert _max_diff(want, {k: v.to(torch.float64) for k, v in global_state.items()}) > 1e-4


def test_a_clients_result_does_not_depend_on_its_group_mates(tmp_path):
    """Per-client clipping and optimizer state: client 0 trained with different mates (or alone) ends the
    same, although the mates' own results differ from each other."""
    engine = _engine(tmp_path, [])
    global_state = engine.strategy.init_global(get_adapter_state(engine.model))
    lr = engine.config.training.lr
    alone = _batched(engine, _plans(engine, [0], global_state), global_state, lr)[0][0]
    with_1 = _batched(engine, _plans(engine, [0, 1], global_state), global_state, lr)
    with_3 = _batched(engine, _plans(engine, [3, 0], global_state), global_state, lr)  # other mate, other slot
    assert _max_diff(alone, with_1[0][0]) <= TOL64
    assert _max_diff(alone, with_3[1][0]) <= TOL64
    assert _max_diff(with_1[1][0], with_3[0][0]) > 1e-4  # the mates themselves trained differently


# --- through the engine, float32 --------------------------------------------------------------------------
F32_ATOL = 1e-5


def test_engine_with_concurrent_clients_matches_serial_run_in_float32(tmp_path):
    common = [*QUIET, *TRAIN, "federation.rounds=2"]
    serial = run_experiment(TINY, common, run_dir=tmp_path / "serial")
    batched = run_experiment(TINY, [*common, "federation.concurrent_clients=2"], run_dir=tmp_path / "batched")
    a, b = final_adapter(serial.run_dir), final_adapter(batched.run_dir)
    diff = _max_diff(a, b)
    print(f"float32 engine, 2 rounds x 3 clients: max |C=2 - C=1| = {diff:.2e}")
    assert diff <= F32_ATOL
    def losses(run_dir):
        return [(e["round"], e["client"], e["losses"]) for e in run_events(run_dir, "client_train")]
    la, lb = losses(serial.run_dir), losses(batched.run_dir)
    assert [x[:2] for x in la] == [x[:2] for x in lb]
    for (_, _, x), (_, _, y) in zip(la, lb):
        assert y == pytest.approx(x, rel=1e-5)


def test_dropout_makes_the_engine_train_serially(tmp_path, caplog):
    cfg = load_config(TINY, [*QUIET, "peft.dropout=0.1", "federation.concurrent_clients=2", "federation.rounds=1"])
    engine = Engine(cfg, tmp_path / "run")
    with caplog.at_level("WARNING"):
        engine._setup()
    assert engine.transport.grouped is None
    assert "dropout" in caplog.text and "one after another" in caplog.text
    # a method not known to have data-only client hooks is refused by name
    from types import SimpleNamespace
    assert "'my_method' is not known" in batching_refusal(engine.model, SimpleNamespace(name="my_method"), cfg)


# --- kill and resume with C > 1 ---------------------------------------------------------------------------
def test_kill_inside_a_group_and_resume_is_bit_identical(tmp_path):
    overrides = ["federation.rounds=2", "federation.concurrent_clients=2", *QUIET]
    reference_run(TINY, overrides, tmp_path / "ref")
    kill_and_resume(TINY, overrides, tmp_path / "run", "client:2:1")
    assert_same_tensors(final_adapter(tmp_path / "ref"), final_adapter(tmp_path / "run"))


def test_a_group_that_runs_out_of_memory_is_retried_in_halves(tmp_path, monkeypatch):
    """The memory guard's fallback: an out-of-memory batched pass is split, never a failed round; every
    plan still gets its own result, equal to training it in a group that fits."""
    import fedpeft.federation.batched_runner as br
    from fedpeft.models.device import OutOfMemory

    engine = _engine(tmp_path, [])
    global_state = engine.strategy.init_global(get_adapter_state(engine.model))
    lr = engine.config.training.lr
    real, sizes = br.train_group, []

    def small_memory(model, members, **kw):
        sizes.append(len(members))
        if len(members) > 1:
            raise OutOfMemory("out of memory (simulated)")
        return real(model, members, **kw)

    monkeypatch.setattr(br, "train_group", small_memory)
    results = GroupedRunner(engine.runner, 3).train(1, _plans(engine, [0, 1, 2], global_state), global_state, lr)
    assert sizes == [3, 1, 2, 1, 1]
    assert [r.update.client_id for r in results] == [0, 1, 2]
    monkeypatch.setattr(br, "train_group", real)
    alone = GroupedRunner(engine.runner, 1).train(1, _plans(engine, [2], global_state), global_state, lr)[0]
    assert _max_diff(results[2].update.tensors, alone.update.tensors) == 0.0


def test_per_client_step_counts_and_learning_rates_match_serial(tmp_path):
    """Clients of one group with their own step count and learning rate: a client that is done leaves the
    later passes; each ends as serial training with its own steps and lr."""
    engine = _engine(tmp_path, [])
    global_state = engine.strategy.init_global(get_adapter_state(engine.model))
    own = {0: (1, 0.05), 1: (3, 0.01), 2: (2, 0.002)}
    grouped = GroupedRunner(engine.runner, 3)
    members = [grouped._member(1, plan, global_state, 0.0) for plan in _plans(engine, [0, 1, 2], global_state)]
    for m in members:
        m.steps, m.lr = own[m.plan.client_id]
    results = train_group(engine.model, members, steps=99, grad_accumulation=2, lr=0.0,
                          pad_id=engine.client_data.pad_id, max_grad_norm=0.05)
    for k, m in enumerate(members):
        steps, lr = own[m.plan.client_id]
        engine.config.federation.local_steps = steps  # the serial client with this step count
        want = _serial(engine, _plans(engine, [m.plan.client_id], global_state), global_state, lr)[0][0]
        assert results[k][0].steps == steps and len(results[k][1]) == steps
        assert _max_diff(want, m.adapters.values) <= TOL64

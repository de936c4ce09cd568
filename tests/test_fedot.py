"""FedOT (offsite tuning): the emulator's blocks, the client's view, the plug-in evaluation on the full
middle, FedAvg on the adapter, the bytes that leave the owner, the refusals, distillation and resume."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model

from fedpeft.adapters import adapter_parameters, get_adapter_state, set_adapter_state
from fedpeft.config import ConfigError, load_config
from fedpeft.federation.engine import run_experiment
from fedpeft.models.emulator import Emulator, check_split, distill, distillation_loss, uniform_keep
from fedpeft.models.registry import tiny_llama
from fedpeft.strategies import build_strategy
from fedpeft.strategies.base import ClientUpdate
from fedpeft.strategies.fedot import FedOT
from helpers import TINY_CONFIG, assert_same_tensors, final_adapter, kill_and_resume, reference_run, run_events

HIDDEN, INTER, KV = 64, 128, 32  # tiny_llama: hidden 64, intermediate 2 x hidden, 2 of 4 heads for k/v


def _block_params() -> int:
    """Parameters of one tiny-llama block: q, k, v, o, gate, up, down and two RMSNorm weights."""
    return HIDDEN * HIDDEN * 2 + HIDDEN * KV * 2 + 3 * HIDDEN * INTER + 2 * HIDDEN


def _wrapped(layers: int, seed: int = 0):
    model, tok = tiny_llama(seed=seed, layers=layers)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    torch.manual_seed(seed)
    return get_peft_model(model, config), tok


def _strategy(model, **options) -> FedOT:
    strategy = FedOT(options={"seed": 0, **options})
    strategy.prepare_model(model)
    return strategy


def _batch(tok, text="hello offsite tuning"):
    enc = tok([text, text[::-1]], return_tensors="pt", padding=True)
    return enc["input_ids"], enc["attention_mask"]


def _logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, use_cache=False).logits


def _randomise_adapter(model, seed=1):
    gen = torch.Generator().manual_seed(seed)
    state = {k: torch.randn(v.shape, generator=gen) * 0.1 for k, v in get_adapter_state(model).items()}
    set_adapter_state(model, state)
    return state


# --- the emulator ---------------------------------------------------------------------------------
@pytest.mark.parametrize("middle,drop,expected", [(10, 0.2, 8), (10, 0.5, 5), (26, 0.2, 21), (26, 0.5, 13), (3, 0.9, 1)])
def test_uniform_drop_keeps_the_stated_number_evenly_spaced(middle, drop, expected):
    kept = uniform_keep(middle, drop)
    assert len(kept) == expected
    assert kept == sorted(set(kept)) and all(0 <= k < middle for k in kept)
    if expected > 1:  # the first and last middle blocks are kept; gaps differ by at most one
        assert kept[0] == 0 and kept[-1] == middle - 1
        gaps = [b - a for a, b in zip(kept, kept[1:])]
        assert max(gaps) - min(gaps) <= 1


def test_ten_middle_blocks_at_drop_02_give_an_eight_block_emulator():
    model, tok = _wrapped(14)
    emu = _strategy(model, a=2, b=2, drop_ratio=0.2).emulator
    assert emu.middle == list(range(2, 12)) and len(emu.kept) == 8 and len(emu.dropped) == 2
    # In the client's view exactly the dropped blocks hand their input back unchanged.
    passed_through = []
    hooks = [block.register_forward_hook(lambda m, args, out, i=i: passed_through.append(i) if out is args[0] else None)
             for i, block in enumerate(emu.blocks)]
    ids, mask = _batch(tok)
    with emu.active():
        _logits(model, ids, mask)
    assert passed_through == emu.dropped
    passed_through.clear()
    _logits(model, ids, mask)  # outside the view: the full model, no block skipped
    for h in hooks:
        h.remove()
    assert passed_through == []


def test_emulator_view_equals_a_model_built_from_the_kept_blocks():
    model, tok = _wrapped(8)
    emu = _strategy(model, a=1, b=2, drop_ratio=0.5).emulator
    _randomise_adapter(model)
    ids, mask = _batch(tok)
    with emu.active():
        seen = _logits(model, ids, mask)
    # Independent: a copy whose block list holds only the adapter and kept blocks, in order.
    small = copy.deepcopy(model)
    base = small.get_base_model().model
    order = list(range(emu.a)) + emu.kept + list(range(emu.num_layers - emu.b, emu.num_layers))
    base.layers = torch.nn.ModuleList([base.layers[i] for i in order])
    base.config.num_hidden_layers = len(order)
    torch.testing.assert_close(seen, _logits(small, ids, mask), rtol=0, atol=0)
    assert not torch.equal(seen, _logits(model, ids, mask))  # the full middle gives something else


def test_plugged_in_evaluation_runs_the_full_middle():
    model, tok = _wrapped(6)
    strategy = _strategy(model, a=1, b=1, drop_ratio=0.5)
    trained = _randomise_adapter(model, seed=3)
    ids, mask = _batch(tok)
    with strategy.evaluation_views()["emulator"]():
        through_emulator = _logits(model, ids, mask)
    plugged = _logits(model, ids, mask)  # the default view the evaluator scores first
    # Independent: a fresh full model from the same base weights with the adapter loaded.
    reference, _ = _wrapped(6)
    set_adapter_state(reference, trained)
    torch.testing.assert_close(plugged, _logits(reference, ids, mask), rtol=0, atol=0)
    assert not torch.allclose(plugged, through_emulator)


# --- the adapter and FedAvg -------------------------------------------------------------------------
def test_adapter_is_the_lora_of_the_first_a_and_last_b_blocks():
    model, _ = _wrapped(6)
    strategy = _strategy(model, a=2, b=1, drop_ratio=0.5)
    keys = strategy.adapter_keys(get_adapter_state(model))
    blocks = {int(k.split(".layers.")[1].split(".")[0]) for k in keys}
    assert blocks == {0, 1, 5}
    assert len(keys) == 3 * 4  # q and v, A and B, per adapter block


def test_fedavg_equation_on_the_adapter_tensors():
    model, _ = _wrapped(6)
    strategy = _strategy(model, a=1, b=1, drop_ratio=0.5)
    global_state = get_adapter_state(model)
    keys = strategy.adapter_keys(global_state)
    gen = torch.Generator().manual_seed(0)
    sizes = [3, 5, 12]
    updates = [ClientUpdate(client_id=c, num_examples=n,
                            tensors={k: torch.randn(global_state[k].shape, generator=gen) for k in keys})
               for c, n in enumerate(sizes)]
    new = strategy.aggregate(1, global_state, updates).global_state
    for key in keys:
        expected = sum(n * u.tensors[key] for n, u in zip(sizes, updates)) / sum(sizes)
        torch.testing.assert_close(new[key], expected, rtol=1e-6, atol=1e-7)
    for key in set(global_state) - set(keys):  # the middle's LoRA never moves
        assert torch.equal(new[key], global_state[key])


def test_an_upload_of_a_middle_tensor_is_refused():
    model, _ = _wrapped(6)
    strategy = _strategy(model, a=1, b=1, drop_ratio=0.5)
    global_state = get_adapter_state(model)
    middle_key = next(k for k in global_state if ".layers.3." in k)
    with pytest.raises(ValueError, match="only the adapter blocks"):
        strategy.check_update(global_state, ClientUpdate(0, {middle_key: global_state[middle_key]}, 1))


# --- what leaves the owner --------------------------------------------------------------------------
def test_shipped_bytes_are_the_full_model_minus_the_dropped_blocks():
    model, _ = _wrapped(6)
    emu = _strategy(model, a=1, b=1, drop_ratio=0.5).emulator
    bare, _ = tiny_llama(layers=6)
    full = sum(t.numel() * t.element_size() for t in list(bare.parameters()) + list(bare.buffers()))
    assert emu.full_model_bytes(model) == full
    assert len(emu.dropped) == 2
    shipped = sum(t.numel() * t.element_size() for t in emu.shipped_parameters(model).values())
    assert shipped == full - len(emu.dropped) * _block_params() * 4


# --- refusals ---------------------------------------------------------------------------------------
def test_a_split_without_middle_is_refused_naming_the_options():
    with pytest.raises(ValueError, match=r"method.options.a=3 and method.options.b=3 leave no middle"):
        check_split(6, 3, 3)
    model, _ = _wrapped(6)
    with pytest.raises(ValueError, match=r"method.options.a=4 and method.options.b=2"):
        _strategy(model, a=4, b=2)


@pytest.mark.parametrize("ratio", ["0", "1", "1.5", "-0.2"])
def test_drop_ratio_outside_the_open_interval_is_refused_by_the_config(ratio):
    with pytest.raises(ConfigError, match=r"method.options.drop_ratio"):
        load_config("configs/tiny.yaml", ["method.name=fedot", f"method.options.drop_ratio={ratio}"])


def test_no_adapter_block_is_refused():
    with pytest.raises(ValueError, match="a=0 and method.options.b=0"):
        build_strategy(load_config("configs/tiny.yaml", ["method.name=fedot", "method.options.a=0",
                                                         "method.options.b=0"]).method)


# --- distillation -----------------------------------------------------------------------------------
def test_distillation_aligns_the_emulator_and_leaves_the_full_model_alone():
    model, tok = _wrapped(6)
    emu = _strategy(model, a=1, b=1, drop_ratio=0.5).emulator
    ids, mask = _batch(tok, "the owner distils its emulator on its own text")
    full_before = _logits(model, ids, mask)

    def batches():
        while True:
            yield {"input_ids": ids, "attention_mask": mask}

    # The loss the copies start from is the plain layer drop's (independently computed here).
    args_kept = [emu.blocks[i] for i in emu.kept]
    losses = distill(model, emu, batches(), steps=30, lr=1e-3, seed=0)
    assert len(losses) == 30 and losses[-1] < 0.5 * losses[0]
    assert torch.equal(_logits(model, ids, mask), full_before)  # the owner's model is untouched
    assert all(emu.blocks[i] is b for i, b in zip(emu.kept, args_kept))
    assert set(emu.distilled) == set(emu.kept)
    # Resume: the distilled copies round-trip through the strategy state.
    with emu.active():
        distilled_view = _logits(model, ids, mask)
    other = Emulator.build(model, 1, 1, 0.5)
    other.load_distilled(emu.distilled_state())
    with other.active():
        torch.testing.assert_close(_logits(model, ids, mask), distilled_view, rtol=0, atol=0)


def test_distillation_loss_is_the_normalised_mse():
    teacher = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])
    student = torch.tensor([[[1.0, 1.0], [3.0, 6.0]]])
    mask = torch.tensor([[1, 0]])  # the second token is padding
    expected = ((0.0 + 1.0) / 2) / ((1.0 + 4.0) / 2)
    assert distillation_loss(student, teacher, mask).item() == pytest.approx(expected)


# --- through the engine -----------------------------------------------------------------------------
def test_engine_run_meters_the_emulator_once_and_evaluates_both_ways(tmp_path, six_block_model):
    summary = run_experiment("configs/tiny.yaml", [f"model.name={six_block_model}", "method.name=fedot",
                                                   "method.options.a=1", "method.options.b=1",
                                                   "method.options.drop_ratio=0.5", "federation.rounds=2"],
                             run_dir=tmp_path / "run")
    assert "exact_match" in summary.final_metrics and "emulator/exact_match" in summary.final_metrics
    lora_block = (4 * HIDDEN + HIDDEN * 4 + 4 * HIDDEN + KV * 4) * 4  # q and v LoRA (r=4), float32
    adapter_bytes = 2 * lora_block  # blocks 0 and 5
    bare, _ = tiny_llama(layers=6)
    full = sum(t.numel() * t.element_size() for t in list(bare.parameters()) + list(bare.buffers()))
    shipped = full - 2 * _block_params() * 4
    trains = run_events(tmp_path / "run", "client_train")
    seen: set[int] = set()
    for event in trains:
        first = event["client"] not in seen
        seen.add(event["client"])
        assert event["uplink_bytes"] == adapter_bytes
        assert event["downlink_bytes"] == adapter_bytes + (shipped if first else 0)
    aggregate = run_events(tmp_path / "run", "aggregate")[0]
    assert aggregate["owner_model_bytes"] == full and aggregate["shipped_once_bytes"] == shipped
    assert {e["split"] for e in run_events(tmp_path / "run", "eval") if "split" in e} == {"emulator"}


def test_local_ot_uploads_nothing_and_scores_each_client(tmp_path, six_block_model):
    summary = run_experiment("configs/tiny.yaml", [f"model.name={six_block_model}", "method.name=fedot",
                                                   "method.options.a=1", "method.options.b=1",
                                                   "method.options.local_ot=true", "federation.rounds=1"],
                             run_dir=tmp_path / "run")
    assert summary.uplink_bytes == 0
    assert "personal/mean" in summary.final_metrics


def test_kill_and_resume_with_a_distilled_emulator_is_bit_identical(tmp_path, six_block_model):
    overrides = [f"model.name={six_block_model}", "method.name=fedot", "method.options.a=1", "method.options.b=1",
                 "method.options.distill_steps=3", "federation.rounds=2", "evaluation.every_rounds=1"]
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    reference_run(TINY_CONFIG, overrides, ref)
    kill_and_resume(TINY_CONFIG, overrides, killed, "client:2:1")
    assert_same_tensors(final_adapter(ref), final_adapter(killed))
    down = lambda d: [(e["round"], e["client"], e["downlink_bytes"], e["losses"])
                      for e in run_events(d, "client_train")]
    assert down(ref) == down(killed)
    metrics = lambda d: [e["metrics"] for e in run_events(d, "eval")]
    assert metrics(ref) == metrics(killed)


def test_a_process_without_the_distilled_emulator_refuses_to_train():
    model, _ = _wrapped(6)
    node = _strategy(model, a=1, b=1, drop_ratio=0.5)
    plan = node.configure_client(1, 0, get_adapter_state(model), None)
    plan.info["distilled"] = True  # as the server's plan says after its distillation
    with pytest.raises(ValueError, match="distilled the emulator"):
        node.client_view(plan)


def test_report_shows_what_left_the_owner(tmp_path, six_block_model):
    summary = run_experiment("configs/tiny.yaml", [f"model.name={six_block_model}", "method.name=fedot",
                                                   "method.options.a=1", "method.options.b=1", "federation.rounds=1",
                                                   "output.report=true"], run_dir=tmp_path / "run")
    aggregate = run_events(tmp_path / "run", "aggregate")[0]
    report = summary.report_path.read_text()
    assert "## Offsite tuning (FedOT)" in report
    assert f"{aggregate['shipped_once_bytes'] / 1e6:.2f} MB of the full model's {aggregate['owner_model_bytes'] / 1e6:.2f} MB" in report
    assert "| exact_match |" in report

"""FedOT with fully trained adapter blocks (``method.options.adapter_training: full``): the adapter is every
base parameter of the first a / last b blocks; FedAvg of those weights into the owner's model, bytes, the
plugged-in evaluation, what final/ holds, kill-and-resume, and the settings it refuses."""

from __future__ import annotations


import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file

from fedpeft.adapters import get_adapter_state
from fedpeft.config import ConfigError, load_config
from fedpeft.federation.engine import run_experiment
from fedpeft.models.loading import load_model_for_eval
from fedpeft.models.peft_wrap import add_to_base_weight
from fedpeft.models.registry import tiny_llama
from fedpeft.strategies.base import ClientUpdate
from fedpeft.strategies.fedot import BLOCK_PREFIX, FedOT
from helpers import TINY_CONFIG, assert_same_tensors, kill_and_resume, reference_run, run_events

HIDDEN, INTER, KV = 64, 128, 32  # tiny_llama: hidden 64, intermediate 2 x hidden, 2 of 4 heads for k/v
BLOCK_PARAMS = HIDDEN * HIDDEN * 2 + HIDDEN * KV * 2 + 3 * HIDDEN * INTER + 2 * HIDDEN  # q,k,v,o, MLP, 2 norms
FULL = ["method.name=fedot", "method.options.a=1", "method.options.b=1", "method.options.drop_ratio=0.5",
        "method.options.adapter_training=full"]


def _wrapped(layers: int = 6, seed: int = 0):
    model, tok = tiny_llama(seed=seed, layers=layers)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    torch.manual_seed(seed)
    return get_peft_model(model, config), tok


def _strategy(model, **options) -> FedOT:
    strategy = FedOT(options={"seed": 0, "a": 1, "b": 1, "drop_ratio": 0.5, "adapter_training": "full", **options})
    strategy.prepare_model(model)
    return strategy


def _logits(model, tok, text="offsite tuning, fully"):
    enc = tok([text, text[::-1]], return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], use_cache=False).logits


# --- the adapter is every parameter of the a + b blocks -----------------------------------------------
def test_full_adapter_is_every_base_parameter_of_the_blocks_and_no_lora():
    model, _ = _wrapped()
    strategy = _strategy(model)
    names = list(strategy.emulator.block_parameters(model))
    assert {n.split(".layers.")[1].split(".")[0] for n in names} == {"0", "5"}
    assert not any("lora_" in n for n in names)
    assert sum(model.get_parameter(n).numel() for n in names) == 2 * BLOCK_PARAMS
    plan = strategy.configure_client(1, 0, get_adapter_state(model), None)
    assert plan.trainable == [] and plan.downlink == {}  # no LoRA trains; blocks go as plan.control
    blocks = {k for k in plan.control if k.startswith(BLOCK_PREFIX)}
    assert blocks == {BLOCK_PREFIX + n for n in names} and set(plan.upload) == blocks


def test_aggregate_is_the_example_weighted_mean_of_the_clients_blocks():
    model, _ = _wrapped()
    strategy = _strategy(model)
    names = list(strategy.emulator.block_parameters(model))
    gen = torch.Generator().manual_seed(0)
    sizes = [3, 5, 12]
    updates = [ClientUpdate(client_id=c, num_examples=n, tensors={
        BLOCK_PREFIX + k: torch.randn(model.get_parameter(k).shape, generator=gen) for k in names})
        for c, n in enumerate(sizes)]
    glob = get_adapter_state(model)
    for u in updates:
        strategy.check_update(glob, u)
    result = strategy.aggregate(1, glob, updates)
    assert all(torch.equal(result.global_state[k], glob[k]) for k in glob)  # the LoRA does not move
    add_to_base_weight(model, result.base_delta)  # what the engine does with it
    for name in names:  # independent: sum_k n_k W_k / sum n in float64
        expected = sum(n * u.tensors[BLOCK_PREFIX + name].double() for n, u in zip(sizes, updates)) / sum(sizes)
        torch.testing.assert_close(model.get_parameter(name).detach().double(), expected, rtol=1e-6, atol=1e-6)
    assert set(result.base_delta) == set(names)


def test_a_block_upload_in_lora_mode_and_a_wrong_shape_are_refused():
    model, _ = _wrapped()
    lora = FedOT(options={"seed": 0, "a": 1, "b": 1, "drop_ratio": 0.5})
    lora.prepare_model(model)
    name = next(iter(lora.emulator.block_parameters(model)))
    with pytest.raises(ValueError, match="adapter_training=lora"):
        lora.check_update({}, ClientUpdate(0, {BLOCK_PREFIX + name: torch.zeros(1)}, 1))
    full = _strategy(model)
    with pytest.raises(ValueError, match="shape"):
        full.check_update({}, ClientUpdate(0, {BLOCK_PREFIX + name: torch.zeros(1)}, 1))


def test_plugged_in_evaluation_uses_the_trained_blocks_with_the_full_middle():
    model, tok = _wrapped()
    strategy = _strategy(model)
    names = list(strategy.emulator.block_parameters(model))
    gen = torch.Generator().manual_seed(1)
    trained = {n: model.get_parameter(n).detach() + 0.05 * torch.randn(model.get_parameter(n).shape, generator=gen)
               for n in names}
    result = strategy.aggregate(1, get_adapter_state(model), [ClientUpdate(0, {BLOCK_PREFIX + n: v for n, v in
                                                                               trained.items()}, 4)])
    add_to_base_weight(model, result.base_delta)
    plugged = _logits(model, tok)
    with strategy.evaluation_views()["emulator"]():
        through_emulator = _logits(model, tok)
    # Independent: a fresh full model (every middle block) with the trained blocks copied in by name.
    reference, _ = _wrapped()
    with torch.no_grad():
        for n, v in trained.items():
            reference.get_parameter(n).copy_(v)
    torch.testing.assert_close(plugged, _logits(reference, tok), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(plugged, _logits(_wrapped()[0], tok))  # the blocks did change the model
    assert not torch.allclose(plugged, through_emulator, atol=1e-3)  # and the middle is the full one


def test_client_view_loads_the_received_blocks_and_puts_the_models_back():
    model, _ = _wrapped()
    strategy = _strategy(model)
    params = strategy.emulator.block_parameters(model)
    before = {n: p.detach().clone() for n, p in params.items()}
    plan = strategy.configure_client(1, 0, get_adapter_state(model), None)
    sent = {k: v + 1.0 for k, v in plan.control.items() if k.startswith(BLOCK_PREFIX)}  # e.g. a node's own copy
    plan.control.update(sent)
    trainable = strategy.trainable_base_parameters(model, plan)
    assert set(trainable) == set(params) and all(p.requires_grad for p in trainable.values())
    with strategy.client_view(plan):
        for n, p in params.items():
            assert torch.equal(p.detach(), sent[BLOCK_PREFIX + n])  # training starts from what was received
            with torch.no_grad():
                p.mul_(2.0)  # "training"
    for n, p in params.items():
        assert torch.equal(p.detach(), before[n]) and not p.requires_grad  # the owner's blocks are back, frozen
        assert torch.equal(strategy.trained_blocks[BLOCK_PREFIX + n], 2.0 * sent[BLOCK_PREFIX + n])


# --- through the engine -----------------------------------------------------------------------------
def test_engine_bytes_and_what_final_holds(tmp_path, six_block_model):
    summary = run_experiment("configs/tiny.yaml", [f"model.name={six_block_model}", *FULL, "federation.rounds=2",
                                                   "evaluation.every_rounds=1"], run_dir=tmp_path / "run")
    bare, _ = tiny_llama(layers=6)
    full = sum(t.numel() * t.element_size() for t in list(bare.parameters()) + list(bare.buffers()))
    blocks = 2 * BLOCK_PARAMS * 4  # blocks 0 and 5, float32
    shipped = full - 2 * BLOCK_PARAMS * 4 - blocks  # minus the 2 dropped middle blocks and the travelling blocks
    seen: set[int] = set()
    for event in run_events(tmp_path / "run", "client_train"):
        first = event["client"] not in seen
        seen.add(event["client"])
        assert event["uplink_bytes"] == blocks
        assert event["downlink_bytes"] == blocks + (shipped if first else 0)
    aggregate = run_events(tmp_path / "run", "aggregate")[-1]
    assert aggregate["adapter_block_bytes"] == blocks and aggregate["shipped_once_bytes"] == shipped
    assert "emulator/exact_match" in summary.final_metrics
    # final/ holds the (untrained) LoRA and the trained blocks; fedpeft eval's loader plugs them into the
    # full model: its blocks are those of the last checkpoint, its middle the pre-trained one.
    saved = load_file(str(tmp_path / "run" / "final" / "base_weights.safetensors"))
    ckpt = sorted((tmp_path / "run" / "checkpoints").glob("round_*"))[-1]
    assert saved.keys() == load_file(str(ckpt / "base_weights.safetensors")).keys()
    assert len(saved) == 2 * 9 and all(".layers.0." in k or ".layers.5." in k for k in saved)
    loaded, _, _ = load_model_for_eval(str(six_block_model), tmp_path / "run")
    params = dict(loaded.named_parameters())
    for k, v in saved.items():
        assert torch.equal(params[k].detach(), v)
    assert not torch.equal(params[next(iter(saved))].detach(), dict(bare.named_parameters())[
        next(iter(saved)).replace("base_model.model.", "").replace(".base_layer", "")])
    middle = [k for k in params if ".layers.3." in k and "lora_" not in k]
    bare_params = dict(bare.named_parameters())
    assert middle and all(torch.equal(params[k].detach(), bare_params[k.replace("base_model.model.", "")
                                                                        .replace(".base_layer", "")]) for k in middle)


def test_kill_and_resume_is_bit_identical(tmp_path, six_block_model):
    overrides = [f"model.name={six_block_model}", *FULL, "federation.rounds=3",
                 "evaluation.every_rounds=1"]
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    reference_run(TINY_CONFIG, overrides, ref)
    kill_and_resume(TINY_CONFIG, overrides, killed, "client:3:1")
    weights = lambda d: load_file(str(d / "final" / "base_weights.safetensors"))
    assert_same_tensors(weights(ref), weights(killed))
    train = lambda d: [(e["round"], e["client"], e["downlink_bytes"], e["losses"])
                       for e in run_events(d, "client_train")]
    assert train(ref) == train(killed)
    assert [e["metrics"] for e in run_events(ref, "eval")] == [e["metrics"] for e in run_events(killed, "eval")]


# --- refusals ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("override,field", [
    ("model.quantization=4bit", "model.quantization=4bit"),
    ("privacy.mode=local", "privacy.mode=local"),
    ("federation.uplink_compression=int8", "federation.uplink_compression=int8"),
    ("federation.max_update_norm=5", "federation.max_update_norm=5"),
    ("method.server_optimizer.name=fedadam", "method.server_optimizer.name"),
    ("training.keep_optimizer=true", "training.keep_optimizer=true"),
    ("method.options.local_ot=true", "method.options.local_ot=true"),
])
def test_settings_full_mode_cannot_honour_are_refused_with_the_config(override, field):
    extra = ["privacy.noise_multiplier=1.0", "privacy.delta=0.01"] if override.startswith("privacy") else []
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config("configs/tiny.yaml", [*FULL, override, *extra])


@pytest.mark.parametrize("override", ["federation.max_update_norm=5", "training.keep_optimizer=true",
                                      "federation.uplink_compression=int8", "method.server_optimizer.name=fedadam"])
def test_lora_mode_still_accepts_them(override):
    load_config("configs/tiny.yaml", [*FULL[:-1], override])


def test_lora_mode_is_unchanged_by_default():
    assert FedOT(options={"seed": 0}).opts.adapter_training == "lora"
    model, _ = _wrapped()
    strategy = FedOT(options={"seed": 0, "a": 1, "b": 1, "drop_ratio": 0.5})
    strategy.prepare_model(model)
    plan = strategy.configure_client(1, 0, get_adapter_state(model), None)
    assert not any(k.startswith(BLOCK_PREFIX) for k in plan.control) and plan.trainable
    assert strategy.trainable_base_parameters(model, plan) == {}

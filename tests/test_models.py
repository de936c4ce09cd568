import pytest
import torch

from fedpeft.adapters import adapter_parameters, get_adapter_state, set_adapter_state, set_trainable, state_bytes
from fedpeft.config import PeftConfig
from fedpeft.models.registry import ModelNotFoundError, load_base_model, resolve_model_path
from fedpeft.models.peft_wrap import add_to_base_weight, lora_modules, wrap_lora


def test_tiny_llama_is_deterministic_per_seed():
    a = load_base_model("tiny-llama", seed=3).model.state_dict()
    b = load_base_model("tiny-llama", seed=3).model.state_dict()
    c = load_base_model("tiny-llama", seed=4).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_local_directory_round_trip(tmp_path):
    loaded = load_base_model("tiny-llama", seed=1)
    loaded.model.save_pretrained(tmp_path / "m")
    loaded.tokenizer.save_pretrained(tmp_path / "m")
    again = load_base_model(str(tmp_path / "m"))
    assert resolve_model_path(str(tmp_path / "m"))[0] == "dir"
    for k, v in loaded.model.state_dict().items():
        assert torch.equal(v, again.model.state_dict()[k])


def test_missing_local_path_is_named():
    with pytest.raises(ModelNotFoundError, match="'./no/such/dir' does not exist"):
        load_base_model("./no/such/dir")
    with pytest.raises(ModelNotFoundError, match="GGUF file"):
        load_base_model("missing.gguf")


def test_hub_id_offline_names_bundled_alternatives(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import time
    with pytest.raises(ModelNotFoundError) as err:
        load_base_model("no-such-org/no-such-model-xyz")
    assert "smollm2-135m-instruct" in str(err.value) and "tiny-llama" in str(err.value)


def test_lora_wrap_state_helpers_and_base_delta():
    loaded = load_base_model("tiny-llama")
    model = wrap_lora(loaded.model, PeftConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]), seed=0)
    state = get_adapter_state(model)
    assert len(state) == 2 * 2 * 2  # layers x modules x (A, B)
    assert state_bytes(state) == sum(v.numel() * 4 for v in state.values())
    assert all(torch.count_nonzero(v) == 0 for k, v in state.items() if "lora_B" in k)  # B starts at 0
    # Same seed -> same A init, in any process.
    again = wrap_lora(load_base_model("tiny-llama").model, PeftConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]), seed=0)
    assert all(torch.equal(v, get_adapter_state(again)[k]) for k, v in state.items())
    new = {k: torch.randn_like(v) for k, v in state.items()}
    set_adapter_state(model, new)
    assert all(torch.equal(get_adapter_state(model)[k], v) for k, v in new.items())
    keys = [k for k in state if "lora_B" in k]
    set_trainable(model, keys)
    assert {n for n, p in adapter_parameters(model).items() if p.requires_grad} == set(keys)
    name = next(iter(lora_modules(model)))
    weight = lora_modules(model)[name].get_base_layer().weight
    before = weight.detach().clone()
    add_to_base_weight(model, {name: torch.ones_like(before)})
    assert torch.equal(weight, before + 1)
    with pytest.raises(ValueError, match="shape"):
        set_adapter_state(model, {keys[0]: torch.zeros(1)})


@pytest.mark.slow
def test_bundled_smollm2_two_lora_steps():
    """The real model: converted once from the bundled GGUF, wrapped with LoRA, trained 2 steps."""
    pytest.importorskip("gguf")
    from fedpeft.data.encoding import collate, encode_example, format_prompt
    from fedpeft.federation.local_trainer import train_local
    from fedpeft.models.registry import cache_dir
    from fedpeft.strategies.base import ClientPlan

    loaded = load_base_model("smollm2-135m-instruct")
    assert (cache_dir() / "models" / "smollm2-135m-instruct" / "config.json").is_file()
    assert sum(p.numel() for p in loaded.model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    model = wrap_lora(loaded.model, PeftConfig(r=8, alpha=16), seed=0)
    tok = loaded.tokenizer
    rec = {"instruction": "Add 12 and 30."}
    ex = encode_example(format_prompt(rec, "chat", tok), "42", tok, max_len=96)
    batch = collate([ex, ex], tok.pad_token_id)
    before = get_adapter_state(model)
    params = {n: p for n, p in adapter_parameters(model).items() if p.requires_grad}
    result, losses = train_local(model, params, iter([batch, batch]), ClientPlan(0, {}), steps=2,
                                 grad_accumulation=1, lr=1e-3, num_examples=1)
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    assert losses[1] < losses[0]
    after = get_adapter_state(model)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    reloaded = load_base_model("smollm2-135m-instruct")  # from the cache now
    assert reloaded.source.endswith("smollm2-135m-instruct")

"""Placement and precision: model.device, bf16 autocast, gradient checkpointing, random shapes, 4-bit.

CPU tests run everywhere; tests marked ``gpu`` need CUDA and skip cleanly without it (bench/gpu_check.sh
runs them on a GPU machine).
"""

import json

import pytest
import torch

from fedpeft.config import ConfigError, load_config
from fedpeft.federation.engine import Engine, run_experiment
from fedpeft.federation.local_trainer import train_local
from fedpeft.federation.metrics_log import read_events
from fedpeft.models import registry
from fedpeft.models.device import (
    DeviceError,
    OutOfMemory,
    autocast,
    bitsandbytes_available,
    check_quantization,
    resolve_device,
)
from fedpeft.models.peft_wrap import enable_gradient_checkpointing, wrap_lora
from fedpeft.strategies.base import ClientPlan

HAS_CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (run bench/gpu_check.sh on a GPU machine)")


# --- model.device --------------------------------------------------------------------------------

@pytest.mark.parametrize("spec, count, expected", [
    ("auto", 0, "cpu"), ("auto", 2, "cuda:0"), ("cpu", 2, "cpu"), ("cuda", 1, "cuda:0"), ("cuda:1", 2, "cuda:1"),
])
def test_device_spec_resolves_as_documented(spec, count, expected):
    assert resolve_device(spec, cuda_count=count) == torch.device(expected)


@pytest.mark.parametrize("spec, count, needle", [
    ("cuda", 0, "no CUDA GPU"), ("cuda:0", 0, "no CUDA GPU"), ("cuda:2", 2, "GPU index 2 does not exist"),
])
def test_impossible_device_is_refused_with_the_field_and_value(spec, count, needle):
    with pytest.raises(DeviceError, match=needle) as err:
        resolve_device(spec, cuda_count=count)
    assert f"model.device={spec}" in str(err.value)


def test_misspelt_device_fails_config_validation():
    with pytest.raises(ConfigError, match=r"model.device.*auto, cpu, cuda or cuda:N"):
        load_config("configs/tiny.yaml", ["model.device=gpu"])


@pytest.mark.skipif(HAS_CUDA, reason="checks the refusal on a machine without CUDA")
def test_cuda_request_without_cuda_stops_before_data_or_model_load(tmp_path, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("nothing may load")

    monkeypatch.setattr(registry, "load_base_model", boom)
    monkeypatch.setattr("fedpeft.federation.engine.load_experiment_data", boom)
    cfg = load_config("configs/tiny.yaml", ["model.device=cuda"])
    with pytest.raises(DeviceError, match="model.device=cuda: this machine has no CUDA GPU"):
        Engine(cfg, tmp_path / "run").run()
    assert not (tmp_path / "run").exists()


def test_quantization_is_refused_on_cpu_and_without_bitsandbytes():
    with pytest.raises(DeviceError, match="needs a CUDA GPU"):
        check_quantization("4bit", torch.device("cpu"))
    with pytest.raises(DeviceError, match=r"fedpeft\[gpu\]"):
        check_quantization("8bit", torch.device("cuda", 0), bnb_available=False)
    check_quantization("none", torch.device("cpu"))  # no-op


@pytest.mark.skipif(HAS_CUDA and bitsandbytes_available(), reason="checks the refusal where 4-bit cannot run")
def test_4bit_run_is_refused_before_loading_where_bitsandbytes_or_cuda_is_missing(tmp_path, monkeypatch):
    monkeypatch.setattr(registry, "load_base_model", lambda *a, **k: pytest.fail("model must not load"))
    cfg = load_config("configs/tiny.yaml", ["model.quantization=4bit"])
    with pytest.raises(DeviceError, match="model.quantization=4bit"):
        Engine(cfg, tmp_path / "run").run()


# --- precision ------------------------------------------------------------------------------------

def _tiny_lora(seed=0, r=4):
    from fedpeft.config import PeftConfig

    model, tokenizer = registry.tiny_llama(seed=seed)
    return wrap_lora(model, PeftConfig(r=r, alpha=2 * r, target_modules=["q_proj", "v_proj"]), seed=seed), tokenizer


def _fixed_batch(seed=0, batch=4, length=24):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 200, (batch, length), generator=gen)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def _repeat(batch):
    while True:
        yield batch


def _params(model):
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _fp32_loss(model, batch) -> float:
    """The loss recomputed independently of the trainer: fp32, eval mode, no autocast."""
    model.eval()
    with torch.no_grad():
        return float(model(**batch).loss)


def test_bf16_autocast_on_cpu_trains_with_float32_master_weights():
    batch = _fixed_batch()
    after = {}
    for precision in ("fp32", "bf16"):
        model, _ = _tiny_lora()
        before = _fp32_loss(model, batch)
        seen_dtypes = set()
        hook = model.get_base_model().model.layers[0].mlp.down_proj.register_forward_hook(
            lambda mod, inp, out: seen_dtypes.add(out.dtype))
        _, losses = train_local(model, _params(model), _repeat(batch), ClientPlan(client_id=0, downlink={}),
                                steps=15, grad_accumulation=1, lr=3e-2, precision=precision)
        hook.remove()
        # The matmuls really ran in bfloat16 under bf16, and the master copy stays float32 either way.
        assert seen_dtypes == {torch.bfloat16 if precision == "bf16" else torch.float32}
        assert all(p.dtype == torch.float32 for p in _params(model).values())
        assert len(losses) == 15 and all(isinstance(x, float) for x in losses)
        after[precision] = _fp32_loss(model, batch)
        assert after[precision] < before - 0.2, (precision, before, after[precision])
    assert after["bf16"] == pytest.approx(after["fp32"], abs=0.05)  # bf16 follows the fp32 trajectory


def test_engine_run_on_cpu_with_bf16_trains_and_logs_the_device(tmp_path):
    run_dir = tmp_path / "run"
    run_experiment("configs/tiny.yaml", ["model.device=cpu", "training.precision=bf16", "federation.rounds=3",
                                         "federation.local_steps=8", "federation.clients_per_round=4",
                                         "training.lr=0.03", "training.lr_min=0.03",
                                         "evaluation.every_rounds=0", "evaluation.before_training=false"],
                   run_dir=run_dir)
    events = read_events(run_dir / "metrics.jsonl")
    start = next(e for e in events if e["event"] == "run_start")
    assert start["device"] == "cpu"
    # The untrained model's loss (each round-1 client's first step) against the last round's final steps.
    untrained = [e["losses"][0] for e in events if e["event"] == "client_train" and e["round"] == 1]
    trained = [e["last_loss"] for e in events if e["event"] == "client_train" and e["round"] == 3]
    assert sum(trained) / len(trained) < sum(untrained) / len(untrained) - 0.2, (untrained, trained)
    rounds = [e for e in events if e["event"] == "round_end"]
    assert all(e["peak_cuda_mb"] is None for e in rounds)  # CPU run: no CUDA number pretends otherwise


def test_autocast_is_a_no_op_for_fp32():
    with autocast(torch.device("cpu"), "fp32"):
        assert not torch.is_autocast_enabled("cpu")
    with autocast(torch.device("cpu"), "bf16"):
        assert torch.is_autocast_enabled("cpu")


# --- gradient checkpointing ----------------------------------------------------------------------

def _loss_and_grads(model, batch):
    model.train()
    for p in model.parameters():
        p.grad = None
    loss = model(**batch, use_cache=False).loss
    loss.backward()
    return float(loss.detach()), {n: p.grad.clone() for n, p in _params(model).items()}


def test_gradient_checkpointing_gives_the_same_loss_and_lora_gradients():
    batch = _fixed_batch()
    plain, _ = _tiny_lora()
    checkpointed, _ = _tiny_lora()
    enable_gradient_checkpointing(checkpointed)
    # Checkpointing really recomputes: a layer's projections run again in the backward replay.
    calls = []
    checkpointed.get_base_model().model.layers[0].self_attn.q_proj.register_forward_hook(lambda *a: calls.append(1))
    loss_plain, grads_plain = _loss_and_grads(plain, batch)
    loss_ckpt, grads_ckpt = _loss_and_grads(checkpointed, batch)
    assert len(calls) == 2
    assert loss_ckpt == pytest.approx(loss_plain, rel=1e-6)
    assert grads_ckpt.keys() == grads_plain.keys() and len(grads_ckpt) == 8  # q,v x A,B x 2 layers
    for name in grads_plain:
        if ".lora_B." in name:  # B starts at 0, so A's gradient is 0 at step 0; B's is not
            assert grads_ckpt[name].abs().sum() > 0, name
        torch.testing.assert_close(grads_ckpt[name], grads_plain[name], rtol=1e-5, atol=1e-7)


def test_gradient_checkpointing_trains_lora():
    model, _ = _tiny_lora()
    enable_gradient_checkpointing(model)
    batch = _fixed_batch(seed=1)
    before = _fp32_loss(model, batch)
    train_local(model, _params(model), _repeat(batch), ClientPlan(client_id=0, downlink={}), steps=15, grad_accumulation=1, lr=3e-2)
    assert _fp32_loss(model, batch) < before - 0.2


def test_config_gradient_checkpointing_reaches_the_model(tmp_path):
    from fedpeft.data.dataset import load_experiment_data
    from fedpeft.models.peft_wrap import load_experiment_model

    cfg = load_config("configs/tiny.yaml", ["training.gradient_checkpointing=true", "model.device=cpu"])
    _, model = load_experiment_model(cfg, load_experiment_data(cfg))
    assert all(layer.gradient_checkpointing for layer in model.get_base_model().model.layers)


# --- out of memory -------------------------------------------------------------------------------

def test_out_of_memory_names_the_knobs():
    model, _ = _tiny_lora()

    def explode(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    model.forward = explode
    with pytest.raises(OutOfMemory) as err:
        train_local(model, _params(model), _repeat(_fixed_batch()), ClientPlan(client_id=0, downlink={}), steps=1,
                    grad_accumulation=1, lr=1e-3)
    for knob in ("federation.batch_size", "training.max_seq_len", "training.gradient_checkpointing=true",
                 "model.quantization=4bit"):
        assert knob in str(err.value)


# --- random shapes -------------------------------------------------------------------------------

def _llama_params(c: dict) -> int:
    """Parameter count of a Llama/Mistral decoder from its config fields alone (independent of transformers)."""
    d, ff, layers, vocab = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["vocab_size"]
    head_dim = c.get("head_dim") or d // c["num_attention_heads"]
    q_out, kv_out = c["num_attention_heads"] * head_dim, c["num_key_value_heads"] * head_dim
    attention = d * q_out + 2 * d * kv_out + q_out * d
    per_layer = attention + 3 * d * ff + 2 * d  # q,k,v,o + gate/up/down + two RMSNorms
    embeddings = vocab * d * (1 if c["tie_word_embeddings"] else 2)
    return layers * per_layer + embeddings + d  # + the final norm


@pytest.mark.parametrize("shape, published", [
    ("smollm2-135m", 134.5e6), ("llama-3.2-1b", 1.236e9), ("llama-2-7b", 6.74e9), ("mistral-7b", 7.25e9),
])
def test_random_shapes_have_their_architectures_parameter_counts_on_the_meta_device(shape, published):
    from transformers import AutoModelForCausalLM

    config = registry.shape_config(shape)
    with torch.device("meta"):  # no memory: 7B parameters cost nothing here
        model = AutoModelForCausalLM.from_config(config)
    counted = sum(p.numel() for p in model.parameters())
    raw = json.loads(registry.shipped_shapes()[shape].read_text())
    assert counted == _llama_params(raw)
    assert counted == pytest.approx(published, rel=0.005)
    assert all(p.device.type == "meta" for p in model.parameters())


def test_random_model_from_a_local_config_json(tmp_path):
    raw = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
           "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 300, "tie_word_embeddings": False,
           "max_position_embeddings": 256}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    loaded = registry.load_base_model(f"random:{tmp_path}", device="cpu")
    assert "throughput only" in loaded.source
    vocab = max(raw["vocab_size"], len(loaded.tokenizer))
    assert sum(p.numel() for p in loaded.model.parameters()) == _llama_params({**raw, "vocab_size": vocab})
    ids = loaded.tokenizer("hello world", return_tensors="pt")["input_ids"]
    assert loaded.model(input_ids=ids).logits.shape[-1] == vocab


def test_unknown_random_shape_lists_the_shipped_ones():
    with pytest.raises(registry.ModelNotFoundError, match="llama-2-7b"):
        registry.shape_config("llama-9000")


# --- GPU (skipped without CUDA) ------------------------------------------------------------------

@pytest.mark.gpu
@needs_cuda
def test_gpu_run_keeps_state_on_cpu_and_logs_true_peaks(tmp_path):
    run_dir = tmp_path / "run"
    summary = run_experiment("configs/tiny.yaml", ["model.device=cuda", "training.precision=bf16",
                                                   "federation.rounds=2"], run_dir=run_dir)
    events = read_events(run_dir / "metrics.jsonl")
    jobs = [e for e in events if e["event"] == "client_train"]
    rounds = [e for e in events if e["event"] == "round_end"]
    assert all(e["peak_cuda_mb"] > 0 for e in jobs)
    for r in rounds:  # a round's peak covers its jobs
        assert r["peak_cuda_mb"] >= max(e["peak_cuda_mb"] for e in jobs if e["round"] == r["round"])
    from fedpeft.federation.checkpoint import load_latest

    ckpt = load_latest(run_dir / "checkpoints")
    assert all(t.device.type == "cpu" for t in ckpt.global_state.values())
    assert summary.final_metrics


@pytest.mark.gpu
@needs_cuda
def test_gpu_bf16_training_matches_cpu_direction():
    model, _ = _tiny_lora()
    model.to("cuda")
    batch = _fixed_batch()
    before = _fp32_loss(model, {k: v.cuda() for k, v in batch.items()})
    train_local(model, _params(model), _repeat(batch), ClientPlan(client_id=0, downlink={}), steps=15,
                grad_accumulation=1, lr=3e-2, precision="bf16")
    assert _fp32_loss(model, {k: v.cuda() for k, v in batch.items()}) < before - 0.2


@pytest.mark.gpu
@pytest.mark.skipif(not (HAS_CUDA and bitsandbytes_available()), reason="4-bit needs CUDA and bitsandbytes "
                    "(pip install 'fedpeft[gpu]')")
def test_4bit_tiny_model_trains_lora(tmp_path):
    run_dir = tmp_path / "run"
    run_experiment("configs/tiny.yaml", ["model.device=cuda", "model.quantization=4bit", "model.dtype=bfloat16",
                                         "training.precision=bf16", "federation.rounds=2",
                                         "federation.local_steps=6"], run_dir=run_dir)
    events = read_events(run_dir / "metrics.jsonl")
    assert any(e["event"] == "client_train" for e in events)
    assert not any(e["event"] == "client_failed" for e in events)


def test_random_shape_run_reports_throughput_only(tmp_path):
    raw = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
           "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 300, "tie_word_embeddings": False,
           "max_position_embeddings": 256}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    run_dir = tmp_path / "run"
    summary = run_experiment("configs/tiny.yaml", [f"model.name=random:{tmp_path}", "federation.rounds=1",
                                                   "output.report=true", "evaluation.before_training=false"],
                             run_dir=run_dir)
    text = summary.report_path.read_text()
    assert "throughput and memory only, never quality" in text
    assert "| device / precision | cpu / float32 / fp32 / none |" in text


def test_4bit_weights_count_as_two_parameters_per_stored_byte():
    from fedpeft.metering.flops import logical_numel

    class Params4bit(torch.nn.Parameter):  # the name bitsandbytes gives its packed 4-bit weights
        pass

    packed = Params4bit(torch.zeros(8, 1, dtype=torch.uint8), requires_grad=False)
    assert logical_numel(packed) == 16
    assert logical_numel(torch.nn.Parameter(torch.zeros(8, 1))) == 8

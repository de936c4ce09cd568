"""Every peft.type through the engine on tiny-llama: config options per type, training and the FedAvg
equation on the type's own tensors, exact bytes, save/load with PeftModel.from_pretrained, refusals by
LoRA-factor methods, server optimizers, FedProx, SCAFFOLD, FedGPL with prompt/P-tuning, AdaLoRA's
local rank allocation, and generation with virtual tokens."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

peft = pytest.importorskip("peft")

from fedpeft.adapters import adapter_parameters, get_adapter_state, is_prompt_learning, set_adapter_state  # noqa: E402
from fedpeft.config import PEFT_OPTION_TYPES, PEFT_TYPES, ConfigError, PeftConfig, load_config  # noqa: E402
from fedpeft.evaluation.generation import generate  # noqa: E402
from fedpeft.federation.engine import run_experiment  # noqa: E402
from fedpeft.models.peft_wrap import wrap_peft  # noqa: E402
from fedpeft.models.registry import load_base_model, tiny_llama  # noqa: E402
from fedpeft.strategies.base import ALL_PEFT_TYPES  # noqa: E402
from fedpeft.strategies.fedit import FedIT  # noqa: E402
from fedpeft.strategies.registry import STRATEGIES, capabilities, registered  # noqa: E402

# Small options per type for tiny-llama (hidden 64, 2 layers, k/v 32 wide, MLP 128 wide).
TYPE_OVERRIDES = {
    "lora": ["peft.r=4", "peft.alpha=8", "peft.target_modules=[q_proj,v_proj]"],
    "dora": ["peft.r=4", "peft.alpha=8", "peft.target_modules=[q_proj,v_proj]"],
    "adalora": ["peft.init_r=4", "peft.target_r=2", "peft.alpha=8", "peft.target_modules=[q_proj,v_proj]"],
    "loha": ["peft.r=4", "peft.alpha=8", "peft.target_modules=[q_proj,v_proj]"],
    "lokr": ["peft.r=4", "peft.alpha=8", "peft.target_modules=[q_proj,v_proj]"],
    "ia3": ["peft.target_modules=[k_proj,v_proj,down_proj]", "peft.feedforward_modules=[down_proj]"],
    "prompt_tuning": ["peft.num_virtual_tokens=4"],
    "p_tuning": ["peft.num_virtual_tokens=4", "peft.encoder_hidden_size=16"],
    "prefix_tuning": ["peft.num_virtual_tokens=4"],
}
# configs/tiny.yaml sets LoRA options; null leaves them unset so another type can be chosen.
CLEAR = ["peft.r=null", "peft.alpha=null", "peft.target_modules=null"]


def type_overrides(kind: str) -> list[str]:
    return [f"peft.type={kind}", *CLEAR, *TYPE_OVERRIDES[kind]]


def library_config(kind: str):
    """The peft library's config of each type, written out here (not through fedpeft) for the checks."""
    if kind in ("lora", "dora"):
        return peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_dora=kind == "dora",
                               task_type="CAUSAL_LM")
    return {
        "adalora": lambda: peft.AdaLoraConfig(init_r=4, target_r=2, total_step=2, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                              task_type="CAUSAL_LM"),
        "loha": lambda: peft.LoHaConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
        "lokr": lambda: peft.LoKrConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
        "ia3": lambda: peft.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"],
                                      task_type="CAUSAL_LM"),
        "prompt_tuning": lambda: peft.PromptTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM"),
        "p_tuning": lambda: peft.PromptEncoderConfig(num_virtual_tokens=4, encoder_hidden_size=16, task_type="CAUSAL_LM"),
        "prefix_tuning": lambda: peft.PrefixTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM"),
    }[kind]()


def trainable_shapes(kind: str) -> dict[str, tuple[int, ...]]:
    """Name -> shape of what peft itself marks trainable for this type on tiny-llama."""
    model = peft.get_peft_model(tiny_llama()[0], library_config(kind))
    return {n: tuple(p.shape) for n, p in model.named_parameters() if p.requires_grad}


def _events(run_dir, kind):
    return [e for e in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if e["event"] == kind]


# --- config ---------------------------------------------------------------------------------------
def test_default_peft_section_is_todays_lora():
    peft_cfg = load_config(None).peft
    assert (peft_cfg.type, peft_cfg.r, peft_cfg.alpha, peft_cfg.dropout, peft_cfg.rslora) == ("lora", 8, 16.0, 0.0, False)
    assert peft_cfg.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj"]


def test_default_lora_adapter_is_the_same_peft_lora_as_before():
    """wrap_peft with the default section builds bit for bit the LoRA adapter a LoraConfig of today's
    defaults builds under the same seed (quickstart behaviour unchanged)."""
    ours = get_adapter_state(wrap_peft(tiny_llama()[0], PeftConfig(target_modules=["q_proj", "v_proj"]), seed=3))
    torch.manual_seed(3)
    ref = peft.get_peft_model(tiny_llama()[0], peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, bias="none",
                                                                target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    theirs = {n: p.detach() for n, p in ref.named_parameters() if p.requires_grad}
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


@pytest.mark.parametrize("kind", PEFT_TYPES)
def test_each_type_validates_and_a_saved_config_loads_back(kind):
    import yaml

    from fedpeft.config import build_config

    cfg = load_config("configs/tiny.yaml", type_overrides(kind), check_method=False)
    assert cfg.peft.type == kind
    again = build_config(yaml.safe_load(cfg.to_yaml()), check_method=False)
    assert again.peft == cfg.peft


@pytest.mark.parametrize("kind,option,value", [
    ("prompt_tuning", "r", 4), ("lora", "num_virtual_tokens", 8), ("ia3", "init_r", 4),
    ("p_tuning", "prefix_projection", True), ("lora", "encoder_hidden_size", 32), ("adalora", "r", 4),
])
def test_an_option_of_another_type_names_the_field_and_its_types(kind, option, value):
    with pytest.raises(ConfigError) as err:
        load_config(None, [f"peft.type={kind}", f"peft.{option}={value}"], check_method=False)
    text = str(err.value)
    owners = PEFT_OPTION_TYPES[option]
    assert f"peft.{option}" in text and f"not of '{kind}'" in text and ", ".join(owners) in text


@pytest.mark.parametrize("overrides,needle", [
    (["peft.type=adalora", "peft.init_r=2", "peft.target_r=4"], "peft.target_r (4) must be at most peft.init_r (2)"),
    (["peft.type=ia3", "peft.target_modules=[k_proj]", "peft.feedforward_modules=[down_proj]"], "peft.feedforward_modules"),
    (["peft.type=prompt_tuning", "peft.prompt_init=text"], "peft.prompt_init_text"),
    (["peft.type=p_tuning", "peft.num_virtual_tokens=0"], "peft.num_virtual_tokens"),
    (["peft.type=bitfit"], "peft.type"),
])
def test_inconsistent_type_options_are_refused(overrides, needle):
    with pytest.raises(ConfigError, match="peft"):
        load_config(None, overrides, check_method=False)
    try:
        load_config(None, overrides, check_method=False)
    except ConfigError as exc:
        assert needle in str(exc)


# --- refusals -------------------------------------------------------------------------------------
LORA_ONLY = ["ffa_lora", "flora", "fedex_lora", "fedsa_lora", "hetlora", "zero_padding", "flexlora", "fedls", "fltac"]


@pytest.mark.parametrize("method", LORA_ONLY)
def test_lora_factor_methods_refuse_other_types_with_the_reason_before_any_model(method, monkeypatch):
    def no_model(*a, **k):
        raise AssertionError("the model was loaded before the refusal")

    monkeypatch.setattr("fedpeft.models.registry.load_base_model", no_model)
    cls = STRATEGIES[method]
    reason = capabilities(cls).peft_type_refusal
    assert capabilities(cls).peft_types == ("lora",) and reason
    for kind in ("prompt_tuning", "dora", "ia3"):
        with pytest.raises(ConfigError) as err:
            load_config("configs/tiny.yaml", [f"method.name={method}", *type_overrides(kind)])
        assert f"peft.type: method '{method}' supports lora, not '{kind}': {reason}" in str(err.value)


def test_methods_on_any_adapter_tensors_accept_every_type():
    for method in ("fedit", "fedprox", "scaffold", "centralized", "local_only", "zero_shot"):
        assert set(capabilities(STRATEGIES[method]).peft_types) == set(PEFT_TYPES), method
    assert set(ALL_PEFT_TYPES) == set(PEFT_TYPES)
    assert set(capabilities(STRATEGIES["fedgpl"]).peft_types) == {"lora", "p_tuning", "prompt_tuning"}


# --- training, FedAvg equation, bytes, save/load ----------------------------------------------------
class RecordingFedIT(FedIT):
    """FedIT that keeps what it aggregated (global before, uploads, weights, global after)."""

    name = "recording_fedit"
    rounds: list = []

    def aggregate(self, round_idx, global_state, updates):
        result = super().aggregate(round_idx, global_state, updates)
        RecordingFedIT.rounds.append(({k: v.clone() for k, v in global_state.items()},
                                      [({k: v.clone() for k, v in u.tensors.items()}, u.num_examples) for u in updates],
                                      {k: v.clone() for k, v in result.global_state.items()}))
        return result


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One two-round FedIT run per type (2 of 4 clients per round, 2 local steps)."""
    out = {}
    with registered(RecordingFedIT):
        for kind in PEFT_TYPES:
            RecordingFedIT.rounds = []
            run_dir = tmp_path_factory.mktemp(kind) / "run"
            summary = run_experiment("configs/tiny.yaml", [*type_overrides(kind), "federation.rounds=2",
                                                           "method.name=recording_fedit", "evaluation.every_rounds=2",
                                                           "evaluation.before_training=false"], run_dir=run_dir)
            out[kind] = (summary, run_dir, list(RecordingFedIT.rounds))
    return out


@pytest.mark.parametrize("kind", PEFT_TYPES)
def test_each_type_trains_its_own_tensors_and_fedavg_holds_on_them(runs, kind):
    summary, run_dir, rounds = runs[kind]
    shapes = trainable_shapes(kind)
    assert len(rounds) == 2
    for before, uploads, after in rounds:
        # the uploads are exactly the tensors peft trains for this type
        for tensors, _ in uploads:
            assert {k: tuple(v.shape) for k, v in tensors.items()} == shapes
        # FedAvg: theta = sum_k (n_k / sum n) theta_k, recomputed in float64
        total = sum(n for _, n in uploads)
        for key in shapes:
            expected = sum(t[key].double() * (n / total) for t, n in uploads)
            assert torch.allclose(after[key].double(), expected, rtol=0, atol=1e-6), key
        # the clients trained: the average moved away from the global state they started from
        assert any(not torch.equal(after[k], before[k]) for k in shapes)


@pytest.mark.parametrize("kind", PEFT_TYPES)
def test_bytes_on_the_wire_are_trainable_numel_times_four_per_client(runs, kind):
    summary, run_dir, _ = runs[kind]
    per_client = 4 * sum(torch.Size(s).numel() for s in trainable_shapes(kind).values())  # float32 on the wire
    assert _events(run_dir, "run_start")[0]["adapter_bytes"] == per_client
    trains = _events(run_dir, "client_train")
    assert len(trains) == 4  # 2 rounds x 2 clients
    assert all(e["uplink_bytes"] == per_client and e["downlink_bytes"] == per_client for e in trains)
    assert summary.uplink_bytes == 2 * 2 * per_client


@pytest.mark.parametrize("kind", PEFT_TYPES)
def test_final_adapter_reloads_with_peft_and_gives_the_trained_models_outputs(runs, kind):
    summary, run_dir, rounds = runs[kind]
    trained = rounds[-1][2]
    ckpt = load_file(str(run_dir / "checkpoints" / "round_0002" / "global.safetensors"))
    assert ckpt.keys() == trained.keys() and all(torch.equal(ckpt[k], trained[k]) for k in ckpt)
    reloaded = peft.PeftModel.from_pretrained(load_base_model("tiny-llama", seed=0).model, str(summary.final_adapter_dir))
    # the trained model: a fresh base wrapped by the peft library itself, the global adapter written in
    own = peft.get_peft_model(load_base_model("tiny-llama", seed=0).model, library_config(kind))
    set_adapter_state(own, trained)
    reloaded.eval(), own.eval()
    if kind == "p_tuning":  # peft saves P-tuning's encoded virtual tokens (inference-ready), not the encoder
        assert set(get_adapter_state(reloaded)) == {"prompt_encoder.default.embedding.weight"}
    else:
        assert get_adapter_state(reloaded).keys() == trained.keys()
    ids = torch.tensor([[5, 17, 99, 3, 42, 7], [8, 8, 120, 64, 1, 2]])
    with torch.no_grad():
        a = reloaded(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        b = own(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    assert torch.allclose(a, b, atol=1e-6, rtol=0)


# --- server optimizers, FedProx, SCAFFOLD on non-LoRA types ---------------------------------------
@pytest.mark.parametrize("kind", ["ia3", "prompt_tuning"])
def test_fedadam_steps_on_any_types_tensors(tmp_path, kind):
    """Round 1 of FedAdam: Delta = avg - theta, m = (1-b1) Delta, v = b2 tau^2 + (1-b2) Delta^2 (v starts at tau^2),
    theta' = theta + lr m / (sqrt(v) + tau), recomputed here from the recorded uploads."""
    class Recording(RecordingFedIT):
        name = "recording_fedit_adam"

    Recording.rounds = []
    with registered(Recording):
        RecordingFedIT.rounds = []
        run_experiment("configs/tiny.yaml", [*type_overrides(kind), "federation.rounds=1", "method.name=recording_fedit_adam",
                                             "method.server_optimizer.name=fedadam", "evaluation.every_rounds=0",
                                             "evaluation.before_training=false"], run_dir=tmp_path / "run")
    before, uploads, after = RecordingFedIT.rounds[0]
    lr, b1, b2, tau = 1e-2, 0.9, 0.99, 1e-3
    total = sum(n for _, n in uploads)
    for key in before:
        avg = sum(t[key].double() * (n / total) for t, n in uploads)
        delta = avg - before[key].double()
        expected = before[key].double() + lr * (1 - b1) * delta / ((b2 * tau**2 + (1 - b2) * delta**2).sqrt() + tau)
        assert torch.allclose(after[key].double(), expected, atol=1e-6, rtol=1e-5), key


@pytest.mark.parametrize("method,kind", [("fedprox", "prefix_tuning"), ("fedprox", "loha"), ("scaffold", "ia3"),
                                         ("scaffold", "p_tuning")])
def test_fedprox_and_scaffold_run_on_other_types(tmp_path, method, kind):
    summary = run_experiment("configs/tiny.yaml", [*type_overrides(kind), "federation.rounds=2", f"method.name={method}",
                                                   "training.optimizer=sgd", "evaluation.every_rounds=0",
                                                   "evaluation.before_training=false"],
                             run_dir=tmp_path / "run")
    state = load_file(str(tmp_path / "run" / "checkpoints" / "round_0002" / "global.safetensors"))
    assert {k: tuple(v.shape) for k, v in state.items()} == trainable_shapes(kind)
    assert all(torch.isfinite(v).all() for v in state.values())
    trains = _events(tmp_path / "run", "client_train")
    per_client = 4 * sum(v.numel() for v in state.values())
    # SCAFFOLD also sends its control variates (one per trained tensor) each way
    factor = 2 if method == "scaffold" else 1
    assert all(e["uplink_bytes"] == factor * per_client for e in trains)
    assert summary.uplink_bytes == len(trains) * factor * per_client


def test_fedprox_proximal_term_covers_the_prompt_encoder():
    from fedpeft.strategies.fedprox import proximal_term

    model = wrap_peft(tiny_llama()[0], load_config(None, type_overrides("p_tuning"), check_method=False).peft, seed=0)
    params = adapter_parameters(model)
    anchor = {k: v.detach().clone() for k, v in params.items()}
    with torch.no_grad():
        for p in params.values():
            p.add_(0.5)
    numel = sum(p.numel() for p in params.values())
    assert torch.isclose(proximal_term(anchor, mu=0.2)(params), torch.tensor(0.5 * 0.2 * numel * 0.25))


# --- FedGPL with prompt / P-tuning (seed 002) ------------------------------------------------------
@pytest.mark.parametrize("kind", ["p_tuning", "prompt_tuning"])
def test_fedgpl_runs_with_prompt_learning_types(tmp_path, kind):
    summary = run_experiment("configs/tiny.yaml", [*type_overrides(kind), "federation.rounds=2", "method.name=fedgpl",
                                                   "evaluation.every_rounds=2", "evaluation.before_training=false"],
                             run_dir=tmp_path / "run")
    ends = _events(tmp_path / "run", "round_end")
    assert len(ends) == 2
    per_client = 4 * sum(torch.Size(s).numel() for s in trainable_shapes(kind).values())
    # no transformer layer to select: the whole prompt encoder trains and travels
    assert all(e["uplink_bytes"] == per_client for e in _events(tmp_path / "run", "client_train"))
    assert summary.uplink_bytes == 4 * per_client


# --- AdaLoRA: rank allocation local to each client job ----------------------------------------------
def test_adalora_prunes_singular_values_inside_a_client_job(tmp_path):
    """With init_r 4 -> target_r 2 over 6 local steps, each client's upload has zeroed entries of E
    (peft's allocator masked them during its own job); the global E is their FedAvg, and the shared
    config carries no rank pattern between jobs."""
    with registered(RecordingFedIT):
        RecordingFedIT.rounds = []
        summary = run_experiment("configs/tiny.yaml", [*type_overrides("adalora"), "federation.rounds=1",
                                                       "federation.local_steps=6", "method.name=recording_fedit",
                                                       "evaluation.every_rounds=0", "evaluation.before_training=false"],
                                 run_dir=tmp_path / "run")
    _, uploads, after = RecordingFedIT.rounds[0]
    e_keys = [k for k in after if ".lora_E." in k]
    assert e_keys
    for tensors, _ in uploads:
        zeros = sum(int((tensors[k] == 0).sum()) for k in e_keys)
        total = sum(tensors[k].numel() for k in e_keys)
        assert 0 < zeros < total  # pruned towards the budget, not everything
    config = json.loads((summary.final_adapter_dir / "adapter_config.json").read_text())
    assert config["peft_type"] == "ADALORA" and not config.get("rank_pattern")


# --- generation and scoring with virtual tokens ----------------------------------------------------
@pytest.mark.parametrize("kind", ["prompt_tuning", "p_tuning", "prefix_tuning"])
def test_generation_with_virtual_tokens_follows_the_models_forward(kind):
    """Each generated token is the argmax of the PEFT model's own forward over prompt + tokens so far
    (virtual tokens included); changing the virtual tokens changes the output."""
    cfg = load_config(None, type_overrides(kind), check_method=False).peft
    base, tok = tiny_llama()
    model = wrap_peft(base, cfg, seed=0)
    assert is_prompt_learning(model)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in adapter_parameters(model).values():
            p.copy_(torch.randn(p.shape, generator=g))
    prompts = ["abc", "hello world!", "x"]
    got = generate(model, tok, prompts, max_new_tokens=4, batch_size=8)
    model.eval()
    for prompt, text in zip(prompts, got):  # greedy by hand: argmax of the whole sequence's forward, per token
        ids = tok(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
        start = ids.shape[1]
        for _ in range(4):
            with torch.no_grad():
                logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
            ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
            if int(ids[0, -1]) == tok.eos_token_id:
                break
        assert text == tok.decode(ids[0, start:], skip_special_tokens=True), prompt
    with torch.no_grad():
        for p in adapter_parameters(model).values():
            p.copy_(torch.randn(p.shape, generator=g))
    assert generate(model, tok, prompts, max_new_tokens=4) != got


def test_classification_head_trains_with_other_types(tmp_path):
    """tiny-bert sequence classification with IA3 and prompt tuning: the head (modules_to_save) travels
    with the type's tensors and the run evaluates accuracy."""
    for kind, extra in (("ia3", ["peft.target_modules=[key,value,output.dense]", "peft.feedforward_modules=[output.dense]"]),
                        ("prompt_tuning", ["peft.num_virtual_tokens=4"])):
        run_dir = tmp_path / kind
        run_experiment(None, ["model.name=tiny-bert", "model.head=classification", f"peft.type={kind}", *extra,
                              "data.tasks=[sentiment,parity]", "data.train_examples_per_task=20",
                              "data.eval_examples_per_task=4", "federation.num_clients=2", "federation.clients_per_round=2",
                              "federation.rounds=1", "federation.local_steps=1", "federation.batch_size=4",
                              "training.max_seq_len=48", "output.progress=false", "output.report=false"], run_dir=run_dir)
        state = load_file(str(run_dir / "checkpoints" / "round_0001" / "global.safetensors"))
        assert any(".modules_to_save." in k for k in state)
        assert any(("ia3_" in k) if kind == "ia3" else k.startswith("prompt_encoder.") for k in state)
        assert _events(run_dir, "eval")

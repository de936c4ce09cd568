"""The encoder-decoder family (model.head=seq2seq: T5 / Flan-T5, tiny-t5 here), each property checked against
a computation written out in the test: the model's loss against cross-entropy of logits from a hand-built
decoder input, token-weighted accumulation against one batch's gradient, FedAvg on the clients' uploads,
exact bytes, save/reload with PeftModel.from_pretrained, generation against a greedy loop over forwards,
a local save_pretrained directory recognised by its config.json, and the refusals naming their field."""

from __future__ import annotations

import json
import logging

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

peft = pytest.importorskip("peft")

from fedpeft.adapters import adapter_parameters, get_adapter_state, set_adapter_state  # noqa: E402
from fedpeft.config import ConfigError, load_config  # noqa: E402
from fedpeft.data.encoding import IGNORE_INDEX, collate, encode_records, format_prompt  # noqa: E402
from fedpeft.evaluation.generation import generate, generation_eval  # noqa: E402
from fedpeft.federation.batched_runner import batching_refusal  # noqa: E402
from fedpeft.federation.engine import run_experiment  # noqa: E402
from fedpeft.federation.local_trainer import label_shift, supervised_count, train_local  # noqa: E402
from fedpeft.models.peft_wrap import wrap_peft  # noqa: E402
from fedpeft.models.registry import ModelNotFoundError, load_base_model, model_head, tiny_t5  # noqa: E402
from fedpeft.strategies import build_experiment_strategy  # noqa: E402
from fedpeft.strategies.base import ClientPlan  # noqa: E402
from fedpeft.strategies.fedit import FedIT  # noqa: E402
from fedpeft.strategies.registry import registered  # noqa: E402

TINY_T5 = "configs/t5/tiny_t5.yaml"
RECORDS = [{"instruction": "Reverse the word 'cat'.", "output": "tac", "task": "reverse"},
           {"instruction": "Uppercase 'dog'.", "output": "DOG", "task": "uppercase"},
           {"instruction": "Add 2 and 3.", "output": "5", "task": "arithmetic"},
           {"instruction": "Reverse the word 'parrot'.", "output": "torrap", "task": "reverse"}]


def _events(run_dir, kind):
    return [e for e in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if e["event"] == kind]


def _decoder_input(labels: torch.Tensor, start: int, pad: int) -> torch.Tensor:
    """T5's decoder input written out: the start token, then the labels shifted right, -100 read as pad."""
    shifted = torch.cat([torch.full((labels.shape[0], 1), start), labels[:, :-1]], dim=1)
    return shifted.masked_fill(shifted == IGNORE_INDEX, pad)


# --- the model and its loss ---------------------------------------------------------------------------
def test_tiny_t5_is_a_seeded_encoder_decoder():
    a, b = load_base_model("tiny-t5", seed=3), load_base_model("tiny-t5", seed=3)
    assert a.model.config.is_encoder_decoder and type(a.model).__name__ == "T5ForConditionalGeneration"
    assert all(torch.equal(x, y) for x, y in zip(a.model.state_dict().values(), b.model.state_dict().values()))
    other = load_base_model("tiny-t5", seed=4).model
    assert not torch.equal(other.shared.weight, a.model.shared.weight)
    assert sum(p.numel() for p in a.model.parameters()) < 100_000
    assert label_shift(a.model) == 0 and label_shift(load_base_model("tiny-llama").model) == 1


def test_encoding_puts_the_prompt_in_the_encoder_and_the_target_in_the_labels():
    tok = tiny_t5()[1]
    encoded, dropped = encode_records(RECORDS[:2], tok, "plain", 64, seq2seq=True)
    assert dropped == 0
    for record, e in zip(RECORDS, encoded):
        prompt = tok(format_prompt(record, "plain", tok), add_special_tokens=False)["input_ids"]
        assert e.input_ids == prompt + [tok.eos_token_id]
        assert e.labels == tok(record["output"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    batch = collate(encoded, tok.pad_token_id)
    assert batch["labels"].shape == (2, max(len(e.labels) for e in encoded))  # the decoder's own width
    short = min(encoded, key=lambda e: len(e.labels))
    row = encoded.index(short)
    assert (batch["labels"][row, len(short.labels):] == IGNORE_INDEX).all()
    assert batch["attention_mask"][row].sum() == len(short.input_ids)
    # a long prompt is cut from the left (eos kept last); a target that cannot fit is dropped and counted
    cut, _ = encode_records([{"instruction": "x" * 50, "output": "ab", "task": "t"}], tok, "plain", 16, seq2seq=True)
    assert len(cut[0].input_ids) == 16 and cut[0].input_ids[-1] == tok.eos_token_id
    too_long = {"instruction": "q", "output": "y" * 20, "task": "t"}
    none, dropped = encode_records([too_long], tok, "plain", 16, seq2seq=True)
    assert none == [None] and dropped == 1


def test_the_models_loss_is_cross_entropy_of_the_decoders_logits_over_the_labels():
    model, tok = tiny_t5(seed=1)
    encoded, _ = encode_records(RECORDS, tok, "plain", 64, seq2seq=True)
    batch = collate(encoded, tok.pad_token_id)
    with torch.no_grad():
        loss = model(**batch).loss
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       decoder_input_ids=_decoder_input(batch["labels"], model.config.decoder_start_token_id,
                                                        tok.pad_token_id)).logits
    keep = batch["labels"] != IGNORE_INDEX
    expected = F.cross_entropy(logits[keep].double(), batch["labels"][keep])  # no shift: each position its label
    assert torch.allclose(loss.double(), expected, atol=1e-5, rtol=0)
    assert supervised_count(batch["labels"], 0) == int(keep.sum())


def test_micro_batches_are_weighted_by_their_supervised_tokens_as_one_batch():
    """Two micro-batches of different target lengths give the gradient of the four examples' token mean."""
    base, tok = tiny_t5(seed=2)
    model = wrap_peft(base, load_config(TINY_T5).peft, seed=0, head="seq2seq")
    encoded, _ = encode_records(RECORDS, tok, "plain", 64, seq2seq=True)
    params = {n: p for n, p in adapter_parameters(model).items() if p.requires_grad}
    start = {n: p.detach().clone() for n, p in params.items()}
    model.train()
    model.zero_grad()
    model(**collate(encoded, tok.pad_token_id)).loss.backward()  # one batch: the token mean over all four
    grads = {n: p.grad.detach().clone() for n, p in params.items()}
    model.zero_grad()
    micro = iter([collate(encoded[:1], tok.pad_token_id), collate(encoded[1:], tok.pad_token_id)])
    train_local(model, params, micro, ClientPlan(client_id=0, downlink={}), steps=1, grad_accumulation=2, lr=1.0,
                optimizer_name="sgd", max_grad_norm=None)
    for n, p in params.items():  # SGD with lr 1: w' = w - g
        assert torch.allclose(start[n] - p.detach(), grads[n], atol=1e-6, rtol=1e-4), n


# --- the engine: FedIT, bytes, save / reload -----------------------------------------------------------
class RecordingFedIT(FedIT):
    name = "recording_fedit_t5"
    rounds: list = []

    def aggregate(self, round_idx, global_state, updates):
        result = super().aggregate(round_idx, global_state, updates)
        RecordingFedIT.rounds.append(([({k: v.clone() for k, v in u.tensors.items()}, u.num_examples) for u in updates],
                                      {k: v.clone() for k, v in global_state.items()},
                                      {k: v.clone() for k, v in result.global_state.items()}))
        return result


_NOT_LORA = ["peft.r=null", "peft.alpha=null"]
KINDS = {"lora": [], "dora": ["peft.type=dora"],
         "adalora": ["peft.type=adalora", "peft.r=null", "peft.init_r=4", "peft.target_r=2"],
         "loha": ["peft.type=loha"], "lokr": ["peft.type=lokr"], "ia3": ["peft.type=ia3", *_NOT_LORA],
         "prompt_tuning": ["peft.type=prompt_tuning", *_NOT_LORA, "peft.num_virtual_tokens=4"],
         "p_tuning": ["peft.type=p_tuning", *_NOT_LORA, "peft.num_virtual_tokens=4", "peft.encoder_hidden_size=16"],
         "prefix_tuning": ["peft.type=prefix_tuning", *_NOT_LORA, "peft.num_virtual_tokens=4"]}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = {}
    with registered(RecordingFedIT):
        for kind, overrides in KINDS.items():
            RecordingFedIT.rounds = []
            run_dir = tmp_path_factory.mktemp(kind) / "run"
            summary = run_experiment(TINY_T5, [*overrides, "method.name=recording_fedit_t5"], run_dir=run_dir)
            out[kind] = (summary, run_dir, list(RecordingFedIT.rounds))
    return out


@pytest.mark.parametrize("kind", KINDS)
def test_fedit_on_tiny_t5_averages_the_clients_adapters(runs, kind):
    summary, run_dir, rounds = runs[kind]
    assert len(rounds) == 2
    for uploads, before, after in rounds:
        total = sum(n for _, n in uploads)
        for key in after:  # theta = sum_k n_k / n theta_k, in float64 here
            expected = sum(t[key].double() * (n / total) for t, n in uploads)
            assert torch.allclose(after[key].double(), expected, atol=1e-6, rtol=0), key
        assert any(not torch.equal(after[k], before[k]) for k in after)
    keys = set(rounds[0][2])
    if kind == "lora":  # T5's own targets (q, v), in both stacks and the decoder's cross-attention
        modules = {k.split(".lora_")[0].rsplit(".", 1)[-1] for k in keys}
        assert modules == {"q", "v"}
        assert any(".encoder." in k for k in keys) and any("EncDecAttention" in k for k in keys)
        # A and B of: 2 encoder blocks x (q, v) and 2 decoder blocks x 2 attentions x (q, v)
        assert len(keys) == 2 * (2 * 2 + 2 * 4)
    per_client = 4 * sum(t.numel() for t in rounds[0][2].values())
    trains = _events(run_dir, "client_train")
    assert len(trains) == 4 and all(e["uplink_bytes"] == per_client for e in trains)
    assert summary.uplink_bytes == 4 * per_client
    assert "exact_match" in summary.final_metrics
    assert _events(run_dir, "run_start")[0]["model_head"] == "seq2seq"  # detected: the config says causal_lm


@pytest.mark.parametrize("kind", KINDS)
def test_the_final_adapter_reloads_with_peft_to_the_same_logits(runs, kind):
    summary, _, rounds = runs[kind]
    trained = rounds[-1][2]
    reloaded = peft.PeftModel.from_pretrained(load_base_model("tiny-t5", seed=0).model, str(summary.final_adapter_dir))
    own = wrap_peft(load_base_model("tiny-t5", seed=0).model, load_config(TINY_T5, KINDS[kind]).peft, seed=0,
                    head="seq2seq", total_step=2)
    set_adapter_state(own, trained)
    assert type(reloaded).__name__ == "PeftModelForSeq2SeqLM"
    if kind == "p_tuning":  # peft saves P-tuning's encoded virtual tokens (inference-ready), not the encoder
        assert set(get_adapter_state(reloaded)) == {"prompt_encoder.default.embedding.weight"}
    else:
        assert get_adapter_state(reloaded).keys() == trained.keys()
    ids = torch.tensor([[5, 17, 99, 3, 42, 258], [8, 8, 120, 64, 258, 256]])
    decoder = _decoder_input(torch.tensor([[50, 51, 258], [52, 258, -100]]), 256, 256)
    reloaded.eval(), own.eval()
    with torch.no_grad():  # (no labels: peft's AdaLoRA computes its training-only loss term whenever there are)
        a = reloaded(input_ids=ids, attention_mask=(ids != 256).long(), decoder_input_ids=decoder).logits
        b = own(input_ids=ids, attention_mask=(ids != 256).long(), decoder_input_ids=decoder).logits
    assert torch.equal(a, b)


# --- generation ----------------------------------------------------------------------------------------
def _greedy_by_forwards(model, tok, prompt: str, steps: int) -> str:
    """Greedy decoding written out: the decoder's argmax at its last position, one forward per token."""
    ids = torch.tensor([tok(prompt, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]])
    out = [model.config.decoder_start_token_id]
    with torch.no_grad():
        for _ in range(steps):
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids),
                           decoder_input_ids=torch.tensor([out])).logits
            out.append(int(logits[0, -1].argmax()))
            if out[-1] == tok.eos_token_id:
                break
    return tok.decode(out[1:], skip_special_tokens=True)


@pytest.mark.parametrize("kind", ["lora", "prompt_tuning", "p_tuning", "prefix_tuning"])
def test_generate_is_the_greedy_decoder_output(kind):
    base, tok = tiny_t5(seed=5)
    model = wrap_peft(base, load_config(TINY_T5, KINDS[kind]).peft, seed=1, head="seq2seq", total_step=2)
    with torch.no_grad():  # move the adapter off its identity start, so it takes part
        for p in adapter_parameters(model).values():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.5)
    prompts = ["Add 2 and 3.", "Reverse the word 'parrot' please.", "x"]
    got = generate(model, tok, prompts, max_new_tokens=6, batch_size=2)  # batched, right-padded
    assert got == [_greedy_by_forwards(model, tok, p, 6) for p in prompts]
    assert len(set(got)) > 1  # the prompts matter


def test_a_model_taught_one_answer_generates_it_and_is_graded_correct():
    model, tok = tiny_t5(seed=0)
    record = {"instruction": "What is the code word?", "output": "blue42", "task": "arithmetic"}
    encoded, _ = encode_records([record], tok, "plain", 64, seq2seq=True)
    batch = collate(encoded, tok.pad_token_id)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(60):
        optimizer.zero_grad()
        model(**batch).loss.backward()
        optimizer.step()
    result = generation_eval(model, tok, [record, {**record, "output": "red"}], "plain", max_new_tokens=10)
    assert result["predictions"] == ["blue42", "blue42"]
    assert result["scores"] == [1.0, 0.0] and result["metrics"]["exact_match"] == 0.5


# --- loading --------------------------------------------------------------------------------------------
def test_a_save_pretrained_t5_directory_loads_as_seq2seq_and_runs(tmp_path):
    model, tok = tiny_t5(seed=7)
    model.save_pretrained(tmp_path / "t5")
    tok.save_pretrained(tmp_path / "t5")
    cfg = load_config(TINY_T5, [f"model.name={tmp_path / 't5'}"])
    assert cfg.model.head == "causal_lm" and model_head(cfg.model) == "seq2seq"  # detected from config.json
    loaded = load_base_model(str(tmp_path / "t5"))  # the default head, as `fedpeft eval` calls it
    assert type(loaded.model).__name__ == "T5ForConditionalGeneration"
    assert all(torch.equal(a, b) for a, b in zip(loaded.model.state_dict().values(), model.state_dict().values()))
    ids, labels = torch.tensor([[5, 6, 7, 258]]), torch.tensor([[9, 10, 258]])
    with torch.no_grad():  # the same model, T5 v1.1's unscaled decoder output included
        expected = model(input_ids=ids, labels=labels).logits
        assert torch.equal(loaded.model(input_ids=ids, labels=labels).logits, expected)
    summary = run_experiment(cfg, ["federation.rounds=1", "evaluation.every_rounds=0"], run_dir=tmp_path / "run")
    assert summary.uplink_bytes > 0


def test_a_hub_t5_offline_fails_with_the_model_not_found_error(monkeypatch):
    from huggingface_hub import constants

    from fedpeft.federation.preflight import model_preflight

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError, match="'google/flan-t5-small'.*tiny-t5"):
        load_base_model("google/flan-t5-small", head="seq2seq")
    cfg = load_config("configs/t5/flan_t5_fedit.yaml")
    assert cfg.model.name == "google/flan-t5-small"
    with pytest.raises(ModelNotFoundError, match="'google/flan-t5-small'.*HF_HUB_OFFLINE"):
        model_preflight(cfg)


def test_t5_gets_its_own_lora_targets_and_keeps_chosen_ones():
    wrapped = wrap_peft(tiny_t5()[0], load_config(TINY_T5).peft, seed=0, head="seq2seq")
    assert {k.split(".lora_")[0].rsplit(".", 1)[-1] for k in adapter_parameters(wrapped)} == {"q", "v"}
    chosen = load_config(TINY_T5, ["peft.target_modules=[k,o]"]).peft
    wrapped = wrap_peft(tiny_t5()[0], chosen, seed=0, head="seq2seq")
    assert {k.split(".lora_")[0].rsplit(".", 1)[-1] for k in adapter_parameters(wrapped)} == {"k", "o"}


# --- refusals -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["sfl", "fedot", "fedkseed", "fedgpl", "fedper"])
def test_methods_built_on_a_decoder_refuse_seq2seq_naming_the_field(method):
    options = ["method.options.cut=1-2"] if method == "sfl" else []
    with pytest.raises(ConfigError, match=rf"method.name: method '{method}' does not run on an encoder-decoder"):
        load_config(TINY_T5, [f"method.name={method}", *options])


@pytest.mark.parametrize("method", ["fedprox", "scaffold", "ffa_lora", "flora", "fedex_lora", "fedsa_lora", "ditto"])
def test_methods_on_adapter_tensors_accept_seq2seq(method):
    assert load_config(TINY_T5, [f"method.name={method}"]).method.name == method


def test_generation_suites_are_accepted_for_seq2seq():
    assert load_config(TINY_T5, ["evaluation.suites=[gsm8k]"]).evaluation.suites == ["gsm8k"]


@pytest.mark.parametrize("overrides,field", [
    (["model.head=classification"], "model.head=classification: model.name 'tiny-t5' is an encoder-decoder"),
    (["model.name=tiny-llama", "model.head=seq2seq"], "model.head=seq2seq needs an encoder-decoder"),
    (["training.objective=dpo"], "training.objective: 'dpo' is built for a causal LM"),
    (["privacy.dp_sgd.enabled=true"], "privacy.dp_sgd.enabled: DP-SGD"),
    (["evaluation.suites=[boolq]"], "evaluation.suites: boolq score by log-likelihood"),
])
def test_bad_combinations_are_refused_naming_the_field(overrides, field):
    with pytest.raises(ConfigError, match=field):
        load_config(TINY_T5, overrides)


def test_the_engine_refuses_before_the_weights_load(tmp_path, monkeypatch):
    """A config validated without the method check (as a resumed or hub config whose family was not known):
    the engine reads config.json and refuses before load_experiment_model."""
    import fedpeft.federation.engine as engine

    monkeypatch.setattr(engine, "load_experiment_model", lambda *a, **k: pytest.fail("weights loaded"))
    cfg = load_config(TINY_T5, ["method.name=fedot"], check_method=False)
    with pytest.raises(ValueError, match="method.name: method 'fedot' does not run on an encoder-decoder"):
        run_experiment(cfg, run_dir=tmp_path / "run")


def test_concurrent_clients_fall_back_to_serial_for_seq2seq(caplog):
    cfg = load_config(TINY_T5, ["federation.concurrent_clients=2"])
    model = wrap_peft(tiny_t5()[0], cfg.peft, seed=0, head="seq2seq")
    assert batching_refusal(model, build_experiment_strategy(cfg), cfg).startswith("model.head=seq2seq")
    from fedpeft.federation.batched_runner import GroupedRunner

    runner = type("Runner", (), {"config": cfg, "model": model, "strategy": build_experiment_strategy(cfg)})()
    with caplog.at_level(logging.WARNING):
        assert GroupedRunner.build(runner) is None
    assert "training clients one after another instead: model.head=seq2seq" in caplog.text


def test_log_likelihood_scoring_refuses_an_encoder_decoder():
    from fedpeft.evaluation.loglik import score_continuations

    model, tok = tiny_t5()
    with pytest.raises(ValueError, match="encoder-decoder model .*use the generate mode"):
        score_continuations(model, tok, [("Is it?", " yes")])


@pytest.mark.parametrize("method", ["fedprox", "scaffold", "ffa_lora", "flora"])
def test_methods_on_lora_tensors_run_on_tiny_t5(tmp_path, method):
    sgd = ["training.optimizer=sgd", "training.lr=0.1"] if method == "scaffold" else []  # option II needs SGD steps
    summary = run_experiment(TINY_T5, [f"method.name={method}", "federation.rounds=1", *sgd], run_dir=tmp_path / "run")
    final = load_file(str(summary.final_adapter_dir / "adapter_model.safetensors"))
    assert final and all(torch.isfinite(t).all() for t in final.values())
    assert "exact_match" in summary.final_metrics


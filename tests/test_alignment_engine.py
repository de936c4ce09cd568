"""training.objective routed through config, data, client and evaluator (reward model, DPO, IPO)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from peft import PeftModel

from fedpeft.adapters import get_adapter_state, set_adapter_state
from fedpeft.alignment.experiment import load_preference_data, objective_from_config, preference_eval
from fedpeft.alignment.names import REWARD_LOSS_PARAMS
from fedpeft.alignment.reward_losses import REWARD_LOSSES, loss_parameters
from fedpeft.config import ConfigError, load_config
from fedpeft.data.dataset import load_experiment_data
from fedpeft.data.sources import DataError
from fedpeft.federation import engine as engine_module
from fedpeft.federation.client import ClientRunner, prepare_client_data
from fedpeft.federation.engine import run_experiment
from fedpeft.models.peft_wrap import load_experiment_model
from fedpeft.models.registry import load_base_model, tiny_llama, tiny_tokenizer
from fedpeft.seeding import derive_seed, index_stream
from fedpeft.strategies import build_experiment_strategy
from fedpeft.strategies.base import ClientPlan
from helpers import run_events

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "alignment"
FAST = ["federation.rounds=2", "evaluation.every_rounds=1", "output.report=false"]


# --- config -----------------------------------------------------------------------------------------
def test_loss_table_names_and_parameters_agree_with_the_functions():
    assert list(REWARD_LOSS_PARAMS) == list(REWARD_LOSSES)
    assert all(REWARD_LOSS_PARAMS[name] == loss_parameters(name) for name in REWARD_LOSSES)


def test_unknown_loss_is_refused_listing_the_valid_names():
    with pytest.raises(ConfigError, match="training.loss='nope' is not a reward loss; valid: logsigmoid, bce, mse"):
        load_config(CONFIGS / "reward_tiny.yaml", ["training.loss=nope"])
    with pytest.raises(ConfigError, match="'width' is not a parameter of loss 'hinge'; valid: margin"):
        load_config(CONFIGS / "reward_tiny.yaml", ["training.loss=hinge", "training.loss_params={width: 1}"])


def test_objective_keys_and_head_must_agree():
    with pytest.raises(ConfigError, match="training.loss .* need training.objective=reward"):
        load_config(None, ["training.loss=hinge"])
    with pytest.raises(ConfigError, match="training.beta .* needs training.objective=dpo or ipo"):
        load_config(CONFIGS / "reward_tiny.yaml", ["training.beta=0.5"])
    with pytest.raises(ConfigError, match="objective=reward .* set model.head=classification"):
        load_config(None, ["training.objective=reward"])
    with pytest.raises(ConfigError, match="objective=dpo .* set model.head=causal_lm"):
        load_config(CONFIGS / "reward_tiny.yaml", ["training.objective=dpo", "training.loss=null"])
    assert load_config(None).training.objective == "sft"  # the default is unchanged


def test_preference_file_missing_a_field_fails_before_any_model_loads(tmp_path, monkeypatch):
    data = tmp_path / "prefs.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": f"q{i}", "chosen": "yes"}) for i in range(6)) + "\n")

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the data was checked")

    monkeypatch.setattr(engine_module, "load_experiment_model", no_model)
    with pytest.raises(DataError, match="preference record 0 has no field 'rejected'"):
        run_experiment(CONFIGS / "dpo_tiny.yaml", [f"data.source={data}", "data.eval_examples_per_task=2"],
                       run_dir=tmp_path / "run")


def test_file_source_holds_out_a_seeded_evaluation_set(tmp_path):
    data = tmp_path / "prefs.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": f"q{i}", "chosen": "yes", "rejected": "no"})
                              for i in range(10)) + "\n")
    cfg = load_config(CONFIGS / "dpo_tiny.yaml", [f"data.source={data}", "data.eval_examples_per_task=3"])
    loaded = load_preference_data(cfg)
    assert len(loaded.train) == 7 and len(loaded.evaluation) == 3
    assert {r["prompt"] for r in loaded.train}.isdisjoint(r["prompt"] for r in loaded.evaluation)
    assert all(r["task"] == "preference" for r in loaded.train)


# --- reward model -----------------------------------------------------------------------------------
class LengthReward(torch.nn.Module):
    """A stand-in reward model whose reward is the number of real tokens of the sequence."""

    def __init__(self) -> None:
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(()))

    def forward(self, input_ids, attention_mask):
        return SimpleNamespace(logits=attention_mask.sum(dim=1, keepdim=True).float() + 0 * self.anchor)


def test_pairwise_accuracy_and_margin_against_known_scores():
    cfg = load_config(CONFIGS / "reward_tiny.yaml")
    # Byte-level tokenizer: the reward is len(prompt) + len(completion) + 1 (end of sequence), so within a
    # pair it differs by len(chosen) - len(rejected): +2, -3, 0 (a tie counts as wrong), +3.
    records = [{"prompt": "p", "chosen": "aaa", "rejected": "a"}, {"prompt": "p", "chosen": "a", "rejected": "aaaa"},
               {"prompt": "p", "chosen": "aa", "rejected": "bb"}, {"prompt": "p", "chosen": "aaaaa", "rejected": "aa"}]
    result = preference_eval(LengthReward(), tiny_tokenizer(), objective_from_config(cfg), records, cfg)
    assert result["headline"] == "pairwise_accuracy"
    assert result["metrics"]["pairwise_accuracy"] == pytest.approx(2 / 4)
    assert result["metrics"]["reward_margin"] == pytest.approx((2 - 3 + 0 + 3) / 4)
    logsigmoid = -F.logsigmoid(torch.tensor([2.0, -3.0, 0.0, 3.0])).mean()
    assert result["metrics"]["pair_loss"] == pytest.approx(float(logsigmoid), rel=1e-5)
    assert result["examples"] == 4


def test_federated_reward_run_trains_and_its_pairwise_accuracy_is_the_final_models(tmp_path):
    cfg = load_config(CONFIGS / "reward_tiny.yaml", FAST)
    summary = run_experiment(cfg, run_dir=tmp_path / "run")
    evals = [e for e in run_events(summary.run_dir, "eval") if "split" not in e]
    assert [e["round"] for e in evals] == [0, 1, 2]
    train = run_events(summary.run_dir, "client_train")
    assert len(train) == 4 and all(0 < e["loss"] < 10 for e in train)

    # Independently: the saved adapter on a fresh base reward model, each completion scored alone (no padding).
    base = load_base_model("tiny-llama", head="reward", num_labels=1, seed=cfg.seed).model
    model = PeftModel.from_pretrained(base, str(summary.run_dir / "final")).eval()
    tok = tiny_tokenizer()
    held_out = load_experiment_data(cfg).evaluation

    def reward(prompt: str, completion: str) -> float:
        ids = tok(prompt, add_special_tokens=False)["input_ids"] + tok(completion, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            return float(model(input_ids=torch.tensor([ids + [tok.eos_token_id]])).logits[0, 0])

    gaps = [reward(r["prompt"], r["chosen"]) - reward(r["prompt"], r["rejected"]) for r in held_out]
    final = evals[-1]["metrics"]
    assert evals[-1]["examples"] == len(held_out) == 24
    assert final["pairwise_accuracy"] == pytest.approx(sum(g > 0 for g in gaps) / len(gaps))
    assert final["reward_margin"] == pytest.approx(sum(gaps) / len(gaps), abs=1e-5)
    assert summary.final_metrics["pairwise_accuracy"] == final["pairwise_accuracy"]


# --- DPO / IPO ----------------------------------------------------------------------------------------
def _summed_logprob(model, ids: list[int], labels: list[int]) -> float:
    """Sum over completion tokens of log p(token | tokens before it), one unpadded sequence, token by token."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].float()
    total = 0.0
    for t in range(1, len(ids)):
        if labels[t] != -100:
            total += float(F.log_softmax(logits[t - 1], dim=-1)[ids[t]])
    return total


@pytest.mark.parametrize("kind", ["dpo", "ipo"])
def test_preference_loss_in_engine_equals_the_hand_computation(kind):
    cfg = load_config(CONFIGS / "dpo_tiny.yaml", [f"training.objective={kind}", "training.beta=0.5",
                                                   "federation.batch_size=3", "federation.local_steps=1"])
    data = load_experiment_data(cfg)
    _, model = load_experiment_model(cfg, data, device=torch.device("cpu"))
    tokenizer = tiny_tokenizer()
    client_data = prepare_client_data(cfg, data, tokenizer)
    strategy = build_experiment_strategy(cfg)
    # A non-zero B, so the policy differs from the reference (at B = 0 every h is 0).
    state = get_adapter_state(model)
    generator = torch.Generator().manual_seed(3)
    state = {k: (torch.randn(v.shape, generator=generator) * 0.3 if "lora_B" in k else v) for k, v in state.items()}
    set_adapter_state(model, state)

    # The pairs of the first local step, as the client draws them, scored by hand.
    round_idx, client = 1, 0
    examples = client_data.examples(client)
    stream = index_stream(examples, derive_seed(cfg.seed, "batches", round_idx, client, "default"))
    pairs = [client_data.encoded[next(stream)] for _ in range(cfg.federation.batch_size)]
    reference = tiny_llama(seed=cfg.seed)[0].eval()  # the base model: a separate copy, built the same way
    model.eval()
    beta, losses = 0.5, []
    for chosen, rejected in pairs:
        pc, pr = (_summed_logprob(model, e.input_ids, e.labels) for e in (chosen, rejected))
        rc, rr = (_summed_logprob(reference, e.input_ids, e.labels) for e in (chosen, rejected))
        h = (pc - rc) - (pr - rr)
        losses.append(-F.logsigmoid(torch.tensor(beta * h)).item() if kind == "dpo" else (h - 1 / (2 * beta)) ** 2)
    expected = sum(losses) / len(losses)

    runner = ClientRunner(model, strategy, cfg, client_data, store=None)
    local = runner.train(round_idx, ClientPlan(client_id=client, downlink=state), None, lr=1e-3)
    assert local.losses[0] == pytest.approx(expected, rel=1e-4, abs=1e-6)
    assert expected > 0.01  # not the trivial B = 0 value

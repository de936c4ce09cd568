"""FlowerTune leaderboard evaluation sets: prompts, the leaderboard's split and answer mapping, accuracy on
offline fixture records with known predictions against hand-computed values."""

from pathlib import Path

import numpy as np
import pytest

from fedpeft.evaluation import flowertune
from fedpeft.evaluation.flowertune import (SETS, gold_token_budgets, leaderboard_items, leaderboard_test_indices,
                                           load_rows, medical_answer, run_set, sentiment_of)
from fedpeft.evaluation.suites import EvalOptions, flat_metrics, resolve_suite, run_suite

FIXTURES = Path(__file__).parent / "fixtures" / "flowertune"
MMLU_ROOT = Path(__file__).parent / "data"


class CharTokenizer:
    """One token per character: enough for the token budgets."""

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": list(range(len(text)))}


def fake_generator(outputs_by_substring, calls):
    """A generate() stand-in: the canned output of the first key found in the prompt."""
    def generate(model, tokenizer, prompts, max_new_tokens, batch_size):
        calls.append(max_new_tokens)
        out = []
        for prompt in prompts:
            hits = [v for k, v in outputs_by_substring.items() if k in prompt]
            assert len(hits) == 1, prompt
            out.append(hits[0])
        return out
    return generate


# --- pure scoring ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, label", [
    ("Positive", "positive"), ("negative outlook", "negative"), ("not negative, positive", "positive"),
    ("I cannot tell", "neutral"), ("NEGATIVE", "neutral"),  # only the two spellings count, as on the leaderboard
])
def test_sentiment_keyword_mapping(text, label):
    assert sentiment_of(text) == label


@pytest.mark.parametrize("output, gold, kind, expected", [
    ("B. Aspirin", "B", "mcq", ("b", "b")),
    (" c) Lumbar", "C", "mcq", ("c", "c")),
    ("The answer is A", "A", "mcq", ("the answer is a", "a")),  # first letter 't' is no option: raw text kept
    ("Yes.", "yes", "boolean", ("yes", "yes")),
    ("nono", "no", "boolean", ("no", "no")),
    ("maybe", "maybe", "boolean", ("maybe", "maybe")),  # not a recognised answer: raw text, equal to the gold
    ("maybe.", "maybe", "boolean", ("maybe.", "maybe")),
    ("intro\n## yes\nmore", "yes", "boolean", ("yes", "yes")),
])
def test_medical_answer(output, gold, kind, expected):
    assert medical_answer(output, gold, kind) == expected


def test_leaderboard_split_is_datasets_seed_42_quarter():
    for n in (8, 10, 4846):  # 4846: FPB sentences_50agree
        expected = np.random.default_rng(42).permutation(n)[: int(np.ceil(0.25 * n))]
        assert leaderboard_test_indices(n) == [int(i) for i in expected]


def test_gold_token_budgets_follow_the_first_gold_of_each_block():
    items = [{"gold": g} for g in ("yes", "no", "maybe", "yes", "no")]
    assert gold_token_budgets(items, CharTokenizer(), block=2) == [3, 3, 5, 5, 2]


# --- items from fixture rows ----------------------------------------------------------------------------------
def test_finance_items_prompts_and_labels():
    fpb = leaderboard_items(SETS["fpb"], load_rows(SETS["fpb"], FIXTURES))
    assert [it["gold"] for it in fpb] == ["positive", "neutral"]  # rows 3 and 4 of 8 (the seed-42 quarter)
    assert fpb[0]["prompt"] == ("Instruction: What is the sentiment of this news? Please choose an answer from "
                                "{negative/neutral/positive}.\nInput: Operating margin improved to twelve percent."
                                "\nAnswer: ")
    fiqa = leaderboard_items(SETS["fiqa"], load_rows(SETS["fiqa"], FIXTURES))
    assert [it["gold"] for it in fiqa] == ["positive", "negative"]  # scores 0.51 and -0.6
    assert "sentiment of this tweet" in fiqa[0]["prompt"] and "sentiment of this news" in fiqa[1]["prompt"]
    tfns = leaderboard_items(SETS["tfns"], load_rows(SETS["tfns"], FIXTURES))
    assert [it["gold"] for it in tfns] == ["positive", "negative", "neutral", "positive"]  # 0 bear, 1 bull, 2 neutral


def test_medical_items_prompts_and_golds():
    medmcqa = leaderboard_items(SETS["medmcqa"], load_rows(SETS["medmcqa"], FIXTURES))
    assert [it["gold"] for it in medmcqa] == ["C", "B", "A"]  # the row with cop=-1 has no answer: left out
    assert medmcqa[0]["prompt"].startswith("<|im_start|>question\nYou are a medical doctor answering")
    assert medmcqa[0]["prompt"].endswith(
        "\nQuestion: Which vitamin deficiency causes scurvy?\n\nOptions:\nA. Vitamin A\nB. Vitamin B12\nC. Vitamin C"
        "\nD. Vitamin D\nThe answer is:\n<|im_end|>\n<|im_start|>answer\n")
    medqa = leaderboard_items(SETS["medqa"], load_rows(SETS["medqa"], FIXTURES))
    assert [it["gold"] for it in medqa] == ["C", "A"]  # the key whose value is the answer text
    careqa = leaderboard_items(SETS["careqa"], load_rows(SETS["careqa"], FIXTURES))
    assert [it["gold"] for it in careqa] == ["B", "C"]  # cop counts from 1
    pubmed = leaderboard_items(SETS["pubmedqa"], load_rows(SETS["pubmedqa"], FIXTURES))
    assert pubmed[0]["prompt"].endswith("A trial of 200 adults compared drug A with placebo.\nSystolic pressure fell "
                                        "by 10 mmHg with drug A.\nDoes drug A lower blood pressure in adults?\n"
                                        "The answer is:\n<|im_end|>\n<|im_start|>answer\n")


def test_general_track_uses_the_leaderboard_categories():
    stem = leaderboard_items(SETS["mmlu_stem"], load_rows(SETS["mmlu_stem"], MMLU_ROOT))
    # fixture test/: abstract_algebra 4 + anatomy 3 (STEM on the leaderboard, "other" in MMLU's paper) + astronomy 2
    assert len(stem) == 9 and sum(it["subject"] == "anatomy" for it in stem) == 3
    assert stem[0]["gold"] == "C" and "Answer the following multiple choice question." in stem[0]["prompt"]


# --- accuracy with known predictions, through the suite ----------------------------------------------------------
OUTPUTS = {
    # fpb (golds positive, neutral): 1 of 2
    "Operating margin": "Positive", "new finance director": "It is negative news",
    # fiqa (positive, negative): 2 of 2, "positive" wins over "neutral"
    "$XYZ breaking out": "neutral, maybe positive", "Retailer warns": "negative",
    # tfns (positive, negative, neutral, positive): 3 of 4
    "$ABC upgraded": "positive", "$DEF misses": "Negative.", "$GHI to present": "I cannot tell",
    "$JKL hits": "not negative at all",
    # pubmedqa (yes, no, maybe, yes): 3 of 4
    "Does drug A lower": "Yes.", "Is vitamin X": "nono", "early mobilisation": "maybe", "screening cost": "no",
    # medmcqa (C, B, A): 2 of 3
    "scurvy": "C", "largest organ": " b) Skin", "Insulin is secreted": "The answer is A",
    # medqa (C, A): 1 of 2
    "stiff neck": "C. Lumbar puncture", "reverses heparin": "Protamine",
    # careqa (B, C): 2 of 2
    "produces bile": "B", "resting heart rate": "c",
}
EXPECTED = {"fpb": 1 / 2, "fiqa": 1.0, "tfns": 3 / 4, "pubmedqa": 3 / 4, "medmcqa": 2 / 3, "medqa": 1 / 2, "careqa": 1.0}


def test_accuracy_on_fixtures_matches_hand_computation(monkeypatch):
    calls = []
    monkeypatch.setattr(flowertune, "generate", fake_generator(OUTPUTS, calls))
    assert [e.task for e in resolve_suite("finance,medical")] == ["fpb", "fiqa", "tfns", "pubmedqa", "medmcqa",
                                                                  "medqa", "careqa"]
    results = run_suite(None, CharTokenizer(), "finance,medical", EvalOptions(data_dir=FIXTURES))
    assert {r.task: r.metrics["acc"] for r in results} == pytest.approx(EXPECTED)
    assert [r.num_examples for r in results] == [2, 2, 4, 4, 3, 2, 2]
    flat = flat_metrics(results)
    assert flat["finance/test/acc"] == pytest.approx((1 / 2 + 1.0 + 3 / 4) / 3)
    assert flat["medical/test/acc"] == pytest.approx((3 / 4 + 2 / 3 + 1 / 2 + 1.0) / 4)
    # finance: one call of 32 new tokens per set; medical: the first gold's length ("yes" = 3 characters here)
    assert calls[:3] == [32, 32, 32] and calls[3] == 3 and calls[4:] == [1, 1, 1]


def test_missing_data_is_a_skip_naming_where_it_looked(monkeypatch, tmp_path):
    monkeypatch.setattr(flowertune, "hub_reachable", lambda: False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    (result,) = run_suite(None, CharTokenizer(), "tfns", EvalOptions(data_dir=tmp_path))
    assert result.skipped and "tfns" in result.skipped and str(tmp_path) in result.skipped


def test_tiny_model_end_to_end_on_fixtures():
    from fedpeft.models.registry import load_base_model

    loaded = load_base_model("tiny-llama")
    out = run_set(loaded.model, loaded.tokenizer, "tfns", FIXTURES, max_new_tokens=2)
    assert out["examples"] == 4 and 0.0 <= out["metrics"]["acc"] <= 1.0
    assert out["metrics"]["acc"] == pytest.approx(sum(out["scores"]) / 4)

"""Preference records: local files, the hh-rlhf and UltraFeedback field mappings, the generated set, errors."""

from __future__ import annotations

import csv
import json
import sys
import types

import pytest

from fedpeft.alignment.preference import (
    generated_preferences,
    load_preferences,
    split_hh_transcripts,
    to_preferences,
)
from fedpeft.data.generated import generate_split
from fedpeft.data.sources import DataError
from helpers import PREFERENCE_PAIRS as PAIRS

HH = {
    "chosen": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: What is 2+2?\n\nAssistant: It is 4.",
    "rejected": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: What is 2+2?\n\nAssistant: No idea.",
}

ULTRA = {
    "prompt": "Name a prime.",
    "chosen": [{"role": "user", "content": "Name a prime."}, {"role": "assistant", "content": "7"}],
    "rejected": [{"role": "user", "content": "Name a prime."}, {"role": "assistant", "content": "8"}],
    "score_chosen": 9.0,
}


def test_jsonl_and_csv_files_give_the_same_records(tmp_path):
    jsonl = tmp_path / "prefs.jsonl"
    jsonl.write_text("\n".join(json.dumps(p) for p in PAIRS) + "\n")
    path_csv = tmp_path / "prefs.csv"
    with path_csv.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["prompt", "chosen", "rejected"])
        writer.writeheader()
        writer.writerows(PAIRS)
    assert load_preferences(jsonl) == PAIRS
    assert load_preferences(path_csv) == PAIRS


def test_column_mapping_renames_source_columns(tmp_path):
    path = tmp_path / "prefs.jsonl"
    path.write_text("\n".join(json.dumps({"question": p["prompt"], "good": p["chosen"], "bad": p["rejected"]})
                              for p in PAIRS))
    assert load_preferences(path, columns="question->prompt, good->chosen, bad->rejected") == PAIRS


def test_hh_rlhf_prompt_is_the_shared_dialogue_up_to_the_last_assistant_turn():
    prompt, chosen, rejected = split_hh_transcripts(HH["chosen"], HH["rejected"])
    assert prompt == "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: What is 2+2?\n\nAssistant:"
    assert (chosen, rejected) == (" It is 4.", " No idea.")
    # The completions start right after the prompt: prompt + completion is the whole transcript.
    assert prompt + chosen == HH["chosen"] and prompt + rejected == HH["rejected"]


def test_hh_rlhf_shared_prefix_inside_an_answer_is_not_part_of_the_prompt():
    # Both answers start with "It " - the prompt must still stop at the assistant turn.
    a = "\n\nHuman: Q?\n\nAssistant: It is 4."
    b = "\n\nHuman: Q?\n\nAssistant: It is 5."
    assert split_hh_transcripts(a, b) == ("\n\nHuman: Q?\n\nAssistant:", " It is 4.", " It is 5.")


def test_hh_rlhf_without_assistant_turn_is_an_error():
    with pytest.raises(DataError, match=r"record 0 .*hh-rlhf.*Assistant"):
        to_preferences([{"chosen": "just text", "rejected": "other text"}], "hh-rlhf")


def test_ultrafeedback_chats_reduce_to_the_last_assistant_message():
    [record] = to_preferences([ULTRA], "ultrafeedback")
    assert (record["prompt"], record["chosen"], record["rejected"]) == ("Name a prime.", "7", "8")
    assert record["score_chosen"] == 9.0  # other fields are kept


def _fake_datasets(monkeypatch, rows, seen):
    module = types.ModuleType("datasets")

    class _Split(list):
        def select(self, indices):
            return _Split(self[i] for i in indices)

    def load_dataset(name, config=None, split="train", revision=None):
        seen.append((name, split))
        return _Split(rows)

    module.load_dataset = load_dataset
    monkeypatch.setitem(sys.modules, "datasets", module)


@pytest.mark.parametrize("name, rows, split, expected", [
    ("Anthropic/hh-rlhf", [HH], "train", (" It is 4.", " No idea.")),
    ("HuggingFaceH4/ultrafeedback_binarized", [ULTRA], "train_prefs", ("7", "8")),
])
def test_known_hub_names_pick_their_format_and_split(monkeypatch, name, rows, split, expected):
    seen = []
    _fake_datasets(monkeypatch, rows, seen)
    [record] = load_preferences(name)
    assert seen == [(name, split)]
    assert (record["chosen"], record["rejected"]) == expected


@pytest.mark.parametrize("missing", ["prompt", "chosen", "rejected"])
def test_missing_field_names_the_field_and_the_record(tmp_path, missing):
    rows = [dict(PAIRS[0]), {k: v for k, v in PAIRS[1].items() if k != missing}]
    path = tmp_path / "prefs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(DataError, match=rf"record 1 has no field '{missing}'"):
        load_preferences(path)


def test_wrong_types_and_empty_completions_are_errors():
    with pytest.raises(DataError, match=r"record 0 field 'chosen' is a int"):
        to_preferences([{"prompt": "p", "chosen": 3, "rejected": "r"}])
    with pytest.raises(DataError, match=r"record 0 field 'rejected' is empty"):
        to_preferences([{"prompt": "p", "chosen": "c", "rejected": "  "}])
    with pytest.raises(DataError, match=r"unknown; valid: fields, hh-rlhf, ultrafeedback"):
        to_preferences(PAIRS, "anthropic")


def test_generated_preferences_pair_the_exact_answer_with_a_wrong_one():
    tasks = ["arithmetic", "reverse", "parity"]
    train, held_out = generated_preferences(tasks, 20, 5, seed=3)
    plain_train, plain_eval = generate_split(tasks, 20, 5, seed=3)
    assert len(train) == 60 and len(held_out) == 15
    for pairs, plain in ((train, plain_train), (held_out, plain_eval)):
        for pair, record in zip(pairs, plain):
            assert pair["prompt"] == record["instruction"] and pair["chosen"] == record["output"]
            assert pair["rejected"] != pair["chosen"]
    # Checked independently for arithmetic: chosen is the true sum, rejected is not.
    for pair in train:
        if pair["task"] == "arithmetic":
            a, b = (int(w.rstrip(".")) for w in pair["prompt"].split() if w.rstrip(".").isdigit())
            assert int(pair["chosen"]) == a + b != int(pair["rejected"])
        if pair["task"] == "parity":
            assert {pair["chosen"], pair["rejected"]} == {"even", "odd"}
    assert not {p["prompt"] for p in held_out} & {p["prompt"] for p in train}
    assert generated_preferences(tasks, 20, 5, seed=3) == (train, held_out)  # deterministic
    with pytest.raises(DataError, match="unknown task 'poetry'"):
        generated_preferences(["poetry"], 2, 1, seed=0)

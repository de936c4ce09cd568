"""Answer extraction on a table of real-looking model outputs (LLM-Adapters protocol)."""

from __future__ import annotations

import pytest

from fedpeft.evaluation.extraction import (canonical_commonsense_task, extract_choice_letter,
                                           extract_commonsense_label, extract_last_number,
                                           extract_letter_llm_adapters, gsm8k_gold, numbers_match)

COMMONSENSE = [
    # (task, output, strict LLM-Adapters label, lenient label)
    ("boolq", "the correct answer is true", "true", "true"),
    ("boolq", "false", "false", "false"),
    ("boolq", "True. Ethanol takes more energy to make than it produces.", None, "true"),
    ("boolq", "the correct answer is false because true statements are rare", "false", "false"),
    ("piqa", "the correct answer is solution2", "solution2", "solution2"),
    ("piqa", "Solution 1 is better: it uses paper strips.", None, "solution1"),
    ("social_i_qa", "the correct answer is answer3</s>", "answer3", "answer3"),
    ("ARC-Challenge", "the correct answer is answer4\n\n### Instruction:", "answer4", "answer4"),
    ("ARC-Easy", "answer1", "answer1", "answer1"),
    ("openbookqa", "I think Answer2 is right", None, "answer2"),
    ("hellaswag", "the correct answer is ending3", "ending3", "ending3"),
    ("winogrande", "the correct answer is option1", "option1", "option1"),
    ("winogrande", "Option 2: Maria", None, "option2"),
    ("winogrande", "Sarah always got the easier cases.", None, None),
    ("piqa", "", None, None),
]


@pytest.mark.parametrize("task,output,strict,lenient", COMMONSENSE)
def test_commonsense_labels(task, output, strict, lenient):
    assert extract_commonsense_label(task, output) == strict
    assert extract_commonsense_label(task, output, lenient=True) == lenient


def test_commonsense_first_label_wins_and_task_aliases():
    # LLM-Adapters takes the first label, even when the model echoes the answer format
    echo = "Answer format: answer1/answer2/answer3/answer4\nthe correct answer is answer3"
    assert extract_commonsense_label("arc_challenge", echo) == "answer1"
    assert canonical_commonsense_task("siqa") == "social_i_qa"
    assert canonical_commonsense_task("ARC-C") == "ARC-Challenge"
    assert canonical_commonsense_task("obqa") == "openbookqa"
    with pytest.raises(ValueError):
        canonical_commonsense_task("squad")


GSM8K = [
    ("Janet sells 16 - 3 - 4 = 9 eggs.\nShe makes 9 * 2 = $18 every day.\n#### 18", 18.0),
    ("The answer is 1,250 dollars.", 1250.0),
    ("So she has -3 degrees left", -3.0),
    ("It takes 2/2=1 bolt, so 2+1=3 bolts in total. The answer is 3.", 3.0),
    ("The price is 0.5 per apple, i.e. 12.75 in total", 12.75),
    ("I cannot solve this problem.", None),
]


@pytest.mark.parametrize("output,expected", GSM8K)
def test_gsm8k_last_number(output, expected):
    assert extract_last_number(output) == expected


def test_gsm8k_gold_and_tolerance():
    assert gsm8k_gold("She makes 9 * 2 = $<<9*2=18>>18 every day.\n#### 18") == 18.0
    assert gsm8k_gold("... #### 1,000") == 1000.0
    assert numbers_match(18.0004, 18.0)
    assert not numbers_match(18.01, 18.0)
    assert not numbers_match(None, 18.0)
    with pytest.raises(ValueError):
        gsm8k_gold("no marker here")


MMLU = [
    ("B", "B"),
    ("The answer is (C).", "C"),
    ("Answer: D", "D"),
    ("answer is A because the group has order 4", "A"),
    ("(B) 8", "B"),
    ("C. 12", "C"),
    ("I believe the correct option is B.", "B"),
    ("A cyclic group of order 4, so the answer is A", "A"),
    ("Looking at the options:\nD. 6 is correct", "D"),
    ("I don't know.", None),
    ("", None),
]


@pytest.mark.parametrize("output,expected", MMLU)
def test_mmlu_letter(output, expected):
    assert extract_choice_letter(output) == expected


def test_llm_adapters_letter_is_naive():
    # kept for reproducing LLM-Adapters' AQuA numbers: it picks the A of "Answer"
    assert extract_letter_llm_adapters("Answer: C") == "A"
    assert extract_letter_llm_adapters("the correct option is e") is None

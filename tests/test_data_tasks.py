"""Each task: record -> (prompt, target), answer extraction and scoring, validation errors."""

from __future__ import annotations

import pytest

from fedpeft.data.sources import DataError
from fedpeft.data.tasks import TASK_TYPES, Example, get_task, infer_task_type, mmlu_category, rouge_l
from fedpeft.evaluation.extraction import extract_answer_number, extract_choice_letter

GSM = {"question": "Natalia sold 48 clips in April and half as many in May. How many in all?",
       "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nAltogether 48+24 = <<48+24=72>>72.\n#### 72"}
PIQA = {"instruction": "Please choose the correct solution to the question: open a jar\n\nSolution1: twist\n\n"
                       "Solution2: push\n\nAnswer format: solution1/solution2",
        "input": "", "output": "the correct answer is solution1", "answer": "solution1"}
SIQA = {"instruction": "Please choose the correct answer to the question: ...\n\nAnswer1: a Answer2: b Answer3: c\n\n"
                       "Answer format: answer1/answer2/answer3", "input": "", "output": "the correct answer is answer3",
        "answer": "answer3"}
BOOLQ = {"instruction": "Please answer the following question with true or false, question: is water wet?\n\n"
                        "Answer format: true/false", "input": "", "output": "the correct answer is true", "answer": "true"}
MMLU = {"question": "2+2=?", "A": "3", "B": "4", "C": "5", "D": "6", "answer": "B", "subject": "elementary_mathematics"}
SST = {"sentence": "a charming and often affecting journey . ", "label": "1"}
DOLLY = {"instruction": "Who wrote it?", "context": "Hamlet was written by Shakespeare.", "response": "Shakespeare",
         "category": "closed_qa"}
SVAMP = {"instruction": "Tom had 5 apples and ate 2. How many are left?", "input": "",
         "output": "\nA: 5 - 2 = 4. The answer is 4.", "answer": "3.0"}
AQUA = {"instruction": "Which is prime? Answer Choices: (A) 4 (B) 6 (C) 7 (D) 8 (E) 9", "input": "", "output": "",
        "answer": "C"}


def test_instruction_task_with_context_and_rouge():
    task = get_task("dolly")
    ex = task.example(DOLLY)
    assert ex == Example("Who wrote it?", "Shakespeare", "Hamlet was written by Shakespeare.")
    assert ex.prompt == "Who wrote it?\n\nHamlet was written by Shakespeare."
    assert task.score("Shakespeare", DOLLY) == 1.0 and task.score("Marlowe", DOLLY) == 0.0
    assert 0 < task.score("It was William Shakespeare", DOLLY) < 1
    assert get_task("instruction", metric="exact").score(" shakespeare ", DOLLY) == 1.0
    alpaca = {"instruction": "Say hi", "input": "", "output": "hi"}
    assert task.example(alpaca).prompt == "Say hi"


def test_rouge_l():
    assert rouge_l("the cat sat", "the cat sat") == 1.0
    assert rouge_l("", "x") == 0.0
    assert rouge_l("cat the", "the cat") == pytest.approx(0.5)


def test_gsm8k_target_reference_and_scoring():
    task = get_task("gsm8k")
    ex = task.example(GSM)
    assert "<<" not in ex.target and ex.target.endswith("#### 72")
    assert "<<48/2=24>>" in get_task("gsm8k", keep_calculator=True).target(GSM)
    assert task.reference(GSM) == "72"
    for prediction, expected in [("... so #### 72", 1.0), ("The answer is 72.", 1.0), ("48 + 24 = 72", 1.0),
                                 ("The answer is 7,2", 0.0), ("#### 71", 0.0), ("no idea", 0.0)]:
        assert task.score(prediction, GSM) == expected, prediction
    assert extract_answer_number("I think $1,234.50 total. The answer is 1,234.5") == 1234.5
    # the two disagreements: one grade each, the stated answer's
    assert task.score("The answer is 72. Check: 48 + 24 = 73", GSM) == 1.0
    assert task.score("#### 72\n\nNote: 3 steps", GSM) == 1.0
    # LLM-Adapters' last number, when asked for: the same two outputs are then wrong
    adapters = get_task("gsm8k", extraction="last_number")
    assert adapters.score("The answer is 72. Check: 48 + 24 = 73", GSM) == 0.0
    assert adapters.score("#### 72\n\nNote: 3 steps", GSM) == 0.0 and adapters.score("48 + 24 = 72", GSM) == 1.0
    with pytest.raises(DataError, match="extraction"):
        get_task("gsm8k", extraction="first")


def test_gsm8k_without_hash_answer_is_rejected():
    with pytest.raises(DataError, match="record 1.*####"):
        get_task("gsm8k").validate([GSM, {"question": "q", "answer": "42"}], "gsm.jsonl")


@pytest.mark.parametrize("record, good, bad", [
    (PIQA, "the correct answer is solution1", "the correct answer is solution2"),
    (SIQA, "answer3 because...", "answer1, not answer3"),
    # LLM-Adapters matches labels case-sensitively: "Answer1" is not a label, so the first label is answer3
    (SIQA, "Answer1, not answer3", "Answer3, not answer1"),
    (BOOLQ, "The correct answer is true", "false"),
])
def test_commonsense_first_option_word(record, good, bad):
    task = get_task("commonsense")
    task.validate([record], "cs.json")
    assert task.target(record) == record["output"]
    assert task.score(good, record) == 1.0 and task.score(bad, record) == 0.0
    options = task.options(record)
    assert task.candidates(record)[task.gold_index(record)].endswith(record["answer"])
    assert len(task.candidates(record)) == len(options)


def test_commonsense_lenient_and_option_texts():
    strict, lenient = get_task("commonsense"), get_task("commonsense", lenient=True)
    assert strict.score("Solution 1 is better", PIQA) == 0.0 and strict.answer("Solution 1 is better", PIQA) is None
    assert lenient.score("Solution 1 is better", PIQA) == 1.0
    assert strict.option_texts(PIQA) == ("open a jar", ["twist", "push"])
    assert strict.option_texts(BOOLQ) == ("is water wet?", ["true", "false"])
    assert strict.option_texts(SIQA) == ("...", ["a", "b", "c"])
    with pytest.raises(DataError, match="no options"):
        strict.option_texts({"instruction": "pick one\n\nAnswer format: option1/option2", "answer": "option1"})


def test_mmlu_categories():
    assert [mmlu_category(s) for s in ("college_physics", "anatomy", "prehistory", "econometrics", "marketing")] == [
        "stem", "other", "humanities", "social_sciences", "other"]


def test_commonsense_options_without_answer_format_line():
    task = get_task("commonsense")
    record = {"instruction": "pick", "answer": "option2"}
    assert task.options(record) == ["option1", "option2"]
    assert task.target(record) == "the correct answer is option2"
    with pytest.raises(DataError, match="'answer9'"):
        task.validate([{**SIQA, "answer": "answer9"}], "siqa.json")


def test_mmlu_prompt_letter_and_k_shot():
    dev = [{**MMLU, "question": f"dev q{i}", "answer": "ABCD"[i % 4]} for i in range(6)]
    dev.append({**MMLU, "question": "other subject", "subject": "virology"})
    task = get_task("mmlu", shots=2, dev_records=dev)
    prompt = task.prompt(MMLU)
    assert prompt.startswith("The following are multiple choice questions (with answers) about elementary mathematics.")
    assert "dev q0" in prompt and "dev q1" in prompt and "dev q2" not in prompt and "other subject" not in prompt
    assert prompt.endswith("2+2=?\nA. 3\nB. 4\nC. 5\nD. 6\nAnswer:")
    assert task.target(MMLU) == "B"
    for prediction, expected in [(" B", 1.0), ("B. 4", 1.0), ("The answer is (B)", 1.0), ("answer: b", 0.0), ("C", 0.0)]:
        assert task.score(prediction, MMLU) == expected, prediction
    hub_style = {"question": "2+2=?", "choices": ["3", "4", "5", "6"], "answer": 1, "subject": "x"}
    assert get_task("mmlu").reference(hub_style) == "B"
    with pytest.raises(DataError, match="dev_records"):
        get_task("mmlu", shots=5)
    with pytest.raises(DataError, match="'E'"):
        get_task("mmlu").validate([{**MMLU, "answer": "E"}], "mmlu.csv")


def test_extract_letter_prefers_stated_answer():
    assert extract_choice_letter("A good question. The answer is C.") == "C"
    assert extract_choice_letter("(D) because") == "D"
    assert extract_choice_letter("nothing here") is None


def test_classification_label_words_and_label_set():
    task = get_task("sst2")
    ex = task.example(SST)
    assert ex.target == "positive" and ex.input.startswith("Sentence: a charming")
    assert task.score("Positive.", SST) == 1.0 and task.score("negative", SST) == 0.0
    assert task.score("neutral", SST) == 0.0
    with pytest.raises(DataError, match="'2'"):
        task.validate([SST, {"sentence": "x", "label": "2"}], "sst2/train.tsv")
    pair = get_task("classification", text_field=["sentence1", "sentence2"], label_words={0: "yes", 1: "no"})
    record = {"sentence1": "A", "sentence2": "B", "label": 0}
    assert pair.example(record).input == "Sentence1: A\nSentence2: B" and pair.target(record) == "yes"


def test_math_numbers_and_letters():
    task = get_task("math")
    # the record's own rationale disagrees with the gold answer: the target falls back to the answer
    assert task.target(SVAMP) == "The answer is 3."
    good = {**SVAMP, "output": "5 - 2 = 3. The answer is 3."}
    assert task.target(good) == good["output"]
    assert get_task("math", use_output="always").target(SVAMP) == SVAMP["output"].strip()
    assert task.score("So 3 apples remain. The answer is 3", SVAMP) == 1.0
    assert task.score("The answer is 4", SVAMP) == 0.0
    assert task.target(AQUA) == "The answer is C."
    assert task.score("7 is prime, so the answer is (C).", AQUA) == 1.0
    assert task.score("The answer is (A).", AQUA) == 0.0
    with pytest.raises(DataError, match="'many'"):
        task.validate([{**SVAMP, "answer": "many"}], "svamp.json")


def test_validate_names_missing_field_and_empty_split():
    with pytest.raises(DataError, match=r"x.json: record 0 has no field 'instruction'"):
        get_task("instruction").validate([{"prompt": "p", "output": "o"}], "x.json")
    with pytest.raises(DataError, match="empty split"):
        get_task("gsm8k").validate([], "gsm8k test")


def test_normalize_keeps_fields_and_adds_the_generated_shape():
    row = get_task("gsm8k").normalize({**GSM, "task": "gsm8k"})
    assert row["instruction"] == GSM["question"] and row["output"].endswith("#### 72")
    assert row["reference"] == "72" and row["answer"] == GSM["answer"] and row["input"] == ""


def test_infer_task_type_and_registry():
    assert infer_task_type(GSM) == "gsm8k"
    assert infer_task_type(PIQA) == "commonsense"
    assert infer_task_type(MMLU) == "mmlu"
    assert infer_task_type(SST) == "classification"
    assert infer_task_type(DOLLY) == "instruction"
    assert infer_task_type(SVAMP) == "math"
    with pytest.raises(DataError, match="data.task"):
        infer_task_type({"foo": 1})
    with pytest.raises(DataError, match="valid"):
        get_task("nope")
    assert {"instruction", "gsm8k", "commonsense", "mmlu", "classification", "math"} <= set(TASK_TYPES)

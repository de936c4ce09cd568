"""The FlowerTune LLM leaderboard's evaluation sets by name, with the leaderboard's own prompts and scoring.

Tracks (``fedpeft eval --suite finance|medical|general``; the code track is suite ``code``):

| track | set | data (hub id; or a local file) | scored as |
|---|---|---|---|
| finance | fpb | takala/financial_phrasebank sentences_50agree, train; the leaderboard's 25 % test split (seed 42) | sentiment by keyword |
| finance | fiqa | pauri32/fiqa-2018, train + validation + test concatenated; 25 % test split (seed 42); label from ``sentiment_score`` | sentiment by keyword |
| finance | tfns | zeroshot/twitter-financial-news-sentiment, validation | sentiment by keyword |
| medical | pubmedqa | bigbio/pubmed_qa pubmed_qa_labeled_fold0_source, test | yes / no / maybe |
| medical | medmcqa | medmcqa, validation | letter A-D |
| medical | medqa | bigbio/med_qa med_qa_en_4options_source, test | letter A-D |
| medical | careqa | HPAI-BSC/CareQA CareQA_en, test | letter A-D |
| general | mmlu_stem, mmlu_social_sciences, mmlu_humanities | MMLU test (the built-in ``mmlu``), one category each | letter A-D |

Finance (the leaderboard's ``finance/`` evaluation): the prompt is ``Instruction: ...\\nInput: ...\\nAnswer: ``
(no chat template), greedy generation, and the generated text is mapped to a label by keyword:
``positive`` if it contains "positive"/"Positive", else ``negative`` if it contains "negative"/"Negative",
else ``neutral``; the gold label goes through the same mapping; the score is accuracy.

Medical and general (the ``medical/`` and ``general-nlp/`` evaluations, prompts after Meditron's): an
instruction, the question (``Question: ...\\n\\nOptions:\\nA. ...``) or PubMedQA's contexts and question, then
``The answer is:``, wrapped as ``<|im_start|>question\\n...<|im_end|>\\n<|im_start|>answer\\n``. Greedy
generation of as many tokens as the gold answer of the first record of each block of ``block_size``
(16, the leaderboard's batch size) records has, in data order. The answer is read by
``medical_answer``: lower-cased, non-alphanumerics turned to spaces; for multiple choice its first
character, for yes/no a few doubled forms folded; a result outside a-e / yes / no leaves the raw output,
which then matches the gold only if identical. Accuracy over all records.

What differs from the leaderboard's scripts: generation is batched with left padding here (the scripts
generate one prompt at a time; greedy decoding gives the same tokens up to floating-point ties), no BOS
token is added, and finance continuations stop after ``max_new_tokens`` (default 32) rather than at 512
tokens of prompt + answer (``--max-new-tokens`` raises it; a tuned model ends with EOS well before). The
leaderboard evaluates a 4-bit quantised base; that is ``--dtype``/the model's business, not this module's.

Local data: ``<data_dir>/flowertune/<set>.<jsonl|json|csv|parquet>`` or ``<data_dir>/<set>.<...>`` with the hub
dataset's own columns, rows in the hub's order (FiQA: train, validation, test concatenated); the
leaderboard's 25 % split is applied to fpb and fiqa as to the hub data. ``bigbio/*`` are loading-script
datasets that current ``datasets`` no longer runs: export them once with an older ``datasets`` to jsonl.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedpeft.data.benchmarks import BenchmarkDataMissing, hub_reachable, load_benchmark, stratified_sample
from fedpeft.data.sources import DataError, Record, hub_offline, load_hub, read_file
from fedpeft.data.tasks import MMLU_CATEGORIES
from fedpeft.evaluation.generation import generate

# --- prompts ----------------------------------------------------------------------------------------------
FINANCE_NEWS = "What is the sentiment of this news? Please choose an answer from {negative/neutral/positive}."
FINANCE_TWEET = "What is the sentiment of this tweet? Please choose an answer from {negative/neutral/positive}."
MEDICAL_INSTRUCTIONS = {  # Meditron's evaluation instructions, as the leaderboard uses them
    "pubmedqa": "As an expert doctor in clinical science and medical knowledge, can you tell me if the following "
                "statement is correct? Answer yes, no, or maybe.",
    "medqa": "You are a medical doctor taking the US Medical Licensing Examination. You need to demonstrate your "
             "understanding of basic and clinical science, medical knowledge, and mechanisms underlying health, "
             "disease, patient care, and modes of therapy. Show your ability to apply the knowledge essential for "
             "medical practice. For the following multiple-choice question, select one correct answer from A to E. "
             "Base your answer on the current and standard practices referenced in medical guidelines.",
    "medmcqa": "You are a medical doctor answering realworld medical entrance exam questions. Based on your "
               "understanding of basic and clinical science, medical knowledge, and mechanisms underlying health, "
               "disease, patient care, and modes of therapy, answer the following multiple-choice question. Select "
               "one correct answer from A to D. Base your answer on the current and standard practices referenced "
               "in medical guidelines.",
}
MEDICAL_INSTRUCTIONS["careqa"] = MEDICAL_INSTRUCTIONS["medmcqa"]
GENERAL_INSTRUCTION = "Answer the following multiple choice question."
# The leaderboard's MMLU categories: the usual ones (data.tasks.MMLU_CATEGORIES) with anatomy under STEM.
FLOWERTUNE_MMLU = {
    "stem": (*MMLU_CATEGORIES["stem"], "anatomy"),
    "social_sciences": MMLU_CATEGORIES["social_sciences"],
    "humanities": MMLU_CATEGORIES["humanities"],
}
LEADERBOARD_TEST_SIZE, LEADERBOARD_SEED = 0.25, 42
BLOCK_SIZE = 16


def finance_prompt(instruction: str, text: str) -> str:
    prompt = f"Instruction: {instruction}\n"
    if text:
        prompt += f"Input: {text}\n"
    return prompt + "Answer: "


def question_with_options(question: str, options: Sequence[str]) -> str:
    if not question.endswith("?") and not question.endswith("."):
        question += "?"
    return "Question: " + question + "\n\nOptions:\n" + "\n".join(f"{chr(65 + i)}. {o}" for i, o in enumerate(options))


def chat_wrapped(instruction: str, body: str) -> str:
    return f"<|im_start|>question\n{instruction}\n{body}\nThe answer is:\n<|im_end|>\n<|im_start|>answer\n"


# --- scoring (pure) ------------------------------------------------------------------------------------------
def sentiment_of(text: str) -> str:
    """The leaderboard's keyword mapping: positive before negative, neutral otherwise."""
    if "positive" in text or "Positive" in text:
        return "positive"
    if "negative" in text or "Negative" in text:
        return "negative"
    return "neutral"


def finance_correct(output: str, gold: str) -> bool:
    return sentiment_of(output) == sentiment_of(gold)


def _fold_boolean(text: str) -> str:
    for doubled, single in (("yesyes", "yes"), ("nono", "no"), ("yesno", "yes"), ("noyes", "no")):
        if doubled in text:
            return text.replace(doubled, single)  # only the first doubled form that occurs, as the leaderboard
    return text


def medical_answer(output: str, gold: str, answer_type: str) -> tuple[str, str]:
    """(prediction, gold) as the leaderboard compares them; both are lower-cased first."""
    output_full, answer = output.lower(), gold.lower()
    text = output_full
    if "\n##" in text:
        text = text.split("\n##")[1].split("\n")[0].strip().lower()
    if "###" in answer:
        if "answer is:" not in answer:
            return output_full, answer
        answer = answer.split("answer is:")[1].split("###")[0].strip()
    text = re.sub(" +", " ", re.sub(r"[^a-zA-Z0-9]", " ", text).strip())
    if answer_type == "boolean":
        text = _fold_boolean(text)
    text = text.encode("ascii", "ignore").decode("ascii")
    if answer_type == "mcq" and text:
        text = text[0]
    if text in ("a", "b", "c", "d", "e", "yes", "no"):
        return text, answer
    return output_full, answer


def is_correct(output: str, gold: str, answer_type: str) -> bool:
    if answer_type == "sentiment":
        return finance_correct(output, gold)
    prediction, answer = medical_answer(output, gold, answer_type)
    return prediction == answer


# --- records -> items ----------------------------------------------------------------------------------------
FPB_LABELS = {0: "negative", 1: "neutral", 2: "positive"}
TFNS_LABELS = {0: "negative", 1: "positive", 2: "neutral"}


def _label(value: Any, names: dict[int, str]) -> str:
    if isinstance(value, str) and not value.strip().lstrip("-").isdigit():
        return value.strip().lower()
    return names[int(value)]


def fiqa_label(score: float) -> str:
    return "negative" if score < -0.1 else "neutral" if score < 0.1 else "positive"


def _fpb(row: Record) -> dict:
    return {"prompt": finance_prompt(FINANCE_NEWS, str(row["sentence"])), "gold": _label(row["label"], FPB_LABELS)}


def _fiqa(row: Record) -> dict:
    instruction = FINANCE_TWEET if row.get("format") == "post" else FINANCE_NEWS
    return {"prompt": finance_prompt(instruction, str(row["sentence"])), "gold": fiqa_label(float(row["sentiment_score"]))}


def _tfns(row: Record) -> dict:
    return {"prompt": finance_prompt(FINANCE_TWEET, str(row["text"])), "gold": _label(row["label"], TFNS_LABELS)}


def _pubmedqa(row: Record) -> dict:
    contexts = row["CONTEXTS"] if isinstance(row["CONTEXTS"], list) else [str(row["CONTEXTS"])]
    return {"prompt": chat_wrapped(MEDICAL_INSTRUCTIONS["pubmedqa"], "\n".join(contexts) + f"\n{row['QUESTION']}"),
            "gold": str(row["final_decision"])}


def _medqa(row: Record) -> dict:
    options = row["options"]
    gold = next((o["key"] for o in options if o["value"] == row["answer"]), row.get("answer_idx"))
    return {"prompt": chat_wrapped(MEDICAL_INSTRUCTIONS["medqa"],
                                   question_with_options(str(row["question"]), [o["value"] for o in options])),
            "gold": gold}


def _lettered(name: str, keys: tuple[str, ...], offset: int) -> Callable[[Record], dict]:
    def item(row: Record) -> dict:
        index = int(row["cop"]) - offset
        return {"prompt": chat_wrapped(MEDICAL_INSTRUCTIONS[name],
                                       question_with_options(str(row["question"]), [str(row[k]) for k in keys])),
                "gold": chr(65 + index) if 0 <= index < len(keys) else None}
    return item


def _mmlu(row: Record) -> dict:
    options = [str(row[k]) for k in "ABCD"] if "A" in row else [str(c) for c in row["choices"]]
    answer = row["answer"]
    gold = answer.strip().upper() if isinstance(answer, str) and answer.strip().isalpha() else "ABCD"[int(answer)]
    return {"prompt": chat_wrapped(GENERAL_INSTRUCTION, question_with_options(str(row["question"]), options)),
            "gold": gold, "subject": row.get("subject", "")}


@dataclass(frozen=True)
class FlowerTuneSet:
    name: str
    track: str
    answer_type: str  # sentiment | mcq | boolean
    item: Callable[[Record], dict]
    hub_id: str | None = None
    hub_config: str | None = None
    hub_splits: tuple[str, ...] = ("test",)  # concatenated in this order
    holdout: bool = False  # the leaderboard's train_test_split(0.25, seed=42)["test"]
    mmlu_category: str | None = None


SETS: dict[str, FlowerTuneSet] = {s.name: s for s in [
    FlowerTuneSet("fpb", "finance", "sentiment", _fpb, "takala/financial_phrasebank", "sentences_50agree",
                  ("train",), holdout=True),
    FlowerTuneSet("fiqa", "finance", "sentiment", _fiqa, "pauri32/fiqa-2018", None,
                  ("train", "validation", "test"), holdout=True),
    FlowerTuneSet("tfns", "finance", "sentiment", _tfns, "zeroshot/twitter-financial-news-sentiment", None,
                  ("validation",)),
    FlowerTuneSet("pubmedqa", "medical", "boolean", _pubmedqa, "bigbio/pubmed_qa", "pubmed_qa_labeled_fold0_source"),
    FlowerTuneSet("medmcqa", "medical", "mcq", _lettered("medmcqa", ("opa", "opb", "opc", "opd"), 0), "medmcqa",
                  None, ("validation",)),
    FlowerTuneSet("medqa", "medical", "mcq", _medqa, "bigbio/med_qa", "med_qa_en_4options_source"),
    FlowerTuneSet("careqa", "medical", "mcq", _lettered("careqa", ("op1", "op2", "op3", "op4"), 1),
                  "HPAI-BSC/CareQA", "CareQA_en"),
    *[FlowerTuneSet(f"mmlu_{c}", "general", "mcq", _mmlu, mmlu_category=c) for c in FLOWERTUNE_MMLU],
]}
TRACKS = {track: [s.name for s in SETS.values() if s.track == track] for track in ("finance", "medical", "general")}


# --- data ----------------------------------------------------------------------------------------------------
def leaderboard_test_indices(n: int) -> list[int]:
    """The rows of ``datasets``' ``train_test_split(test_size=0.25, seed=42)["test"]`` for ``n`` rows (the
    library's own split, so the indices are the leaderboard's)."""
    from datasets import Dataset  # the optional hub extra; only the sets with a leaderboard split need it

    split = Dataset.from_dict({"i": list(range(n))}).train_test_split(test_size=LEADERBOARD_TEST_SIZE,
                                                                      seed=LEADERBOARD_SEED)
    return list(split["test"]["i"])


SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


def _local_file(name: str, data_dir: str | Path | None) -> Path | None:
    if data_dir is None:
        return None
    root = Path(data_dir)
    for folder in (root / "flowertune", root):
        for suffix in SUFFIXES:
            if (folder / f"{name}{suffix}").is_file():
                return folder / f"{name}{suffix}"
    return None


def load_rows(spec: FlowerTuneSet, data_dir: str | Path | None) -> list[Record]:
    """The set's rows: a local file when there is one, else the hub (``BenchmarkDataMissing`` saying where
    it looked when neither loads)."""
    if spec.mmlu_category is not None:
        subjects = set(FLOWERTUNE_MMLU[spec.mmlu_category])
        return [r for r in load_benchmark("mmlu", ("test",), data_dir) if str(r.get("subject", "")).strip() in subjects]
    path = _local_file(spec.name, data_dir)
    if path is not None:
        return read_file(path)
    if not (hub_offline() or hub_reachable()):
        raise BenchmarkDataMissing(f"{spec.name}: no {spec.name}.jsonl/.json/.csv/.parquet under "
                                   f"{data_dir or '(no data dir)'}[/flowertune], and huggingface.co is unreachable "
                                   f"for {spec.hub_id}")
    try:
        return [row for split in spec.hub_splits for row in load_hub(spec.hub_id, spec.hub_config, split)]
    except DataError as exc:
        raise BenchmarkDataMissing(str(exc)) from None


def leaderboard_items(spec: FlowerTuneSet, rows: Sequence[Record]) -> list[dict]:
    """Prompts and gold answers in the leaderboard's order (its 25 % test split where it takes one); rows
    without a gold answer (MedMCQA's cop out of range) are left out."""
    if spec.holdout:
        rows = [rows[i] for i in leaderboard_test_indices(len(rows))]
    items = [spec.item(row) for row in rows]
    return [it for it in items if it["gold"] is not None]


# --- running -------------------------------------------------------------------------------------------------
def gold_token_budgets(items: Sequence[dict], tokenizer, block: int = BLOCK_SIZE) -> list[int]:
    """Per item, the new tokens it may generate: the token count of the gold answer of the first item of
    its block of ``block`` (the leaderboard's batch) in data order."""
    budgets = []
    for start in range(0, len(items), block):
        chunk = items[start:start + block]
        n = max(1, len(tokenizer(str(chunk[0]["gold"]), add_special_tokens=False)["input_ids"]))
        budgets += [n] * len(chunk)
    return budgets


def score_items(items: Sequence[dict], outputs: Sequence[str], answer_type: str) -> list[float]:
    return [float(is_correct(out, str(it["gold"]), answer_type)) for it, out in zip(items, outputs)]


def run_set(model, tokenizer, name: str, data_dir: str | Path | None = None, limit: int | None = None, seed: int = 0,
            batch_size: int = 16, max_new_tokens: int | None = None,
            generate_fn: Callable[..., list[str]] | None = None) -> dict:
    """Evaluate one set: ``{"metrics": {"acc", ...}, "examples", "seconds", "samples", "scores"}``.
    ``limit``: a seeded sample stratified by gold answer (the full set is the leaderboard's number)."""
    generate_fn = generate_fn or generate
    spec = SETS[name]
    items = leaderboard_items(spec, load_rows(spec, data_dir))
    items = stratified_sample(items, limit, seed, key=lambda it: str(it["gold"]))
    start = time.perf_counter()
    if spec.answer_type == "sentiment":
        outputs = generate_fn(model, tokenizer, [it["prompt"] for it in items], max_new_tokens=max_new_tokens or 32,
                              batch_size=batch_size)
    else:
        budgets = ([max_new_tokens] * len(items) if max_new_tokens else gold_token_budgets(items, tokenizer))
        outputs = [""] * len(items)
        for budget in sorted(set(budgets)):
            idx = [i for i, b in enumerate(budgets) if b == budget]
            for i, out in zip(idx, generate_fn(model, tokenizer, [items[i]["prompt"] for i in idx],
                                               max_new_tokens=budget, batch_size=batch_size)):
                outputs[i] = out
    scores = score_items(items, outputs, spec.answer_type)
    metrics = {"acc": sum(scores) / len(scores) if scores else math.nan}
    samples = [{"output": o, "gold": it["gold"]} for it, o in list(zip(items, outputs))[:3]]
    return {"metrics": metrics, "examples": len(items), "seconds": time.perf_counter() - start, "samples": samples,
            "scores": scores}

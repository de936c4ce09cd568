"""Prompt templates and completion-only tokenisation.

A record becomes (prompt text, target text); the model sees prompt + target + end-of-sequence, and the
loss covers only the target tokens (labels of the prompt are -100). When an example is too long the
prompt is cut from the left (its end, next to the answer, is kept); a target that cannot fit whole is
never cut: the example is dropped and counted, and the caller reports the count.

For a classification head (``model.head=classification``) a record becomes its text (``head_text``, else
instruction and input; cut from the right at ``max_len`` as encoders usually are) and the index of its target in the
experiment's class list (the sorted distinct targets: SST-2's "negative"/"positive", a generated task's
answers); the model's own cross-entropy over its head is the loss.

For an encoder-decoder (``model.head=seq2seq``, T5) the encoder reads the prompt + end-of-sequence (as T5's
tokenizer writes an input; cut from the left to ``max_len``) and the decoder's labels are the target +
end-of-sequence, every one supervised (the model shifts them right itself to make the decoder's input).
A target longer than ``max_len`` is dropped and counted as for a causal LM. Batches pad the two sides
separately: the prompt with the pad id (attention mask 0), the labels with -100.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

IGNORE_INDEX = -100

ALPACA_TEMPLATE = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
ALPACA_TEMPLATE_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)


def format_prompt(record: dict, template: str, tokenizer) -> str:
    """The text the model is conditioned on for ``record`` (fields: instruction, optional input/context)."""
    instruction = record["instruction"]
    extra = record.get("input") or record.get("context") or ""
    if template == "alpaca":
        return (ALPACA_TEMPLATE_WITH_INPUT if extra else ALPACA_TEMPLATE).format(instruction=instruction, input=extra)
    if template == "chat":
        if getattr(tokenizer, "chat_template", None) is None:  # T5's tokenizer, for one
            name = getattr(tokenizer, "name_or_path", "")
            raise ValueError(f"data.template=chat: the tokenizer of this model ({name!r}) has no chat template; "
                             "use data.template=plain or alpaca")
        content = f"{instruction}\n\n{extra}" if extra else instruction
        return tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True)
    if template == "plain":
        return f"{instruction}\n{extra}\n" if extra else f"{instruction}\n"
    raise ValueError(f"data.template: unknown template '{template}'; valid: chat, alpaca, plain")


@dataclass
class EncodedExample:
    input_ids: list[int]
    labels: list[int]
    """Per token (-100 where no loss); for a classification example, one element: the class index; for a
    seq2seq example, the decoder's target tokens (their own length, not input_ids')."""
    is_class: bool = False
    seq2seq: bool = False


def classification_text(record: dict) -> str:
    """What an encoder classifier reads: a classification task's ``head_text`` (the input text alone:
    a head needs no instruction, and one would take room from the text), else the instruction and, when
    present, the input or context (the generated tasks, whose text is in the instruction)."""
    if record.get("head_text"):
        return record["head_text"]
    extra = record.get("input") or record.get("context") or ""
    return f"{record['instruction']}\n{extra}" if extra else record["instruction"]


def class_index(record: dict, classes: Sequence[str]) -> int:
    try:
        return list(classes).index(record["output"])
    except ValueError:
        raise ValueError(f"record target {record['output']!r} is not one of the classes {list(classes)[:10]}") from None


def encode_classification(record: dict, tokenizer, classes: Sequence[str], max_len: int) -> EncodedExample:
    ids = tokenizer(classification_text(record), truncation=True, max_length=max_len)["input_ids"]
    return EncodedExample(ids, [class_index(record, classes)], is_class=True)


def encode_example(prompt: str, target: str, tokenizer, max_len: int) -> EncodedExample | None:
    """Tokens of prompt + target + eos, labels only on target + eos; None when the target cannot fit."""
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    target_ids = tokenizer(target, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    if len(target_ids) >= max_len:
        return None
    room = max_len - len(target_ids)
    if len(prompt_ids) > room:
        prompt_ids = prompt_ids[len(prompt_ids) - room:]
    return EncodedExample(prompt_ids + target_ids, [IGNORE_INDEX] * len(prompt_ids) + target_ids)


def encoder_ids(prompt: str, tokenizer, max_len: int | None = None) -> list[int]:
    """An encoder-decoder's input: the prompt's tokens + eos, the prompt cut from the left to fit ``max_len``
    (training and generation both build it here)."""
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    if max_len is not None and len(ids) > max_len - 1:
        ids = ids[len(ids) - (max_len - 1):]
    return ids + [tokenizer.eos_token_id]


def encode_seq2seq_example(prompt: str, target: str, tokenizer, max_len: int) -> EncodedExample | None:
    """Encoder input (:func:`encoder_ids`) and decoder labels target + eos; None when the target cannot fit."""
    target_ids = tokenizer(target, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    if len(target_ids) > max_len:
        return None
    return EncodedExample(encoder_ids(prompt, tokenizer, max_len), target_ids, seq2seq=True)


def encode_records(records: Sequence[dict], tokenizer, template: str, max_len: int,
                   classes: Sequence[str] | None = None,
                   seq2seq: bool = False) -> tuple[list[EncodedExample | None], int]:
    """Encode every record (None where dropped) and return how many were dropped; with ``classes``,
    as classification examples (none dropped: the text is truncated instead); with ``seq2seq``, as
    encoder input + decoder labels."""
    if classes is not None:
        return [encode_classification(r, tokenizer, classes, max_len) for r in records], 0
    encode = encode_seq2seq_example if seq2seq else encode_example
    encoded = [encode(format_prompt(r, template, tokenizer), r["output"], tokenizer, max_len) for r in records]
    return encoded, sum(e is None for e in encoded)


def collate(examples: Sequence[EncodedExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch: input_ids, attention_mask, labels (padding labelled -100; for classification
    examples, labels is one class index per row; for seq2seq examples, labels padded to their own width)."""
    if examples[0].seq2seq:
        return collate_seq2seq(examples, pad_id)
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    per_row = examples[0].is_class
    labels = (torch.tensor([e.labels[0] for e in examples]) if per_row
              else torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long))
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids)
        mask[row, :n] = 1
        if not per_row:
            labels[row, :n] = torch.tensor(e.labels)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def collate_seq2seq(examples: Sequence[EncodedExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Encoder side right-padded with ``pad_id`` (attention mask 0 there), decoder labels right-padded with -100."""
    width = max(len(e.input_ids) for e in examples)
    target_width = max(len(e.labels) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), target_width), IGNORE_INDEX, dtype=torch.long)
    for row, e in enumerate(examples):
        ids[row, :len(e.input_ids)] = torch.tensor(e.input_ids)
        mask[row, :len(e.input_ids)] = 1
        labels[row, :len(e.labels)] = torch.tensor(e.labels)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}

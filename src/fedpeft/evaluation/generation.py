"""Batched greedy generation with left padding, and the generation evaluator on (prompt, answer) records."""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Sequence

import torch
from peft import PeftType

from fedpeft.adapters import is_prompt_learning
from fedpeft.data.encoding import encoder_ids, format_prompt
from fedpeft.data.tasks import ExactMatchTask
from fedpeft.evaluation.extraction import normalize_answer  # noqa: F401  (re-exported: its old home)
from fedpeft.evaluation.kv_cache import cache_argument, returned_cache
from fedpeft.models.family import model_is_encoder_decoder


@torch.no_grad()
def generate(model, tokenizer, prompts: Sequence[str], max_new_tokens: int = 32, batch_size: int = 16,
             stop: Sequence[str] | None = None) -> list[str]:
    """Greedy continuations of ``prompts`` (decoded, special tokens removed). Batches are built from
    prompts sorted by length so that little compute goes to padding; results come back in input order.
    Decoding uses the KV cache. ``stop`` strings end a sequence early (``### Instruction`` for the Alpaca
    template, say) and are cut from the text with whatever follows them.

    One batch is decoded by the model family's decoder: a causal LM by ``model.generate``
    (:func:`_decode_causal`); a prompt-learning adapter (prompt, P- or prefix tuning) by
    :func:`_decode_prompt_learning` (cached and batched too): peft's own ``generate`` with these types does
    not match the model's forward under transformers 5.24 (it repeats the virtual tokens at every step, or
    drops the prefix); an encoder-decoder (T5) by :func:`_decode_seq2seq`: the encoder reads the prompt,
    the answer is the decoder's whole output (no prompt to strip)."""
    if model_is_encoder_decoder(model):
        decode = _decode_seq2seq_by_forwards if _is_prefix_tuning(model) else _decode_seq2seq
    elif is_prompt_learning(model):
        decode = _decode_prompt_learning
    else:
        decode = _decode_causal
    was_training, previous_side = model.training, tokenizer.padding_side
    model.eval()
    tokenizer.padding_side = "left"  # the causal decoders pad on the left; the seq2seq ones build their rows
    device = next(model.parameters()).device
    outputs: list[str] = [""] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    try:
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            texts = decode(model, tokenizer, [prompts[i] for i in idx], max_new_tokens, stop, device)
            for i, text in zip(idx, texts):
                outputs[i] = _cut_at_stop(text, stop) if stop else text
    finally:
        tokenizer.padding_side = previous_side
        model.train(was_training)
    return outputs


def _stop_kwargs(tokenizer, stop: Sequence[str] | None) -> dict:
    return {"stop_strings": list(stop), "tokenizer": tokenizer} if stop else {}


def _decode_causal(model, tokenizer, prompts: list[str], max_new_tokens: int, stop, device) -> list[str]:
    """One left-padded batch through ``model.generate``; the new tokens only."""
    batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    batch = {key: value.to(device) for key, value in batch.items()}
    generated = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                               pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                               **_stop_kwargs(tokenizer, stop))
    return tokenizer.batch_decode(generated[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)


def _decode_prompt_learning(model, tokenizer, prompts: list[str], max_new_tokens: int, stop, device) -> list[str]:
    """One batch of a prompt-learning adapter, greedy with a KV cache, left-padded. It calls the base
    model the way peft's forward does, with the positions peft's own (unpadded) forward uses:

    - prompt / P-tuning: the prompt encoder's virtual embeddings (``get_prompt``) before the prompt's token
      embeddings, positions 0..L-1 for the L virtual tokens and L.. for the prompt's tokens; later steps
      feed one token and reuse the cache, which holds the virtual tokens' keys and values;
    - prefix tuning: the learned key/value prefix (``get_prompt``: a ``DynamicCache`` of L entries per
      layer) is the cache the prompt is read against, tokens at positions L..; later steps extend it.

    Left padding sits between the virtual tokens and the prompt (the attention mask hides it) and the
    positions skip it, so each row is read as if alone. Peft's ``generate`` is not used: peft 0.21 looks
    for generate's cache under ``past_key_values``, which transformers 5.24 renamed ``cache``; finding none,
    it treats every step as the first: prompt / P-tuning put the L virtual embeddings before each new
    token again (the cache gains L + 1 entries a step), and prefix tuning's prefix, passed as
    ``past_key_values`` beside generate's own ``cache``, is never read (docs/peft_types.md)."""
    base = model.get_base_model()
    config = model.active_peft_config
    n_virtual = config.num_virtual_tokens
    cache_arg = cache_argument(base)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    ids = batch["input_ids"].to(device)
    rows = ids.shape[0]
    mask = torch.cat([torch.ones(rows, n_virtual, dtype=torch.long, device=device),
                      batch["attention_mask"].to(device).long()], dim=1)
    # virtual tokens 0..L-1, the prompt's tokens L.. in every row (padding gets a masked dummy)
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
    if config.peft_type == PeftType.PREFIX_TUNING:
        out = base(input_ids=ids, attention_mask=mask, position_ids=positions[:, n_virtual:],
                   use_cache=True, **{cache_arg: model.get_prompt(rows)})
    else:
        embeds = model.word_embeddings(ids)
        embeds = torch.cat([model.get_prompt(rows).to(embeds.dtype), embeds], dim=1)
        out = base(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=True)
    last = positions[:, -1:]
    new = torch.empty(rows, 0, dtype=torch.long, device=device)
    done = torch.zeros(rows, dtype=torch.bool, device=device)
    for step in range(max_new_tokens):
        token = out.logits[:, -1].argmax(dim=-1)
        token = torch.where(done, torch.full_like(token, pad_id), token)
        new = torch.cat([new, token[:, None]], dim=1)
        done |= token == tokenizer.eos_token_id
        if stop:
            done |= torch.tensor([any(s in tokenizer.decode(r, skip_special_tokens=True) for s in stop)
                                  for r in new], device=device)
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        mask = torch.cat([mask, torch.ones(rows, 1, dtype=mask.dtype, device=device)], dim=1)
        last = last + 1
        out = base(input_ids=token[:, None], attention_mask=mask, position_ids=last, use_cache=True,
                   **{cache_arg: returned_cache(out)})
    return tokenizer.batch_decode(new, skip_special_tokens=True)


@torch.no_grad()
def generate_by_full_forwards(model, tokenizer, prompts: Sequence[str], max_new_tokens: int,
                              stop: Sequence[str] | None = None) -> list[str]:
    """Greedy decoding by full forwards of ``model`` (peft's own forward for an adapter), one prompt at a
    time, no padding and no KV cache: each new token is the argmax of exactly what the model computes
    for prompt + tokens so far. The reference the cached decoding is checked against (tests) and timed
    against (bench/prompt_generation.py); one forward over the whole sequence per new token."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        outputs = []
        for prompt in prompts:
            ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"].to(device)
            text = _greedy_by_full_forwards(
                lambda seq: model(input_ids=seq, attention_mask=torch.ones_like(seq)).logits, ids, tokenizer,
                max_new_tokens, stop)
            outputs.append(_cut_at_stop(text, stop) if stop else text)
    finally:
        model.train(was_training)
    return outputs


def _greedy_by_full_forwards(logits_of, prefix: torch.Tensor, tokenizer, max_new_tokens: int,
                             stop: Sequence[str] | None) -> str:
    """Extend ``prefix`` (1 x n) by the argmax of ``logits_of(sequence so far)`` until eos, a stop string or
    ``max_new_tokens``; the text of what was added (not yet cut at the stop string)."""
    start, seq = prefix.shape[1], prefix
    for _ in range(max_new_tokens):
        token = logits_of(seq)[:, -1].argmax(dim=-1, keepdim=True)
        seq = torch.cat([seq, token], dim=1)
        if int(token) == tokenizer.eos_token_id:
            break
        if stop and any(s in tokenizer.decode(seq[0, start:], skip_special_tokens=True) for s in stop):
            break
    return tokenizer.decode(seq[0, start:], skip_special_tokens=True)


def _decode_seq2seq(model, tokenizer, prompts: list[str], max_new_tokens: int, stop, device) -> list[str]:
    """One batch of an encoder-decoder: each encoder input is the prompt + eos (``encoder_ids``, as in
    training), right-padded with its attention mask; ``generate`` decodes from the decoder's start token,
    which is dropped, up to ``max_new_tokens`` or eos. Prompt and P-tuning go through peft's seq2seq
    ``generate`` (virtual tokens prepended to the encoder's input), which matches its forward; for prefix
    tuning peft's cached ``generate`` does not (peft 0.21, transformers 5.24), so :func:`generate` uses
    :func:`_decode_seq2seq_by_forwards` (both checked in tests/test_seq2seq.py)."""
    pad = tokenizer.pad_token_id
    rows = [encoder_ids(prompt, tokenizer) for prompt in prompts]
    width = max(len(r) for r in rows)
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows], device=device)
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=device)
    generated = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                               pad_token_id=pad, eos_token_id=tokenizer.eos_token_id, **_stop_kwargs(tokenizer, stop))
    return tokenizer.batch_decode(generated[:, 1:], skip_special_tokens=True)


def _is_prefix_tuning(model) -> bool:
    configs = getattr(model, "peft_config", None)
    config = configs.get(getattr(model, "active_adapter", "default")) if isinstance(configs, dict) else None
    return getattr(config, "peft_type", None) == PeftType.PREFIX_TUNING


def _decode_seq2seq_by_forwards(model, tokenizer, prompts: list[str], max_new_tokens: int, stop,
                                device) -> list[str]:
    """An encoder-decoder by full forwards (no cache), one prompt at a time: each new token is the argmax
    of what the model computes for the encoder input and the decoder tokens so far, exactly as in training."""
    start = torch.tensor([[model.config.decoder_start_token_id]], device=device)
    outputs = []
    for prompt in prompts:
        ids = torch.tensor([encoder_ids(prompt, tokenizer)], device=device)
        outputs.append(_greedy_by_full_forwards(
            lambda decoded: model(input_ids=ids, attention_mask=torch.ones_like(ids), decoder_input_ids=decoded).logits,
            start, tokenizer, max_new_tokens, stop))
    return outputs


def _cut_at_stop(text: str, stop: Sequence[str]) -> str:
    cuts = [text.find(s) for s in stop if s and s in text]
    return text[:min(cuts)] if cuts else text


def group_key(group_by: str | None):
    """record -> its reporting group: the ``group_by`` field when the record has it, else its task."""
    return lambda r: str(r[group_by]) if group_by and r.get(group_by) not in (None, "") else r["task"]


def first_per_group(records: Sequence[dict], group_of, max_examples: int | None) -> list[dict]:
    """The first ``max_examples`` records of every group, in their original order (all when None)."""
    chosen: list[dict] = []
    count: dict[str, int] = defaultdict(int)
    for r in records:
        if max_examples is None or count[group_of(r)] < max_examples:
            count[group_of(r)] += 1
            chosen.append(r)
    return chosen


def generation_eval(model, tokenizer, records: Sequence[dict], template: str, score=None, metric_name=None,
                    max_new_tokens: int = 16, batch_size: int = 16, max_examples: int | None = None,
                    group_by: str | None = None, stop: Sequence[str] | None = None) -> dict:
    """Greedy generation on every record, scored per group and overall. Per-round evaluation and the
    suites' generation evaluator both come through here, grading with the records' ``Task.score``.

    ``score(prediction, record) -> float`` defaults to ``ExactMatchTask`` (exact match after
    ``normalize_answer``);
    ``metric_name(task) -> str`` names the metric (default ``exact_match``). Records are grouped by
    their ``task`` or, when ``group_by`` names a field the record has, by that field (Dolly's
    ``category``: one dataset, eight tasks). Per group the first ``max_examples`` records are used
    (all when None)."""
    start = time.perf_counter()
    score = score or ExactMatchTask().score
    metric_name = metric_name or (lambda task: "exact_match")
    group_of = group_key(group_by)
    chosen = first_per_group(records, group_of, max_examples)
    prompts = [format_prompt(r, template, tokenizer) for r in chosen]
    predictions = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size, stop=stop)
    scores = [float(score(pred, r)) for r, pred in zip(chosen, predictions)]
    result = scored_result(chosen, predictions, scores, group_of, metric_name, start)
    result.update(records=chosen, predictions=predictions, scores=scores)  # per record, for callers that need them
    return result


def scored_result(chosen: Sequence[dict], predictions: Sequence[str], scores: Sequence[float], group_of, metric_name,
                  start: float, default_metric: str = "score") -> dict:
    """The evaluation result every evaluator returns: the mean score per group (named by the group's
    metric) and overall (named by the one metric, or ``default_metric`` when groups differ), the
    record count, seconds since ``start``, a few samples, and the headline metric's name."""
    by_group: dict[str, list[float]] = defaultdict(list)
    group_metric: dict[str, str] = {}
    for r, value in zip(chosen, scores):
        by_group[group_of(r)].append(value)
        group_metric[group_of(r)] = metric_name(r["task"])
    metrics = {f"{group}/{group_metric[group]}": sum(v) / len(v) for group, v in sorted(by_group.items())}
    names = set(group_metric.values())
    overall = names.pop() if len(names) == 1 else default_metric
    metrics[overall] = sum(scores) / max(1, len(scores))
    samples = [{"task": r["task"], "prompt": r["instruction"], "expected": r["output"], "predicted": p}
               for r, p in list(zip(chosen, predictions))[:: max(1, len(chosen) // 8)]]
    return {"metrics": metrics, "examples": len(chosen), "seconds": time.perf_counter() - start, "samples": samples,
            "headline": overall}


"""Log-likelihood evaluators: multiple choice (acc and acc_norm, as lm-evaluation-harness) and LM loss.

One primitive, :func:`score_continuations`, gives ``log p(continuation | context)`` for a batch of
(context, continuation) pairs; multiple choice, classification with verbalisers and held-out loss /
perplexity are all built on it.

Conventions follow lm-evaluation-harness so numbers are comparable:

* a pair is tokenised as ``tokens(context + continuation)`` split at ``len(tokens(context))`` after
  trailing whitespace of the context is moved onto the continuation (so ``"Answer: "``, ``"A"`` scores
  the token ``" A"``);
* an empty context is replaced by the BOS (or EOS) token so the first token has something to condition on;
* ``acc`` picks the option with the highest summed log-likelihood, ``acc_norm`` the highest
  log-likelihood divided by the option's length in characters;
* over-long inputs are truncated from the left, keeping the continuation.

Batches are left-padded (explicit ``position_ids``) so that every continuation ends at the last position,
and only the last ``max continuation length`` positions go through the LM head
(``logits_to_keep``), which saves most of the vocabulary projection on short answers.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class ContinuationScore:
    logprob: float  # sum of log p(token) over the continuation tokens
    num_tokens: int
    is_greedy: bool  # every continuation token is the argmax at its position


@dataclass
class MultipleChoiceItem:
    context: str
    choices: list[str]  # continuations, usually with a leading space
    gold: int
    id: str | None = None
    meta: dict = field(default_factory=dict)
    contexts: list[str] | None = None  # one context per choice (WinoGrande's partial scoring); else `context`

    def pairs(self) -> list[tuple[str, str]]:
        contexts = self.contexts if self.contexts is not None else [self.context] * len(self.choices)
        if len(contexts) != len(self.choices):
            raise ValueError(f"item {self.id}: {len(contexts)} contexts for {len(self.choices)} choices")
        return list(zip(contexts, self.choices))


@dataclass
class EvalResult:
    """What every evaluator returns: metrics (floats), how many examples, how long, per-example records."""

    metrics: dict[str, float | None]
    num_examples: int
    seconds: float
    records: list[dict] = field(default_factory=list)

    @property
    def examples_per_second(self) -> float:
        return self.num_examples / self.seconds if self.seconds > 0 else float("inf")


def _device(model: torch.nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:  # pragma: no cover
        return torch.device("cpu")


def _prefix_token(tokenizer) -> int:
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        token = getattr(tokenizer, name, None)
        if token is not None:
            return int(token)
    raise ValueError("tokenizer has no BOS, EOS or PAD token to condition an empty context on")


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of (context, continuation), split as lm-evaluation-harness does."""
    if not continuation:
        raise ValueError("cannot score an empty continuation")
    spaces = len(context) - len(context.rstrip())
    if spaces:
        continuation = context[-spaces:] + continuation
        context = context[:-spaces]
    if not context:
        cont = tokenizer(continuation, add_special_tokens=False)["input_ids"]
        return [_prefix_token(tokenizer)], list(cont)
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    ctx_len = len(tokenizer(context, add_special_tokens=False)["input_ids"])
    ctx, cont = list(whole[:ctx_len]), list(whole[ctx_len:])
    if not cont:  # the continuation merged into the context's last token: score that token instead
        ctx, cont = ctx[:-1], ctx[-1:]
        if not ctx:
            ctx = [_prefix_token(tokenizer)]
    return ctx, cont


def _forward_last_logits(model, input_ids, attention_mask, keep: int) -> torch.Tensor:
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    try:
        out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                    logits_to_keep=keep, use_cache=False)
        logits = out.logits
        if logits.shape[1] == keep:
            return logits
    except TypeError:  # a model whose forward has no logits_to_keep
        out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
        logits = out.logits
    return logits[:, -keep:]


def _score_rows(logprobs: torch.Tensor, cont: list[int]) -> tuple[float, bool]:
    """Sum of ``logprobs[k, cont[k]]`` and whether every ``cont[k]`` is the argmax of its row."""
    target = torch.tensor(cont, dtype=torch.long, device=logprobs.device)
    token_lp = logprobs.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    return float(token_lp.sum()), bool((logprobs.argmax(-1) == target).all())


def _left_padded(seqs: Sequence[Sequence[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(seq) for seq in seqs)
    input_ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, seq in enumerate(seqs):
        input_ids[row, width - len(seq):] = torch.tensor(seq, dtype=torch.long)
        attention_mask[row, width - len(seq):] = 1
    return input_ids, attention_mask


def _score_by_input(model, groups, pad, device, batch_size, scores) -> None:
    """One forward per distinct input ``(context + continuation)[:-1]``; left padding aligns the ends, so
    the last n kept positions predict the n continuation tokens of every pair read from that input."""
    inputs = sorted(groups, key=len, reverse=True)  # longest first: memory trouble shows at once
    for start in range(0, len(inputs), batch_size):
        batch = inputs[start:start + batch_size]
        input_ids, attention_mask = _left_padded(batch, pad)
        keep = max(len(cont) for seq in batch for _, cont in groups[seq])
        logits = _forward_last_logits(model, input_ids.to(device), attention_mask.to(device), keep)
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        for row, seq in enumerate(batch):
            for pair, cont in groups[seq]:
                total, greedy = _score_rows(logprobs[row, keep - len(cont):], cont)
                scores[pair] = ContinuationScore(total, len(cont), greedy)


def _score_by_context(model, contexts, pad, device, batch_size, scores) -> None:
    """Contexts read once, their KV cache repeated for each continuation: for options that share a long
    question and differ in several tokens (ARC, SIQA, HellaSwag texts) this saves most of the compute."""
    ordered = sorted(contexts, key=len, reverse=True)
    start = 0
    while start < len(ordered):
        batch, rows = [], 0
        while start < len(ordered) and (not batch or rows + len(contexts[ordered[start]]) <= batch_size):
            batch.append(ordered[start])
            rows += len(contexts[ordered[start]])
            start += 1
        input_ids, attention_mask = _left_padded(batch, pad)
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                    use_cache=True, logits_to_keep=1)
        first = torch.log_softmax(out.logits[:, -1].float(), dim=-1)  # predicts each continuation's first token
        owners = [(c, pair, cont) for c, ctx in enumerate(batch) for pair, cont in contexts[ctx]]
        rest = max(len(cont) for _, _, cont in owners) - 1
        later = None
        if rest > 0:
            cache = out.past_key_values
            index = torch.tensor([c for c, _, _ in owners], device=device)
            cache.reorder_cache(index)  # one cache row per continuation
            cont_ids = torch.full((len(owners), rest), pad, dtype=torch.long)
            cont_mask = torch.zeros((len(owners), rest), dtype=torch.long)
            for row, (_, _, cont) in enumerate(owners):
                cont_ids[row, :len(cont) - 1] = torch.tensor(cont[:-1], dtype=torch.long)
                cont_mask[row, :len(cont) - 1] = 1
            cont_ids, cont_mask = cont_ids.to(device), cont_mask.to(device)
            lengths = attention_mask.sum(-1)[index]
            positions = lengths.unsqueeze(-1) + torch.arange(rest, device=device).unsqueeze(0)
            out = model(input_ids=cont_ids, attention_mask=torch.cat([attention_mask[index], cont_mask], dim=1),
                        position_ids=positions, past_key_values=cache, use_cache=True)
            later = torch.log_softmax(out.logits.float(), dim=-1)
        for row, (c, pair, cont) in enumerate(owners):
            logprobs = first[c:c + 1] if later is None or len(cont) == 1 else \
                torch.cat([first[c:c + 1], later[row, :len(cont) - 1]], dim=0)
            total, greedy = _score_rows(logprobs, cont)
            scores[pair] = ContinuationScore(total, len(cont), greedy)


@torch.inference_mode()
def score_continuations(model, tokenizer, pairs: Sequence[tuple[str, str]], batch_size: int = 16,
                        max_length: int | None = None, share_context: bool = True) -> list[ContinuationScore]:
    """``log p(continuation | context)`` for every pair, batched; results in the input order.

    The model reads ``(context + continuation)[:-1]``. Pairs whose inputs are identical share one forward
    pass: options that differ only in their last token (`` A``/`` B``, `` yes``/`` no``, `` answer1``/
    `` answer2``) cost one sequence per question. With ``share_context``, a context with several distinct
    inputs (option texts) is read once and its KV cache reused for each option. ``max_length``
    (default: the model's ``max_position_embeddings``) bounds the input; longer inputs lose tokens from
    the left of the context.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if max_length is None:
        max_length = int(getattr(getattr(model, "config", None), "max_position_embeddings", 0) or 2048)
    encoded: dict[tuple[str, str], tuple[list[int], list[int]]] = {}
    for pair in pairs:
        if pair not in encoded:
            ctx, cont = encode_pair(tokenizer, *pair)
            if len(cont) > max_length:
                raise ValueError(f"continuation of {len(cont)} tokens does not fit max_length={max_length}")
            encoded[pair] = (ctx, cont)
    # input tokens -> [(pair, continuation)]; context tokens -> [(pair, continuation)] for cache sharing
    by_input: dict[tuple[int, ...], list] = {}
    by_context: dict[tuple[int, ...], list] = {}
    for pair, (ctx, cont) in encoded.items():
        by_input.setdefault(tuple((ctx + cont)[:-1][-max_length:]), []).append((pair, cont))
        by_context.setdefault(tuple(ctx), []).append((pair, cont))
    shared: dict[tuple[int, ...], list] = {}
    if share_context:
        for ctx, members in by_context.items():
            inputs = {ctx + tuple(cont[:-1]) for _, cont in members}
            if len(inputs) > 1 and len(ctx) + max(len(c) for _, c in members) - 1 <= max_length:
                shared[ctx] = members
        if shared:
            done = {pair for members in shared.values() for pair, _ in members}
            by_input = {key: kept for key, members in by_input.items()
                        if (kept := [(p, c) for p, c in members if p not in done])}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else _prefix_token(tokenizer)
    device = _device(model)
    was_training = model.training
    model.eval()
    scores: dict[tuple[str, str], ContinuationScore] = {}
    try:
        if by_input:
            _score_by_input(model, by_input, pad, device, batch_size, scores)
        if shared:
            _score_by_context(model, shared, pad, device, batch_size, scores)
    finally:
        model.train(was_training)
    return [scores[pair] for pair in pairs]


def multiple_choice_predictions(item: MultipleChoiceItem, scores: Sequence[ContinuationScore]) -> tuple[int, int]:
    """(argmax of summed log-likelihood, argmax of log-likelihood per character): acc and acc_norm picks."""
    lls = [score.logprob for score in scores]
    normed = [ll / max(len(choice), 1) for ll, choice in zip(lls, item.choices)]
    return max(range(len(lls)), key=lls.__getitem__), max(range(len(normed)), key=normed.__getitem__)


def evaluate_multiple_choice(model, tokenizer, items: Sequence[MultipleChoiceItem], batch_size: int = 16,
                             limit: int | None = None, max_length: int | None = None,
                             keep_records: bool = False) -> EvalResult:
    """Accuracy (``acc``) and length-normalised accuracy (``acc_norm``) over multiple-choice items."""
    items = list(items)[:limit] if limit else list(items)
    start = time.perf_counter()
    pairs = [pair for item in items for pair in item.pairs()]
    flat = score_continuations(model, tokenizer, pairs, batch_size=batch_size, max_length=max_length)
    correct = correct_norm = 0
    records, offset = [], 0
    for item in items:
        scores = flat[offset:offset + len(item.choices)]
        offset += len(item.choices)
        pred, pred_norm = multiple_choice_predictions(item, scores)
        correct += pred == item.gold
        correct_norm += pred_norm == item.gold
        if keep_records:
            records.append({"id": item.id, "gold": item.gold, "pred": pred, "pred_norm": pred_norm,
                            "logprobs": [round(score.logprob, 4) for score in scores]})
    n = len(items)
    metrics = {"acc": correct / n if n else None, "acc_norm": correct_norm / n if n else None}
    return EvalResult(metrics=metrics, num_examples=n, seconds=time.perf_counter() - start, records=records)


def evaluate_lm_loss(model, tokenizer, texts: Sequence[str] | Sequence[tuple[str, str]], batch_size: int = 8,
                     limit: int | None = None, max_length: int | None = None) -> EvalResult:
    """Token-weighted mean negative log-likelihood and perplexity on held-out text.

    ``texts`` are plain strings (every token scored, conditioned on BOS) or (prompt, response) pairs
    (only the response tokens scored, as in supervised fine-tuning with a masked prompt).
    """
    texts = list(texts)[:limit] if limit else list(texts)
    pairs = [t if isinstance(t, tuple) else ("", t) for t in texts]
    start = time.perf_counter()
    scores = score_continuations(model, tokenizer, pairs, batch_size=batch_size, max_length=max_length)
    tokens = sum(score.num_tokens for score in scores)
    nll = -sum(score.logprob for score in scores)
    loss = nll / tokens if tokens else None
    metrics = {"loss": loss, "perplexity": math.exp(loss) if loss is not None and loss < 700 else None,
               "tokens": float(tokens)}
    return EvalResult(metrics=metrics, num_examples=len(pairs), seconds=time.perf_counter() - start)

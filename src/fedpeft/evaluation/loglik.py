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
(``logits_to_keep``), which saves most of the vocabulary projection on short answers. Batches are cut
by a token budget as well as a row count, so one long input does not pad fifteen short ones. Inputs
that share a prefix (a question before each option text, a subject's header and k-shot exemplars, a
prompt template) read it once and reuse its KV cache (``prefix_groups``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from fedpeft.adapters import is_prompt_learning
from fedpeft.evaluation.kv_cache import cache_argument, returned_cache
from fedpeft.models.family import model_is_encoder_decoder


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


MIN_FILL = 0.8  # a row joins a batch only if it is at least this fraction of the batch's widest row


def _token_batches(lengths: Sequence[int], batch_size: int, max_tokens: int,
                   min_fill: float = MIN_FILL) -> list[list[int]]:
    """Indices (already sorted longest first) cut into batches of at most ``batch_size`` rows, at most
    ``max_tokens`` padded tokens (rows x the batch's longest row), and rows no shorter than ``min_fill``
    of the longest (padding stays under a quarter of the real tokens), at least one row each: long
    inputs do not pad short ones to their length. Padding is computed, not skipped, so on a CPU it costs
    as much as real tokens."""
    batches: list[list[int]] = []
    current: list[int] = []
    for index, length in enumerate(lengths):
        if current:
            width = lengths[current[0]]  # sorted longest first: the first row is the widest
            if len(current) >= batch_size or (len(current) + 1) * width > max_tokens or length < min_fill * width:
                batches.append(current)
                current = []
        current.append(index)
    if current:
        batches.append(current)
    return batches


def _score_plain(model, inputs, groups, pad, device, batch_size, max_tokens, scores) -> None:
    """One forward per distinct input ``(context + continuation)[:-1]``; left padding aligns the ends, so
    the last n kept positions predict the n continuation tokens of every pair read from that input."""
    inputs = sorted(inputs, key=len, reverse=True)  # longest first: memory trouble shows at once
    for batch_index in _token_batches([len(seq) for seq in inputs], batch_size, max_tokens):
        batch = [inputs[i] for i in batch_index]
        input_ids, attention_mask = _left_padded(batch, pad)
        keep = max(len(cont) for seq in batch for _, cont in groups[seq])
        logits = _forward_last_logits(model, input_ids.to(device), attention_mask.to(device), keep)
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        for row, seq in enumerate(batch):
            for pair, cont in groups[seq]:
                total, greedy = _score_rows(logprobs[row, keep - len(cont):], cont)
                scores[pair] = ContinuationScore(total, len(cont), greedy)


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def prefix_groups(inputs: dict[tuple[int, ...], list],
                  min_shared: int = 8) -> tuple[list[tuple[int, list[tuple[int, ...]]]], list[tuple[int, ...]]]:
    """Inputs that start with the same tokens: ``([(shared length, member inputs)], inputs alone)``,
    chosen to read the fewest tokens when each group's shared prefix is read once.

    Sorted inputs form a trie laid flat: a run's common prefix is the smallest common prefix of
    neighbours, and cutting the run where that minimum occurs gives runs that share more. Each run is
    either one group (its prefix read once) or cut further, whichever reads fewer tokens; so the
    options of one question become a group of their own rather than joining every question that only
    shares the template, and a subject's questions share its header. A member keeps the positions
    that predict its continuation tokens (``inputs[seq]`` holds ``(pair, continuation)``), which caps
    the shared length; under ``min_shared`` tokens nothing is shared."""
    seqs = sorted(inputs)
    if not seqs:
        return [], []
    neighbours = [_common_prefix(a, b) for a, b in zip(seqs, seqs[1:])]
    most = [len(s) - max(len(c) for _, c in inputs[s]) for s in seqs]  # the most each member may share

    def plan(lo: int, hi: int, depth: int) -> tuple[int, list, list]:
        members = seqs[lo:hi]
        alone = (sum(len(m) for m in members), [], list(members))
        if hi - lo == 1:
            return alone
        common = min(neighbours[lo:hi - 1])
        shared = min(common, min(most[lo:hi]))
        whole = (shared + sum(len(m) - shared for m in members), [(shared, members)], []) if shared >= min_shared else None
        split = alone
        if depth < 64 and any(n > common for n in neighbours[lo:hi - 1]):
            cost, groups, singles, start = 0, [], [], lo
            for i in [i for i in range(lo, hi - 1) if neighbours[i] == common] + [hi - 1]:
                part_cost, part_groups, part_singles = plan(start, i + 1, depth + 1)
                cost += part_cost
                groups.extend(part_groups)
                singles.extend(part_singles)
                start = i + 1
            split = (cost, groups, singles)
        return whole if whole is not None and whole[0] <= split[0] else split

    _, groups, alone = plan(0, len(seqs), 0)
    return groups, alone


def _score_shared(model, groups, inputs, pad, device, batch_size, max_tokens, scores) -> None:
    """Each group's shared prefix is read once (prefixes of several groups batched, left-padded) and its
    KV cache repeated for each member, whose remaining tokens (left-padded after the prefix, positions
    given explicitly) are read in a second forward; only the last positions go through the LM head.
    For MMLU this reads the subject header (and the k-shot exemplars) once per subject, for option
    texts the question once per question."""
    chunks = []  # (shared length, members): token batches of one group's members, by remaining length
    for shared, members in groups:
        members = sorted(members, key=len, reverse=True)
        for chunk in _token_batches([len(m) - shared for m in members], batch_size, max_tokens):
            chunks.append((shared, [members[i] for i in chunk]))
    chunks.sort(key=lambda c: (len(c[1][0]) - c[0], c[0]), reverse=True)  # widest remainder first
    start = 0
    while start < len(chunks):
        # chunks of several groups share a forward when their prefixes and remainders are alike in width
        batch, rows = [chunks[start]], len(chunks[start][1])
        prefix_width, rest_width = batch[0][0], len(batch[0][1][0]) - batch[0][0]
        start += 1
        while start < len(chunks):
            shared, members = chunks[start]
            rest = len(members[0]) - shared
            wider = max(prefix_width, shared)
            if (rows + len(members) > batch_size or (rows + len(members)) * (wider + rest_width) > max_tokens
                    or rest < MIN_FILL * rest_width or min(prefix_width, shared) < MIN_FILL * wider):
                break
            batch.append(chunks[start])
            rows += len(members)
            prefix_width = wider
            start += 1
        prefixes = [members[0][:shared] for shared, members in batch]
        prefix_ids, prefix_mask = _left_padded(prefixes, pad)
        prefix_ids, prefix_mask = prefix_ids.to(device), prefix_mask.to(device)
        out = model(input_ids=prefix_ids, attention_mask=prefix_mask,
                    position_ids=(prefix_mask.cumsum(-1) - 1).clamp(min=0), use_cache=True, logits_to_keep=1)
        owners = [(g, member) for g, (_, members) in enumerate(batch) for member in members]
        index = torch.tensor([g for g, _ in owners], device=device)
        cache = returned_cache(out)
        cache.reorder_cache(index)  # one cache row per member
        suffixes = [member[batch[g][0]:] for g, member in owners]
        suffix_ids, suffix_mask = _left_padded(suffixes, pad)
        suffix_ids, suffix_mask = suffix_ids.to(device), suffix_mask.to(device)
        positions = prefix_mask.sum(-1)[index].unsqueeze(-1) + (suffix_mask.cumsum(-1) - 1).clamp(min=0)
        keep = max(len(cont) for _, member in owners for _, cont in inputs[member])
        out = model(input_ids=suffix_ids, attention_mask=torch.cat([prefix_mask[index], suffix_mask], dim=1),
                    position_ids=positions, use_cache=True, logits_to_keep=keep, **{cache_argument(model): cache})
        logprobs = torch.log_softmax(out.logits[:, -keep:].float(), dim=-1)
        for row, (_, member) in enumerate(owners):
            for pair, cont in inputs[member]:
                total, greedy = _score_rows(logprobs[row, keep - len(cont):], cont)
                scores[pair] = ContinuationScore(total, len(cont), greedy)


@torch.inference_mode()
def score_continuations(model, tokenizer, pairs: Sequence[tuple[str, str]], batch_size: int = 16,
                        max_length: int | None = None, share_prefix: bool = True,
                        max_batch_tokens: int | None = None, min_shared: int = 16) -> list[ContinuationScore]:
    """``log p(continuation | context)`` for every pair, batched; results in the input order.

    The model reads ``(context + continuation)[:-1]``. Pairs whose inputs are identical share one forward
    pass: options that differ only in their last token (`` A``/`` B``, `` yes``/`` no``, `` answer1``/
    `` answer2``) cost one sequence per question. With ``share_prefix``, inputs that begin with the same
    ``min_shared`` or more tokens (a question read before each of its option texts; the MMLU header and
    k-shot exemplars of one subject; a prompt template) read that prefix once and reuse its KV cache
    (``prefix_groups``). Batches hold at most ``batch_size`` rows and ``max_batch_tokens`` padded tokens
    (default ``batch_size * 128``), longest first. ``max_length`` (default: the model's
    ``max_position_embeddings``) bounds the input; longer inputs lose tokens from the left of the context.
    Runs on the model's device in the model's dtype (log-softmax in fp32).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if model_is_encoder_decoder(model):
        raise ValueError("log-likelihood scoring (multiple choice, lm_loss) reads a causal LM's continuation "
                         "logits; an encoder-decoder model (model.head=seq2seq, T5) is not supported there: use the "
                         "generate mode")
    if max_length is None:
        max_length = int(getattr(getattr(model, "config", None), "max_position_embeddings", 0) or 2048)
    max_tokens = max_batch_tokens or batch_size * 128
    encoded: dict[tuple[str, str], tuple[list[int], list[int]]] = {}
    for pair in pairs:
        if pair not in encoded:
            ctx, cont = encode_pair(tokenizer, *pair)
            if len(cont) > max_length:
                raise ValueError(f"continuation of {len(cont)} tokens does not fit max_length={max_length}")
            encoded[pair] = (ctx, cont)
    # input tokens -> [(pair, continuation)]
    by_input: dict[tuple[int, ...], list] = {}
    for pair, (ctx, cont) in encoded.items():
        by_input.setdefault(tuple((ctx + cont)[:-1][-max_length:]), []).append((pair, cont))
    if is_prompt_learning(model):  # the virtual tokens are added by peft's forward: no cache shared outside it
        share_prefix = False
    groups, alone = prefix_groups(by_input, min_shared) if share_prefix else ([], list(by_input))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else _prefix_token(tokenizer)
    device = _device(model)
    was_training = model.training
    model.eval()
    scores: dict[tuple[str, str], ContinuationScore] = {}
    try:
        if alone:
            _score_plain(model, alone, by_input, pad, device, batch_size, max_tokens, scores)
        if groups:
            _score_shared(model, groups, by_input, pad, device, batch_size, max_tokens, scores)
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

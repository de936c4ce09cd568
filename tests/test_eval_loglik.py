"""Log-likelihood scoring against a hand computation on the tiny random Llama."""

from __future__ import annotations

import math

import pytest
import torch

from fedpeft.evaluation.loglik import (ContinuationScore, MultipleChoiceItem, encode_pair, evaluate_lm_loss,
                                       evaluate_multiple_choice, multiple_choice_predictions, score_continuations)
from fedpeft.models.registry import tiny_llama

torch.set_num_threads(1)

PAIRS = [
    ("The cat sat on the", " mat"),
    ("Question: 2+2?\nAnswer:", " 4"),
    ("Question: 2+2?\nAnswer:", " 5"),  # same input as the previous pair: one forward for both
    ("Question: 2+2?\nAnswer: ", "four"),  # trailing space moves onto the continuation
    ("", "hello world"),  # empty context: conditioned on BOS
    ("ab" * 25, " xyz"),
]


@pytest.fixture(scope="module")
def tiny():
    model, tokenizer = tiny_llama(seed=0)
    model.eval()
    return model, tokenizer


def hand_logprob(model, tokenizer, context: str, continuation: str) -> tuple[float, int, bool]:
    """log p(continuation | context) from one unpadded forward: sum of log_softmax(logits)[t-1, token_t]."""
    ctx, cont = encode_pair(tokenizer, context, continuation)
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(ids).logits[0].double(), dim=-1)
    total, greedy = 0.0, True
    for k, token in enumerate(cont):
        row = logprobs[len(ctx) - 1 + k]
        total += row[token].item()
        greedy &= int(row.argmax()) == token
    return total, len(cont), greedy


def test_encode_pair_moves_trailing_whitespace_and_handles_empty_context(tiny):
    _, tokenizer = tiny
    ctx, cont = encode_pair(tokenizer, "Answer: ", "four")
    assert tokenizer.decode(ctx) == "Answer:"
    assert tokenizer.decode(cont) == " four"
    ctx, cont = encode_pair(tokenizer, "", "hi")
    assert ctx == [tokenizer.bos_token_id] and tokenizer.decode(cont) == "hi"
    with pytest.raises(ValueError):
        encode_pair(tokenizer, "x", "")


@pytest.mark.parametrize("batch_size", [1, 4])
def test_scores_equal_hand_computation(tiny, batch_size):
    model, tokenizer = tiny
    scores = score_continuations(model, tokenizer, PAIRS, batch_size=batch_size)
    assert len(scores) == len(PAIRS)
    for (context, continuation), score in zip(PAIRS, scores):
        expected, n, greedy = hand_logprob(model, tokenizer, context, continuation)
        assert score.num_tokens == n
        assert score.logprob == pytest.approx(expected, abs=1e-4)
        assert score.is_greedy == greedy


def test_greedy_flag_true_for_the_argmax_token(tiny):
    model, tokenizer = tiny
    context = "Question: 2+2?\nAnswer:"
    ids = torch.tensor([encode_pair(tokenizer, context, " 4")[0]])
    with torch.no_grad():
        best = int(model(ids).logits[0, -1].argmax())
    best_text = tokenizer.decode([best])
    [score] = score_continuations(model, tokenizer, [(context, best_text)])
    if encode_pair(tokenizer, context, best_text)[1] == [best]:  # the decoded token re-encodes to itself
        assert score.is_greedy


def test_left_truncation_keeps_the_continuation(tiny):
    model, tokenizer = tiny
    context, continuation = "0123456789" * 6, " end"
    [score] = score_continuations(model, tokenizer, [(context, continuation)], max_length=20)
    # the model reads at most 20 tokens: (context + continuation)[:-1], so 17 context bytes survive
    expected, n, _ = hand_logprob(model, tokenizer, context[-17:], continuation)
    assert score.num_tokens == n == 4
    assert score.logprob == pytest.approx(expected, abs=1e-4)


def test_multiple_choice_acc_and_acc_norm_by_hand(tiny):
    model, tokenizer = tiny
    items = [
        MultipleChoiceItem("Question: 2+2?\nAnswer:", [" 4", " 5", " four"], gold=0, id="a"),
        MultipleChoiceItem("The sky is", [" blue", " green and wide"], gold=1, id="b"),
        MultipleChoiceItem("", ["x y z", "x y z"], gold=0, id="c", contexts=["Pick:", "Choose:"]),
    ]
    result = evaluate_multiple_choice(model, tokenizer, items, batch_size=2, keep_records=True)
    correct = correct_norm = 0
    for item, record in zip(items, result.records):
        lls = [hand_logprob(model, tokenizer, c, x)[0] for c, x in item.pairs()]
        pred = max(range(len(lls)), key=lls.__getitem__)
        pred_norm = max(range(len(lls)), key=lambda i: lls[i] / len(item.choices[i]))
        assert record["pred"] == pred and record["pred_norm"] == pred_norm
        correct += pred == item.gold
        correct_norm += pred_norm == item.gold
    assert result.num_examples == 3
    assert result.metrics["acc"] == pytest.approx(correct / 3)
    assert result.metrics["acc_norm"] == pytest.approx(correct_norm / 3)
    assert result.examples_per_second > 0


def test_acc_norm_divides_by_characters():
    item = MultipleChoiceItem("q", [" a", " abcdefgh"], gold=1)
    scores = [ContinuationScore(-10.0, 1, False), ContinuationScore(-12.0, 3, False)]
    # summed: -10 > -12 picks 0; per character: -10/2 = -5 < -12/9 = -1.33 picks 1
    assert multiple_choice_predictions(item, scores) == (0, 1)


def test_lm_loss_matches_cross_entropy(tiny):
    model, tokenizer = tiny
    texts = ["hello world", "federated learning is fun"]
    result = evaluate_lm_loss(model, tokenizer, texts, batch_size=2)
    total, tokens = 0.0, 0
    for text in texts:
        ids = torch.tensor([[tokenizer.bos_token_id] + tokenizer(text, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            loss = model(ids, labels=ids).loss.item()
        total += loss * (ids.shape[1] - 1)
        tokens += ids.shape[1] - 1
    assert result.metrics["tokens"] == tokens
    assert result.metrics["loss"] == pytest.approx(total / tokens, abs=1e-4)
    assert result.metrics["perplexity"] == pytest.approx(math.exp(total / tokens), rel=1e-4)
    # (prompt, response) pairs score the response only
    masked = evaluate_lm_loss(model, tokenizer, [("Say hi:", " hello")])
    assert masked.metrics["tokens"] == len(" hello")


def test_scoring_through_a_peft_model_and_restores_train_mode(tiny):
    from peft import LoraConfig, get_peft_model

    model, tokenizer = tiny_llama(seed=1)
    wrapped = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    wrapped.train()
    pairs = PAIRS[:3] + [("The sky is", " blue"), ("The sky is", " green and wide")]  # both scoring paths
    scores = score_continuations(wrapped, tokenizer, pairs, batch_size=3)
    assert wrapped.training
    wrapped.eval()
    for (context, continuation), score in zip(pairs, scores):
        assert score.logprob == pytest.approx(hand_logprob(wrapped, tokenizer, context, continuation)[0], abs=1e-4)


@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_shared_context_cache_equals_hand_computation(tiny, batch_size):
    """Options of different lengths after a shared context: the context's KV cache is reused per option."""
    model, tokenizer = tiny
    pairs = [("Question: which planet is red?\nAnswer:", option) for option in (" Mars", " the planet Jupiter", " Sun", " x")]
    pairs += [("Short q?", " yes indeed"), ("Short q?", " no"), ("A longer unrelated context here.", " alone")]
    shared = score_continuations(model, tokenizer, pairs, batch_size=batch_size, share_prefix=True)
    plain = score_continuations(model, tokenizer, pairs, batch_size=batch_size, share_prefix=False)
    for (context, continuation), a, b in zip(pairs, shared, plain):
        expected, n, greedy = hand_logprob(model, tokenizer, context, continuation)
        assert a.logprob == pytest.approx(expected, abs=1e-4) and b.logprob == pytest.approx(expected, abs=1e-4)
        assert a.num_tokens == b.num_tokens == n and a.is_greedy == b.is_greedy == greedy


def test_prefix_groups_keep_a_questions_options_together_and_share_a_header():
    from fedpeft.evaluation.loglik import prefix_groups

    header = tuple(range(100, 120))  # 20 shared tokens, as an MMLU subject header
    q1, q2, q3 = header + (1, 2, 3, 4), header + (5, 6, 7), header + (8, 9, 10, 11, 12)
    inputs = {seq: [(str(seq), [0])] for seq in (q1, q2, q3)}
    groups, alone = prefix_groups(inputs, min_shared=8)
    assert groups == [(20, sorted([q1, q2, q3]))] and alone == []
    # one question's options (long shared question) then another question sharing only 10 tokens:
    # the options stay a group of their own (sharing 30), the other question is alone
    question = tuple(range(200, 230))
    opts = [question + (1,), question + (2, 3), question + (4, 5, 6)]
    other = question[:10] + (99, 98, 97)
    inputs = {seq: [(str(seq), [0])] for seq in (*opts, other)}
    groups, alone = prefix_groups(inputs, min_shared=8)
    assert groups == [(30, sorted(opts))] and alone == [other]
    # a member's continuation tokens must be predicted from the second forward: the shared part is cut
    inputs = {q1: [("a", [0, 0, 0, 0, 0])], q2: [("b", [0])]}
    assert prefix_groups(inputs, min_shared=8)[0] == [(19, sorted([q1, q2]))]
    # too little in common: nothing shared
    assert prefix_groups({(1, 2, 3): [("a", [0])], (1, 2, 4): [("b", [0])]}, min_shared=8) == ([], [(1, 2, 3), (1, 2, 4)])


@pytest.mark.parametrize("batch_size", [1, 2, 16])
def test_questions_sharing_a_header_equal_hand_computation(tiny, batch_size):
    """MMLU-shaped items: one header per subject, letters as options; prefixes read once per subject."""
    model, tokenizer = tiny
    header = {s: f"The following are multiple choice questions (with answers) about {s}.\n\n" for s in ("astronomy", "law")}
    items = [MultipleChoiceItem(header[s] + f"{q}\nA. x\nB. y\nC. z\nD. w\nAnswer:", [" A", " B", " C", " D"], 0)
             for s, q in [("astronomy", "Red planet?"), ("astronomy", "Hot star?"), ("law", "A tort is?"),
                          ("law", "Mens rea means?"), ("astronomy", "Moons of Mars?")]]
    pairs = [pair for item in items for pair in item.pairs()]
    scores = score_continuations(model, tokenizer, pairs, batch_size=batch_size, max_batch_tokens=150)
    for (context, continuation), score in zip(pairs, scores):
        expected, n, greedy = hand_logprob(model, tokenizer, context, continuation)
        assert score.logprob == pytest.approx(expected, abs=1e-4) and score.is_greedy == greedy


def test_token_budget_batches():
    from fedpeft.evaluation.loglik import _token_batches

    # longest first; a batch stops at 3 rows, when rows x first row's length would pass 100 tokens, or at
    # a row shorter than 0.8 of the first (30 < 0.8 x 40)
    assert _token_batches([60, 40, 30, 20, 20, 20, 10], 3, 100) == [[0], [1], [2], [3, 4, 5], [6]]
    assert _token_batches([40, 35, 33, 20], 4, 1000) == [[0, 1, 2], [3]]
    assert _token_batches([40, 35, 33, 20], 4, 1000, min_fill=0.0) == [[0, 1, 2, 3]]
    assert _token_batches([500], 4, 100) == [[0]]  # a row longer than the budget still runs, alone

"""DPO and IPO with the frozen base model as the reference: no second copy of the model.

The policy is the LoRA-wrapped model; the reference is the same model with its adapters switched off
(``PeftModel.disable_adapter()``), which is exactly the frozen base the adapters were added to. For a
pair (prompt x, chosen y_w, rejected y_l), with ``log π(y|x)`` the summed log-probability of the
completion's tokens (prompt tokens excluded) under the policy and ``log π_ref(y|x)`` under the reference:

    h = [log π(y_w|x) - log π_ref(y_w|x)] - [log π(y_l|x) - log π_ref(y_l|x)]

    DPO (Rafailov et al. 2023, eq. 7):  loss = -log σ(β·h)
    IPO (Azar et al. 2023, eq. 17):     loss = (h - 1/(2β))²

Both use summed (not per-token averaged) log-probabilities, as in the papers. The implicit rewards are
``r_w = β·(log π(y_w|x) - log π_ref(y_w|x))`` and ``r_l`` likewise; the reward margin is ``r_w - r_l``
and the preference accuracy the fraction of pairs with ``r_w > r_l``.

A pair is encoded as two completion-only examples (``data.encoding.encode_example``: the loss and the
log-probability cover the completion and the end-of-sequence token); chosen and rejected rows go through
the model in one batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fedpeft.data.encoding import IGNORE_INDEX, EncodedExample, collate, encode_example, format_prompt

KINDS = ("dpo", "ipo")


@dataclass
class PreferenceStats:
    loss: torch.Tensor
    """Mean loss over the pairs (differentiable)."""
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    margin: float
    """Mean of ``chosen_rewards - rejected_rewards``."""
    accuracy: float
    """Fraction of pairs with ``chosen_rewards > rejected_rewards``."""


def preference_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
                    ref_rejected: torch.Tensor, beta: float = 0.1, kind: str = "dpo") -> PreferenceStats:
    """The DPO or IPO loss of a batch of pairs from summed completion log-probs, shape ``(batch,)`` each."""
    if kind not in KINDS:
        raise ValueError(f"preference loss kind {kind!r} is unknown; valid: {', '.join(KINDS)}")
    if not beta > 0:
        raise ValueError(f"preference loss beta = {beta!r}; expected a number > 0")
    chosen_ratio = policy_chosen - ref_chosen
    rejected_ratio = policy_rejected - ref_rejected
    h = chosen_ratio - rejected_ratio
    losses = -F.logsigmoid(beta * h) if kind == "dpo" else (h - 1.0 / (2.0 * beta)) ** 2
    chosen_rewards = (beta * chosen_ratio).detach()
    rejected_rewards = (beta * rejected_ratio).detach()
    return PreferenceStats(
        loss=losses.mean(),
        chosen_rewards=chosen_rewards,
        rejected_rewards=rejected_rewards,
        margin=float((chosen_rewards - rejected_rewards).mean()),
        accuracy=float((chosen_rewards > rejected_rewards).float().mean()),
    )


def sequence_logprobs(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      labels: torch.Tensor) -> torch.Tensor:
    """Per row, the summed log-probability of the tokens whose label is not -100, each predicted from
    the tokens before it (logits at position t score the token at t + 1)."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1, :]
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    token_logps = torch.gather(F.log_softmax(logits.float(), dim=-1), 2,
                               targets.masked_fill(~mask, 0).unsqueeze(-1)).squeeze(-1)
    return (token_logps * mask).sum(dim=-1)


def reference_logprobs(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                       labels: torch.Tensor) -> torch.Tensor:
    """``sequence_logprobs`` under the frozen base: the PEFT model with its adapters disabled, no grad."""
    if not hasattr(model, "disable_adapter"):
        raise TypeError(f"the reference model is the PEFT model with its adapters disabled; got a "
                        f"{type(model).__name__} without disable_adapter()")
    with torch.no_grad(), model.disable_adapter():
        return sequence_logprobs(model, input_ids, attention_mask, labels)


def encode_pair(record: dict, tokenizer, template: str, max_len: int) -> tuple[EncodedExample, EncodedExample] | None:
    """(chosen, rejected) examples of a preference record; ``template="raw"`` uses the prompt text as it
    is (an hh-rlhf transcript already ends in 'Assistant:'), other templates as ``format_prompt`` does.
    None when either completion cannot fit in ``max_len`` (the caller counts the drops)."""
    prompt = record["prompt"] if template == "raw" else format_prompt({"instruction": record["prompt"]}, template, tokenizer)
    chosen = encode_example(prompt, record["chosen"], tokenizer, max_len)
    rejected = encode_example(prompt, record["rejected"], tokenizer, max_len)
    if chosen is None or rejected is None:
        return None
    return chosen, rejected


def collate_pairs(pairs: Sequence[tuple[EncodedExample, EncodedExample]], pad_id: int) -> dict[str, torch.Tensor]:
    """One right-padded batch: the chosen rows first, then the rejected rows in the same order."""
    return collate([c for c, _ in pairs] + [r for _, r in pairs], pad_id)


def batch_preference_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor], beta: float = 0.1,
                          kind: str = "dpo") -> PreferenceStats:
    """DPO/IPO of a ``collate_pairs`` batch: the reference pass (adapters off, no grad), then the policy pass."""
    args = (batch["input_ids"], batch["attention_mask"], batch["labels"])
    n = batch["input_ids"].shape[0] // 2
    ref = reference_logprobs(model, *args)
    policy = sequence_logprobs(model, *args)
    return preference_loss(policy[:n], policy[n:], ref[:n], ref[n:], beta=beta, kind=kind)

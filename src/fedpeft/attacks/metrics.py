"""Scores of a reconstruction against the true client text.

- ROUGE-L F: ``rouge_score``'s longest-common-subsequence F-measure (its tokenizer: lower case,
  alphanumeric words).
- METEOR: nltk's ``single_meteor_score`` with its **exact-match stage only**. Full METEOR also matches
  Porter stems and WordNet synonyms; WordNet is a corpus download that is not available offline, so the
  stem and synonym stages are switched off (an identity stemmer and a synonym table with no entries).
  Scores are therefore lower than or equal to full METEOR's on the same pair (never higher: fewer
  matches, same formula). Words are whitespace-separated, lower-cased.
- Token accuracy: the fraction of positions whose recovered token id equals the true one (over the
  positions a mask keeps, e.g. not padding).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from nltk.translate.meteor_score import single_meteor_score
from rouge_score import rouge_scorer

_ROUGE = rouge_scorer.RougeScorer(["rougeL"])


class _IdentityStemmer:
    """Stems nothing, so nltk's stem stage matches only what the exact stage already matched."""

    def stem(self, word: str) -> str:
        return word


class _NoSynonyms:
    """A WordNet stand-in with no synsets: nltk's synonym stage adds no match and needs no corpus."""

    def synsets(self, word: str) -> list:
        return []


def rouge_l_f(reference: str, hypothesis: str) -> float:
    """ROUGE-L F-measure of ``hypothesis`` against ``reference`` (0 when either has no words)."""
    return float(_ROUGE.score(reference, hypothesis)["rougeL"].fmeasure)


def meteor_exact(reference: str, hypothesis: str, alpha: float = 0.9, beta: float = 3.0, gamma: float = 0.5) -> float:
    """METEOR with exact word matches only (see the module docstring): F_mean = P·R / (α·P + (1−α)·R),
    penalty = γ·(chunks / matches)^β, score = F_mean·(1 − penalty); 0 when nothing matches."""
    ref, hyp = reference.split(), hypothesis.split()
    if not ref or not hyp:
        return 0.0
    return float(single_meteor_score(ref, hyp, stemmer=_IdentityStemmer(), wordnet=_NoSynonyms(),
                                     alpha=alpha, beta=beta, gamma=gamma))


def token_accuracy(true_ids: torch.Tensor | Sequence[int], recovered_ids: torch.Tensor | Sequence[int],
                   mask: torch.Tensor | Sequence[bool] | None = None) -> float:
    """Fraction of kept positions where ``recovered_ids`` equals ``true_ids`` (same shape)."""
    true_ids, recovered_ids = torch.as_tensor(true_ids), torch.as_tensor(recovered_ids)
    if true_ids.shape != recovered_ids.shape:
        raise ValueError(f"token_accuracy: true ids have shape {tuple(true_ids.shape)} but recovered ids "
                         f"{tuple(recovered_ids.shape)}; expected the same shape")
    keep = torch.ones_like(true_ids, dtype=torch.bool) if mask is None else torch.as_tensor(mask, dtype=torch.bool)
    kept = int(keep.sum())
    if kept == 0:
        raise ValueError("token_accuracy: the mask keeps no position")
    return float(((true_ids == recovered_ids) & keep).sum()) / kept


def score_texts(references: Sequence[str], hypotheses: Sequence[str]) -> dict[str, float]:
    """Mean ROUGE-L F and METEOR (exact) over pairs."""
    if len(references) != len(hypotheses) or not references:
        raise ValueError(f"score_texts: {len(references)} references and {len(hypotheses)} hypotheses; "
                         "expected the same non-zero number")
    n = len(references)
    return {"rouge_l_f": sum(rouge_l_f(r, h) for r, h in zip(references, hypotheses)) / n,
            "meteor": sum(meteor_exact(r, h) for r, h in zip(references, hypotheses)) / n}


SCORES = ("rouge_l_f", "meteor", "token_accuracy")  # the score columns of an attack's result rows


def sequence_scores(reference: str, hypothesis: str, true_ids: torch.Tensor | Sequence[int],
                    recovered_ids: torch.Tensor | Sequence[int],
                    mask: torch.Tensor | Sequence[bool] | None = None) -> tuple[float, float, float]:
    """The ``SCORES`` of one reconstructed sequence: ROUGE-L F and METEOR of its decoded text, token
    accuracy of its ids."""
    return (rouge_l_f(reference, hypothesis), meteor_exact(reference, hypothesis),
            token_accuracy(true_ids, recovered_ids, mask))


def mean_scores(scores: Sequence[tuple[float, float, float]]) -> dict[str, float]:
    """``{name: mean over sequences}`` for each of ``SCORES``, from ``sequence_scores`` tuples."""
    if not scores:
        raise ValueError("mean_scores: no scored sequence; expected at least one")
    n = len(scores)
    return {name: sum(s[i] for s in scores) / n for i, name in enumerate(SCORES)}

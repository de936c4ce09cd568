"""Reconstruction scores against hand computations."""

from __future__ import annotations

import pytest

from fedpeft.attacks.metrics import mean_scores, meteor_exact, rouge_l_f, score_texts, sequence_scores, token_accuracy


def test_rouge_l_f_by_hand():
    # LCS of "the cat on the mat" in "the cat sat on the mat" is all 5 words: P = 5/5, R = 5/6,
    # F = 2PR / (P + R) = 10/11.
    assert rouge_l_f("the cat sat on the mat", "the cat on the mat") == pytest.approx(10 / 11)
    assert rouge_l_f("alpha beta", "gamma delta") == 0.0
    assert rouge_l_f("Add 12 and 3.", "add 12 and 3") == pytest.approx(1.0)  # case and punctuation ignored


def test_meteor_exact_by_hand():
    # m = 5 matches, P = 1, R = 5/6; F_mean = PR / (0.9P + 0.1R); alignment (the,the)(cat,cat) | (on,on)
    # (the,the)(mat,mat) = 2 chunks; penalty = 0.5 (2/5)^3.
    p, r = 1.0, 5 / 6
    f_mean = p * r / (0.9 * p + 0.1 * r)
    expected = f_mean * (1 - 0.5 * (2 / 5) ** 3)
    assert meteor_exact("the cat sat on the mat", "the cat on the mat") == pytest.approx(expected)
    # identical: one chunk of 3, penalty 0.5 (1/3)^3
    assert meteor_exact("a b c", "a b c") == pytest.approx(1 - 0.5 / 27)
    # reversed: 3 chunks of one word, penalty 0.5
    assert meteor_exact("a b c", "c b a") == pytest.approx(0.5)
    assert meteor_exact("a b c", "x y") == 0.0
    assert meteor_exact("", "x y") == 0.0


def test_meteor_exact_has_no_stem_or_synonym_stage():
    # Full METEOR matches "cats" to "cat" through the Porter stem; the exact-only score does not.
    assert meteor_exact("cat", "cats") == 0.0


def test_token_accuracy_by_hand():
    assert token_accuracy([1, 2, 3, 4], [1, 0, 3, 0]) == 0.5
    assert token_accuracy([1, 2, 3, 4], [1, 0, 3, 0], mask=[True, False, True, False]) == 1.0
    with pytest.raises(ValueError, match="same shape"):
        token_accuracy([1, 2], [1, 2, 3])
    with pytest.raises(ValueError, match="keeps no position"):
        token_accuracy([1, 2], [1, 2], mask=[False, False])


def test_score_texts_is_the_mean():
    scores = score_texts(["a b c", "a b c"], ["a b c", "x"])
    assert scores["rouge_l_f"] == pytest.approx(0.5)
    assert scores["meteor"] == pytest.approx((1 - 0.5 / 27) / 2)


def test_row_scores_are_the_per_sequence_means():
    """A result row's columns: each score averaged over the sequences, by hand here."""
    one = sequence_scores("a b c", "a b c", [1, 2, 3], [1, 2, 3])
    two = sequence_scores("a b c", "x", [1, 2, 3], [1, 0, 0])
    assert one == (1.0, pytest.approx(1 - 0.5 / 27), 1.0) and two == (0.0, 0.0, pytest.approx(1 / 3))
    row = mean_scores([one, two])
    assert list(row) == ["rouge_l_f", "meteor", "token_accuracy"]
    assert row["rouge_l_f"] == 0.5 and row["token_accuracy"] == pytest.approx(2 / 3)
    assert row["meteor"] == pytest.approx((1 - 0.5 / 27) / 2)
    with pytest.raises(ValueError, match="no scored sequence"):
        mean_scores([])

"""Robust aggregation rules against hand computations, and their composition with a method."""

import math

import pytest
import torch

from fedpeft.config import ConfigError, RobustConfig, load_config
from fedpeft.federation.robust import (
    RobustAggregationError,
    apply_robust_rule,
    clip_to_norm,
    coordinate_median,
    krum_scores,
    krum_select,
    trimmed_mean,
)
from fedpeft.strategies.base import ClientUpdate


def _updates(rows, num_examples=None):
    num_examples = num_examples or [1] * len(rows)
    return [ClientUpdate(client_id=i, tensors={"w": torch.tensor(r, dtype=torch.float32)}, num_examples=n)
            for i, (r, n) in enumerate(zip(rows, num_examples))]


def test_coordinate_median_odd_and_even():
    values = torch.tensor([[1.0, 10.0], [3.0, -2.0], [2.0, 100.0]])
    assert coordinate_median(values).tolist() == [2.0, 10.0]
    even = torch.tensor([[1.0], [4.0], [2.0], [100.0]])
    assert coordinate_median(even).tolist() == [3.0]  # (2 + 4) / 2, not torch.median's lower value


def test_trimmed_mean_drops_each_end():
    values = torch.tensor([[1.0], [2.0], [3.0], [4.0], [1000.0]])
    assert trimmed_mean(values, 0.2).tolist() == [3.0]  # cut 1 at each end: mean(2, 3, 4)
    assert trimmed_mean(values, 0.0).tolist() == [pytest.approx(202.0)]
    assert trimmed_mean(values, 0.19).tolist() == [pytest.approx(202.0)]  # floor(0.95) = 0 cut


def test_krum_scores_by_hand():
    # Points on a line: 0, 1, 2, 10; f = 1 -> each scores its n - f - 2 = 1 nearest neighbour.
    v = torch.tensor([[0.0], [1.0], [2.0], [10.0]], dtype=torch.float64)
    assert krum_scores(v, 1).tolist() == [1.0, 1.0, 1.0, 64.0]
    assert krum_select(v, 1) == [0]  # tie broken by the lower index
    # f = 0 -> 2 neighbours: 0:{1,4}=5, 1:{1,1}=2, 2:{1,4}=5, 10:{64,81}=145
    assert krum_scores(v, 0).tolist() == [5.0, 2.0, 5.0, 145.0]
    assert krum_select(v, 0, keep=3) == [0, 1, 2]
    with pytest.raises(RobustAggregationError, match="more than 4 updates"):
        krum_scores(v, 2)


def test_clip_to_norm_scales_the_change_only():
    ref = {"a": torch.tensor([1.0, 1.0]), "b": torch.tensor([0.0])}
    state = {"a": torch.tensor([4.0, 1.0]), "b": torch.tensor([4.0])}  # change (3, 0, 4): norm 5
    clipped, norm = clip_to_norm(state, ref, 1.0)
    assert norm == pytest.approx(5.0)
    assert clipped["a"].tolist() == pytest.approx([1.6, 1.0]) and clipped["b"].tolist() == pytest.approx([0.8])
    same, _ = clip_to_norm(state, ref, 10.0)
    assert torch.equal(same["a"], state["a"]) and torch.equal(same["b"], state["b"])


def test_median_replaces_each_update_and_keeps_counts():
    updates = _updates([[0.0, 0.0], [1.0, 5.0], [2.0, -1.0], [1e30, 1e30]], [10, 20, 30, 40])
    out = apply_robust_rule(RobustConfig(rule="median"), {"w": torch.zeros(2)}, updates)
    assert [u.client_id for u in out] == [0, 1, 2, 3] and [u.num_examples for u in out] == [10, 20, 30, 40]
    for u in out:
        assert u.tensors["w"].tolist() == [1.5, 2.5]  # (1 + 2) / 2 and (0 + 5) / 2
    assert updates[3].tensors["w"][0] == 1e30  # inputs untouched


def test_multi_krum_drops_the_outlier():
    updates = _updates([[0.0], [0.1], [0.2], [50.0], [0.15]])
    out = apply_robust_rule(RobustConfig(rule="multi_krum", byzantine=1), {"w": torch.zeros(1)}, updates)
    assert [u.client_id for u in out] == [0, 1, 2, 4]  # m = n - f = 4 lowest scores


def test_clip_then_none_rule():
    updates = _updates([[3.0, 4.0], [0.3, 0.4]])
    out = apply_robust_rule(RobustConfig(clip_norm=1.0), {"w": torch.zeros(2)}, updates)
    assert out[0].tensors["w"].tolist() == pytest.approx([0.6, 0.8])
    assert out[1].tensors["w"].tolist() == pytest.approx([0.3, 0.4])
    assert apply_robust_rule(RobustConfig(), {"w": torch.zeros(2)}, updates) is updates


def test_heterogeneous_updates_are_refused():
    updates = _updates([[1.0, 2.0], [1.0]])
    with pytest.raises(RobustAggregationError, match="global shape"):
        apply_robust_rule(RobustConfig(rule="median"), {"w": torch.zeros(2)}, updates)


def test_fedit_with_median_aggregates_to_the_median():
    """Composition: FedIT's weighted mean of median-replaced updates is the median (float rounding)."""
    from fedpeft.strategies import build_experiment_strategy

    cfg = load_config("configs/tiny.yaml", ["method.name=fedit"])
    strategy = build_experiment_strategy(cfg)
    glob = {"w": torch.zeros(3)}
    rows = [[1.0, 2.0, 3.0], [2.0, 2.0, 2.0], [3.0, -5.0, 1.0], [1e6, 1e6, -1e6], [2.5, 0.0, 2.0]]
    updates = apply_robust_rule(RobustConfig(rule="median"), glob, _updates(rows, [1, 7, 3, 100, 2]))
    result = strategy.aggregate(1, glob, updates)
    assert result.global_state["w"].tolist() == pytest.approx([2.5, 2.0, 2.0], rel=1e-6)


def test_config_checks_krum_feasibility():
    with pytest.raises(ConfigError, match="clients_per_round > 4"):
        load_config("configs/tiny.yaml", ["federation.robust.rule=krum", "federation.robust.byzantine=1"])
    cfg = load_config("configs/tiny.yaml", ["federation.num_clients=6", "federation.clients_per_round=5",
                                            "federation.robust.rule=krum", "federation.robust.byzantine=1"])
    assert cfg.federation.robust.byzantine == 1
    with pytest.raises(ConfigError, match="trim_fraction"):
        load_config("configs/tiny.yaml", ["federation.robust.trim_fraction=0.5"])
    assert math.isfinite(RobustConfig().trim_fraction)

"""Server optimizers against a few steps computed by hand from Reddi et al.'s formulas (v uses Delta^2),
their per-rule defaults, and their checkpoint state (name-checked, in the format earlier runs saved)."""

from __future__ import annotations

import io
import math

import pytest
import torch

from fedpeft.config import ConfigError, ServerOptimizerConfig, load_config
from fedpeft.strategies.server_optimizers import (
    SERVER_OPTIMIZERS,
    build_server_optimizer,
    make_server_optimizer,
    rule_defaults,
)

LR, B1, B2, TAU = 0.5, 0.9, 0.99, 1e-3
THETA0 = [0.0, 1.0, -2.0]
AVERAGES = [[1.0, 1.5, -2.0], [0.5, 0.0, -1.0], [2.0, -1.0, 3.0]]  # what clients average to, per round


def reference(rule: str) -> list[list[float]]:
    """The same rules, one scalar at a time in plain Python floats (written from the paper's formulas)."""
    out = []
    theta = list(THETA0)
    m = [0.0] * 3
    v = [TAU**2] * 3
    for avg in AVERAGES:
        for i in range(3):
            d = avg[i] - theta[i]
            if rule == "fedavgm":
                m[i] = B1 * m[i] + d
                theta[i] += LR * m[i]
                continue
            m[i] = B1 * m[i] + (1 - B1) * d
            if rule == "fedadagrad":
                v[i] = v[i] + d * d
            elif rule == "fedadam":
                v[i] = B2 * v[i] + (1 - B2) * d * d
            elif rule == "fedyogi":
                sign = (v[i] - d * d > 0) - (v[i] - d * d < 0)
                v[i] = v[i] - (1 - B2) * d * d * sign
            theta[i] += LR * m[i] / (math.sqrt(v[i]) + TAU)
        out.append(list(theta))
    return out


HYPER = {"lr": LR, "beta1": B1, "beta2": B2, "tau": TAU}


def optimizer(name: str):
    """Rule ``name`` with the hyperparameters above that it has (FedAvgM has no beta2 / tau)."""
    return make_server_optimizer(name, **{k: v for k, v in HYPER.items() if k in rule_defaults(name)})


def run(name: str) -> list[list[float]]:
    opt = optimizer(name)
    theta = {"w": torch.tensor(THETA0, dtype=torch.float64).float()}
    out = []
    for avg in AVERAGES:
        theta = {"w": opt.step(theta, {"w": torch.tensor(avg)})["w"]}
        out.append(theta["w"].tolist())
    return out


@pytest.mark.parametrize("name", ["fedavgm", "fedadagrad", "fedadam", "fedyogi"])
def test_three_steps_match_the_formula(name):
    got, want = run(name), reference(name)
    for g, w in zip(got, want):
        assert g == pytest.approx(w, rel=1e-5, abs=1e-6)


def test_first_steps_by_hand():
    # Coordinate 0: theta = 0, avg = 1 -> Delta = 1, m = 0.1 (adaptive) or 1 (FedAvgM).
    assert run("fedavgm")[0][0] == pytest.approx(0.5)  # 0 + 0.5 * 1
    assert run("fedadagrad")[0][0] == pytest.approx(0.5 * 0.1 / (math.sqrt(1e-6 + 1) + 1e-3), rel=1e-6)
    assert run("fedadam")[0][0] == pytest.approx(0.5 * 0.1 / (math.sqrt(0.99e-6 + 0.01) + 1e-3), rel=1e-6)
    assert run("fedyogi")[0][0] == pytest.approx(0.5 * 0.1 / (math.sqrt(1e-6 + 0.01) + 1e-3), rel=1e-6)
    # FedAvgM round 2, coordinate 0: Delta = 0.5 - 0.5 = 0, m = 0.9 * 1 + 0 -> theta = 0.5 + 0.45.
    assert run("fedavgm")[1][0] == pytest.approx(0.95)


def test_second_moment_uses_delta_squared_not_m_squared():
    opt = optimizer("fedadam")
    opt.step({"w": torch.zeros(1)}, {"w": torch.ones(1)})
    assert opt.v["w"].item() == pytest.approx(B2 * TAU**2 + (1 - B2) * 1.0)  # Delta^2 = 1; m^2 would be 0.01
    assert opt.m["w"].item() == pytest.approx(0.1)


def test_each_name_runs_its_own_rule():
    results = {name: [x for step in run(name) for x in step] for name in SERVER_OPTIMIZERS}
    names = sorted(results)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert results[a] != pytest.approx(results[b], rel=1e-4), f"{a} and {b} produced the same trajectory"
    assert len({cls for cls in SERVER_OPTIMIZERS.values()}) == len(SERVER_OPTIMIZERS)
    assert results["none"][-3:] == pytest.approx(AVERAGES[-1])  # identity: the plain average


def test_untouched_keys_keep_their_state_and_values():
    opt = make_server_optimizer("fedadam", lr=LR)
    out = opt.step({"a": torch.zeros(2), "b": torch.ones(2)}, {"a": torch.ones(2)})
    assert set(out) == {"a"} and set(opt.m) == {"a"}
    m_a = opt.m["a"].clone()
    opt.step({"a": out["a"], "b": torch.ones(2)}, {"b": torch.zeros(2)})  # a later round steps only b
    assert set(opt.m) == {"a", "b"} and torch.equal(opt.m["a"], m_a)


def test_state_dict_round_trips_and_refuses_other_optimizer():
    a = build_server_optimizer(ServerOptimizerConfig(name="fedyogi", lr=LR))
    assert a.state_dict()["hyper"] == {"lr": LR, "beta1": 0.9, "beta2": 0.99, "tau": 1e-3}
    theta = {"w": torch.tensor(THETA0)}
    theta = a.step(theta, {"w": torch.tensor(AVERAGES[0])})
    buffer = io.BytesIO()
    torch.save(a.state_dict(), buffer)
    buffer.seek(0)
    b = build_server_optimizer(ServerOptimizerConfig(name="fedyogi", lr=LR))
    b.load_state_dict(torch.load(buffer, weights_only=False))
    nxt = {"w": torch.tensor(AVERAGES[1])}
    assert torch.equal(a.step(theta, nxt)["w"], b.step(theta, nxt)["w"])
    with pytest.raises(ValueError, match="fedyogi.*fedadam"):
        build_server_optimizer(ServerOptimizerConfig(name="fedadam")).load_state_dict(a.state_dict())


def test_unknown_name_lists_valid_ones():
    class Fake:
        name, lr, beta1, beta2, tau = "fedadagard", 1.0, 0.9, 0.99, 1e-3

    with pytest.raises(ValueError, match="fedadagard.*fedadagrad.*fedadam.*fedavgm.*fedyogi"):
        build_server_optimizer(Fake())


def test_a_checkpoint_in_the_earlier_format_resumes_the_same_trajectory():
    """Round 2 after loading {name, steps, hyper, m, v} written by hand (the format checkpoints have always
    had) equals the formula's round 2 from those moments."""
    m1, v1 = 0.1, 0.99 * TAU**2 + 0.01  # FedAdam after round 1 on coordinate 0 of the reference (Delta = 1)
    theta1 = LR * m1 / (math.sqrt(v1) + TAU)
    saved = {"name": "fedadam", "steps": 1, "hyper": {"lr": LR, "beta1": B1, "beta2": B2, "tau": TAU},
             "m": {"w": torch.tensor([m1])}, "v": {"w": torch.tensor([v1])}}
    opt = optimizer("fedadam")
    opt.load_state_dict(saved)
    got = opt.step({"w": torch.tensor([theta1])}, {"w": torch.tensor([AVERAGES[1][0]])})["w"].item()
    assert got == pytest.approx(reference("fedadam")[1][0], rel=1e-5)
    assert opt.steps == 2


def test_per_rule_defaults_keep_the_first_fedadam_step_on_the_scale_of_the_update():
    """Issue 13 item 7: a 1e-3 update with one lr = 1 for every rule became a 0.05 step; with FedAdam's own
    default lr = 1e-2 it is lr (1 - beta1) Delta / (sqrt(beta2 tau^2 + (1 - beta2) Delta^2) + tau)."""
    delta = 1e-3
    opt = build_server_optimizer(ServerOptimizerConfig(name="fedadam"))
    step = opt.step({"w": torch.zeros(1)}, {"w": torch.full((1,), delta)})["w"].item()
    want = 1e-2 * 0.1 * delta / (math.sqrt(0.99 * 1e-6 + 0.01 * delta**2) + 1e-3)
    assert step == pytest.approx(want, rel=1e-5) and step == pytest.approx(5e-4, rel=1e-3)
    assert rule_defaults("fedavgm") == {"lr": 1.0, "beta1": 0.9}
    assert rule_defaults("fedadagrad")["lr"] == 0.1 and rule_defaults("fedyogi")["lr"] == 0.01
    # a value set in the config wins over the rule's default
    assert build_server_optimizer(ServerOptimizerConfig(name="fedadam", lr=0.5)).lr == 0.5


def test_a_hyperparameter_the_rule_lacks_is_ignored_with_a_warning(caplog):
    """Configs saved before the per-rule defaults hold lr, beta1, beta2 and tau for every rule (also for
    ``none``): they still load (a resumed run), the rule's missing ones are named and dropped."""
    cfg = load_config(None, ["method.server_optimizer.name=fedavgm", "method.server_optimizer.tau=0.1",
                             "method.server_optimizer.beta1=0.5"])
    assert "method.server_optimizer.tau=0.1: the rule 'fedavgm' has no tau; ignored" in caplog.text
    assert cfg.method.server_optimizer.tau is None and cfg.method.server_optimizer.beta1 == 0.5
    assert build_server_optimizer(cfg.method.server_optimizer).hyper == {"lr": 1.0, "beta1": 0.5}
    old = load_config(None, ["method.server_optimizer.lr=1.0", "method.server_optimizer.beta2=0.99"])  # name none
    assert old.method.server_optimizer.lr is None and build_server_optimizer(old.method.server_optimizer).name == "none"
    with pytest.raises(ConfigError, match=r"method.server_optimizer.name: unknown server optimizer 'fedadm'; did you mean 'fedadam'"):
        load_config(None, ["method.server_optimizer.name=fedadm"])
    with pytest.raises(ValueError, match="fedavgm has no beta2"):
        make_server_optimizer("fedavgm", beta2=0.9)


def test_fedpeft_methods_states_each_rules_defaults():
    from typer.testing import CliRunner

    from fedpeft.cli import app

    out = CliRunner().invoke(app, ["methods"], env={"COLUMNS": "300"}).output
    rows = {line.split("│")[1].strip(): line for line in out.splitlines() if line.count("│") >= 3}
    assert "lr=0.01, beta1=0.9, beta2=0.99, tau=0.001" in rows["fedadam"]
    assert "lr=0.01, beta1=0.9, beta2=0.99, tau=0.001" in rows["fedyogi"]
    assert "lr=0.1, beta1=0.9, tau=0.001" in rows["fedadagrad"]
    assert "lr=1, beta1=0.9" in rows["fedavgm"]

import pytest
import torch

from fedpeft.config import MethodConfig
from fedpeft.strategies import build_strategy
from fedpeft.strategies.base import ClientUpdate


def _states(seed, n, shapes):
    g = torch.Generator().manual_seed(seed)
    return [{k: torch.randn(s, generator=g) for k, s in shapes.items()} for _ in range(n)]


SHAPES = {"m.lora_A.default.weight": (4, 6), "m.lora_B.default.weight": (5, 4)}


def test_fedit_is_weighted_average_of_a_and_b_separately():
    states = _states(0, 3, SHAPES)
    sizes = [10, 30, 60]
    updates = [ClientUpdate(client_id=i, tensors=s, num_examples=n) for i, (s, n) in enumerate(zip(states, sizes))]
    strategy = build_strategy(MethodConfig(name="fedit"))
    glob = {k: torch.zeros(s) for k, s in SHAPES.items()}
    out = strategy.aggregate(1, glob, updates).global_state
    for key in SHAPES:
        expected = 0.1 * states[0][key] + 0.3 * states[1][key] + 0.6 * states[2][key]
        torch.testing.assert_close(out[key], expected)


def test_fedit_keeps_keys_not_uploaded():
    glob = {k: torch.ones(s) for k, s in SHAPES.items()}
    only_b = {"m.lora_B.default.weight": torch.full((5, 4), 3.0)}
    out = build_strategy(MethodConfig(name="fedit")).aggregate(1, glob, [ClientUpdate(0, only_b, 5)]).global_state
    assert torch.equal(out["m.lora_A.default.weight"], glob["m.lora_A.default.weight"])
    assert torch.equal(out["m.lora_B.default.weight"], only_b["m.lora_B.default.weight"])


def test_unknown_method_lists_valid_names():
    with pytest.raises(ValueError, match="unknown method 'fedavgg'.*fedit"):
        build_strategy(MethodConfig(name="fedavgg"))


def test_zero_examples_is_an_error():
    with pytest.raises(ValueError, match="zero examples"):
        build_strategy(MethodConfig(name="fedit")).aggregate(1, {}, [ClientUpdate(0, {}, 0)])


def test_methods_command_lists_every_registered_method():
    from typer.testing import CliRunner

    from fedpeft.cli import app
    from fedpeft.strategies import STRATEGIES

    result = CliRunner().invoke(app, ["methods"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    for name in STRATEGIES:
        assert name in result.output

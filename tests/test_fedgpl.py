"""FedGPL: layer scores under each grad_eval on a model whose gradients the test sets, the count rule,
only the selected layers trained and uploaded, the model left as found, fed_alg compositions, and an
engine run on the tiny model."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from fedpeft.strategies.base import TrainResult
from fedpeft.strategies.fedgpl import GRAD_EVALS, layer_gradient_scores, layer_of, select_layers
from strategy_fakes import MemoryStore, make

PREFIX = "base_model.model.model.layers.{}.self_attn.{}"
D, R = 4, 2
# layer -> module -> constant gradient of (base weight, lora_A, lora_B)
GRADS = {
    0: {"q_proj": (10.0, 0.1, 0.1)},
    1: {"q_proj": (1.0, 1.5, 1.5), "v_proj": (1.0, 1.5, 1.5)},
    2: {"q_proj": (1.0, 5.0, 0.0)},
    3: {"q_proj": (0.5, 2.6, 2.6)},
}


def _child(root: nn.Module, path: list[str]) -> nn.Module:
    node = root
    for part in path:
        if not hasattr(node, part):
            node.add_module(part, nn.Module())
        node = getattr(node, part)
    return node


class ControlledGradModel(nn.Module):
    """Parameters named like a PEFT LoRA model; loss = sum_p <C_p, p>, so dL/dp = C_p exactly."""

    def __init__(self) -> None:
        super().__init__()
        self.coef: dict[str, torch.Tensor] = {}
        for layer, modules in GRADS.items():
            for module, (cw, ca, cb) in modules.items():
                path = PREFIX.format(layer, module).split(".")
                _child(self, path + ["base_layer"]).register_parameter("weight", nn.Parameter(torch.randn(D, D), requires_grad=False))
                _child(self, path + ["lora_A", "default"]).register_parameter("weight", nn.Parameter(torch.randn(R, D)))
                _child(self, path + ["lora_B", "default"]).register_parameter("weight", nn.Parameter(torch.zeros(D, R)))
                name = PREFIX.format(layer, module)
                self.coef[f"{name}.base_layer.weight"] = torch.full((D, D), cw)
                self.coef[f"{name}.lora_A.default.weight"] = torch.full((R, D), ca)
                self.coef[f"{name}.lora_B.default.weight"] = torch.full((D, R), cb)

    def forward(self, input_ids=None, attention_mask=None, labels=None):
        loss = sum((self.coef[n] * p).sum() for n, p in self.named_parameters() if p.requires_grad)
        return type("Out", (), {"loss": loss})()


def expected_scores(grad_eval: str) -> dict[int, float]:
    out = {}
    for layer, modules in GRADS.items():
        vals, n = [], 0
        for cw, ca, cb in modules.values():
            if grad_eval in ("l1", "l2"):
                vals.append(torch.full((D, D), cw))
            else:
                vals += [torch.full((R, D), ca), torch.full((D, R), cb)]
                n += R * D + D * R
        flat = torch.cat([v.reshape(-1) for v in vals]).double()
        score = float(flat.abs().sum()) if grad_eval.endswith("l1") else float(flat.norm())
        out[layer] = score / n if grad_eval.startswith("lora_per_") else score
    return out


BATCH = {"input_ids": torch.zeros(1, 2, dtype=torch.long), "attention_mask": torch.ones(1, 2), "labels": torch.zeros(1, 2)}
WINNER = {"l1": 0, "l2": 0, "lora_l1": 1, "lora_l2": 2, "lora_per_l1": 3, "lora_per_l2": 2}


@pytest.mark.parametrize("grad_eval", GRAD_EVALS)
def test_scores_and_selection_follow_the_controlled_gradients(grad_eval):
    model = ControlledGradModel()
    scores = layer_gradient_scores(model, [BATCH, BATCH], grad_eval)  # mean over batches: the same constants
    want = expected_scores(grad_eval)
    assert scores.keys() == want.keys()
    for layer in want:
        assert scores[layer] == pytest.approx(want[layer], rel=1e-6)
    ranked = sorted(want, key=lambda layer: -want[layer])
    assert select_layers(scores, 1, 1) == [WINNER[grad_eval]] == ranked[:1]
    assert select_layers(scores, 2, 2) == sorted(ranked[:2])


def test_the_grad_eval_option_decides_which_layer_trains():
    """A FedGPL strategy configured with each grad_eval, scoring the controlled model, trains the layer
    that score ranks first (computed here from the gradients, not from the code), and on this model the six
    scores pick four different layers: a strategy that ignored grad_eval, or mixed two of them up, fails."""
    model = ControlledGradModel()
    glob = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    picked = {}
    for grad_eval in GRAD_EVALS:
        strategy = make("fedgpl", grad_eval=grad_eval, min_layer_num=1, max_layer_num=1, fed_alg="fedavg")
        strategy._server_batches = lambda server, round_idx: [BATCH]  # the server batch: the controlled loss
        strategy.begin_round(1, type("Server", (), {"model": model})())
        [plan] = strategy.configure_round(1, [0], glob, MemoryStore())
        picked[grad_eval] = {layer_of(k) for k in plan.trainable}
        want = expected_scores(grad_eval)
        assert picked[grad_eval] == {max(want, key=lambda layer: (want[layer], -layer))}, grad_eval
    assert len({frozenset(v) for v in picked.values()}) == 4


def test_count_rule_smallest_prefix_covering_half_clamped():
    scores = {0: 4.0, 1: 3.0, 2: 2.0, 3: 1.0, 4: 0.0}
    assert select_layers(scores, 1, 5) == [0, 1]  # 4 < 5 <= 4 + 3
    assert select_layers(scores, 3, 5) == [0, 1, 2]  # clamped up to min
    assert select_layers(scores, 1, 1) == [0]  # clamped down to max
    assert select_layers({0: 1.0, 1: 9.0, 2: 1.0}, 1, 3) == [1]
    assert select_layers({0: 0.0, 1: 0.0, 2: 0.0}, 2, 3) == [0, 1]  # no signal: min, by index
    assert select_layers({0: 1.0, 1: 1.0}, 3, 6) == [0, 1]  # never more than there are
    assert select_layers(scores, 1, 5, coverage=0.9) == [0, 1, 2]  # 9 >= 0.9 * 10
    assert select_layers(scores, 1, 5, coverage=0.95) == [0, 1, 2, 3]


def test_scoring_leaves_the_model_as_found():
    model = ControlledGradModel()
    named = dict(model.named_parameters())
    flags = {n: p.requires_grad for n, p in named.items()}
    values = {n: p.detach().clone() for n, p in named.items()}
    some = next(n for n in named if ".lora_A." in n)
    named[some].grad = torch.full_like(named[some], 7.0)
    model.train()
    state = {n: torch.ones_like(p) for n, p in named.items() if "lora_" in n}
    for grad_eval in ("l2", "lora_l1"):
        layer_gradient_scores(model, [BATCH], grad_eval, state=state)
        assert model.training
        for n, p in named.items():
            assert p.requires_grad == flags[n], n
            assert torch.equal(p.detach(), values[n]), n
            assert (p.grad is None) == (n != some), n
        assert torch.equal(named[some].grad, torch.full_like(named[some], 7.0))


def test_scores_are_taken_at_the_given_state():
    """With B = 0 the gradient of A vanishes in a real LoRA; the state passed in is what is scored."""
    model = ControlledGradModel()
    s1 = layer_gradient_scores(model, [BATCH], "lora_l1")
    assert s1 == layer_gradient_scores(model, [BATCH], "lora_l1", state={n: p * 3 for n, p in
                                                                          dict(model.named_parameters()).items() if "lora_" in n})


def test_layer_index_parsing():
    assert layer_of("base_model.model.model.layers.12.self_attn.q_proj.lora_A.default.weight") == 12
    assert layer_of("transformer.h.3.attn.c_attn.lora_B.default.weight") == 3
    assert layer_of("lm_head.lora_A.default.weight") is None


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="grad_eval"):
        make("fedgpl", grad_eval="l3")
    with pytest.raises(ValueError, match="train_mode"):
        make("fedgpl", train_mode="central")
    with pytest.raises(ValueError, match="min_layer_num"):
        make("fedgpl", min_layer_num=4, max_layer_num=2)
    with pytest.raises(ValueError, match="conflicts"):
        make("fedgpl", fed_alg="fedadam", server_optimizer="fedyogi")


def test_fed_alg_compositions():
    assert make("fedgpl", fed_alg="fedadam").server_optimizer.name == "fedadam"
    assert make("fedgpl", fed_alg="fedadam").server_optimizer.lr == 5e-4
    assert make("fedgpl", fed_alg="fedadam", server_optimizer="fedadam").server_optimizer.lr == 0.5  # the configured one


# --- with the tiny model and the engine's own data path ---------------------------------------------------
@pytest.fixture(scope="module")
def tiny_engine(tmp_path_factory):
    from fedpeft.config import load_config
    from fedpeft.federation.engine import Engine

    cfg = load_config("configs/tiny.yaml", ["method.name=fedgpl", "method.options.min_layer_num=1",
                                             "method.options.max_layer_num=1", "method.options.fed_alg=fedprox"])
    engine = Engine(cfg, tmp_path_factory.mktemp("fedgpl") / "run")
    engine._setup()
    return engine


def _server(engine):
    from fedpeft.strategies.base import ServerContext

    return ServerContext(engine.model, engine.tokenizer, engine.config, engine.data, engine.client_data.batches)


@pytest.mark.parametrize("server_batch", ["heldout", 6])
def test_only_selected_layers_train_and_upload_and_model_is_untouched(tiny_engine, server_batch):
    from fedpeft.adapters import adapter_parameters, get_adapter_state

    engine = tiny_engine
    strategy = make("fedgpl", grad_eval="lora_l2", min_layer_num=1, max_layer_num=1, fed_alg="fedprox",
                    server_batch=server_batch, seed=0)
    glob = strategy.init_global(get_adapter_state(engine.model))
    glob = {k: v + 0.01 * torch.randn(v.shape, generator=torch.Generator().manual_seed(1)) for k, v in glob.items()}
    before = get_adapter_state(engine.model)
    flags = {n: p.requires_grad for n, p in engine.model.named_parameters()}
    strategy.begin_round(1, _server(engine))
    plans = strategy.configure_round(1, [0, 1], glob, MemoryStore())
    after = get_adapter_state(engine.model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert flags == {n: p.requires_grad for n, p in engine.model.named_parameters()}
    layer = plans[0].trainable and {layer_of(k) for k in plans[0].trainable}
    assert len(layer) == 1
    assert all(plan.trainable == plan.upload for plan in plans)
    assert set(plans[0].trainable) == {k for k in glob if layer_of(k) in layer}
    strategy.attach_client_hooks(1, plans[0], None)  # client side: FedProx's term anchored at the downlink
    assert plans[0].extra_loss is not None
    scores = strategy._scores
    assert layer == {max(scores, key=scores.get)}
    # the uplink holds the selected layer only
    result = TrainResult(steps=1, examples_seen=1, num_examples=5, mean_loss=1.0, last_loss=1.0, lr=0.1, seconds=0.0)
    up = strategy.client_update(1, plans[0], {k: v + 1 for k, v in glob.items()}, result, None)
    assert set(up.tensors) == set(plans[0].trainable)
    agg = strategy.aggregate(1, glob, [up])
    assert agg.metrics["selected_layers"] == sorted(layer)
    assert agg.metrics["uplink_ratio"] == pytest.approx(0.5)  # 1 of the 2 tiny layers
    for k in glob:
        assert torch.equal(agg.global_state[k], glob[k] + 1 if layer_of(k) in layer else glob[k])
    assert {n for n, p in adapter_parameters(engine.model).items()} == set(glob)


def test_fed_mode_trains_every_layer_without_scoring(tiny_engine):
    strategy = make("fedgpl", train_mode="fed")
    from fedpeft.adapters import get_adapter_state

    glob = get_adapter_state(tiny_engine.model)
    strategy.begin_round(1, None)  # no server work in fed mode
    plans = strategy.configure_round(1, [0], glob, MemoryStore())
    assert set(plans[0].trainable) == set(glob) == set(plans[0].upload)


def test_local_mode_shares_nothing():
    from strategy_fakes import adapter

    strategy = make("fedgpl", train_mode="local")
    assert strategy.personalized
    glob = adapter(4, seed=0)
    store = MemoryStore()
    plans = strategy.configure_round(1, [0, 1], glob, store)
    assert all(p.downlink == {} and p.upload == [] for p in plans)
    result = TrainResult(steps=1, examples_seen=1, num_examples=5, mean_loss=1.0, last_loss=1.0, lr=0.1, seconds=0.0)
    trained = {k: v + 1 for k, v in glob.items()}
    up = strategy.client_update(1, plans[0], trained, result, store)
    assert up.tensors == {}
    assert all(torch.equal(strategy.personal_state(0, glob, store)[k], trained[k]) for k in glob)
    agg = strategy.aggregate(1, glob, [up])
    assert all(torch.equal(agg.global_state[k], glob[k]) for k in glob)


def test_engine_runs_fedgpl_on_the_tiny_model(tmp_path):
    from fedpeft.federation.engine import run_experiment

    summary = run_experiment("configs/tiny.yaml", [
        "method.name=fedgpl", "method.options.min_layer_num=1", "method.options.max_layer_num=1",
        "method.options.server_examples=4", "federation.rounds=2", "evaluation.every_rounds=0",
        "evaluation.before_training=false",
    ], run_dir=tmp_path / "run")
    events = [json.loads(x) for x in (summary.run_dir / "metrics.jsonl").read_text().splitlines()]
    full = next(e for e in events if e["event"] == "run_start")["adapter_bytes"]
    agg = [e for e in events if e["event"] == "aggregate"]
    assert [len(e["selected_layers"]) for e in agg] == [1, 1]
    assert all(math.isfinite(v) for e in agg for v in e["layer_scores"].values())
    train = [e for e in events if e["event"] == "client_train"]
    assert train and all(e["uplink_bytes"] == full // 2 for e in train)
    assert not [e for e in events if e["event"] == "client_failed"]


class StateDependentModel(ControlledGradModel):
    """loss = sum_p 1/2 <C_p, p * p>, so dL/dp = C_p * p: the gradient depends on the adapter values."""

    def forward(self, input_ids=None, attention_mask=None, labels=None):
        loss = sum((self.coef[n] * p * p).sum() / 2 for n, p in self.named_parameters() if p.requires_grad)
        return type("Out", (), {"loss": loss})()


@pytest.mark.parametrize("grad_eval", ["lora_l1", "lora_l2"])
def test_scores_are_taken_at_the_given_state_of_a_state_dependent_model(grad_eval):
    """Issue 13: scores at a given state S are the norms of C * S per layer (computed here by hand); the
    model's own adapter values would give different ones, and they are restored afterwards."""
    torch.manual_seed(0)
    model = StateDependentModel()
    own = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    for n in own:  # non-zero B as well, so every LoRA parameter has a gradient
        own[n] = torch.randn_like(own[n])
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in own:
                p.copy_(own[n])
    state = {n: torch.randn_like(v) * (1 + layer_of(n)) for n, v in own.items()}
    expected: dict[int, float] = {}
    for n, v in state.items():
        g = (model.coef[n] * v).double()
        expected[layer_of(n)] = expected.get(layer_of(n), 0.0) + float(g.abs().sum() if grad_eval == "lora_l1" else g.pow(2).sum())
    if grad_eval == "lora_l2":
        expected = {k: math.sqrt(v) for k, v in expected.items()}
    got = layer_gradient_scores(model, [BATCH], grad_eval, state=state)
    assert got == pytest.approx(expected, rel=1e-6)
    assert got != pytest.approx(layer_gradient_scores(model, [BATCH], grad_eval), rel=1e-3)  # own values differ
    for n, p in model.named_parameters():
        if n in own:
            assert torch.equal(p.detach(), own[n])


def test_defaults_are_the_seeds_fedadam_and_a_training_server_batch():
    """Issue 13, finding 5: seed 002 defaults to FedAdam; the server batch comes from the training records."""
    strategy = make("fedgpl")
    assert strategy.fed_alg == "fedadam" and strategy.server_optimizer.name == "fedadam"
    assert strategy.server_batch == "train"

"""The local trainer's math, each against a value computed here by hand or by one plain backward pass:
token-weighted accumulation, clipping, the plan's extra loss and gradient transform, the cosine schedule,
a kept optimizer, and SCAFFOLD's controls through two real rounds of ``train_local``."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fedpeft.federation.local_trainer import (
    load_optimizer_tensors,
    make_optimizer,
    optimizer_tensors,
    round_lr,
    supervised_count,
    train_local,
)
from fedpeft.strategies.base import ClientPlan
from strategy_fakes import MemoryStore, make

VOCAB, DIM = 11, 3


class TinyCausalLM(nn.Module):
    """Embedding -> linear -> logits; the loss is transformers' causal-LM loss: logits at t predict the
    label at t + 1, mean cross-entropy over the labels that are not -100."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.emb = nn.Parameter(torch.randn(VOCAB, DIM, generator=g))
        self.lora_A = nn.Parameter(torch.randn(VOCAB, DIM, generator=g))

    def forward(self, input_ids=None, attention_mask=None, labels=None):
        logits = self.emb[input_ids] @ self.lora_A.T
        loss = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1), ignore_index=-100)
        return type("Out", (), {"loss": loss})()


def example(length: int, supervised: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (length,), generator=g)
    labels = ids.clone()
    labels[: length - supervised] = -100  # the prompt: only the last `supervised` tokens are targets
    return ids, labels


def batch_of(examples, length: int) -> dict[str, torch.Tensor]:
    ids = torch.zeros(len(examples), length, dtype=torch.long)
    labels = torch.full((len(examples), length), -100)
    mask = torch.zeros(len(examples), length)
    for i, (e_ids, e_labels) in enumerate(examples):
        ids[i, : len(e_ids)], labels[i, : len(e_ids)], mask[i, : len(e_ids)] = e_ids, e_labels, 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def params_of(model):
    return {"lora_A": model.lora_A}


def one_batch_gradient(examples, length):
    model = TinyCausalLM()
    model(**batch_of(examples, length)).loss.backward()
    return model.lora_A.grad.clone()


def sgd_step(model, batches, **kwargs):
    """One SGD step with lr 1 and no clipping: the parameter change is minus the step's gradient."""
    before = model.lora_A.detach().clone()
    options = dict(steps=1, lr=1.0, optimizer_name="sgd", max_grad_norm=None)
    options.update(kwargs)
    plan = options.pop("plan", ClientPlan(0, {}))
    result, losses = train_local(model, params_of(model), iter(batches), plan, **options)
    return before - model.lora_A.detach(), losses


# unequal micro-batches: 31 supervised tokens (two examples) and 3 (one example)
LONG = [example(17, 16, seed=1), example(16, 15, seed=2)]
SHORT = [example(5, 3, seed=3)]


def test_supervised_count_is_the_shifted_label_tokens_or_the_examples():
    batch = batch_of(LONG, 17)
    assert supervised_count(batch["labels"]) == 16 + 15
    assert supervised_count(batch_of([example(5, 5, seed=1)], 5)["labels"]) == 4  # position 0 is never a target
    assert supervised_count(torch.tensor([1, 0, 1])) == 3  # a classifier: one target per example


def test_accumulation_over_unequal_token_counts_equals_the_one_batch_gradient():
    """Issue 13, finding 2: micro-batches of 31 and 3 supervised tokens give the gradient of the same three
    examples in one batch (the mean over all 34 tokens), not the mean of the two micro-batch means."""
    expected = one_batch_gradient(LONG + SHORT, 17)
    step, losses = sgd_step(TinyCausalLM(), [batch_of(LONG, 17), batch_of(SHORT, 5)], grad_accumulation=2)
    torch.testing.assert_close(step, expected, rtol=1e-5, atol=1e-6)
    model = TinyCausalLM()
    assert losses[0] == pytest.approx(float(model(**batch_of(LONG + SHORT, 17)).loss.detach()), rel=1e-5)
    # the old rule (mean of micro-batch means) is measurably different on these batches
    m1, m2 = TinyCausalLM(), TinyCausalLM()
    m1(**batch_of(LONG, 17)).loss.backward()
    m2(**batch_of(SHORT, 5)).loss.backward()
    naive = (m1.lora_A.grad + m2.lora_A.grad) / 2
    assert float((naive - expected).norm() / expected.norm()) > 0.1


def test_a_micro_batch_without_targets_adds_nothing_and_an_all_empty_step_is_an_error():
    empty = [example(6, 0, seed=4)]
    expected = one_batch_gradient(SHORT, 5)
    step, _ = sgd_step(TinyCausalLM(), [batch_of(SHORT, 5), batch_of(empty, 6)], grad_accumulation=2)
    torch.testing.assert_close(step, expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="no supervised target"):
        sgd_step(TinyCausalLM(), [batch_of(empty, 6)], grad_accumulation=1)


def test_clipping_scales_the_step_to_max_grad_norm():
    g = one_batch_gradient(LONG, 17)
    norm = float(g.norm())
    limit = norm / 4
    step, _ = sgd_step(TinyCausalLM(), [batch_of(LONG, 17)], grad_accumulation=1, max_grad_norm=limit)
    torch.testing.assert_close(step, g * (limit / norm), rtol=1e-5, atol=1e-6)
    step, _ = sgd_step(TinyCausalLM(), [batch_of(LONG, 17)], grad_accumulation=1, max_grad_norm=norm * 2)
    torch.testing.assert_close(step, g, rtol=1e-5, atol=1e-6)  # under the limit: unchanged


def test_extra_loss_counts_once_per_step_whatever_the_accumulation():
    """extra = 1/2 ||p||^2 adds p to the step's gradient exactly once (FedProx's term is per step)."""
    model = TinyCausalLM()
    p0 = model.lora_A.detach().clone()
    plan = ClientPlan(0, {}, extra_loss=lambda params: 0.5 * params["lora_A"].pow(2).sum())
    expected = one_batch_gradient(LONG + LONG + LONG, 17) + p0
    step, losses = sgd_step(model, [batch_of(LONG, 17)] * 3, grad_accumulation=3, plan=plan)
    torch.testing.assert_close(step, expected, rtol=1e-5, atol=1e-5)
    task = float(TinyCausalLM()(**batch_of(LONG, 17)).loss.detach())
    assert losses[0] == pytest.approx(task + 0.5 * float(p0.pow(2).sum()), rel=1e-5)


def test_grad_transform_edits_the_clipped_gradient():
    """The raw gradient is clipped first, then the plan's transform adds its correction (SCAFFOLD)."""
    g = one_batch_gradient(LONG, 17)
    limit = float(g.norm()) / 4
    shift = torch.full_like(g, 0.7)

    def transform(params):
        params["lora_A"].grad.add_(shift)

    step, _ = sgd_step(TinyCausalLM(), [batch_of(LONG, 17)], grad_accumulation=1, max_grad_norm=limit,
                       plan=ClientPlan(0, {}, grad_transform=transform))
    torch.testing.assert_close(step, g * (limit / float(g.norm())) + shift, rtol=1e-5, atol=1e-6)


def test_a_non_finite_loss_stops_training_with_the_step():
    model = TinyCausalLM()
    plan = ClientPlan(0, {}, extra_loss=lambda params: params["lora_A"].sum() * float("nan"))
    with pytest.raises(FloatingPointError, match="step 1"):
        sgd_step(model, [batch_of(LONG, 17)], grad_accumulation=1, plan=plan)


def test_cosine_round_lr_runs_from_lr_to_lr_min():
    lr, lr_min = 1e-2, 1e-4
    assert round_lr(1, 5, lr, lr_min, "cosine") == pytest.approx(lr)
    assert round_lr(5, 5, lr, lr_min, "cosine") == pytest.approx(lr_min)
    assert round_lr(3, 5, lr, lr_min, "cosine") == pytest.approx((lr + lr_min) / 2)  # half-way: cos(pi/2) = 0
    # a quarter of the way: cos(pi/4) = sqrt(2)/2
    assert round_lr(2, 5, lr, lr_min, "cosine") == pytest.approx(lr_min + (lr - lr_min) * (1 + math.sqrt(0.5)) / 2)
    assert round_lr(4, 5, lr, lr_min, "constant") == lr
    assert round_lr(1, 1, lr, lr_min, "cosine") == lr


def test_a_kept_optimizer_continues_exactly_where_it_stopped():
    """Two calls with an AdamW state saved and restored between them = one uninterrupted optimizer."""
    batches = [batch_of(LONG, 17), batch_of(SHORT, 5)] * 2
    whole = TinyCausalLM()
    opt = make_optimizer([whole.lora_A], "adamw", 1e-2, 0.0)
    train_local(whole, params_of(whole), iter(batches), ClientPlan(0, {}), steps=4, grad_accumulation=1,
                lr=1e-2, optimizer=opt)
    split = TinyCausalLM()
    first = make_optimizer([split.lora_A], "adamw", 1e-2, 0.0)
    it = iter(batches)
    train_local(split, params_of(split), it, ClientPlan(0, {}), steps=2, grad_accumulation=1, lr=1e-2, optimizer=first)
    saved = optimizer_tensors(first, params_of(split))
    assert {"lora_A::exp_avg", "lora_A::exp_avg_sq", "lora_A::step"} <= set(saved)
    second = make_optimizer([split.lora_A], "adamw", 1e-2, 0.0)
    load_optimizer_tensors(second, params_of(split), saved)
    train_local(split, params_of(split), it, ClientPlan(0, {}), steps=2, grad_accumulation=1, lr=1e-2, optimizer=second)
    torch.testing.assert_close(split.lora_A.detach(), whole.lora_A.detach())
    fresh = TinyCausalLM()  # a fresh optimizer for the second half is a different trajectory
    it = iter(batches)
    train_local(fresh, params_of(fresh), it, ClientPlan(0, {}), steps=2, grad_accumulation=1, lr=1e-2)
    train_local(fresh, params_of(fresh), it, ClientPlan(0, {}), steps=2, grad_accumulation=1, lr=1e-2)
    assert not torch.allclose(fresh.lora_A.detach(), whole.lora_A.detach())


# --- SCAFFOLD through train_local ------------------------------------------------------------------------------
KEY = "layers.0.q_proj.lora_A.default.weight"


class Quadratic(nn.Module):
    """loss = 1/2 ||M x - y||^2 for the client's (M, y): gradient M^T (M x - y), computed by hand below."""

    def __init__(self, x: torch.Tensor, m: torch.Tensor, y: torch.Tensor) -> None:
        super().__init__()
        self.x = nn.Parameter(x.clone())
        self.m, self.y = m, y

    def forward(self, input_ids=None, attention_mask=None, labels=None):
        r = self.m @ self.x - self.y
        return type("Out", (), {"loss": 0.5 * (r * r).sum()})()


def manual_mean_clipped_gradient(x0, m, y, c_minus_ck, steps, lr, limit):
    """SCAFFOLD's local loop written out: g = M^T (M x - y), clipped to ``limit``, then corrected."""
    x = x0.clone().double()
    m, y, corr = m.double(), y.double(), c_minus_ck.double()
    total = torch.zeros_like(x)
    for _ in range(steps):
        g = m.T @ (m @ x - y)
        g = g * min(1.0, limit / float(g.norm()))
        total += g
        x = x - lr * (g + corr)
    return (total / steps).float(), x.float()


def test_scaffold_two_rounds_through_train_local_with_nonzero_controls():
    """Issue 13, finding 8: with clipping on, option II's c_k+ = c_k - c + (x - x_k) / (K lr) must equal the
    mean clipped raw gradient along the client's corrected trajectory, in round 2 too (non-zero c - c_k);
    clipping after the correction would give c_k - c + mean(clip(g + c - c_k)) instead."""
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(4, generator=g)
    data = {cid: (torch.randn(5, 4, generator=g) * (cid + 2), torch.randn(5, generator=g) * 3) for cid in (0, 1)}
    steps, lr, limit = 5, 0.05, 1.0
    strategy = make("scaffold", num_clients=2, local_optimizer="sgd")
    glob = strategy.init_global({KEY: x0})
    store = MemoryStore()
    batch = {"input_ids": torch.zeros(1, 1, dtype=torch.long), "attention_mask": torch.ones(1, 1), "labels": torch.zeros(1)}
    c_k = {0: torch.zeros(4), 1: torch.zeros(4)}
    clipped_somewhere = False
    for round_idx in (1, 2):
        c = strategy.control[KEY].clone()
        updates = []
        for cid in (0, 1):
            m, y = data[cid]
            plan = strategy.configure_client(round_idx, cid, glob, store)
            strategy.attach_client_hooks(round_idx, plan, store)
            model = Quadratic(glob[KEY], m, y)
            result, _ = train_local(model, {KEY: model.x}, iter([batch] * steps), plan, steps=steps,
                                    grad_accumulation=1, lr=lr, optimizer_name="sgd", max_grad_norm=limit,
                                    num_examples=10)
            up = strategy.client_update(round_idx, plan, {KEY: model.x.detach().clone()}, result, store)
            strategy.check_update(glob, up)
            strategy.commit_private(up, store)
            expected_c, expected_x = manual_mean_clipped_gradient(glob[KEY], m, y, c - c_k[cid], steps, lr, limit)
            clipped_somewhere |= float((m.T @ (m @ glob[KEY] - y)).norm()) > limit
            torch.testing.assert_close(up.tensors[KEY], expected_x, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(store.get(cid, "scaffold_control")[KEY], expected_c, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(up.control[KEY], expected_c - c_k[cid], rtol=1e-4, atol=1e-5)
            c_k[cid] = expected_c
            updates.append(up)
        glob = strategy.aggregate(round_idx, glob, updates).global_state
        # c <- c + (1/N) sum of the control deltas; with every client sampled, c = mean_k c_k
        torch.testing.assert_close(strategy.control[KEY], (c_k[0] + c_k[1]) / 2, rtol=1e-4, atol=1e-5)
        if round_idx == 1:
            assert float(strategy.control[KEY].abs().max()) > 0.1  # round 2 runs with non-zero controls
    assert clipped_somewhere


def test_a_dropped_scaffold_client_keeps_its_old_control():
    """c_k+ reaches the store only through commit_private, which the engine calls after check_update."""
    strategy = make("scaffold", num_clients=2, local_optimizer="sgd")
    glob = strategy.init_global({KEY: torch.zeros(4)})
    store = MemoryStore()
    plan = strategy.configure_client(1, 0, glob, store)
    strategy.attach_client_hooks(1, plan, store)
    from fedpeft.strategies.base import TrainResult

    bad = {KEY: torch.tensor([float("nan"), 0.0, 0.0, 0.0])}
    up = strategy.client_update(1, plan, bad, TrainResult(3, 3, 10, 1.0, 1.0, 0.1, 0.0), store)
    with pytest.raises(ValueError):
        strategy.check_update(glob, up)
    assert store.get(0, "scaffold_control") is None

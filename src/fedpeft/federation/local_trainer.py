"""The local trainer: one lean loop over the shared model (no per-round Trainer objects).

K optimizer steps, each of ``grad_accumulation`` micro-batches; optional extra loss and gradient
transform from the ClientPlan; gradient-norm clipping; a fresh optimizer every call (the learning
rate is constant within a round, the engine picks it from the cross-round schedule).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator, Mapping

import torch

from fedpeft.strategies.base import ClientPlan, TrainResult


def round_lr(round_idx: int, rounds: int, lr: float, lr_min: float, schedule: str) -> float:
    """Client learning rate of round ``round_idx`` (1-based): constant, or cosine from lr to lr_min."""
    if schedule == "constant" or rounds <= 1:
        return lr
    progress = (round_idx - 1) / (rounds - 1)
    return lr_min + 0.5 * (lr - lr_min) * (1 + math.cos(math.pi * progress))


def make_optimizer(params, name: str, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"training.optimizer: unknown optimizer '{name}'; valid: adamw, sgd")


def train_local(
    model: torch.nn.Module,
    params: Mapping[str, torch.nn.Parameter],
    batches: Iterator[dict[str, torch.Tensor]],
    plan: ClientPlan,
    *,
    steps: int,
    grad_accumulation: int,
    lr: float,
    optimizer_name: str = "adamw",
    weight_decay: float = 0.0,
    max_grad_norm: float | None = 1.0,
    precision: str = "fp32",
    num_examples: int = 0,
    on_step=None,
) -> tuple[TrainResult, list[float]]:
    """Train ``params`` (already set trainable on ``model``) and return the result and per-step losses."""
    start = time.perf_counter()
    optimizer = make_optimizer(list(params.values()), optimizer_name, lr, weight_decay)
    autocast = (torch.autocast("cpu" if not torch.cuda.is_available() else "cuda", dtype=torch.bfloat16)
                if precision == "bf16" else contextlib.nullcontext())
    model.train()
    losses: list[float] = []
    seen = tokens = 0
    for step in range(steps):
        optimizer.zero_grad(set_to_none=True)
        step_loss = 0.0
        for _ in range(grad_accumulation):
            batch = next(batches)
            with autocast:
                out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
            loss = out.loss / grad_accumulation
            if plan.extra_loss is not None:
                loss = loss + plan.extra_loss(params) / grad_accumulation
            loss.backward()
            step_loss += float(loss.detach())
            seen += batch["input_ids"].shape[0]
            tokens += int(batch["attention_mask"].sum())
        if not math.isfinite(step_loss):
            raise FloatingPointError(f"local loss became {step_loss} at step {step + 1}")
        if plan.grad_transform is not None:
            plan.grad_transform(params)
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(list(params.values()), max_grad_norm)
        optimizer.step()
        losses.append(step_loss)
        if on_step is not None:
            on_step(step + 1, step_loss)
    model.eval()
    result = TrainResult(
        steps=steps,
        examples_seen=seen,
        num_examples=num_examples,
        mean_loss=sum(losses) / len(losses),
        last_loss=losses[-1],
        lr=lr,
        seconds=time.perf_counter() - start,
        tokens=tokens,
    )
    return result, losses

"""The local loop of ``local_trainer.train_local`` for a group of clients in one batched pass.

Each optimizer step, the m-th micro-batch of every client of the group is stacked (right-padded to the
longest) into one batch, client by client, and runs once through the shared model with per-sample adapter
routing (``batched_lora.grouped_lora``). The loss is the sum over clients of each client's own step loss,
exactly as the serial loop weighs it (its micro-batch's supervised-token mean times the micro-batch's
share of the step's supervised tokens), so the gradient of each client's tensors is that client's serial
gradient. Then, per client and in the serial order: its extra loss (FedProx's proximal term), clipping by
the norm of its own gradient, its ``grad_transform`` (masks, SCAFFOLD's correction), its own optimizer's
step. Nothing couples two clients: a client's result does not depend on its group-mates' data.

Batch order and micro-batch boundaries are each client's serial ones (same seeded streams), so the
results equal the serial run's up to floating-point reassociation (bit-identical is not promised: the
batched matmuls may sum in another order; float64 agrees to ~1e-15).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from fedpeft.federation.batched_lora import ClientAdapters, grouped_lora
from fedpeft.federation.local_trainer import IGNORE_INDEX, make_optimizer, supervised_count
from fedpeft.models.device import autocast, is_out_of_memory, model_device, out_of_memory_error
from fedpeft.strategies.base import ClientPlan, TrainResult


@dataclass
class GroupMember:
    """One client job of a group: its plan, adapter tensors, seeded batch stream and optimizer."""

    plan: ClientPlan
    adapters: ClientAdapters
    batches: Iterator[dict[str, torch.Tensor]]
    num_examples: int
    optimizer: torch.optim.Optimizer | None = None
    steps: int | None = None
    """This client's optimizer steps (None: the group's); a client that is done leaves the later passes."""
    lr: float | None = None
    """This client's learning rate (None: the group's)."""
    error: Exception | None = None
    """What failed this client alone (its step held no supervised target); it leaves the later passes."""
    losses: list[torch.Tensor] = field(default_factory=list)
    seen: int = 0
    tokens: int = 0


def stack_batches(batches: Sequence[dict[str, torch.Tensor]], pad_id: int) -> dict[str, torch.Tensor]:
    """Concatenate right-padded batches row-wise, padding each to the longest (pad id, mask 0, label -100):
    right padding leaves every real token's position and causal context unchanged."""
    width = max(b["input_ids"].shape[1] for b in batches)

    def pad(t: torch.Tensor, value: int) -> torch.Tensor:
        return F.pad(t, (0, width - t.shape[1]), value=value)

    return {"input_ids": torch.cat([pad(b["input_ids"], pad_id) for b in batches]),
            "attention_mask": torch.cat([pad(b["attention_mask"], 0) for b in batches]),
            "labels": torch.cat([pad(b["labels"], IGNORE_INDEX) for b in batches])}


def per_row_token_loss_sums(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum over each row of the shifted next-token cross-entropy (transformers' causal-LM loss before
    its mean), in float32 or wider like transformers' (logits upcast)."""
    logits = logits[:, :-1, :].float() if logits.dtype in (torch.float16, torch.bfloat16) else logits[:, :-1, :]
    target = labels[:, 1:]
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=IGNORE_INDEX,
                           reduction="none")
    return loss.view(target.shape).sum(dim=1)


def train_group(model: torch.nn.Module, members: Sequence[GroupMember], *, steps: int, grad_accumulation: int,
                lr: float, pad_id: int, optimizer_name: str = "adamw", weight_decay: float = 0.0,
                max_grad_norm: float | None = 1.0, precision: str = "fp32") -> dict[int, tuple[TrainResult, list[float]] | Exception]:
    """Train every member's adapters; per member (by position) its (result, step losses), or the
    exception that failed it alone (a non-finite loss, a step without a supervised target). Members may
    set their own ``steps`` and ``lr``. An exception of the batched pass itself
    (out of memory, ...) is raised for the caller to handle."""
    start = time.perf_counter()
    device = model_device(model)
    cast = autocast(device, precision)
    non_blocking = device.type == "cuda"
    for m in members:
        m.steps = steps if m.steps is None else m.steps
        m.lr = lr if m.lr is None else m.lr
        if m.optimizer is None:
            m.optimizer = make_optimizer(list(m.adapters.params.values()), optimizer_name, m.lr, weight_decay)
        for group in m.optimizer.param_groups:
            group["lr"] = m.lr
    model.train()
    everyone = members
    try:
        for step in range(max(m.steps for m in everyone)):
            drawn = [(m, [next(m.batches) for _ in range(grad_accumulation)])
                     for m in everyone if step < m.steps and m.error is None]  # clients with steps left
            for m, mb in drawn:
                if sum(supervised_count(b["labels"]) for b in mb) == 0:  # as serially: this client fails
                    m.error = ValueError(f"local step {step + 1}: its {grad_accumulation} micro-batch(es) hold no "
                                         f"supervised target (every label is {IGNORE_INDEX}); check "
                                         f"training.max_seq_len and the template")
            members = [m for m, _ in drawn if m.error is None]
            micro = [mb for m, mb in drawn if m.error is None]
            if not members:
                continue
            with grouped_lora(model, [m.adapters for m in members]):
                for m in members:
                    m.optimizer.zero_grad(set_to_none=True)
                counts = [[supervised_count(b["labels"]) for b in mb] for mb in micro]
                totals = [sum(c) for c in counts]
                step_losses = [torch.zeros((), device=device) for _ in members]
                for j in range(grad_accumulation):
                    batches = [micro[k][j] for k in range(len(members))]
                    for m, b in zip(members, batches):
                        m.seen += b["input_ids"].shape[0]
                        m.tokens += int(b["attention_mask"].sum())
                    batch = {k: v.to(device, non_blocking=non_blocking)
                             for k, v in stack_batches(batches, pad_id).items()}
                    rows = [b["input_ids"].shape[0] for b in batches]
                    with cast:
                        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                        row_sums = per_row_token_loss_sums(logits, batch["labels"])
                    total_loss = None
                    for k, part in enumerate(torch.split(row_sums, rows)):
                        count = counts[k][j]
                        if count == 0:  # serial skips this micro-batch: it adds nothing to the step's mean
                            continue
                        # the serial weighting: (mean over the micro-batch's targets) * count / total
                        loss = (part.sum() / count).float() * (count / totals[k])
                        step_losses[k] += loss.detach()
                        total_loss = loss if total_loss is None else total_loss + loss
                    if total_loss is not None:
                        total_loss.backward()
                for k, m in enumerate(members):
                    params = m.adapters.params
                    if m.plan.extra_loss is not None:
                        extra = m.plan.extra_loss(params)
                        extra.backward()
                        step_losses[k] += extra.detach().to(device)
                    if max_grad_norm is not None:
                        torch.nn.utils.clip_grad_norm_(list(params.values()), max_grad_norm)
                    if m.plan.grad_transform is not None:
                        m.plan.grad_transform(params)
                    m.optimizer.step()
                    m.losses.append(step_losses[k])
    except Exception as exc:
        model.eval()
        if is_out_of_memory(exc):
            raise out_of_memory_error(exc, "batched local training", device) from exc
        raise
    model.eval()
    seconds = time.perf_counter() - start
    out: dict[int, tuple[TrainResult, list[float]] | Exception] = {}
    for k, m in enumerate(everyone):
        if m.error is not None:
            out[k] = m.error
            continue
        losses = torch.stack(m.losses).tolist()
        bad = next((i for i, value in enumerate(losses) if not math.isfinite(value)), None)
        if bad is not None:
            out[k] = FloatingPointError(f"local loss became {losses[bad]} at step {bad + 1}")
            continue
        out[k] = (TrainResult(steps=m.steps, examples_seen=m.seen, num_examples=m.num_examples,
                              mean_loss=sum(losses) / len(losses), last_loss=losses[-1], lr=m.lr, seconds=seconds,
                              tokens=m.tokens), losses)
    return out

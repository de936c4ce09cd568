"""The local trainer: one lean loop over the shared model (no per-round Trainer objects).

K optimizer steps, each over ``grad_accumulation`` micro-batches. The step's loss is the mean over every
supervised token of its micro-batches (for a classifier: over its examples), so accumulating micro-batches
gives the gradient of the same examples in one batch, whatever their token counts: each micro-batch's mean
loss is weighted by its share of the step's supervised tokens (``supervised_count``). The plan's extra loss
(e.g. FedProx's proximal term) is added once per step. Then the raw gradient is clipped to
``max_grad_norm``, and only then the plan's ``grad_transform`` edits it (SCAFFOLD's correction c - c_k, a
rank mask): a correction is not clipped away, and SCAFFOLD's control estimates the gradient the client
actually followed. The optimizer is fresh every call unless the caller passes one (``training.keep_optimizer``:
the client runner restores it from the client's store); the learning rate is constant within a round, the
engine picks it from the cross-round schedule (``round_lr``).

Device and precision: each batch moves to the model's device (non-blocking from pinned CPU memory on
CUDA); ``precision="bf16"`` runs forward and loss under bfloat16 autocast on that device while the
trainable adapter weights, their gradients and the optimizer state stay float32. The hot path never
waits for the device: step losses stay tensors and are read once, at the end of the job (a NaN or inf
loss is therefore reported after the job, not at its step). ``on_step`` gets the step's loss as a
0-d tensor; reading it (``float``) synchronises, which the progress display does only when shown.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Mapping

import torch

from fedpeft.models.device import autocast, is_out_of_memory, model_device, out_of_memory_error
from fedpeft.models.family import model_is_encoder_decoder
from fedpeft.models.vision import image_loss, is_image_batch
from fedpeft.privacy.dp_sgd import DPSGD
from fedpeft.strategies.base import ClientPlan, TrainResult

IGNORE_INDEX = -100
"""Label value the loss skips (transformers' convention)."""


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


def supervised_count(labels: torch.Tensor, shift: int = 1) -> int:
    """How many targets a batch's mean loss averages over: for a causal LM the label tokens after the
    one-position shift the model applies (``labels[:, 1:] != -100``); for an encoder-decoder (``shift=0``:
    the decoder predicts every label, :func:`label_shift`) every label that is not -100; for per-example
    labels (a classifier's class ids) the examples."""
    if labels.dim() <= 1:
        return int(labels.shape[0])
    return int((labels[..., shift:] != IGNORE_INDEX).sum())


def label_shift(model: torch.nn.Module) -> int:
    """Positions a model's own loss shifts its labels by: 1 for a causal LM (token t predicts label t+1), 0
    for an encoder-decoder (its config's ``is_encoder_decoder``: the decoder predicts each label in place)."""
    return 0 if model_is_encoder_decoder(model) else 1


# --- optimizer state as flat tensors (the client store holds str -> tensor) -----------------------------
def optimizer_tensors(optimizer: torch.optim.Optimizer, params: Mapping[str, torch.nn.Parameter]) -> dict[str, torch.Tensor]:
    """The optimizer's per-parameter state as ``"<param name>::<state key>" -> tensor`` (CPU)."""
    out: dict[str, torch.Tensor] = {}
    for name, p in params.items():
        for key, value in optimizer.state.get(p, {}).items():
            out[f"{name}::{key}"] = torch.as_tensor(value).detach().to("cpu").clone()
    return out


def load_optimizer_tensors(optimizer: torch.optim.Optimizer, params: Mapping[str, torch.nn.Parameter],
                           tensors: Mapping[str, torch.Tensor]) -> None:
    """Restore what ``optimizer_tensors`` saved, for the parameters present with the same shape (a
    parameter trained for the first time, or reshaped, starts fresh)."""
    for name, p in params.items():
        prefix = f"{name}::"
        state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        if not state or any(v.dim() and tuple(v.shape) != tuple(p.shape) for v in state.values()):
            continue
        optimizer.state[p] = {k: (v.clone() if k == "step" else v.to(p.device, p.dtype).clone()) for k, v in state.items()}


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
    optimizer: torch.optim.Optimizer | None = None,
    loss_fn=None,
    dp_sgd: dict | None = None,
) -> tuple[TrainResult, list[float]]:
    """Train ``params`` (already set trainable on ``model``) and return the result and per-step losses.
    ``optimizer`` (over ``params``): continue with it (its learning rate is set to ``lr``); None: a fresh one.
    ``loss_fn(model, batch)`` replaces the model's own loss on ``labels`` (alignment.objectives: reward
    model, DPO, IPO); each micro-batch then weighs the same.
    ``dp_sgd`` (``{noise_multiplier, max_grad_norm, expected_batch_size, seed}``): record-level DP through
    Opacus (``privacy/dp_sgd.py``): each example's loss is its own token mean, its gradient is clipped and
    the sum noised; ``max_grad_norm`` (batch clipping) is then not applied, and ``loss_fn`` is refused."""
    start = time.perf_counter()
    if optimizer is None:
        optimizer = make_optimizer(list(params.values()), optimizer_name, lr, weight_decay)
    for group in optimizer.param_groups:
        group["lr"] = lr
    device = model_device(model)
    cast = autocast(device, precision)
    non_blocking = device.type == "cuda"
    private = None
    if dp_sgd is not None:
        if loss_fn is not None:
            raise ValueError("privacy.dp_sgd does not support a replaced loss (training objective other than sft)")
        private = DPSGD(model, optimizer, noise_multiplier=dp_sgd["noise_multiplier"],
                        max_grad_norm=dp_sgd["max_grad_norm"], expected_batch_size=dp_sgd["expected_batch_size"],
                        seed=dp_sgd["seed"], device=device)
    shift = label_shift(model)
    model.train()
    step_losses: list[torch.Tensor] = []
    seen = tokens = 0
    try:
        for step in range(steps):
            if private is not None:
                private.zero_grad()
            else:
                optimizer.zero_grad(set_to_none=True)
            micro = [next(batches) for _ in range(grad_accumulation)]
            counts = [supervised_count(batch["labels"], shift) for batch in micro]  # on the CPU copies: no device sync
            total = sum(counts)
            if total == 0:
                raise ValueError(f"local step {step + 1}: its {grad_accumulation} micro-batch(es) hold no supervised "
                                 f"target (every label is {IGNORE_INDEX}); check training.max_seq_len and the template")
            step_loss = torch.zeros((), device=device)
            for batch, count in zip(micro, counts):
                if is_image_batch(batch):  # pixel_values, labels, class_mask: no tokens
                    seen += batch["labels"].shape[0]
                else:
                    seen += batch["input_ids"].shape[0]
                    tokens += int(batch["attention_mask"].sum()) + (count if shift == 0 else 0)  # + decoder tokens
                if count == 0:  # its mean loss is 0/0; it adds nothing to the step's token mean
                    continue
                batch = {k: v.to(device, non_blocking=non_blocking) if torch.is_tensor(v) else v
                         for k, v in batch.items()}
                with cast:
                    if private is not None:  # per-example losses through Opacus's hooks, mean over the micro-batch
                        loss = private.loss(batch)
                    elif loss_fn is not None:
                        loss = loss_fn(model, batch).float() / grad_accumulation
                    elif is_image_batch(batch):  # cross-entropy over the logits of each image's task
                        loss = image_loss(model, batch) * (count / total)
                    else:
                        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                    labels=batch["labels"])
                        loss = out.loss.float() * (count / total)  # sum = mean over the step's supervised targets
                loss.backward()
                # (DP-SGD: each micro-batch's loss is its example mean, unscaled for Opacus; reported as the mean)
                step_loss += loss.detach() / (grad_accumulation if private is not None else 1)
            extra_grads = None
            if plan.extra_loss is not None:
                extra = plan.extra_loss(params)
                if private is not None:  # data-independent: its gradient is added after DP-SGD's clip and noise
                    extra_grads = (list(torch.autograd.grad(extra, list(params.values()), allow_unused=True))
                                   if extra.requires_grad else None)
                else:
                    extra.backward()
                step_loss += extra.detach().to(device)
            if private is not None:
                private.step(params, extra_grads, plan.grad_transform)
                step_losses.append(step_loss)
                if on_step is not None:
                    on_step(step + 1, step_loss)
                continue
            if max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(list(params.values()), max_grad_norm)
            if plan.grad_transform is not None:
                plan.grad_transform(params)
            optimizer.step()
            step_losses.append(step_loss)
            if on_step is not None:
                on_step(step + 1, step_loss)
    except Exception as exc:
        if is_out_of_memory(exc):
            model.eval()
            raise out_of_memory_error(exc, "local training", device) from exc
        raise
    finally:
        if private is not None:
            private.close()  # Opacus's hooks off the shared model
    losses = torch.stack(step_losses).tolist()  # the job's one host sync
    bad = next((i for i, value in enumerate(losses) if not math.isfinite(value)), None)
    if bad is not None:
        model.eval()
        raise FloatingPointError(f"local loss became {losses[bad]} at step {bad + 1}")
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

"""Record-level DP: DP-SGD through Opacus inside a client's local training.

For one local job, :class:`DPSGD` wraps the shared model in Opacus's ``GradSampleModule`` (hooks that
compute per-example gradients of the trainable parameters: the adapter, and only the adapter, since the
base is frozen) and the local optimizer in Opacus's ``DPOptimizer``: each step clips every example's
gradient to ``max_grad_norm``, sums them, adds N(0, (sigma max_grad_norm)^2) and divides by the expected
batch (micro-batch size x grad_accumulation). Each example's loss is the mean over its own supervised
tokens (for a classifier: its cross-entropy), so its gradient is that example's alone. The hooks are
removed when the job ends; the model is left as it was.

Per-client accounting: every step is a sampled Gaussian mechanism on the client's n_k records with
q = batch / n_k (Opacus's analysis assumes Poisson sampling; the trainer draws fixed-size batches from
shuffled epochs, see ``privacy/accountant.py``); :class:`RecordLevelAccounting` keeps each client's step
count and reports its epsilon at ``privacy.dp_sgd.delta``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer

from fedpeft.privacy.accountant import epsilon_of

IGNORE_INDEX = -100

# Opacus's full backward hooks on the first trainable layer fire on outputs only (its input, the frozen
# embedding's output, needs no gradient): expected under PEFT, and said once per step by torch.
warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed with respect "
                        "to module outputs", category=UserWarning)


class DPSGDUnsupported(ValueError):
    """A trainable module Opacus has no per-example gradient rule for."""


def check_opacus_modules(model: torch.nn.Module) -> None:
    """Every module holding trainable parameters directly must be one Opacus computes per-example
    gradients for (``GradSampleModule.GRAD_SAMPLERS``: Linear, Embedding, LayerNorm, Conv, ...)."""
    for name, module in model.named_modules():
        own = [n for n, p in module.named_parameters(recurse=False) if p.requires_grad]
        if own and type(module) not in GradSampleModule.GRAD_SAMPLERS:
            raise DPSGDUnsupported(
                f"privacy.dp_sgd: Opacus cannot compute per-example gradients for module '{name}' (type "
                f"{type(module).__name__}, trainable {', '.join(own)}); DP-SGD supports adapters whose trainable "
                f"parameters live in {', '.join(sorted({t.__name__ for t in GradSampleModule.GRAD_SAMPLERS})[:8])}, ... "
                "(e.g. LoRA's Linear factors, a Linear head); use privacy.dp_sgd.enabled=false with this adapter")


def per_example_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(batch,) losses: for a causal LM each example's mean cross-entropy over its supervised next
    tokens (0 when it has none); for per-example labels (a classifier) its cross-entropy."""
    if labels.dim() <= 1:
        return F.cross_entropy(logits.float(), labels, reduction="none")
    shifted, targets = logits[:, :-1].float(), labels[:, 1:]
    token = F.cross_entropy(shifted.reshape(-1, shifted.shape[-1]), targets.reshape(-1), reduction="none",
                            ignore_index=IGNORE_INDEX).view(targets.shape)
    mask = (targets != IGNORE_INDEX).float()
    return (token * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)


class DPSGD:
    """One local job's DP-SGD: ``loss(batch)``, ``zero_grad()``, ``step(...)``, ``close()``."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, *, noise_multiplier: float,
                 max_grad_norm: float, expected_batch_size: int, seed: int, device: torch.device) -> None:
        check_opacus_modules(model)
        # strict=False: the base model's buffers (rotary tables) are not parameters Opacus needs to see.
        self.module = GradSampleModule(model, batch_first=True, loss_reduction="mean", strict=False)
        generator = torch.Generator(device=device).manual_seed(seed % (2**63))
        self.optimizer = DPOptimizer(optimizer, noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
                                     expected_batch_size=expected_batch_size, loss_reduction="mean",
                                     generator=generator)

    def loss(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Mean over the micro-batch of each example's own loss (Opacus's loss_reduction='mean')."""
        out = self.module(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        return per_example_loss(out.logits, batch["labels"]).mean()

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)  # also drops the per-example gradients

    def step(self, params: Mapping[str, torch.nn.Parameter], extra_grads: list[torch.Tensor | None] | None,
             grad_transform: Callable[[Mapping[str, torch.nn.Parameter]], None] | None) -> None:
        """Clip per example, noise, average (Opacus), then the data-independent extras: the gradient of
        the plan's extra loss (FedProx's proximal term) and the plan's gradient transform (a rank mask)."""
        for name, p in params.items():
            if getattr(p, "grad_sample", None) is None:
                raise DPSGDUnsupported(f"privacy.dp_sgd: no per-example gradient reached trainable parameter "
                                       f"'{name}' (Opacus did not see it in the forward pass)")
        if not self.optimizer.pre_step():
            return
        if extra_grads is not None:
            for p, g in zip(params.values(), extra_grads):
                if g is not None:
                    p.grad.add_(g)
        if grad_transform is not None:
            grad_transform(params)
        self.optimizer.original_optimizer.step()

    def close(self) -> None:
        self.module._close()  # hooks and per-example state removed: the shared model is as before


class RecordLevelAccounting:
    """Per client, the DP-SGD steps taken on its records and the epsilon they spend."""

    def __init__(self, noise_multiplier: float, delta: float, batch_per_step: int) -> None:
        self.noise_multiplier, self.delta, self.batch = noise_multiplier, delta, batch_per_step
        self.steps: dict[str, list[int]] = {}  # client -> [steps, records]

    def charge(self, client_id: int, steps: int, records: int) -> None:
        entry = self.steps.setdefault(str(client_id), [0, records])
        entry[0] += steps
        entry[1] = records

    def epsilon(self, client_id: int | str) -> float:
        steps, records = self.steps.get(str(client_id), [0, 1])
        if not steps:
            return 0.0
        return epsilon_of([[self.noise_multiplier, min(1.0, self.batch / records), steps]], self.delta)

    def summary(self) -> dict[str, Any]:
        eps = {c: self.epsilon(c) for c in self.steps}
        return {"dp_sgd_epsilon_max": max(eps.values(), default=0.0),
                "dp_sgd_epsilon_mean": sum(eps.values()) / len(eps) if eps else 0.0,
                "dp_sgd_delta": self.delta, "dp_sgd_noise_multiplier": self.noise_multiplier,
                "dp_sgd_clients": len(eps)}

    def state_dict(self) -> dict[str, Any]:
        return {"steps": {c: list(v) for c, v in self.steps.items()}}

    def load_state_dict(self, state: Mapping[str, Any] | None) -> None:
        self.steps = {str(c): [int(v[0]), int(v[1])] for c, v in (state or {}).get("steps", {}).items()}

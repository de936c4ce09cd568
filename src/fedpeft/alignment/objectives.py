"""Preference training objectives as a loss function the local trainer can call: reward model, DPO, IPO.

``PreferenceObjective(kind, loss=..., beta=...)`` is a callable ``(model, batch) -> loss`` over a
``dpo.collate_pairs`` batch (chosen rows, then rejected rows), which is what
``federation.local_trainer.train_local(loss_fn=...)`` takes in place of the model's own LM loss:

- ``reward``: the model has a scalar head (``AutoModelForSequenceClassification`` with ``num_labels=1``,
  wrapped with LoRA as ``model.head=classification`` is: the head is a ``modules_to_save`` tensor of the
  adapter state); its logit on the last real token of prompt + completion is the reward, and
  ``reward_losses.reward_loss(loss, **loss_params)`` of (chosen, rejected) rewards is the loss;
- ``dpo`` / ``ipo``: the model is the LoRA causal LM; ``dpo.batch_preference_loss`` with the base model
  (adapters disabled) as the reference.

``evaluate_pairs`` gives the metrics of held-out pairs: pairwise accuracy (chosen reward > rejected
reward; for DPO/IPO the implicit rewards), the mean reward margin and the mean loss.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch

from fedpeft.alignment.dpo import batch_preference_loss
from fedpeft.alignment.names import OBJECTIVES
from fedpeft.alignment.reward_losses import reward_loss


def pair_rewards(model: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) scalar rewards of a ``collate_pairs`` batch from a one-output classifier."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    if logits.dim() != 2 or logits.shape[-1] != 1:
        raise ValueError(f"a reward model has one output per sequence (num_labels=1); its logits have shape "
                         f"{tuple(logits.shape)}")
    rewards = logits[:, 0].float()
    n = rewards.shape[0] // 2
    return rewards[:n], rewards[n:]


@dataclass
class PreferenceObjective:
    kind: str
    """reward | dpo | ipo (``sft`` is the model's own LM loss: no objective object)."""
    loss: str = "logsigmoid"
    """For ``reward``: a name of ``reward_losses.REWARD_LOSSES``."""
    loss_params: dict[str, float] = field(default_factory=dict)
    beta: float = 0.1
    """For ``dpo``/``ipo``: the strength of the pull towards the reference."""

    def __post_init__(self) -> None:
        if self.kind not in OBJECTIVES[1:]:
            raise ValueError(f"training objective {self.kind!r} is not a preference objective; valid: "
                             f"{', '.join(OBJECTIVES[1:])} (sft uses the model's own loss)")
        if self.kind == "reward":
            self._reward_loss = reward_loss(self.loss, **self.loss_params)  # validates name and parameters
        elif not self.beta > 0:
            raise ValueError(f"training.beta = {self.beta!r}; expected a number > 0")

    def stats(self, model: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(loss, chosen rewards, rejected rewards) of a batch of pairs."""
        if self.kind == "reward":
            chosen, rejected = pair_rewards(model, batch)
            return self._reward_loss(chosen, rejected), chosen.detach(), rejected.detach()
        out = batch_preference_loss(model, dict(batch), beta=self.beta, kind=self.kind)
        return out.loss, out.chosen_rewards, out.rejected_rewards

    def __call__(self, model: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.stats(model, batch)[0]


@torch.no_grad()
def evaluate_pairs(model: torch.nn.Module, objective: PreferenceObjective,
                   batches: Iterable[Mapping[str, torch.Tensor]]) -> dict[str, float]:
    """Pairwise accuracy, mean reward margin and mean loss over every pair of ``batches``."""
    was_training = model.training
    model.eval()
    chosen, rejected, losses, sizes = [], [], [], []
    try:
        for batch in batches:
            loss, c, r = objective.stats(model, batch)
            chosen.append(c)
            rejected.append(r)
            losses.append(float(loss))
            sizes.append(c.shape[0])
    finally:
        model.train(was_training)
    if not chosen:
        raise ValueError("evaluate_pairs: no pairs to evaluate")
    c, r = torch.cat(chosen), torch.cat(rejected)
    return {
        "pairwise_accuracy": float((c > r).float().mean()),
        "reward_margin": float((c - r).mean()),
        "loss": sum(loss * n for loss, n in zip(losses, sizes)) / sum(sizes),
        "pairs": int(c.shape[0]),
    }

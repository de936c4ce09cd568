"""Runs chosen attacks on a model and a sample of client texts, and scores them.

``AttackSettings`` is checked before any model loads (attack names, auxiliary data for the attacks
that need it, noise levels); the cut points are checked against the model's block count once it is
loaded. ``run_attacks`` simulates each victim's step on one text at a time (batch 1, no padding):

- split attacks see the activations after block ``cut`` (EIA, SIP, BiSR) and the gradient at block
  ``top_cut`` (DLG/TAG on the split gradient, BiSR's backward term);
- FedIT attacks see the gradient of one local step on a LoRA copy of the model (fresh adapter: B = 0).

A noise level ``k`` adds Gaussian noise of σ = k · RMS(observed tensor) to each observed tensor (the
activations, the cut gradient, the LoRA gradient), so the same level means the same signal-to-noise
ratio on every model. Scores: ROUGE-L F, METEOR (exact stage) and token accuracy against the true
text (for the split gradient attacks, which recover targets, against tokens 1..T−1).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import nn

from fedpeft.attacks.bisr import BiSROptions, bisr_attack
from fedpeft.attacks.cut import check_cut, num_blocks
from fedpeft.attacks.defences import gaussian_noise, noisy_gradients
from fedpeft.attacks.eia import EIAOptions, eia_attack
from fedpeft.attacks.gradient_matching import GradientMatchOptions, lora_gradient_attack, top_gradient_attack
from fedpeft.attacks.metrics import mean_scores, sequence_scores
from fedpeft.attacks.observe import observe_lora_gradient, observe_split
from fedpeft.attacks.sip import InversionModel, SIPOptions, sip_logits, train_inversion_model

# attack name -> what it observes (documentation and the table's "observes" column)
ATTACKS = {
    "eia": "activations at the cut (split)",
    "sip": "activations at the cut (split); auxiliary data",
    "bisr": "activations at the cut + gradient at the top cut (split); auxiliary data",
    "dlg-split": "gradient at the top cut (split)",
    "tag-split": "gradient at the top cut (split)",
    "dlg-fedit": "LoRA gradient of one local step (plain FL)",
    "tag-fedit": "LoRA gradient of one local step (plain FL)",
}
NEEDS_AUXILIARY = ("sip", "bisr")


class AttackSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    attacks: list[str] = Field(default_factory=lambda: ["eia", "tag-split"])
    cut: int = Field(1, ge=1)
    top_cut: int | None = None          # default: the last cut (blocks − 1)
    samples: int = Field(4, ge=1)
    max_tokens: int = Field(32, ge=2)
    noise_levels: list[float] = Field(default_factory=lambda: [0.0])
    steps: int | None = Field(None, ge=1)       # optimisation steps of EIA / DLG / TAG / BiSR (None: each one's default)
    sip_steps: int = Field(300, ge=1)
    has_auxiliary: bool = False
    lora_r: int = Field(8, ge=1)
    lora_targets: list[str] = Field(default_factory=lambda: ["q_proj", "v_proj"])
    seed: int = 0

    @field_validator("attacks")
    @classmethod
    def _known(cls, attacks: list[str]) -> list[str]:
        if not attacks:
            raise ValueError("--attacks: no attack given; valid: " + ", ".join(ATTACKS))
        unknown = [a for a in attacks if a not in ATTACKS]
        if unknown:
            raise ValueError(f"--attacks: unknown attack name(s) {', '.join(unknown)}; valid: {', '.join(ATTACKS)}")
        return attacks

    @field_validator("noise_levels")
    @classmethod
    def _levels(cls, levels: list[float]) -> list[float]:
        bad = [v for v in levels if not v >= 0]
        if bad or not levels:
            raise ValueError(f"--noise: {bad or levels} — expected one or more levels ≥ 0 (σ in units of the "
                             "observed tensor's RMS)")
        return levels

    @model_validator(mode="after")
    def _auxiliary(self) -> "AttackSettings":
        needing = [a for a in self.attacks if a in NEEDS_AUXILIARY]
        if needing and not self.has_auxiliary:
            raise ValueError(f"--aux-source: attack(s) {', '.join(needing)} train an inversion model on auxiliary "
                             "data, but no auxiliary data was given; pass --aux-source (a data source other than "
                             "the clients', e.g. --aux-source generated --aux-tasks uppercase,sort_numbers)")
        return self

    def check_model(self, model: nn.Module) -> int:
        """Both cuts inside the model's layers, top cut not below the cut; returns the top cut."""
        check_cut(model, self.cut, "--cut")
        top = num_blocks(model) - 1 if self.top_cut is None else self.top_cut
        check_cut(model, top, "--top-cut")
        if top < self.cut:
            raise ValueError(f"--top-cut: {top} is below --cut {self.cut}; expected cut ≤ top cut")
        return top


def _rms(tensor: torch.Tensor) -> float:
    return float(tensor.float().pow(2).mean().sqrt())


def _steps(settings: AttackSettings) -> dict:
    return {} if settings.steps is None else {"steps": settings.steps}


def _encode_all(tokenizer, texts: Sequence[str], max_tokens: int) -> list[dict[str, torch.Tensor]]:
    out = []
    for text in texts:
        enc = tokenizer(text, return_tensors="pt", truncation=True, max_length=max_tokens)
        out.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
    return out


def auxiliary_batches(tokenizer, texts: Sequence[str], max_tokens: int, batch_size: int = 16):
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    batches = []
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(list(texts[i:i + batch_size]), return_tensors="pt", padding=True, truncation=True,
                        max_length=max_tokens)
        batches.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
    return batches


def _lora_copy(model: nn.Module, settings: AttackSettings) -> nn.Module:
    """A copy of the model with a fresh LoRA adapter (what a FedIT client trains in its first step)."""
    from peft import LoraConfig, get_peft_model

    state = torch.random.get_rng_state()
    torch.manual_seed(settings.seed)
    try:
        return get_peft_model(copy.deepcopy(model), LoraConfig(r=settings.lora_r, lora_alpha=2 * settings.lora_r,
                                                               target_modules=list(settings.lora_targets)))
    finally:
        torch.random.set_rng_state(state)


def run_attacks(model: nn.Module, tokenizer, victim_texts: Sequence[str], settings: AttackSettings,
                auxiliary_texts: Sequence[str] = ()) -> list[dict]:
    """One row per (attack, noise level): mean ROUGE-L F, METEOR, token accuracy over the victim texts,
    plus the first reconstruction as an example."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    top_cut = settings.check_model(model)
    device = next(model.parameters()).device
    victims = [{k: v.to(device) for k, v in b.items()} for b in _encode_all(tokenizer, victim_texts, settings.max_tokens)]
    inversion: InversionModel | None = None
    if any(a in NEEDS_AUXILIARY for a in settings.attacks):
        batches = auxiliary_batches(tokenizer, auxiliary_texts, settings.max_tokens)
        batches = [{k: v.to(device) for k, v in b.items()} for b in batches]
        inversion = train_inversion_model(model, settings.cut, batches, SIPOptions(steps=settings.sip_steps,
                                                                                  seed=settings.seed))
    lora_model = _lora_copy(model, settings) if any(a.endswith("-fedit") for a in settings.attacks) else None
    rows = []
    for attack in settings.attacks:
        for level in settings.noise_levels:
            start = time.perf_counter()
            scores, example = [], None
            for index, victim in enumerate(victims):
                ids, mask = victim["input_ids"], victim["attention_mask"]
                seed = settings.seed + 1000 * index
                recovered, truth = _attack_one(attack, model, lora_model, inversion, ids, mask, settings, top_cut,
                                               level, seed)
                reference = tokenizer.decode(truth[0], skip_special_tokens=True)
                hypothesis = tokenizer.decode(recovered[0], skip_special_tokens=True)
                scores.append(sequence_scores(reference, hypothesis, truth.cpu(), recovered.cpu()))
                if example is None:
                    example = {"reference": reference, "reconstruction": hypothesis}
            rows.append({"attack": attack, "observes": ATTACKS[attack], "noise": level, "samples": len(scores),
                         **mean_scores(scores), "seconds": round(time.perf_counter() - start, 2), "example": example})
    return rows


def _attack_one(attack, model, lora_model, inversion, ids, mask, settings, top_cut, level, seed):
    """(recovered ids, the true ids they are scored against) for one victim text."""
    if attack.endswith("-fedit"):
        observed = observe_lora_gradient(lora_model, ids, mask)
        rms = _rms(torch.cat([g.reshape(-1) for g in observed.values()]))
        observed = noisy_gradients(observed, level * rms, seed)
        options = GradientMatchOptions(distance="l2" if attack == "dlg-fedit" else "tag", seed=seed, **_steps(settings))
        return lora_gradient_attack(lora_model, observed, tuple(ids.shape), mask, options), ids
    obs = observe_split(model, ids, mask, settings.cut, top_cut)
    activations = gaussian_noise(obs.activations, level * _rms(obs.activations), seed)
    gradient = gaussian_noise(obs.top_gradient, level * _rms(obs.top_gradient), seed + 1)
    if attack == "eia":
        return eia_attack(model, activations, settings.cut, mask, EIAOptions(seed=seed, **_steps(settings))), ids
    if attack == "sip":
        return sip_logits(inversion, activations, mask).argmax(-1), ids
    if attack == "bisr":
        start = sip_logits(inversion, activations, mask)
        return bisr_attack(model, start, settings.cut, activations, mask, top_cut, gradient,
                           BiSROptions(**_steps(settings))), ids
    options = GradientMatchOptions(distance="l2" if attack == "dlg-split" else "tag", seed=seed, **_steps(settings))
    return top_gradient_attack(model, obs.top_activations, gradient, top_cut, mask, options), ids[:, 1:]


def markdown_table(rows: Sequence[dict]) -> str:
    lines = ["| attack | observes | noise (× RMS) | samples | ROUGE-L F | METEOR (exact) | token accuracy | seconds |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['attack']} | {r['observes']} | {r['noise']:g} | {r['samples']} | {r['rouge_l_f']:.3f} | "
                     f"{r['meteor']:.3f} | {r['token_accuracy']:.3f} | {r['seconds']:.1f} |")
    return "\n".join(lines) + "\n"

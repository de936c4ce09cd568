"""Attacks on what a real split run recorded (``method.options.save_crossings``), not on a simulation.

A split run (method ``sfl``, cut ``a-b``) with ``save_crossings: N`` writes, per round and client job,
``<run>/split_crossings/round_<t>/client_<k>_<job>.safetensors`` with the first N micro-batches'
``<i>/act_up`` (input of block a, what the server receives, defence noise included), ``<i>/act_down``,
``<i>/grad_up`` (gradient at the input of block b, sent up by the client), ``<i>/grad_down`` and the
true ``<i>/input_ids`` / ``attention_mask`` / ``labels`` (never sent; the ground truth scores use).

Cut conventions: the split package's cut ``a`` (trunk starts at block index a) is this package's cut
``a`` (bottom = embeddings + the first a blocks), so EIA inverts ``act_up`` through ``a`` blocks; with
a = 0 the activation is the (privatised) input embedding itself and EIA reads its nearest tokens. The
gradient attacks (DLG/TAG) match ``grad_up`` at top cut ``b``, which must leave a block above it
(b ≤ L − 1).

What the attacker knows: the server of a split run holds the trunk and the pre-trained base model; it
does not see the clients' bottom/top LoRA weights at the step the crossing was made. The default
(``weights="base"``) is therefore the base model alone: exact for the first micro-batch of round 1
(LoRA B = 0, so the bottom is the base model) and an approximation afterwards. ``weights="final"`` adds
the run's final adapter (what the server has after the last average when client parts are averaged).

Scores per sequence over its attention mask: ROUGE-L F and METEOR (exact) of the decoded text, and
token accuracy of the ids; for DLG/TAG, which recover next-token targets, against tokens 1..T−1.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from safetensors import safe_open
from torch import nn

from fedpeft.attacks.cut import input_embedding_matrix, nearest_tokens, num_blocks
from fedpeft.attacks.eia import EIAOptions, eia_attack
from fedpeft.attacks.gradient_matching import GradientMatchOptions, top_gradient_attack
from fedpeft.attacks.metrics import mean_scores, sequence_scores
from fedpeft.attacks.report import ATTACK_FILE, PRIVACY_DIR
from fedpeft.attacks.sip import InversionModel, sip_logits

CROSSINGS_DIR = "split_crossings"   # strategies/sfl.py writes here (kept equal; test_attack_recorded checks)
RECORDED_ATTACKS = {
    "eia": "act_up (cut 1 activations, as received)",
    "sip": "act_up (cut 1 activations); auxiliary data",
    "dlg-split": "grad_up (gradient at cut 2, as received)",
    "tag-split": "grad_up (gradient at cut 2, as received)",
}
WEIGHTS = ("base", "final")


@dataclass
class RecordedJob:
    """One client job's saved crossings: its metadata and, per micro-batch, the tensors by name."""

    path: Path
    meta: dict[str, str]
    batches: list[dict[str, torch.Tensor]] = field(default_factory=list)

    @property
    def cut(self) -> tuple[int, int]:
        first, second = self.meta["cut"].split("-")
        return int(first), int(second)

    @property
    def defence(self) -> str:
        """The defences that were on, in the run's option names ("none" when none)."""
        parts = []
        if float(self.meta.get("activation_sigma", 0) or 0) > 0:
            parts.append(f"activation_noise={float(self.meta['activation_sigma']):g}")
        if self.meta.get("dchi_epsilon") not in (None, "None", ""):
            parts.append(f"dchi_epsilon={float(self.meta['dchi_epsilon']):g}")
        if float(self.meta.get("nopeek_alpha", 0) or 0) > 0:
            parts.append(f"nopeek_alpha={float(self.meta['nopeek_alpha']):g}")
        return ", ".join(parts) or "none"


def run_config(run_dir: Path) -> dict:
    """The run's saved config.yaml; an sfl run is required (else nothing crossed a cut)."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise ValueError(f"--run: '{run_dir}' has no config.yaml; expected a fedpeft run directory")
    config = yaml.safe_load(path.read_text()) or {}
    method = (config.get("method") or {}).get("name")
    if method != "sfl":
        raise ValueError(f"--run: '{run_dir}' ran method.name={method!r}, which exposes no cut activations or "
                         "gradients; attack a split run (method.name: sfl) with method.options.save_crossings > 0, "
                         "or attack FedIT updates with --model (tag-fedit)")
    return config


def load_crossings(directory: Path) -> list[RecordedJob]:
    """Every saved client job under ``directory`` (a run's split_crossings/ or one round of it), in order."""
    directory = Path(directory)
    files = sorted(directory.rglob("*.safetensors")) if directory.is_dir() else []
    if not files:
        raise ValueError(f"no recorded crossings in '{directory}': run the split training with "
                         "method.options.save_crossings set (e.g. method.options.save_crossings=1)")
    jobs = []
    for path in files:
        with safe_open(str(path), "pt") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
        count = 1 + max(int(k.split("/", 1)[0]) for k in tensors)
        batches = [{k.split("/", 1)[1]: v for k, v in tensors.items() if k.split("/", 1)[0] == str(i)}
                   for i in range(count)]
        jobs.append(RecordedJob(path, meta, batches))
    return jobs


def check_attacks(attacks: Sequence[str], has_auxiliary: bool) -> list[str]:
    """Names known for recorded crossings, and auxiliary data for those that train on it."""
    if not attacks:
        raise ValueError("--attacks: no attack given; valid on recorded crossings: " + ", ".join(RECORDED_ATTACKS))
    unknown = [a for a in attacks if a not in RECORDED_ATTACKS]
    if unknown:
        raise ValueError(f"--attacks: {', '.join(unknown)} cannot run on recorded split crossings; valid: "
                         f"{', '.join(RECORDED_ATTACKS)} (the fedit attacks need --model, not --run)")
    if "sip" in attacks and not has_auxiliary:
        raise ValueError("--aux-source: attack sip trains an inversion model on auxiliary data, but no auxiliary "
                         "data was given; pass --aux-source (a data source other than the clients')")
    return list(attacks)


def _texts(tokenizer, ids: torch.Tensor, mask: torch.Tensor) -> list[str]:
    return [tokenizer.decode(row[m.bool()].tolist(), skip_special_tokens=True) for row, m in zip(ids, mask)]


def _score(tokenizer, truth: torch.Tensor, recovered: torch.Tensor, mask: torch.Tensor) -> list[tuple[float, ...]]:
    refs, hyps = _texts(tokenizer, truth, mask), _texts(tokenizer, recovered, mask)
    return [sequence_scores(r, h, t, x, m) for r, h, t, x, m in zip(refs, hyps, truth, recovered, mask)
            if int(m.sum()) > 0]


def _attack_batch(attack: str, model: nn.Module, batch: dict[str, torch.Tensor], cut: tuple[int, int],
                  steps: int | None, seed: int, inversion: InversionModel | None):
    """(recovered ids, true ids, mask) for one recorded micro-batch."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    first, second = cut
    extra = {} if steps is None else {"steps": steps}
    if attack in ("eia", "sip"):
        act = batch["act_up"].float()
        if attack == "sip":
            return sip_logits(inversion, act, mask).argmax(-1), ids, mask
        if first == 0:  # cut 1 is the embedding output: the tokens are its nearest rows
            return nearest_tokens(act, input_embedding_matrix(model).detach().float()), ids, mask
        return eia_attack(model, act, first, mask, EIAOptions(seed=seed, **extra)), ids, mask
    if second >= num_blocks(model):
        raise ValueError(f"--attacks {attack}: the run's cut '{first}-{second}' puts cut 2 after the last block, "
                         "where only the final norm and head remain above it; gradient matching needs a block "
                         f"above the cut (method.options.cut with b ≤ {num_blocks(model) - 1})")
    options = GradientMatchOptions(distance="l2" if attack == "dlg-split" else "tag", seed=seed, **extra)
    recovered = top_gradient_attack(model, batch["act_down"].float(), batch["grad_up"].float(), second, mask, options)
    return recovered, ids[:, 1:], mask[:, 1:]


def attack_recorded(model: nn.Module, tokenizer, jobs: Sequence[RecordedJob], attacks: Sequence[str],
                    steps: int | None = None, max_batches: int | None = None, seed: int = 0,
                    inversion: InversionModel | None = None) -> list[dict]:
    """One row per (attack, defence setting found in the recordings): mean scores over the sequences."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    groups: dict[str, list[tuple[RecordedJob, dict]]] = {}
    for job in jobs:
        for batch in job.batches[:max_batches]:
            groups.setdefault(job.defence, []).append((job, batch))
    rows = []
    for attack in attacks:
        for defence, items in groups.items():
            start, scores, example = time.perf_counter(), [], None
            for index, (job, batch) in enumerate(items):
                recovered, truth, mask = _attack_batch(attack, model, batch, job.cut, steps, seed + index, inversion)
                scores += _score(tokenizer, truth, recovered, mask)
                if example is None:
                    ref, hyp = _texts(tokenizer, truth[:1], mask[:1])[0], _texts(tokenizer, recovered[:1], mask[:1])[0]
                    example = {"reference": ref, "reconstruction": hyp}
            rows.append({"attack": attack, "observes": RECORDED_ATTACKS[attack], "defence": defence,
                         "cut": items[0][0].meta.get("cut"), "sequences": len(scores), **mean_scores(scores),
                         "seconds": round(time.perf_counter() - start, 2), "example": example})
    return rows


def markdown_table(rows: Sequence[dict]) -> str:
    lines = ["| attack | observes | defence | cut | sequences | ROUGE-L F | METEOR (exact) | token accuracy |",
             "|---|---|---|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['attack']} | {r['observes']} | {r['defence']} | {r['cut']} | {r['sequences']} | "
                     f"{r['rouge_l_f']:.3f} | {r['meteor']:.3f} | {r['token_accuracy']:.3f} |")
    return "\n".join(lines) + "\n"


def write_privacy(run_dir: Path, payload: dict) -> Path:
    """RUN_DIR/privacy/attack.json and attack.md; returns the json path."""
    out = Path(run_dir) / PRIVACY_DIR
    out.mkdir(parents=True, exist_ok=True)
    (out / ATTACK_FILE).write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (out / "attack.md").write_text(markdown_table(payload["results"]), encoding="utf-8")
    return out / ATTACK_FILE

"""Reward-model pairwise accuracy per loss variant, and DPO before/after, on the generated preference set.

One client, the local trainer (``federation.local_trainer.train_local`` with ``loss_fn`` =
``alignment.objectives.PreferenceObjective``), not a federated run: the engine does not route preference
objectives yet. For each reward loss the same SmolLM2-135M-Instruct with a fresh scalar head
(``num_labels=1``, drawn from the seed) and a fresh LoRA adapter trains for ``--steps`` steps on the
training pairs; the table gives the held-out pairwise accuracy (chosen reward > rejected reward) before
and after. With ``--dpo`` the causal LM also trains with DPO (the base, adapters off, as reference):
"before" is the base model's own preference (log p(chosen) > log p(rejected)), "after" the policy's.

    python bench/reward_losses_smollm2.py --steps 12 --train-per-task 16 --eval-per-task 8 --dpo
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import time

import torch
from transformers import AutoModelForSequenceClassification

from fedpeft.adapters import adapter_parameters
from fedpeft.alignment.dpo import collate_pairs, encode_pair, sequence_logprobs
from fedpeft.alignment.objectives import PreferenceObjective, evaluate_pairs
from fedpeft.alignment.preference import generated_preferences
from fedpeft.alignment.reward_losses import REWARD_LOSSES
from fedpeft.config import PeftConfig
from fedpeft.federation.local_trainer import train_local
from fedpeft.models.peft_wrap import wrap_lora
from fedpeft.models.registry import load_base_model
from fedpeft.strategies.base import ClientPlan


def batches_of(pairs, tokenizer, template, size, max_len=96):
    encoded = [e for e in (encode_pair(p, tokenizer, template, max_len) for p in pairs) if e is not None]
    return [collate_pairs(encoded[i:i + size], tokenizer.pad_token_id) for i in range(0, len(encoded), size)]


def train(model, objective, batches, steps, lr):
    params = {n: p for n, p in adapter_parameters(model).items() if p.requires_grad}
    start = time.perf_counter()
    _, losses = train_local(model, params, itertools.cycle(batches), ClientPlan(0, {}), steps=steps,
                            grad_accumulation=1, lr=lr, max_grad_norm=1.0, loss_fn=objective)
    return losses, (time.perf_counter() - start) / steps


@torch.no_grad()
def base_preference(model, batches) -> float:
    """Fraction of pairs where the model's own log p(chosen) > log p(rejected)."""
    wins = total = 0
    for b in batches:
        logps = sequence_logprobs(model, b["input_ids"], b["attention_mask"], b["labels"])
        n = logps.shape[0] // 2
        wins += int((logps[:n] > logps[n:]).sum())
        total += n
    return wins / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=["sentiment", "topic", "parity"])
    parser.add_argument("--train-per-task", type=int, default=16)
    parser.add_argument("--eval-per-task", type=int, default=8)
    parser.add_argument("--losses", nargs="+", default=list(REWARD_LOSSES))
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch-pairs", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--template", default="plain")
    parser.add_argument("--dpo", action="store_true", help="also DPO on the causal LM")
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    train_pairs, held_out = generated_preferences(args.tasks, args.train_per_task, args.eval_per_task, args.seed)
    loaded = load_base_model("smollm2", seed=args.seed)  # converts the bundled GGUF once, then the cache
    tokenizer = loaded.tokenizer
    train_batches = batches_of(train_pairs, tokenizer, args.template, args.batch_pairs)
    eval_batches = batches_of(held_out, tokenizer, args.template, 8)
    peft = PeftConfig()
    rows = []
    torch.manual_seed(args.seed)
    scorer = AutoModelForSequenceClassification.from_pretrained(loaded.source, num_labels=1)
    scorer.config.pad_token_id = tokenizer.pad_token_id
    for loss in args.losses:
        torch.manual_seed(args.seed)  # the same head and adapter init for every loss
        model = wrap_lora(copy.deepcopy(scorer), peft, seed=args.seed, head="classification")
        objective = PreferenceObjective("reward", loss=loss)
        before = evaluate_pairs(model, objective, eval_batches)
        losses, s_step = train(model, objective, train_batches, args.steps, args.lr)
        after = evaluate_pairs(model, objective, eval_batches)
        rows.append({"objective": f"reward/{loss}", "acc_before": before["pairwise_accuracy"],
                     "acc_after": after["pairwise_accuracy"], "margin_after": after["reward_margin"],
                     "first_loss": losses[0], "last_loss": losses[-1], "s_per_step": s_step})
        print(json.dumps(rows[-1]), flush=True)
        del model
    if args.dpo:
        model = wrap_lora(loaded.model, peft, seed=args.seed)
        objective = PreferenceObjective("dpo", beta=args.beta)
        before = base_preference(model, eval_batches)
        losses, s_step = train(model, objective, train_batches, args.steps, args.lr)
        after = evaluate_pairs(model, objective, eval_batches)
        rows.append({"objective": f"dpo (beta {args.beta})", "acc_before": before,
                     "acc_after_policy_logp": base_preference(model, eval_batches),
                     "acc_after": after["pairwise_accuracy"], "margin_after": after["reward_margin"],
                     "first_loss": losses[0], "last_loss": losses[-1], "s_per_step": s_step})
        print(json.dumps(rows[-1]), flush=True)
    print(f"\n{len(train_pairs)} training pairs, {len(held_out)} held-out pairs ({', '.join(args.tasks)}); "
          f"{args.steps} steps of {args.batch_pairs} pairs, lr {args.lr}")
    print("| objective | held-out acc before | after | margin after | loss first → last | s/step |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['objective']} | {r['acc_before']:.3f} | {r['acc_after']:.3f} | {r['margin_after']:.3f} | "
              f"{r['first_loss']:.3f} → {r['last_loss']:.3f} | {r['s_per_step']:.2f} |")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"args": vars(args), "rows": rows}, handle, indent=2)


if __name__ == "__main__":
    main()

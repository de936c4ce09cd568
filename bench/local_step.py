"""Time of one local training step at a config's batch size and sequence length (default: the quickstart).

    python bench/local_step.py [--config configs/quickstart.yaml] [--steps 8] [--threads N]

Prints the tokens per batch and the mean seconds per optimizer step after two warm-up steps.
"""

from __future__ import annotations

import argparse
import time

import torch

from fedpeft.adapters import adapter_parameters
from fedpeft.config import load_config
from fedpeft.data.encoding import collate, encode_records
from fedpeft.data.generated import generate_split
from fedpeft.federation.local_trainer import train_local
from fedpeft.metering.allocator import tune_malloc
from fedpeft.models.peft_wrap import wrap_lora
from fedpeft.models.registry import load_base_model
from fedpeft.strategies.base import ClientPlan


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/quickstart.yaml")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    tune_malloc()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(args.config)
    loaded = load_base_model(cfg.model.name, cfg.model.dtype)
    model = wrap_lora(loaded.model, cfg.peft, seed=cfg.seed)
    records, _ = generate_split(list(cfg.data.tasks), 64, 1, cfg.seed)
    encoded, _ = encode_records(records, loaded.tokenizer, cfg.data.template, cfg.training.max_seq_len)
    size = cfg.federation.batch_size
    batches = [collate(encoded[i:i + size], loaded.tokenizer.pad_token_id) for i in range(0, len(encoded) - size + 1, size)]
    stream = (batches[i % len(batches)] for i in range(10**9))
    params = {n: p for n, p in adapter_parameters(model).items() if p.requires_grad}
    common = dict(grad_accumulation=cfg.federation.grad_accumulation, lr=cfg.training.lr, num_examples=len(encoded))
    train_local(model, params, stream, ClientPlan(0, {}), steps=2, **common)  # warm-up
    start = time.perf_counter()
    train_local(model, params, stream, ClientPlan(0, {}), steps=args.steps, **common)
    per_step = (time.perf_counter() - start) / args.steps
    tokens = sum(int(b["attention_mask"].sum()) for b in batches) / len(batches)
    print(f"model {cfg.model.name}  batch {size} x {batches[0]['input_ids'].shape[1]} (mean {tokens:.0f} tokens)  "
          f"threads {torch.get_num_threads()}  seconds/step {per_step:.2f}")


if __name__ == "__main__":
    main()

"""Model load: time to the first training step from the cached SmolLM2 directory.

Each repeat is a fresh subprocess (Python and the libraries are imported anew; the model files are in
the OS page cache after the first run, as they would be on a warm machine). Phases:

* ``import``: ``import torch, transformers, peft`` and fedpeft;
* ``load``: ``fedpeft.models.registry.load_base_model("smollm2-135m-instruct")`` (cached safetensors dir);
* ``wrap``: LoRA wrapping (``wrap_lora``, r=8 on q/k/v/o);
* ``first step``: one forward + backward + AdamW step on a batch of 8 x 64 tokens;
* ``second step``: the same again (steady state, for comparison);
* ``total``: process start to the end of the first step.

    python bench/model_load.py --repeats 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time


def child(model_name: str, threads: int) -> None:
    t0 = time.perf_counter()
    import torch

    torch.set_num_threads(threads)
    import peft  # noqa: F401
    import transformers  # noqa: F401

    from fedpeft.config import PeftConfig
    from fedpeft.models.peft_wrap import wrap_lora
    from fedpeft.models.registry import load_base_model

    t1 = time.perf_counter()
    loaded = load_base_model(model_name)
    t2 = time.perf_counter()
    model = wrap_lora(loaded.model, PeftConfig(r=8, alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]), seed=0)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    t3 = time.perf_counter()
    gen = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (8, 64), generator=gen)

    def step():
        optimizer.zero_grad(set_to_none=True)
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids)
        out.loss.backward()
        optimizer.step()

    model.train()
    step()
    t4 = time.perf_counter()
    step()
    t5 = time.perf_counter()
    print("RESULT " + json.dumps({"import": t1 - t0, "load": t2 - t1, "load_reported": loaded.load_seconds,
                                  "wrap": t3 - t2, "first_step": t4 - t3, "second_step": t5 - t4, "in_process": t4 - t0,
                                  "source": loaded.source}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.model, args.threads)
        return

    rows = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, __file__, "--child", "--model", args.model, "--threads", str(args.threads)],
                              capture_output=True, text=True)
        total = time.perf_counter() - start
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            raise SystemExit(f"child failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
        row = json.loads(lines[-1][len("RESULT "):])
        row["total"] = total
        rows.append(row)
    print(f"model {args.model} ({rows[0]['source']}), torch threads {args.threads}, {args.repeats} fresh processes")
    keys = ["import", "load", "wrap", "first_step", "second_step", "total"]
    print(f"{'':6} | " + " | ".join(f"{k:>11}" for k in keys))
    print("-" * (9 + 14 * len(keys)))
    for i, row in enumerate(rows, start=1):
        print(f"run {i:<2} | " + " | ".join(f"{row[k]:>11.2f}" for k in keys))
    med = {k: statistics.median(r[k] for r in rows) for k in keys}
    print("median | " + " | ".join(f"{med[k]:>11.2f}" for k in keys))
    print(f"time to first training step (process start -> first step done), median: {med['total']:.2f} s; "
          f"first step / steady step = {med['first_step'] / med['second_step']:.2f}")


if __name__ == "__main__":
    main()

"""Model load: time to the first training step from the cached SmolLM2 directory.

Each repeat is a fresh subprocess (Python and the libraries are imported anew; the model files are in
the OS page cache after the first run, as they would be on a warm machine). Phases:

* ``import``: ``import torch, transformers, peft`` and fedpeft;
* ``load``: ``fedpeft.models.registry.load_base_model("smollm2-135m-instruct")`` (cached safetensors dir);
* ``wrap``: LoRA wrapping (``wrap_lora``, r=8 on q/k/v/o);
* ``first step``: one forward + backward + AdamW step on a batch of 8 x 64 tokens;
* ``second step``: the same again (steady state, for comparison);
* ``spawn``: from the parent's spawn to the child's first line (interpreter start);
* ``to_first_step``: spawn to the end of the first step (the headline number);
* ``exit``: from the child's last line to the parent seeing it exit (teardown, for information).

    python bench/model_load.py --repeats 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time


def child(model_name: str, threads: int, spawned_at: float) -> None:
    t0 = time.perf_counter()
    started = time.time() - spawned_at
    import torch

    torch.set_num_threads(threads)
    ta = time.perf_counter()
    import transformers  # noqa: F401
    from transformers import LlamaForCausalLM  # noqa: F401  (transformers imports lazily)

    tb = time.perf_counter()
    import peft  # noqa: F401

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
    print("RESULT " + json.dumps({"spawn": started, "end_wall": time.time(), "import": t1 - t0, "import_torch": ta - t0, "import_transformers": tb - ta,
                                  "import_peft_fedpeft": t1 - tb, "load": t2 - t1, "load_reported": loaded.load_seconds,
                                  "wrap": t3 - t2, "first_step": t4 - t3, "second_step": t5 - t4,
                                  "to_first_step": started + (t4 - t0),
                                  "source": loaded.source}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--spawned-at", type=float, default=0.0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.model, args.threads, args.spawned_at or time.time())
        return

    rows = []
    for _ in range(args.repeats):
        spawned_at = time.time()
        proc = subprocess.run([sys.executable, __file__, "--child", "--model", args.model, "--threads", str(args.threads),
                               "--spawned-at", repr(spawned_at)], capture_output=True, text=True)
        ended_at = time.time()
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            raise SystemExit(f"child failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
        row = json.loads(lines[-1][len("RESULT "):])
        row["exit"] = ended_at - row["end_wall"]
        rows.append(row)
    print(f"model {args.model} ({rows[0]['source']}), torch threads {args.threads}, {args.repeats} fresh processes")
    keys = ["spawn", "import", "load", "wrap", "first_step", "to_first_step", "second_step", "exit"]
    widths = [max(7, len(k)) for k in keys]
    print(f"{'':6} | " + " | ".join(f"{k:>{w}}" for k, w in zip(keys, widths)))
    print("-" * (9 + sum(w + 3 for w in widths)))
    for i, row in enumerate(rows, start=1):
        print(f"run {i:<2} | " + " | ".join(f"{row[k]:>{w}.2f}" for k, w in zip(keys, widths)))
    med = {k: statistics.median(r[k] for r in rows) for k in keys}
    print("median | " + " | ".join(f"{med[k]:>{w}.2f}" for k, w in zip(keys, widths)))
    print("import split (median s): " + ", ".join(
        f"{k[len('import_'):]} {statistics.median(r[k] for r in rows):.2f}"
        for k in ("import_torch", "import_transformers", "import_peft_fedpeft")))
    print(f"time to first training step (process spawn -> first step done), median: {med['to_first_step']:.2f} s; "
          f"first step / steady step = {med['first_step'] / med['second_step']:.2f}")


if __name__ == "__main__":
    main()

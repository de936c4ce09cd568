"""Round time and client-steps/s of concurrent clients (federation.concurrent_clients) against serial clients.

The 135M shape (random:smollm2-135m, LoRA r=8 on q/k/v/o, AdamW, clipping 1.0), synthetic token batches
(every token supervised). For each (per-client batch b, seq T): ``serial`` trains one client K steps
(``local_trainer.train_local``; serial throughput does not depend on how many clients a round has), and
``batched`` trains C clients K steps in one group (``batched_trainer.train_group``). Each measurement runs
in its own process, so its peak memory (RSS on CPU, max allocated on CUDA) is its own. One warm-up step
is not timed.

    PYTHONPATH=src python bench/concurrent_clients.py                                  # full grid (slow on CPU)
    PYTHONPATH=src python bench/concurrent_clients.py --c 1,2,4 --b 1 --t 128 --steps 2 # a CPU subset
    PYTHONPATH=src python bench/concurrent_clients.py --device cuda --dtype bfloat16 --shape llama-3.2-1b
                                                                                       # not verified on a GPU

Prints one JSON line per measurement and a table: client-steps/s and the ratio batched / serial, by wall
time and by the process's CPU time. On a shared CPU, run with ``--threads 1`` and read the CPU-time columns:
other processes stretch wall time, not the CPU time a single-threaded process spends.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from types import SimpleNamespace

import torch


def _batches(vocab: int, b: int, t: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    while True:
        ids = torch.randint(0, vocab, (b, t), generator=gen)
        yield {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def measure(mode: str, clients: int, b: int, t: int, steps: int, shape: str, device: str, dtype: str, threads: int) -> dict:
    from fedpeft.adapters import adapter_parameters, set_trainable
    from fedpeft.federation.batched_lora import ClientAdapters
    from fedpeft.federation.batched_trainer import GroupMember, train_group
    from fedpeft.federation.local_trainer import train_local
    from fedpeft.models.peft_wrap import wrap_lora
    from fedpeft.models.registry import load_base_model
    from fedpeft.strategies.base import ClientPlan

    torch.set_num_threads(threads)
    dev = torch.device(device)
    loaded = load_base_model(f"random:{shape}", dtype, seed=0, device=dev)
    peft_cfg = SimpleNamespace(r=8, alpha=16, dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                               rslora=False)
    model = wrap_lora(loaded.model, peft_cfg, seed=0)
    set_trainable(model, None)
    vocab = model.get_base_model().config.vocab_size
    precision = "bf16" if dtype == "bfloat16" else "fp32"
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(dev)

    def run(k: int) -> tuple[float, float]:
        start, cpu_start = time.perf_counter(), time.process_time()
        if mode == "serial":
            params = {n: p for n, p in adapter_parameters(model).items() if p.requires_grad}
            train_local(model, params, _batches(vocab, b, t, 0), ClientPlan(0, {}), steps=k, grad_accumulation=1,
                        lr=1e-4, precision=precision)
        else:
            members = [GroupMember(ClientPlan(c, {}), ClientAdapters(
                {n: p.detach() for n, p in adapter_parameters(model).items()},
                list(adapter_parameters(model)), None), _batches(vocab, b, t, c), num_examples=1)
                for c in range(clients)]
            train_group(model, members, steps=k, grad_accumulation=1, lr=1e-4, pad_id=0, precision=precision)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start, time.process_time() - cpu_start

    run(1)  # warm-up
    seconds, cpu_seconds = run(steps)
    n = 1 if mode == "serial" else clients
    peak = (torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return {"mode": mode, "clients": n, "b": b, "T": t, "steps": steps, "seconds": seconds, "cpu_seconds": cpu_seconds,
            "client_steps_per_s": n * steps / seconds, "client_steps_per_cpu_s": n * steps / cpu_seconds, "round_seconds_per_client_step": seconds / (n * steps),
            "peak_mb": peak, "shape": shape, "device": device, "dtype": dtype, "threads": threads}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--c", default="1,2,4,8", help="group sizes C")
    p.add_argument("--b", default="1,4", help="per-client batch sizes")
    p.add_argument("--t", default="128,512", help="sequence lengths")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--shape", default="smollm2-135m")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--one", nargs=4, metavar=("MODE", "C", "B", "T"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        mode, c, b, t = args.one
        print(json.dumps(measure(mode, int(c), int(b), int(t), args.steps, args.shape, args.device, args.dtype,
                                 args.threads)))
        return
    rows = []
    common = ["--steps", str(args.steps), "--shape", args.shape, "--device", args.device, "--dtype", args.dtype,
              "--threads", str(args.threads)]
    for b in map(int, args.b.split(",")):
        for t in map(int, args.t.split(",")):
            for mode, c in [("serial", 1)] + [("batched", int(c)) for c in args.c.split(",")]:
                out = subprocess.run([sys.executable, __file__, "--one", mode, str(c), str(b), str(t), *common],
                                     capture_output=True, text=True, check=True)
                row = json.loads(out.stdout.strip().splitlines()[-1])
                print(json.dumps(row), flush=True)
                rows.append(row)
    print(f"\n{'b':>3} {'T':>5} {'mode':>8} {'C':>3} {'client-steps/s':>15} {'x serial':>9} {'s per group step':>17} "
          f"{'client-steps/CPU-s':>19} {'x serial':>9} {'peak MiB':>9}")
    for row in rows:
        serial = next(r for r in rows if r["mode"] == "serial" and r["b"] == row["b"] and r["T"] == row["T"])
        ratio = row["client_steps_per_s"] / serial["client_steps_per_s"]
        cpu_ratio = row["client_steps_per_cpu_s"] / serial["client_steps_per_cpu_s"]
        round_s = row["seconds"] / row["steps"]  # one local step of every client of the group
        print(f"{row['b']:>3} {row['T']:>5} {row['mode']:>8} {row['clients']:>3} {row['client_steps_per_s']:>15.3f} "
              f"{ratio:>9.2f} {round_s:>17.2f} {row['client_steps_per_cpu_s']:>19.3f} {cpu_ratio:>9.2f} "
              f"{row['peak_mb']:>9.0f}")


if __name__ == "__main__":
    main()

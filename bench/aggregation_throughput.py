"""Aggregation throughput: FedAvg weighted sum and FLoRA stacking over K client updates.

Updates are generated rank-r LoRA adapters on a 7B-shaped (Llama-2-7B: d=4096, d_ff=11008) subset of
layers, all seven projections (q, k, v, o, gate, up, down). Throughput is GB/s of client-update data
read (K x update bytes / seconds, 1 GB = 10^9 bytes), compared with two memory-bandwidth references:

* ``torch flat add_``: the same weighted sum over one contiguous float32 vector per client
  (``acc.add_(flat_k, alpha=p_k)``), i.e. no per-key overhead;
* ``memcpy``: ``dst.copy_(src)`` of the distinct update pool (read bytes / s).

Every one of the K updates is a distinct tensor set (K x update size in memory, 1 GB for the default
1 layer and K = 100), so reads come from DRAM as with real updates; a smaller ``--pool`` reuses updates
cyclically to save memory, but then per-key working sets may fit in the L3 cache and flatter the
numbers. FLoRA stacking materialises its output (K x update size), the one cost that grows with K.
Large fresh buffers are served by glibc's mmap and page-faulted on every call; compare with
``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=100000000000`` in the environment (printed in the header).

    python bench/aggregation_throughput.py                    # 1 layer (~10 MB/update), K = 2..100
    MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=100000000000 python bench/aggregation_throughput.py
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from fedpeft.strategies.base import weighted_average

MODULES = {  # name -> (d_in, d_out) for Llama-2-7B
    "self_attn.q_proj": (4096, 4096),
    "self_attn.k_proj": (4096, 4096),
    "self_attn.v_proj": (4096, 4096),
    "self_attn.o_proj": (4096, 4096),
    "mlp.gate_proj": (4096, 11008),
    "mlp.up_proj": (4096, 11008),
    "mlp.down_proj": (11008, 4096),
}


def make_update(layers: int, rank: int, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for layer in range(layers):
        for module, (d_in, d_out) in MODULES.items():
            prefix = f"base_model.model.model.layers.{layer}.{module}"
            state[f"{prefix}.lora_A.default.weight"] = torch.randn(rank, d_in, generator=gen) * 0.01
            state[f"{prefix}.lora_B.default.weight"] = torch.randn(d_out, rank, generator=gen) * 0.01
    return state


def stack(states, weights):
    """FLoRA stacking, module by module: B = [B_1..B_K], A = [p_1 A_1; ..; p_K A_K]."""
    try:
        from fedpeft.strategies.lora_math import stack_factors
    except ImportError:  # the strategies helper's module is not there yet: same two torch.cat calls
        def stack_factors(bs, as_, coefficients):
            return torch.cat(list(bs), dim=1), torch.cat([float(c) * a for c, a in zip(coefficients, as_)], dim=0)
    out = {}
    for key in states[0]:
        if ".lora_A." in key:
            b_key = key.replace(".lora_A.", ".lora_B.")
            out[b_key], out[key] = stack_factors([s[b_key] for s in states], [s[key] for s in states], weights)
    return out


def timed(fn, repeats: int) -> float:
    """Median wall seconds of ``repeats`` calls after one warm-up call."""
    del_result = fn()
    del del_result
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
        del result
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--clients", type=int, nargs="+", default=[2, 5, 10, 20, 50, 100])
    parser.add_argument("--pool", type=int, default=None, help="distinct updates, reused cyclically (default: max K)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    args.pool = args.pool or max(args.clients)
    first = make_update(args.layers, args.rank, seed=0)
    pool = [first] + [{k: v * (1.0 + 0.01 * i) for k, v in first.items()} for i in range(1, args.pool)]
    update_bytes = sum(t.numel() * t.element_size() for t in pool[0].values())
    flat_pool = [torch.cat([t.reshape(-1) for t in s.values()]) for s in pool]
    print(f"update: rank {args.rank}, {args.layers} layer(s) x {len(MODULES)} modules of a 7B-shaped model: "
          f"{len(pool[0])} tensors, {update_bytes / 1e6:.1f} MB; pool of {args.pool} distinct updates; "
          f"torch threads {torch.get_num_threads()}; MALLOC_MMAP_MAX_={os.environ.get('MALLOC_MMAP_MAX_', 'unset')} "
          f"MALLOC_TRIM_THRESHOLD_={os.environ.get('MALLOC_TRIM_THRESHOLD_', 'unset')}")

    def memcpy_bandwidth() -> float:
        src = torch.cat(flat_pool)
        dst = torch.empty_like(src)
        return src.numel() * 4 / timed(lambda: dst.copy_(src), args.repeats) / 1e9

    memcpy = memcpy_bandwidth()

    header = f"{'K':>4} | {'FedAvg s':>9} {'GB/s':>6} | {'flat add_ s':>11} {'GB/s':>6} | {'FedAvg/ref':>10} | {'FLoRA stack s':>13} {'GB/s':>6}"
    print(header)
    print("-" * len(header))
    ratios = []
    for k in args.clients:
        states = [pool[i % args.pool] for i in range(k)]
        flats = [flat_pool[i % args.pool] for i in range(k)]
        weights = [1.0 / k] * k
        data = k * update_bytes

        def reference():
            acc = torch.zeros_like(flats[0])
            for flat, w in zip(flats, weights):
                acc.add_(flat, alpha=w)
            return acc

        t_avg = timed(lambda: weighted_average(states, weights), args.repeats)
        t_ref = timed(reference, args.repeats)
        t_stack = timed(lambda: stack(states, weights), args.repeats)
        ratios.append(t_ref / t_avg)
        print(f"{k:>4} | {t_avg:>9.4f} {data / t_avg / 1e9:>6.2f} | {t_ref:>11.4f} {data / t_ref / 1e9:>6.2f} | "
              f"{t_ref / t_avg:>10.2f} | {t_stack:>13.4f} {data / t_stack / 1e9:>6.2f}")
    print(f"memcpy reference (read GB/s): {memcpy:.2f}")
    print(f"FedAvg throughput / flat torch add_ reference: mean {statistics.mean(ratios):.2f} "
          f"(min {min(ratios):.2f}, max {max(ratios):.2f}); 1.00 = as fast as the plain torch weighted sum")


if __name__ == "__main__":
    main()

"""Training throughput per model shape x precision x gradient checkpointing, fedpeft's engine against
a plain peft loop on the same batches; the 135M peak-RSS comparison; per-round estimates for configs/paper.

Three modes:

    python bench/gpu_throughput.py                       # throughput table (CPU: 135M shape; GPU: 135M/1B/7B)
    python bench/gpu_throughput.py --rss                 # peak RSS, SmolLM2-135M workload: engine vs plain loop
    python bench/gpu_throughput.py --estimate configs/paper/*.yaml   # rule-based H100 time/memory per round

**Throughput.** Every cell is two fresh processes, so that each has its own peak memory:

* ``engine``: ``fedpeft.federation.engine.run_experiment`` on ``random:<shape>`` (random weights, the bundled
  tokenizer), one client per round, 3 rounds of ``--steps`` local steps, every batch ``--batch`` sequences of
  exactly ``--seq`` tokens (synthetic records whose prompt is cut to fit). It records the batches its
  round 2 and 3 jobs drew. The **round time** is round 2's ``round_end.seconds`` + its checkpoint seconds
  (train, aggregate, checkpoint; no evaluation happens in round 2), warm: round 1 paid the first-step costs;
* ``plain``: the same model (same seed) wrapped by ``peft.get_peft_model`` with the same LoRA config, AdamW,
  clip 1.0, the same precision/checkpointing, one warm-up pass over round 3's batches, then round 2's batches
  timed: forward + backward + clip + step + zero_grad, with a device synchronisation at the end only.
  That **pure** time is the physical-limit anchor: ``round/pure`` is what the engine adds around it.

Columns: tokens/s and s/step of both (tokens = batch x seq, no padding), the engine's round/pure, MFU
and peak memory (CUDA: ``max_memory_allocated`` per job / in the plain loop; CPU: the process's peak RSS).

**FLOP rule (MFU).** Model FLOPs per token = ``4 x N_base + 6 x N_lora`` (``fedpeft.metering.flops``:
forward 2N and activation-gradient 2N through the frozen base, full 6N for the adapter; the input embedding
table is excluded, attention's sequence term is left out). Gradient checkpointing's recomputed forward is
*not* counted (that would be hardware FLOPs, not model FLOPs). MFU = model FLOP/s / peak: on a known GPU
its nominal dense bf16 peak (H100/H200 989 TFLOP/s, A100 312; fp32 cells use the fp32 non-tensor peak);
on a CPU (or an unknown GPU) the measured throughput of a 1024^3 matmul in the cell's dtype, stated in the
output, so CPU MFU reads "of what this CPU's matmul reaches".

**Peak RSS (``--rss``).** The workload of issue 16: SmolLM2-135M-Instruct, fp32, batch 4, sequences up to
200 tokens, LoRA r=8 on q_proj/v_proj, no checkpointing; fedpeft's engine (1 round, 2 clients x 10 steps,
a 8-example evaluation) against the plain loop over the very batches the engine drew, in separate processes.

**Estimates (``--estimate``).** No GPU was measured for configs/paper; their header comments carry this
mode's output, labelled as estimates. Time per round = model FLOPs of the round's training tokens (sampled
clients x local steps x grad accumulation x batch x assumed tokens per sequence, ``--fill`` x max_seq_len)
/ (``--mfu`` x 989 TFLOP/s), + 2 N per token of the server batch for FedGPL. Peak memory = base weights
(bytes per parameter of its dtype; quantised: 0.55 per NF4 / 1.1 per int8 linear weight incl. scales,
embeddings and head in float32 as QLoRA's preparation leaves them) + adapter x 16 bytes (fp32 weight, grad,
two Adam moments) + activations (Korthikanti et al. 2022 without the attention-score term (SDPA):
34 x seq x batch x hidden bytes per layer in 16-bit, x 2 in fp32; with gradient checkpointing
2 x seq x batch x hidden per layer + one layer's full set) + the logits (batch x seq x vocab x 4 bytes x 3:
logits, log-softmax and its gradient), all x 1.1 for allocator slack.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

H100_BF16 = 989e12
NOMINAL_PEAKS = {  # dense tensor-core bf16 / fp32 (non-tensor) FLOP/s by device-name fragment
    "H200": (989e12, 67e12), "H100": (989e12, 67e12), "A100": (312e12, 19.5e12), "L40S": (362e12, 91.6e12),
    "L4": (121e12, 30.3e12), "A10G": (70e12, 31.2e12),
}
PRECISIONS = {  # name -> (model.dtype, training.precision, model.quantization)
    "fp32": ("float32", "fp32", "none"),
    "bf16": ("bfloat16", "bf16", "none"),
    "4bit": ("bfloat16", "bf16", "4bit"),
}
WORDS = ("alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa "
         "quebec romeo sierra tango uniform victor whiskey xray yankee zulu").split()


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def synthetic_records(path: Path, n: int, seq: int, seed: int = 0) -> None:
    """Records whose prompt alone is longer than ``seq`` tokens: encoded, every one is exactly ``seq``."""
    rng = random.Random(seed)
    with path.open("w") as f:
        for _ in range(n):
            words = " ".join(rng.choice(WORDS) for _ in range(2 * seq))
            f.write(json.dumps({"instruction": words, "output": rng.choice(WORDS)}) + "\n")


def matmul_peak(device, dtype) -> float:
    """Measured FLOP/s of a 1024^3 matmul (the CPU/unknown-GPU MFU denominator)."""
    import torch

    n = 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    sync(device)
    reps, start = 0, time.perf_counter()
    while time.perf_counter() - start < 1.0:
        a @ b
        reps += 1
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - start)


def sync(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def peak_flops(device, precision: str) -> tuple[float, str]:
    import torch

    dtype = torch.float32 if precision == "fp32" else torch.bfloat16
    if torch.device(device).type == "cuda":
        name = torch.cuda.get_device_name(device)
        for fragment, (bf16, fp32) in NOMINAL_PEAKS.items():
            if fragment in name:
                return (fp32 if precision == "fp32" else bf16), f"{name} nominal"
    return matmul_peak(device, dtype), f"measured {str(dtype).replace('torch.', '')} matmul"


def cell_overrides(args, shape: str, precision: str, gc: bool, data: Path) -> list[str]:
    dtype, train_precision, quant = PRECISIONS[precision]
    return [
        f"model.name=random:{shape}", f"model.dtype={dtype}", f"model.quantization={quant}",
        f"model.device={args.device}", f"training.precision={train_precision}",
        f"training.gradient_checkpointing={str(gc).lower()}", f"training.max_seq_len={args.seq}",
        f"peft.r={args.r}", f"peft.alpha={2 * args.r}", f"peft.target_modules=[{','.join(args.targets)}]",
        "peft.dropout=0.0", f"data.source={data}", "data.task=instruction", "data.template=plain",
        "data.partition.kind=iid", "data.eval_split=null", "federation.num_clients=1", "federation.clients_per_round=1",
        "federation.rounds=3", f"federation.local_steps={args.steps}", f"federation.batch_size={args.batch}",
        "training.lr=1e-4", "training.schedule=constant", "evaluation.every_rounds=0",
        "evaluation.before_training=false", "evaluation.max_new_tokens=1", "evaluation.max_examples=1",
        "output.progress=false", "output.report=false",
    ] + ([f"model.threads={args.threads}"] if args.threads else [])


# --- child processes ------------------------------------------------------------------------------

def child_engine(args) -> None:
    import torch

    from fedpeft.federation import client as client_module
    from fedpeft.federation.engine import run_experiment
    from fedpeft.federation.metrics_log import read_events
    from fedpeft.metering.flops import count_parameters

    recorded: dict[int, list] = {}
    original = client_module.ClientData.batches
    current = {"round": 0}

    def recording_batches(self, indices, seed):
        for batch in original(self, indices, seed):
            recorded.setdefault(current["round"], []).append({k: v.clone() for k, v in batch.items()})
            yield batch

    client_module.ClientData.batches = recording_batches
    original_run = client_module.ClientRunner.run

    def run(self, round_idx, *a, **k):
        current["round"] = round_idx
        return original_run(self, round_idx, *a, **k)

    client_module.ClientRunner.run = run
    counts = {}
    import fedpeft.federation.engine as engine_module

    original_setup = engine_module.Engine._setup

    def setup(self):
        original_setup(self)
        base, lora = count_parameters(self.model)
        counts.update(base=base, lora=lora, device=str(self.device))

    engine_module.Engine._setup = setup
    run_dir = Path(args.workdir) / "run"
    run_experiment(REPO / "configs" / "tiny.yaml", overrides=json.loads(args.overrides), run_dir=run_dir)
    events = read_events(run_dir / "metrics.jsonl")
    r2 = next(e for e in events if e["event"] == "round_end" and e["round"] == 2)
    ck2 = next(e for e in events if e["event"] == "checkpoint" and e["round"] == 2)
    job2 = next(e for e in events if e["event"] == "client_train" and e["round"] == 2)
    torch.save({"warm": recorded[3], "timed": recorded[2]}, Path(args.workdir) / "batches.pt")
    print("RESULT " + json.dumps({
        "round_seconds": r2["seconds"] - r2["phase_seconds"].get("evaluate", 0.0) + ck2["seconds"],
        "train_seconds": job2["seconds"], "tokens": job2["tokens"], "steps": job2["steps"],
        "peak_cuda_mb": job2.get("peak_cuda_mb"), "peak_rss_mb": peak_rss_mb(), **counts}))


def child_plain(args) -> None:
    """The anchor: a plain peft loop, written here without fedpeft's trainer."""
    import torch
    from peft import LoraConfig, get_peft_model

    from fedpeft.models import registry
    from fedpeft.models.device import resolve_device

    spec = json.loads(args.plain)
    device = resolve_device(spec["device"])
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    dtype = registry.DTYPES[spec["dtype"]]
    if spec["model"].startswith("random:"):
        model, _, _ = registry.random_model(spec["model"][len("random:"):], dtype, device, seed=spec["seed"],
                                            attention="sdpa", quantization=spec["quantization"])
    else:  # a checkpoint directory, loaded the usual way
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=dtype).to(device)
    if spec["quantization"] != "none":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model = get_peft_model(model, LoraConfig(r=spec["r"], lora_alpha=2 * spec["r"], lora_dropout=0.0,
                                             target_modules=spec["targets"], task_type="CAUSAL_LM"))
    if spec["gc"]:
        model.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.get_base_model().enable_input_require_grads()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    batches = torch.load(Path(args.workdir) / "batches.pt")
    bf16 = spec["precision"] == "bf16"
    model.train()

    def step_all(items):
        for batch in items:
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                loss = model(**batch, use_cache=False).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    step_all(batches["warm"])
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    step_all(batches["timed"])
    sync(device)
    seconds = time.perf_counter() - start
    tokens = sum(int(b["attention_mask"].sum()) for b in batches["timed"])
    print("RESULT " + json.dumps({
        "seconds": seconds, "tokens": tokens, "steps": len(batches["timed"]), "peak_rss_mb": peak_rss_mb(),
        "peak_cuda_mb": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
        "peak_flops": peak_flops(device, spec["precision"])}))


def launch(mode: str, workdir: Path, **extra) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, "--workdir", str(workdir)]
    for key, value in extra.items():
        cmd += [f"--{key}", value]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{mode} child failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT "):])


# --- throughput table -----------------------------------------------------------------------------

def throughput(args) -> list[str]:
    import torch

    from fedpeft.metering.flops import lora_training_flops
    from fedpeft.models.device import bitsandbytes_available, resolve_device

    device = resolve_device(args.device)
    rows, notes = [], []
    header = ("| shape | precision | grad ckpt | engine tok/s | plain tok/s | engine s/step | plain s/step | "
              "round/pure | engine/plain tok/s | MFU engine | MFU plain | peak mem engine MiB | peak mem plain MiB |")
    rows += [header, "|" + "---|" * (header.count("|") - 1)]
    for shape in args.shapes:
        for precision in args.precisions:
            if precision == "4bit" and (device.type != "cuda" or not bitsandbytes_available()):
                notes.append(f"{shape} 4bit: skipped ({'no CUDA' if device.type != 'cuda' else 'bitsandbytes missing'})")
                continue
            for gc in args.checkpointing:
                with tempfile.TemporaryDirectory() as tmp:
                    work = Path(tmp)
                    data = work / "records.jsonl"
                    synthetic_records(data, n=max(64, 4 * args.batch * args.steps), seq=args.seq)
                    overrides = cell_overrides(args, shape, precision, gc, data)
                    engine = launch("engine", work, overrides=json.dumps(overrides))
                    dtype, train_precision, quant = PRECISIONS[precision]
                    plain = launch("plain", work, plain=json.dumps({
                        "model": f"random:{shape}", "dtype": dtype, "precision": train_precision, "quantization": quant,
                        "gc": gc, "r": args.r, "targets": args.targets, "device": args.device, "seed": 0,
                        "threads": args.threads}))
                flops_per_token = lora_training_flops(1, engine["base"], engine["lora"])
                peak, peak_note = plain["peak_flops"]
                if not any(n.startswith(f"MFU peak for {precision}:") for n in notes):
                    notes.append(f"MFU peak for {precision}: {peak / 1e12:.2f} TFLOP/s ({peak_note})")
                e_tps = engine["tokens"] / engine["round_seconds"]
                p_tps = plain["tokens"] / plain["seconds"]
                mem_e = engine["peak_cuda_mb"] if engine["peak_cuda_mb"] is not None else engine["peak_rss_mb"]
                mem_p = plain["peak_cuda_mb"] if plain["peak_cuda_mb"] is not None else plain["peak_rss_mb"]
                rows.append(
                    f"| {shape} | {precision} | {'on' if gc else 'off'} | {e_tps:,.0f} | {p_tps:,.0f} | "
                    f"{engine['round_seconds'] / engine['steps']:.3f} | {plain['seconds'] / plain['steps']:.3f} | "
                    f"{engine['round_seconds'] / plain['seconds']:.3f} | {e_tps / p_tps:.3f} | "
                    f"{e_tps * flops_per_token / peak:.1%} | {p_tps * flops_per_token / peak:.1%} | "
                    f"{mem_e:,.0f} | {mem_p:,.0f} |")
                print(rows[-1], flush=True)
    mem_kind = "CUDA max_memory_allocated" if device.type == "cuda" else "process peak RSS"
    intro = [f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}), "
             f"batch {args.batch} x seq {args.seq} tokens, {args.steps} steps/round, LoRA r={args.r} on "
             f"{','.join(args.targets)}, threads {args.threads or 'default'}; peak mem = {mem_kind}; random weights "
             f"(throughput only); load average at the end {os.getloadavg()[0]:.1f}", ""]
    return intro + rows + [""] + [f"- {n}" for n in notes]


# --- peak RSS on the 135M workload ---------------------------------------------------------------

RSS_OVERRIDES = [
    "federation.batch_size=4", "training.max_seq_len=200", "peft.r=8", "peft.alpha=16", "peft.dropout=0.0",
    "peft.target_modules=[q_proj,v_proj]", "federation.rounds=1", "federation.local_steps=10",
    "federation.clients_per_round=2", "evaluation.before_training=false", "data.eval_examples_per_task=2",
    "output.progress=false", "output.report=false", "model.device=cpu", "model.dtype=float32",
    "training.precision=fp32",
]


def child_rss_engine(args) -> None:
    import torch

    from fedpeft.federation import client as client_module
    from fedpeft.federation.engine import run_experiment
    from fedpeft.federation.metrics_log import read_events

    recorded: list = []
    original = client_module.ClientData.batches

    def recording_batches(self, indices, seed):
        for batch in original(self, indices, seed):
            recorded.append({k: v.clone() for k, v in batch.items()})
            yield batch

    client_module.ClientData.batches = recording_batches
    run_dir = Path(args.workdir) / "run"
    start = time.perf_counter()
    run_experiment(REPO / "configs" / "quickstart.yaml",
                   overrides=RSS_OVERRIDES + ([f"model.threads={args.threads}"] if args.threads else []),
                   run_dir=run_dir)
    wall = time.perf_counter() - start
    events = read_events(run_dir / "metrics.jsonl")
    train = sum(e["seconds"] for e in events if e["event"] == "client_train")
    torch.save({"warm": [], "timed": recorded}, Path(args.workdir) / "batches.pt")
    print("RESULT " + json.dumps({"peak_rss_mb": peak_rss_mb(), "train_seconds": train, "wall": wall,
                                  "steps": len(recorded)}))


def rss(args) -> list[str]:
    from fedpeft.models import registry

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        engine = launch("rss-engine", work, threads=str(args.threads))
        plain = launch("plain", work, plain=json.dumps({
            "model": str(registry.cache_dir() / "models" / "smollm2-135m-instruct"), "dtype": "float32",
            "precision": "fp32", "quantization": "none", "gc": False, "r": 8, "targets": ["q_proj", "v_proj"],
            "device": "cpu", "seed": 0, "threads": args.threads}))
    return [
        "SmolLM2-135M-Instruct, fp32, batch 4, seq <= 200, LoRA r=8 q/v, no checkpointing, CPU, "
        f"{engine['steps']} steps, threads {args.threads}",
        "",
        "| process | peak RSS MiB | training s | s/step |",
        "|---|---|---|---|",
        f"| fedpeft engine (load, data, 2 jobs, aggregate, checkpoint, final eval) | {engine['peak_rss_mb']:,.0f} | "
        f"{engine['train_seconds']:.1f} | {engine['train_seconds'] / engine['steps']:.3f} |",
        f"| plain peft loop (from_pretrained + get_peft_model + AdamW, same batches) | {plain['peak_rss_mb']:,.0f} | "
        f"{plain['seconds']:.1f} | {plain['seconds'] / plain['steps']:.3f} |",
        "",
        f"engine / plain peak RSS = {engine['peak_rss_mb'] / plain['peak_rss_mb']:.3f}; "
        f"vs OpenFedLLM's 2.9 GiB (issue 16): {engine['peak_rss_mb'] / 1024 / 2.9:.3f}",
    ]


# --- estimates for configs/paper ------------------------------------------------------------------

BYTES_PER_PARAM = {"float32": 4.0, "bfloat16": 2.0, "float16": 2.0}


def estimate(path: Path, fill: float, mfu: float) -> dict:
    """Rule-based time and peak memory per round on one H100 (see the module docstring)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from fedpeft.config import load_config
    from fedpeft.metering.flops import lora_training_flops

    cfg = load_config(path)
    shape = {"meta-llama/Llama-2-7b-hf": "llama-2-7b", "huggyllama/llama-7b": "llama-2-7b",
             "mistralai/Mistral-7B-v0.3": "mistral-7b"}.get(cfg.model.name)
    if shape is not None:
        from fedpeft.models.registry import shape_config

        config = shape_config(shape)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    else:  # BERT-base: its public config, built on meta (no download: the shape is written here)
        from transformers import BertConfig

        config = BertConfig(num_labels=2)  # bert-base-uncased: 12 x 768, vocab 30522
        with torch.device("meta"):
            model = AutoModelForSequenceClassification.from_config(config)
    embed = model.get_input_embeddings().weight.numel()
    total = sum(p.numel() for p in model.parameters())
    d, layers = config.hidden_size, config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or d // config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    kv = kv * head_dim
    dims = {"q_proj": (d, d), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (d, d),
            "gate_proj": (d, getattr(config, "intermediate_size", 4 * d)),
            "up_proj": (d, getattr(config, "intermediate_size", 4 * d)),
            "down_proj": (getattr(config, "intermediate_size", 4 * d), d), "query": (d, d), "value": (d, d)}
    lora = layers * sum(cfg.peft.r * (dims[m][0] + dims[m][1]) for m in cfg.peft.target_modules)
    fed = cfg.federation
    seq = int(fill * cfg.training.max_seq_len)
    tokens = fed.clients_per_round * fed.local_steps * fed.grad_accumulation * fed.batch_size * seq
    flops = lora_training_flops(tokens, total - embed, lora)
    if cfg.method.name == "fedgpl":  # the server's gradient pass over its batch
        flops += lora_training_flops(cfg.method.options.get("server_batch", 16) * seq, total - embed, lora)
    seconds = flops / (mfu * H100_BF16)
    quant = cfg.model.quantization
    if quant == "none":
        base_bytes = total * BYTES_PER_PARAM[cfg.model.dtype]
    else:  # quantised linears; embeddings and head float32 after prepare_model_for_kbit_training
        output = model.get_output_embeddings()
        head = output.weight.numel() if output is not None and output.weight is not model.get_input_embeddings().weight else 0
        base_bytes = (total - embed - head) * (0.55 if quant == "4bit" else 1.1) + (embed + head) * 4
    act_unit = 2 if cfg.training.precision == "bf16" or cfg.model.dtype != "float32" else 4
    b = fed.batch_size
    if cfg.training.gradient_checkpointing:
        activations = layers * 2 * seq * b * d * act_unit / 2 + 34 * seq * b * d * act_unit / 2
    else:
        activations = layers * 34 * seq * b * d * act_unit / 2
    vocab = getattr(config, "vocab_size", 0) if shape is not None else 0
    logits = b * seq * vocab * 4 * 3
    peak = 1.1 * (base_bytes + 16 * lora + activations + logits)
    return {"seconds": seconds, "peak_gib": peak / 2**30, "tokens": tokens, "seq": seq, "lora": lora,
            "rounds": fed.rounds}


def estimates(args) -> list[str]:
    out = {}
    lines = [f"fill {args.fill} (tokens per sequence / max_seq_len), MFU {args.mfu:.0%} of 989 TFLOP/s", ""]
    for path in args.estimate:
        path = Path(path)
        e = estimate(path, args.fill, args.mfu)
        text = (f"# Estimated per round on one H100 (an estimate: no GPU was measured; rule in bench/gpu_throughput.py, "
                f"`python bench/gpu_throughput.py --estimate {path.relative_to(REPO) if path.is_absolute() else path}`):\n"
                f"#   ~{e['seconds']:.1f} s training compute per round ({e['tokens']:,} tokens at {e['seq']} per "
                f"sequence, {args.mfu:.0%} MFU), ~{e['seconds'] * e['rounds'] / 3600:.2f} h for {e['rounds']} rounds "
                f"(evaluation extra); peak GPU memory ~{e['peak_gib']:.0f} GiB.")
        out[path.name] = text
        lines.append(f"{path.name}: {e['seconds']:.1f} s/round, {e['peak_gib']:.1f} GiB, LoRA params {e['lora']:,}")
    if args.write_json:
        Path(args.write_json).write_text(json.dumps(out, indent=1))
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=None, help="default: smollm2-135m on CPU; "
                        "smollm2-135m llama-3.2-1b llama-2-7b on CUDA")
    parser.add_argument("--precisions", nargs="+", default=None, choices=list(PRECISIONS),
                        help="default: fp32 bf16 on CPU; bf16 4bit on CUDA")
    parser.add_argument("--checkpointing", nargs="+", default=["off", "on"], choices=["off", "on"])
    parser.add_argument("--batch", type=int, default=None, help="default: 4 on CPU, 8 on CUDA")
    parser.add_argument("--seq", type=int, default=None, help="default: 128 on CPU, 512 on CUDA")
    parser.add_argument("--steps", type=int, default=None, help="local steps per round (default: 3 CPU, 5 CUDA)")
    parser.add_argument("--r", type=int, default=32)
    parser.add_argument("--targets", nargs="+", default=["q_proj", "v_proj"])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--rss", action="store_true", help="the 135M peak-RSS comparison")
    parser.add_argument("--estimate", nargs="+", help="config files to estimate")
    parser.add_argument("--fill", type=float, default=0.5)
    parser.add_argument("--mfu", type=float, default=0.4)
    parser.add_argument("--write-json", help=argparse.SUPPRESS)
    parser.add_argument("--out", help="also write the output to this file")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    parser.add_argument("--overrides", help=argparse.SUPPRESS)
    parser.add_argument("--plain", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        {"engine": child_engine, "plain": child_plain, "rss-engine": child_rss_engine}[args.child](args)
        return
    if args.estimate:
        lines = estimates(args)
    elif args.rss:
        lines = rss(args)
    else:
        import torch

        cuda = args.device != "cpu" and torch.cuda.is_available()
        args.shapes = args.shapes or (["smollm2-135m", "llama-3.2-1b", "llama-2-7b"] if cuda else ["smollm2-135m"])
        args.precisions = args.precisions or (["bf16", "4bit"] if cuda else ["fp32", "bf16"])
        args.batch = args.batch or (8 if cuda else 4)
        args.seq = args.seq or (512 if cuda else 128)
        args.steps = args.steps or (5 if cuda else 3)
        args.checkpointing = [c == "on" for c in args.checkpointing]
        lines = throughput(args)
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "a") as f:
            f.write(f"$ python bench/gpu_throughput.py {' '.join(sys.argv[1:])}\n\n{text}\n\n")


if __name__ == "__main__":
    main()

"""Resident memory at the stages of one fedpeft run on the issue-16 135M workload (SmolLM2-135M, fp32, batch 4,
seq <= 200, LoRA r=8 on q/v, 1 round x 2 clients x 10 steps, 8-example evaluation): psutil RSS and the
kernel peak before/after model load, each local job and the evaluation.

    PYTHONPATH=src python bench/rss_stages.py x model.threads=2                       # warm model cache
    FEDPEFT_CACHE_DIR=$(mktemp -d) PYTHONPATH=src python bench/rss_stages.py x       # cold: GGUF conversion first
"""
import os, sys, time, resource, psutil, threading
proc = psutil.Process()
def rss(): return proc.memory_info().rss / 2**20
def peak(): return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
marks = []
def mark(name): marks.append((name, rss(), peak())); print(f"{name:40s} rss {rss():8.0f} MiB  peak {peak():8.0f} MiB", flush=True)
mark("start")
import torch, transformers, peft
mark("imports")
from fedpeft.federation.engine import Engine
from fedpeft.config import load_config
import fedpeft.federation.engine as E
import fedpeft.federation.client as C
import fedpeft.federation.evaluator as V


def around(owner, name, before, after):
    """Replace ``owner.name`` by a wrapper that marks RSS before and after each call."""
    original = getattr(owner, name)

    def wrapped(*a, **k):
        mark(before)
        out = original(*a, **k)
        mark(after)
        return out

    setattr(owner, name, wrapped)


around(E, "load_experiment_model", "before model load", "after model load + wrap")
around(C, "train_local", "before train_local", "after train_local")
around(V.Evaluator, "_score", "before eval", "after eval")
cfg = load_config(str(__import__("pathlib").Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"), ["federation.batch_size=4", "training.max_seq_len=200", "peft.r=8",
    "peft.target_modules=[q_proj,v_proj]", "federation.rounds=1", "federation.local_steps=10",
    "evaluation.before_training=false", "data.eval_examples_per_task=2", "output.progress=false", "output.report=false"] + sys.argv[2:])
import tempfile
Engine(cfg, tempfile.mkdtemp() + "/run").run()
mark("end")

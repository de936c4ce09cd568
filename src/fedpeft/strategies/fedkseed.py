"""FedKSeed (Qin et al., ICML 2024): federated zeroth-order tuning where a round costs seeds and scalars.

K candidate seeds are shared by everyone (derived from the run seed). A local step on client k:

    j ~ U{0..K-1}                                   (seeded by (run seed, round, client))
    z = N(0, I) drawn from candidate seed s_j       (one generator, the tuned tensors in a fixed order)
    g = (L(w + eps z) - L(w - eps z)) / (2 eps)     (two forward passes on the same batch, no backward)
    w <- w - lr g z

and the client uploads only its (j, g) pairs: ``steps x (index bytes + 4)`` bytes (the index in the
smallest integer type that holds K - 1). The server replays them on the global model, client after
client in sampling order, step after step, each scaled by the client's weight p_k = n_k / sum n (the
official code's default; ``equal_weight: true`` for 1/m): ``w <- w + c z_j`` with
``c = float32(-lr p_k g)``. With one client (p = 1) this is the client's own sequence of operations,
so the server's model is bit-identical to the client's (on the same device type). The paper's server
sums each seed's scalars first and applies every seed once (the same linear update, another rounding
order); the per-step replay is used here because it is exact.

Downlink: a client must catch up with the global model. The server keeps each round's replay list
(seed index, c) and sends a client, when sampled, the entries of the rounds since it last had the
global model (from round 1 for a client never sampled: it starts from the pre-trained model), as
``plan.control`` (metered as downlink). In process the clients share the server's model, which is
already up to date, so they do not replay it; ``tests/test_fedkseed.py`` checks that replaying it on
the pre-trained model gives the server's model exactly. A client in its own process (a Flower node)
replays it (``catch_up``; ``tests/test_flower_methods.py``).

Tuned tensors (``params``): ``all`` (the paper: every base parameter, embeddings and head included,
each once; the LoRA of the shared PEFT model stays at its initial, identity value) or ``adapter`` (the
adapter tensors, a zeroth-order variant of LoRA). With ``all`` the global state of the run lives in the
base weights: a checkpoint holds the replay history and a resume replays it on the freshly loaded
model (exact); ``final/`` holds the untouched adapter, so the tuned weights are base + history, not
loaded by ``fedpeft eval`` (not built).

FedKSeed-Pro (``seed_sampling: pro``, the paper's second variant): seeds are not picked uniformly. The
server keeps, per candidate j, the history of the |g| clients uploaded for it (each clipped to ``pro_clip``,
starting from one value ``pro_initial``) as a sum and a count; before each round it sends every sampled
client p = softmax(minmax(mean clipped |g|)) (K float32 in ``plan.control``, metered as downlink), and the
client draws each step's j by inverse CDF on p. The sums and counts are checkpointed, so a resume sends
the same p. With an empty history every mean is equal and p is uniform.

Memory: no backward pass, no gradients, no optimizer state; one copy of the tuned tensors restores w
exactly after each perturbation (in-place ``w + eps z - eps z`` would drift by rounding and break the
exact replay).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field

from fedpeft.adapters import AdapterState, adapter_parameters, is_adapter_param
from fedpeft.models.device import autocast, model_device
from fedpeft.seeding import derive_seed
from fedpeft.strategies.base import AggregateResult, ClientPlan, ClientUpdate, ServerContext, TrainResult
from fedpeft.strategies.common import MethodStrategy
from fedpeft.strategies.registry import MethodOptions, register_method

INDEX_KEY = "fedkseed/seed_index"
G_KEY = "fedkseed/g"
HISTORY_INDEX_KEY = "fedkseed/history_seed_index"
HISTORY_COEF_KEY = "fedkseed/history_coef"
HISTORY_NAME = "fedkseed_history"
"""Client-store name of the replay history a client received (rounds 1.. of its last catch-up), kept
where the client runs when that is not the server's process (a Flower node): ``catch_up``."""
PROBS_KEY = "fedkseed/seed_probabilities"
"""``seed_sampling: pro``: the round's sampling distribution over the K candidates (float32, plan.control)."""
IGNORE_INDEX = -100


class FedKSeedOptions(MethodOptions):
    k: int = Field(4096, ge=1, le=2**31 - 1, description="K, the candidate seeds shared by all (the paper: 1024-4096).")
    eps: float = Field(5e-4, gt=0, description="Perturbation scale epsilon (the paper: 5e-4).")
    params: Literal["all", "adapter"] = Field("all", description="Tuned tensors: all base parameters (the paper) "
                                                                 "or the adapter's.")
    equal_weight: bool = Field(False, description="Weight clients equally instead of by their examples.")
    seed_sampling: Literal["uniform", "pro"] = Field(
        "uniform", description="How a local step picks its seed: uniform (FedKSeed) or pro (FedKSeed-Pro: "
                               "softmax of the min-max normalised mean |g| each seed has had, sent with the plan).")
    pro_clip: float = Field(1000.0, gt=0, description="FedKSeed-Pro: |g| above this is clipped before it enters a "
                                                      "seed's history (the official code's bias_loss_clip).")
    pro_initial: float = Field(0.0, description="FedKSeed-Pro: the value every seed's history starts with "
                                                "(the official code's grad_initial).")


def index_dtype(k: int) -> torch.dtype:
    """The smallest integer type that holds seed indices 0..k-1."""
    if k <= 256:
        return torch.uint8
    if k <= 2**15:
        return torch.int16
    return torch.int32


def candidate_seeds(seed: int, k: int) -> list[int]:
    return [derive_seed(seed, "fedkseed_candidate", j) for j in range(k)]


def perturb(tensors: Sequence[torch.Tensor], seed: int, alpha: float) -> None:
    """w <- w + alpha z, z ~ N(0, I) drawn from ``seed`` tensor after tensor (in place, no grad)."""
    if not tensors:
        return
    gen = torch.Generator(device=tensors[0].device)
    gen.manual_seed(seed)
    with torch.no_grad():
        for t in tensors:
            z = torch.randn(t.shape, generator=gen, device=t.device, dtype=t.dtype)
            t.add_(z, alpha=alpha)


def seed_probabilities(abs_sum: np.ndarray, count: np.ndarray) -> np.ndarray:
    """FedKSeed-Pro's sampling distribution (float64): a_j = abs_sum_j / count_j (seed j's mean clipped |g|),
    normalised to [0, 1] by min-max (all equal: all 0), then p = softmax(a). A seed whose steps moved the
    loss more is picked more often, at most e times as often as the least useful one."""
    amp = np.asarray(abs_sum, dtype=np.float64) / np.asarray(count, dtype=np.float64)
    lo, hi = amp.min(), amp.max()
    norm = (amp - lo) / (hi - lo) if hi > lo else np.zeros_like(amp)
    weights = np.exp(norm - norm.max())
    return weights / weights.sum()


def sampling_cdf(probabilities: torch.Tensor | None, k: int) -> np.ndarray | None:
    """The cumulative sums a client samples seeds with (None: uniform); refuses a distribution that is not
    one over the K candidates."""
    if probabilities is None:
        return None
    p = probabilities.detach().to("cpu", torch.float64).numpy()
    if p.shape != (k,) or not np.isfinite(p).all() or (p < 0).any() or p.sum() <= 0:
        raise ValueError(f"fedkseed: the plan's {PROBS_KEY} must be {k} finite non-negative probabilities, "
                         f"got shape {tuple(p.shape)}")
    return np.cumsum(p)


def pick_seed(picks: np.random.Generator, k: int, cdf: np.ndarray | None) -> int:
    """A candidate index: uniform (``picks.integers(k)``), or by inverse CDF, j = the first index whose
    cumulative probability exceeds u * total with u = ``picks.random()``."""
    if cdf is None:
        return int(picks.integers(k))
    return int(np.searchsorted(cdf, picks.random() * cdf[-1], side="right"))


def replay(tensors: Sequence[torch.Tensor], seeds: Sequence[int], indices: torch.Tensor, coefs: torch.Tensor) -> None:
    """Apply a replay list in order: w <- w + c_i z_{j_i} (what the server and a catching-up client run)."""
    for j, c in zip(indices.tolist(), coefs.tolist()):
        perturb(tensors, seeds[j], c)


def step_coefficient(lr: float, weight: float, g: float) -> float:
    """c = float32(-lr * p * g): the value both a client (p = 1) and the server apply."""
    return float(np.float32(-lr * weight * g))


def tuned_tensors(model: torch.nn.Module, params: str) -> list[torch.Tensor]:
    """The tensors zeroth-order steps move, in a fixed order: every floating base parameter once
    (``all``, in ``named_parameters`` order) or the adapter's (``adapter``, sorted by name)."""
    if params == "adapter":
        named = adapter_parameters(model)
        return [named[k].data for k in sorted(named)]
    return [p.data for name, p in model.named_parameters() if not is_adapter_param(name) and p.is_floating_point()]


def batch_loss(model, micro: list[dict[str, torch.Tensor]], device, cast) -> torch.Tensor:
    """The step's loss: the mean over every supervised token of its micro-batches (as the local trainer)."""
    counts = [int(b["labels"].shape[0]) if b["labels"].dim() <= 1 else int((b["labels"][..., 1:] != IGNORE_INDEX).sum())
              for b in micro]  # a classifier's examples, or an LM's supervised tokens after the shift
    total = sum(counts)
    if total == 0:
        raise ValueError("a zeroth-order step's micro-batches hold no supervised target")
    loss = torch.zeros((), device=device)
    for batch, count in zip(micro, counts):
        if count == 0:
            continue
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        with cast:
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
        loss += out.loss.float() * (count / total)
    return loss


def zo_train(model, tensors: list[torch.Tensor], seeds: Sequence[int], picks: np.random.Generator, batches, *,
             steps: int, grad_accumulation: int, lr: float, eps: float, precision: str = "fp32",
             on_step=None, cdf: np.ndarray | None = None) -> tuple[torch.Tensor, torch.Tensor, list[float], int, int]:
    """``steps`` zeroth-order steps on ``tensors`` (in place). Returns (seed indices, g as float32, losses:
    the mean of the two perturbed losses per step, examples seen, tokens seen). ``cdf``: FedKSeed-Pro's
    cumulative seed probabilities (None: uniform)."""
    device = model_device(model)
    cast = autocast(device, precision)
    backup = [t.detach().clone() for t in tensors]
    indices, grads, losses = [], [], []
    seen = tokens = 0
    model.eval()  # no dropout: both evaluations see the same function
    with torch.no_grad():
        for step in range(steps):
            micro = [next(batches) for _ in range(grad_accumulation)]
            seen += sum(int(b["input_ids"].shape[0]) for b in micro)
            tokens += sum(int(b["attention_mask"].sum()) for b in micro)
            j = pick_seed(picks, len(seeds), cdf)
            for b, t in zip(backup, tensors):
                b.copy_(t)
            perturb(tensors, seeds[j], eps)
            plus = float(batch_loss(model, micro, device, cast))
            for b, t in zip(backup, tensors):
                t.copy_(b)
            perturb(tensors, seeds[j], -eps)
            minus = float(batch_loss(model, micro, device, cast))
            for b, t in zip(backup, tensors):
                t.copy_(b)
            if not (math.isfinite(plus) and math.isfinite(minus)):
                raise FloatingPointError(f"zeroth-order loss became {plus if not math.isfinite(plus) else minus} "
                                         f"at step {step + 1}")
            g = float(np.float32((plus - minus) / (2 * eps)))
            perturb(tensors, seeds[j], step_coefficient(lr, 1.0, g))
            indices.append(j)
            grads.append(g)
            losses.append((plus + minus) / 2)
            if on_step is not None:
                on_step(step + 1, torch.tensor(losses[-1]))
    return torch.tensor(indices, dtype=torch.int64), torch.tensor(grads, dtype=torch.float32), losses, seen, tokens


@register_method
class FedKSeed(MethodStrategy):
    name = "fedkseed"
    image_refusal = "its zeroth-order loss is the language-model loss on token inputs"
    seq2seq_refusal = ("its micro-batch weights count supervised tokens after the causal one-position label shift "
                       "(labels[:, 1:]), which an encoder-decoder's loss does not apply")
    summary = "zeroth-order tuning: clients upload (seed index, projected gradient) pairs, the server replays them"
    Options = FedKSeedOptions
    server_optimizer_refusal = "the server replays scalar steps along seeded directions; there is no averaged tensor to step on"
    dp_refusal = ("uploads are (seed index, projected gradient) pairs replayed step by step, not a change vector "
                  "that can be clipped to a norm and noised")

    def __init__(self, options: Mapping[str, Any] | None = None, server_optimizer: Any | None = None) -> None:
        super().__init__(options, server_optimizer)
        self.seeds = candidate_seeds(self.opts.seed or 0, self.opts.k)
        self.model: torch.nn.Module | None = None
        self.history: list[tuple[torch.Tensor, torch.Tensor]] = []
        """Per round: (seed indices, coefficients c) the server replayed, in order."""
        self.synced: dict[int, int] = {}
        """Client -> the round whose starting global model it holds (1: the pre-trained model)."""
        self.round_lr: float | None = None
        self.on_server = False
        """True in the server's process (``begin_round`` ran): the model is the server's, moved by every
        replay; False on a client in its own process (a Flower node), which catches up by replaying."""
        # FedKSeed-Pro's server state: per candidate, the sum of its clipped |g| and how many values it has
        # (its history starts with one value, pro_initial); p = seed_probabilities(abs_sum, count).
        self.abs_sum = np.full(self.opts.k, min(abs(self.opts.pro_initial), self.opts.pro_clip), dtype=np.float64)
        self.count = np.ones(self.opts.k, dtype=np.int64)

    @property
    def pro(self) -> bool:
        return self.opts.seed_sampling == "pro"

    def probabilities(self) -> np.ndarray:
        """The sampling distribution the next plans carry (FedKSeed-Pro)."""
        return seed_probabilities(self.abs_sum, self.count)

    @property
    def index_dtype(self) -> torch.dtype:
        return index_dtype(self.opts.k)

    # --- set-up -------------------------------------------------------------------------------
    def prepare_model(self, model: torch.nn.Module) -> None:
        self.model = model

    def begin_round(self, round_idx: int, server: ServerContext) -> None:
        cfg = server.config
        refusals = []
        if cfg.federation.uplink_compression != "none":
            refusals.append(f"federation.uplink_compression={cfg.federation.uplink_compression}: FedKSeed uploads "
                            "(seed index, scalar) pairs, which the tensor codecs do not apply to; use none")
        if cfg.federation.robust.rule != "none" or cfg.federation.robust.clip_norm is not None:
            refusals.append("federation.robust: the robust rules act on tensors, FedKSeed's uploads are scalar lists; "
                            "use rule none without clip_norm")
        if cfg.training.objective != "sft":
            refusals.append(f"training.objective={cfg.training.objective}: FedKSeed's zeroth-order steps use the "
                            "language-modelling loss only; use sft")
        if cfg.model.quantization != "none" and self.opts.params == "all":
            refusals.append(f"model.quantization={cfg.model.quantization}: method.options.params=all moves every base "
                            "weight, which a quantised base cannot hold; use params=adapter or no quantisation")
        if cfg.training.keep_optimizer:
            refusals.append("training.keep_optimizer=true: FedKSeed has no optimizer state to keep")
        if refusals:
            raise ValueError("; ".join(refusals))
        self.round_lr = server.lr if server.lr is not None else cfg.training.lr
        self.on_server = True

    # --- a round ------------------------------------------------------------------------------
    def configure_client(self, round_idx: int, client_id: int, global_state: AdapterState, store: Any) -> ClientPlan:
        since = self.synced.get(client_id, 1)
        missed = self.history[since - 1:round_idx - 1]
        control = {
            HISTORY_INDEX_KEY: torch.cat([i for i, _ in missed]).to(self.index_dtype) if missed
            else torch.zeros(0, dtype=self.index_dtype),
            HISTORY_COEF_KEY: torch.cat([c for _, c in missed]) if missed else torch.zeros(0, dtype=torch.float32),
        }
        if self.pro:  # K float32 go down with every plan
            control[PROBS_KEY] = torch.from_numpy(self.probabilities()).to(torch.float32)
        self.synced[client_id] = round_idx
        # No tensor of the model goes down: the client catches up by replaying the history it missed
        # (``catch_up``: which rounds the list covers, and each round's number of entries, are plan info).
        return ClientPlan(client_id=client_id, downlink={}, control=control,
                          trainable=None if self.opts.params == "adapter" else [],
                          upload=[INDEX_KEY, G_KEY], start_needed=False,
                          info={"round": round_idx, "since": since, "steps": [int(i.numel()) for i, _ in missed]})

    def attach_client_hooks(self, round_idx: int, plan: ClientPlan, store: Any) -> None:
        """The client must hold the round's global model. In process it is the server's own, moved by every
        replay so far; in a process of its own (a Flower node) the client replays the catch-up list."""
        if not self.on_server:
            self.catch_up(round_idx, plan, store)
        elif self.opts.params == "all" and len(self.history) != round_idx - 1:
            raise ValueError(f"fedkseed: this process's model holds round {len(self.history) + 1}'s global model, "
                             f"not round {round_idx}'s")

    def catch_up(self, round_idx: int, plan: ClientPlan, store: Any) -> None:
        """On a client in its own process: bring this process's model to round ``round_idx``'s global model.
        The plan's lists cover rounds ``since``..round-1 (``info["steps"]``: entries per round); the rounds
        before ``since`` are the client's own earlier catch-ups (its store, ``HISTORY_NAME``). This process's
        model holds the global model of round ``len(self.history) + 1`` (the pre-trained model when it was
        just built; ``client_view`` puts it back after each job), so it replays only the rounds it lacks:
        the same entries in the same order as the server, hence the server's model bit for bit."""
        since, counts = int(plan.info["since"]), [int(n) for n in plan.info["steps"]]
        idx, coef = plan.control[HISTORY_INDEX_KEY].to(torch.int64), plan.control[HISTORY_COEF_KEY].float()
        if len(counts) != round_idx - since or sum(counts) != idx.numel() or idx.numel() != coef.numel():
            raise ValueError(f"fedkseed: this process's model holds round {len(self.history) + 1}'s global model, "
                             f"not round {round_idx}'s, and client {plan.client_id}'s catch-up list ({idx.numel()} "
                             f"entries, per round {counts}) does not cover rounds {since}..{round_idx - 1}")
        missed = list(zip(idx.split(counts), coef.split(counts))) if counts else []
        stored = store.get(plan.client_id, HISTORY_NAME) if store is not None else None
        known = (list(zip(stored["seed_index"].split(stored["steps"].tolist()),
                          stored["coef"].split(stored["steps"].tolist())))
                 if stored is not None and stored["steps"].numel() else [])
        if len(known) < since - 1:
            raise ValueError(f"fedkseed: client {plan.client_id} holds the replay history of rounds 1..{len(known)} "
                             f"but its catch-up starts at round {since} (a lost client store, or a message that "
                             "never arrived)")
        full = known[:since - 1] + missed  # rounds 1..round_idx-1
        have = len(self.history)
        if have > len(full) or any(not (torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]))
                                   for a, b in zip(self.history, full)):
            raise ValueError(f"fedkseed: this process's model holds a history that is not a prefix of client "
                             f"{plan.client_id}'s (round {round_idx})")
        tensors = tuned_tensors(self.model, self.opts.params)
        for entry in full[have:]:
            replay(tensors, self.seeds, *entry)
        self.history = full
        if len(full) > len(known) and store is not None:  # received: kept whatever becomes of the update
            store.put(plan.client_id, HISTORY_NAME, {
                "seed_index": torch.cat([i for i, _ in full]), "coef": torch.cat([c for _, c in full]),
                "steps": torch.tensor([int(i.numel()) for i, _ in full], dtype=torch.int64)})

    @contextlib.contextmanager
    def client_view(self, plan: ClientPlan):
        """In process the clients train the server's model: its tuned tensors are put back as they were
        when the job ends (a real client keeps its own copy; the server moves only by replaying)."""
        tensors = tuned_tensors(self.model, self.opts.params) if self.model is not None else []
        saved = [t.detach().clone() for t in tensors]
        try:
            yield
        finally:
            with torch.no_grad():
                for t, value in zip(tensors, saved):
                    t.copy_(value)

    def local_trainer(self):
        return self.train_zeroth_order

    def train_zeroth_order(self, model, params, batches, plan: ClientPlan, *, steps: int, grad_accumulation: int,
                           lr: float, precision: str = "fp32", num_examples: int = 0, on_step=None,
                           **ignored) -> tuple[TrainResult, list[float]]:
        """The client's local loop (``Strategy.local_trainer``): zeroth-order steps, no backward."""
        start = time.perf_counter()
        picks = np.random.default_rng(derive_seed(self.opts.seed or 0, "fedkseed_pick", plan.info.get("round"),
                                                  plan.client_id, plan.job))
        if self.pro and PROBS_KEY not in plan.control:
            raise ValueError(f"fedkseed: method.options.seed_sampling=pro but the plan carries no {PROBS_KEY}")
        cdf = sampling_cdf(plan.control.get(PROBS_KEY), self.opts.k) if self.pro else None
        indices, grads, losses, seen, tokens = zo_train(model, tuned_tensors(model, self.opts.params), self.seeds, picks, batches,
                                          steps=steps, grad_accumulation=grad_accumulation, lr=lr,
                                          eps=self.opts.eps, precision=precision, on_step=on_step, cdf=cdf)
        result = TrainResult(steps=steps, examples_seen=seen, num_examples=num_examples,
                             mean_loss=sum(losses) / len(losses), last_loss=losses[-1], lr=lr,
                             seconds=time.perf_counter() - start, tokens=tokens,
                             extra={"seed_index": indices.to(self.index_dtype), "g": grads})
        return result, losses

    def client_update(self, round_idx: int, plan: ClientPlan, trained: AdapterState, result: TrainResult,
                      store: Any) -> ClientUpdate:
        return ClientUpdate(client_id=plan.client_id, num_examples=result.num_examples, job=plan.job,
                            tensors={INDEX_KEY: result.extra["seed_index"], G_KEY: result.extra["g"]},
                            metrics={"loss": result.mean_loss})

    def check_update(self, global_state: AdapterState, update: ClientUpdate) -> None:
        got = update.tensors
        if set(got) != {INDEX_KEY, G_KEY}:
            raise ValueError(f"fedkseed: client {update.client_id} must upload exactly {INDEX_KEY} and {G_KEY}")
        idx, g = got[INDEX_KEY], got[G_KEY]
        if idx.dim() != 1 or g.dim() != 1 or idx.shape != g.shape:
            raise ValueError(f"fedkseed: client {update.client_id} uploaded {tuple(idx.shape)} indices and "
                             f"{tuple(g.shape)} scalars; expected two vectors of one entry per step")
        if idx.is_floating_point() or (idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.opts.k)):
            raise ValueError(f"fedkseed: client {update.client_id} uploaded seed indices outside 0..{self.opts.k - 1}")
        if not torch.isfinite(g).all():
            raise ValueError(f"fedkseed: client {update.client_id} uploaded a non-finite projected gradient")

    def aggregate(self, round_idx: int, global_state: AdapterState, updates: Sequence[ClientUpdate]) -> AggregateResult:
        lr = self.round_lr
        if lr is None:
            raise RuntimeError("fedkseed: begin_round sets the round's learning rate before aggregate")
        if self.opts.equal_weight:
            weights = [1.0 / len(updates)] * len(updates)
        else:
            total = sum(u.num_examples for u in updates)
            weights = [u.num_examples / total for u in updates]
        indices, coefs = [], []
        for update, weight in zip(updates, weights):
            indices.append(update.tensors[INDEX_KEY].to(torch.int64))
            coefs += [step_coefficient(lr, weight, g) for g in update.tensors[G_KEY].tolist()]
        entry = (torch.cat(indices) if indices else torch.zeros(0, dtype=torch.int64),
                 torch.tensor(coefs, dtype=torch.float32))
        new_global = {k: v.clone() for k, v in global_state.items()}
        if self.opts.params == "adapter":
            replay([new_global[k] for k in sorted(new_global)], self.seeds, *entry)
        else:
            replay(tuned_tensors(self.model, "all"), self.seeds, *entry)
        self.history.append(entry)
        metrics = {"replayed_steps": int(entry[0].numel()), "distinct_seeds": int(entry[0].unique().numel())}
        if self.pro:  # every accepted client's raw g joins its seed's history, in sampling order
            for update in updates:
                self.record_history(update.tensors[INDEX_KEY], update.tensors[G_KEY])
            p = self.probabilities()
            metrics.update(seed_prob_max=float(p.max()), seed_prob_min=float(p.min()))
        return AggregateResult(global_state=new_global, metrics=metrics)

    def record_history(self, indices: torch.Tensor, grads: torch.Tensor) -> None:
        """FedKSeed-Pro: abs_sum_j += min(|g|, pro_clip), count_j += 1 for each uploaded (j, g), in order."""
        for j, g in zip(indices.tolist(), grads.tolist()):
            self.abs_sum[j] += min(abs(g), self.opts.pro_clip)
            self.count[j] += 1

    # --- resume -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["history"] = [{"seed_index": i, "coef": c} for i, c in self.history]
        state["synced"] = {str(k): v for k, v in self.synced.items()}
        if self.pro:
            state["pro_abs_sum"] = torch.from_numpy(self.abs_sum.copy())
            state["pro_count"] = torch.from_numpy(self.count.copy())
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.history = [(h["seed_index"].to(torch.int64), h["coef"].float()) for h in state.get("history", [])]
        self.synced = {int(k): int(v) for k, v in state.get("synced", {}).items()}
        if self.pro and "pro_abs_sum" in state:
            self.abs_sum = state["pro_abs_sum"].to(torch.float64).numpy().copy()
            self.count = state["pro_count"].to(torch.int64).numpy().copy()
        if self.opts.params == "all" and self.model is not None:  # the global model is base + the history
            tensors = tuned_tensors(self.model, "all")
            for entry in self.history:
                replay(tensors, self.seeds, *entry)

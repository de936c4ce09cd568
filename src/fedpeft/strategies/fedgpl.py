"""FedGPL (gradient-priority layer selection; seed 002, ALGORITHMS.md section 3).

Before each round's clients are configured, the server computes gradients of the task loss on a small
server-held batch with the shared model holding the current global adapter, scores each transformer
layer (the ``layers.<i>`` index in the adapter keys) by ``grad_eval``, and selects layers:

- ``l1`` / ``l2``: L1 / L2 norm of the gradient of the full (frozen base) weights of the layer's
  LoRA-targeted modules (``<module>.base_layer.weight``), i.e. dL/dW;
- ``lora_l1`` / ``lora_l2``: L1 / L2 norm of the gradient of the layer's LoRA parameters (A and B);
- ``lora_per_l1`` / ``lora_per_l2``: the same divided by the layer's LoRA parameter count.

Count rule: layers sorted by score (descending, ties by index); k = the smallest prefix whose scores
sum to at least ``coverage`` (0.5) of the total, clamped to [``min_layer_num``, ``max_layer_num``] and
to the number of layers (k = ``min_layer_num`` when every score is 0). Only the selected layers' LoRA
parameters train and are uploaded; adapter keys outside any numbered layer always train.

Server batch (``server_batch``): ``train`` (the default; or an integer N, meaning ``train`` with N
records) = ``server_examples`` (16) records drawn (seeded, fixed for the run) from the training data,
batched by ``ServerContext.make_batch``, so no evaluation record influences which layers train;
``heldout`` = records drawn from the evaluation records, encoded like the training data (an opt-in for a
server that holds a declared public split: with the run's own evaluation set it leaks test data into
layer selection). Batches of
``federation.batch_size``; ``server_batches`` caps how many (default: enough to cover the records once).

``train_mode``: ``fedGradFocus`` (selection, the paper), ``fed`` (every layer, no gradients computed),
``local`` (no federation: each client trains its whole adapter from its own stored copy, nothing is
uploaded, evaluation per client). ``fed_alg``: ``fedadam`` (the default, as in seed 002: the configured
FedAdam server optimizer, else FedAdam with ``server_lr`` (5e-4, the seed's), beta1 0.9, beta2 0.99,
tau 1e-3), ``fedavg`` (the average; a configured server optimizer composes), ``fedprox`` (the proximal term (mu/2)||theta -
theta_global||^2 with ``mu`` (0.01) over the trained parameters).

With ``peft.type`` p_tuning or prompt_tuning (seed 002's other choices) no adapter tensor belongs to a
numbered layer: ``fedGradFocus`` then has nothing to select and trains the whole prompt encoder (no
server gradients are computed); ``fed``, ``local`` and every ``fed_alg`` work as with LoRA.

The score computation leaves the model as it found it: adapter values, ``requires_grad`` flags, ``.grad``
tensors and train/eval mode are restored. ``begin_round`` has no global state, so it keeps the server
context and the scores are computed in ``configure_round`` (which has it).
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field, PositiveInt, field_validator, model_validator

from fedpeft.adapters import AdapterState, adapter_parameters, module_name, set_adapter_state, state_bytes
from fedpeft.seeding import derive_seed
from fedpeft.strategies.base import AggregateResult, ClientPlan, ClientUpdate, TrainResult
from fedpeft.strategies.common import MethodStrategy, global_with_stored
from fedpeft.strategies.fedprox import proximal_term
from fedpeft.strategies.registry import MethodOptions, register_method
from fedpeft.strategies.server_optimizers import is_identity, make_server_optimizer

GRAD_EVALS = ("l1", "l2", "lora_l1", "lora_l2", "lora_per_l1", "lora_per_l2")
TRAIN_MODES = ("local", "fed", "fedGradFocus")
FED_ALGS = ("fedavg", "fedadam", "fedprox")
LOCAL_NAME = "fedgpl_local"
_LAYER = re.compile(r"\.(?:layers|layer|h|blocks|block)\.(\d+)\.")


def layer_of(key: str) -> int | None:
    """The transformer layer index in an adapter/parameter name (``...layers.3.self_attn...`` -> 3)."""
    match = _LAYER.search("." + key)
    return int(match.group(1)) if match else None


def base_weight_name(adapter_key: str) -> str:
    """PEFT's name of the frozen weight a LoRA parameter adapts."""
    return f"{module_name(adapter_key)}.base_layer.weight"


def layer_gradient_scores(model: torch.nn.Module, batches: Iterable[Mapping[str, torch.Tensor]], grad_eval: str,
                          state: Mapping[str, torch.Tensor] | None = None) -> dict[int, float]:
    """Layer index -> score under ``grad_eval`` from the loss gradient summed over ``batches`` (mean loss
    per batch). ``state`` (adapter values) is loaded first. The model is left exactly as found."""
    if grad_eval not in GRAD_EVALS:
        raise ValueError(f"grad_eval must be one of {', '.join(GRAD_EVALS)}, got {grad_eval!r}")
    named = dict(model.named_parameters())
    lora = adapter_parameters(model)
    use_base = grad_eval in ("l1", "l2")
    if use_base:
        targets = {}
        for key in lora:
            name = base_weight_name(key)
            if name not in named:
                raise KeyError(f"grad_eval={grad_eval}: no base weight '{name}' for adapter key '{key}'")
            targets[name] = named[name]
    else:
        targets = dict(lora)
    saved_values = {k: p.detach().clone() for k, p in lora.items()}
    saved_flags = {n: p.requires_grad for n, p in named.items()}
    saved_grads = {n: p.grad for n, p in named.items()}
    was_training = model.training
    try:
        if state is not None:
            set_adapter_state(model, state)
        for p in named.values():
            p.requires_grad_(False)
            p.grad = None
        for p in targets.values():
            p.requires_grad_(True)
        model.eval()
        batches = list(batches)
        if not batches:
            raise ValueError("layer_gradient_scores: no server batches")
        device = next(model.parameters()).device
        for batch in batches:
            batch = {k: v.to(device) for k, v in batch.items() if v is not None}
            out = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), labels=batch["labels"])
            (out.loss / len(batches)).backward()
        sums: dict[int, float] = {}
        counts: dict[int, int] = {}
        for name, p in targets.items():
            layer = layer_of(name)
            if layer is None:
                continue
            g = p.grad.detach().double() if p.grad is not None else torch.zeros(p.shape, dtype=torch.float64)
            value = float(g.abs().sum()) if grad_eval.endswith("l1") else float(g.pow(2).sum())
            sums[layer] = sums.get(layer, 0.0) + value
            counts[layer] = counts.get(layer, 0) + p.numel()
        scores = {}
        for layer in sorted(sums):
            value = sums[layer] if grad_eval.endswith("l1") else math.sqrt(sums[layer])
            if grad_eval.startswith("lora_per_"):
                value /= counts[layer]
            scores[layer] = value
        return scores
    finally:
        with torch.no_grad():
            for k, p in lora.items():
                p.copy_(saved_values[k])
        for n, p in named.items():
            p.requires_grad_(saved_flags[n])
            p.grad = saved_grads[n]
        model.train(was_training)


def select_layers(scores: Mapping[int, float], min_layers: int, max_layers: int, coverage: float = 0.5) -> list[int]:
    """Highest-score layers: the smallest prefix (by score, descending; ties by index) covering
    ``coverage`` of the total score, clamped to [min_layers, max_layers] and the number of layers."""
    order = sorted(scores, key=lambda layer: (-scores[layer], layer))
    total = sum(max(0.0, scores[layer]) for layer in order)
    if total <= 0:
        k = min_layers
    else:
        acc, k = 0.0, len(order)
        for i, layer in enumerate(order, start=1):
            acc += max(0.0, scores[layer])
            if acc >= coverage * total - 1e-12 * total:
                k = i
                break
    k = max(min_layers, min(max_layers, k))
    return sorted(order[: min(k, len(order))])


class FedGPLOptions(MethodOptions):
    train_mode: Literal["local", "fed", "fedGradFocus"] = Field(
        "fedGradFocus", description="fedGradFocus: gradient-selected layers (the paper); fed: every layer; local: no "
        "federation, each client alone.")
    fed_alg: Literal["fedavg", "fedadam", "fedprox"] = Field(
        "fedadam", description="Server rule: fedadam (seed 002's default; FedAdam with server_lr unless a server "
        "optimizer is configured), fedavg, or fedprox (proximal term mu).")
    grad_eval: Literal[GRAD_EVALS] = Field("lora_per_l1", description="Layer score: l1/l2 of the base-weight gradient, "
                                           "lora_l1/lora_l2 of the LoRA gradient, lora_per_*: per LoRA parameter.")
    min_layer_num: int = Field(2, ge=1, description="Fewest layers selected per round.")
    max_layer_num: int = Field(6, ge=1, description="Most layers selected per round.")
    coverage: float = Field(0.5, gt=0, le=1, description="Select the smallest top-score prefix covering this share "
                            "of the total score.")
    server_batch: Literal["heldout", "train"] | PositiveInt = Field(
        "train", description="Records the server scores layers on: train (training records), heldout (evaluation "
        "records), or N (N training records).")
    server_examples: int = Field(16, ge=1, description="Records in the server batch.")
    server_batches: int | None = Field(None, ge=1, description="Batches per scoring (null: cover the records once).")
    mu: float = Field(0.01, ge=0, description="Proximal coefficient for fed_alg=fedprox.")
    server_lr: float = Field(5e-4, gt=0, description="FedAdam's server learning rate for fed_alg=fedadam (seed 002's).")

    @field_validator("fed_alg", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _layer_bounds(self) -> "FedGPLOptions":
        if self.min_layer_num > self.max_layer_num:
            raise ValueError(f"need min_layer_num <= max_layer_num, got {self.min_layer_num} > {self.max_layer_num}")
        return self


@register_method
class FedGPL(MethodStrategy):
    name = "fedgpl"
    image_refusal = "its server-side gradient pass that picks the layers to train reads token inputs"
    seq2seq_refusal = ("it scores and selects layers by the block index in the adapter keys, which is the same "
                       "for T5's encoder block i and decoder block i")
    summary = "server-side gradient priority picks the layers whose LoRA trains and is sent each round"
    peft_types = ("lora", "p_tuning", "prompt_tuning")  # seed 002's --peft choices
    peft_type_refusal = "seed 002 runs FedGPL with lora, p-tuning or prompt-tuning"
    Options = FedGPLOptions

    def __init__(self, options=None, server_optimizer=None) -> None:
        super().__init__(options, server_optimizer)
        opts = self.opts
        self.train_mode, self.fed_alg, self.grad_eval = opts.train_mode, opts.fed_alg, opts.grad_eval
        self.min_layers, self.max_layers, self.coverage = opts.min_layer_num, opts.max_layer_num, opts.coverage
        if isinstance(opts.server_batch, int):
            self.server_batch, self.server_examples = "train", opts.server_batch
        else:
            self.server_batch, self.server_examples = opts.server_batch, opts.server_examples
        self.server_batches = opts.server_batches
        self.mu = opts.mu
        self.seed = opts.seed or 0
        if self.train_mode == "local" and not is_identity(server_optimizer):
            raise ValueError("fedgpl train_mode=local has no aggregate for a server optimizer to step on")
        if self.fed_alg == "fedadam":
            if is_identity(server_optimizer):
                self.server_optimizer = make_server_optimizer("fedadam", lr=opts.server_lr)
            elif server_optimizer.name != "fedadam":
                raise ValueError(f"fedgpl fed_alg=fedadam (the default) conflicts with server optimizer "
                                 f"'{server_optimizer.name}': set method.options.fed_alg=fedavg to compose with it")
        self.personalized = self.train_mode == "local"
        self._server: Any = None
        self._selected: list[int] | None = None
        self._scores: dict[int, float] = {}
        self._grad_seconds = 0.0
        self._server_records: list | None = None

    # --- server-held batch ------------------------------------------------------------------------
    def begin_round(self, round_idx: int, server: Any) -> None:
        self._server = server

    def _server_batches(self, server: Any, round_idx: int) -> list[dict[str, torch.Tensor]]:
        from fedpeft.data.encoding import collate
        from fedpeft.data.dataset import encode_for_experiment

        cfg = server.config
        size = cfg.federation.batch_size
        source = server.data.evaluation if self.server_batch == "heldout" else server.data.train
        if self._server_records is None:
            rng = np.random.default_rng(derive_seed(self.seed, "fedgpl_server_records", self.server_batch))
            order = rng.permutation(len(source)).tolist()
            encoded, _ = encode_for_experiment(cfg, server.data, [source[i] for i in order], server.tokenizer)
            keep = [(i, e) for i, e in zip(order, encoded) if e is not None][: self.server_examples]
            if not keep:
                raise ValueError(f"fedgpl: no {self.server_batch} record fits training.max_seq_len for the server batch")
            self._server_records = keep
        n_batches = int(self.server_batches) if self.server_batches else math.ceil(len(self._server_records) / size)
        if self.server_batch == "train":
            stream = server.make_batch([i for i, _ in self._server_records],
                                       derive_seed(self.seed, "fedgpl_batches", round_idx))
            return [next(stream) for _ in range(n_batches)]
        examples = [e for _, e in self._server_records]
        pad = server.tokenizer.pad_token_id
        return [collate([examples[(b * size + j) % len(examples)] for j in range(size)], pad) for b in range(n_batches)]

    def select(self, round_idx: int, global_state: AdapterState) -> list[int]:
        if self._server is None:
            raise RuntimeError("fedgpl: begin_round (the server context) must come before configure_round")
        start = time.perf_counter()
        batches = self._server_batches(self._server, round_idx)
        self._scores = layer_gradient_scores(self._server.model, batches, self.grad_eval, state=global_state)
        self._grad_seconds = time.perf_counter() - start
        return select_layers(self._scores, self.min_layers, self.max_layers, self.coverage)

    # --- clients ----------------------------------------------------------------------------------
    def configure_round(self, round_idx: int, clients: Sequence[int], global_state: AdapterState, store: Any
                        ) -> list[ClientPlan]:
        if self.train_mode == "local":
            plans = []
            for cid in clients:
                state = dict(global_state)
                stored = store.get(cid, LOCAL_NAME) if store is not None else None
                if stored is not None:
                    state.update(stored)
                plans.append(ClientPlan(client_id=cid, downlink={}, init_state=state, upload=[]))
            return plans
        if self.train_mode == "fedGradFocus" and not any(layer_of(k) is not None for k in global_state):
            # Prompt or P-tuning: the virtual tokens belong to no transformer layer, so there is no layer
            # to select; every adapter tensor trains (what fedGradFocus trains outside numbered layers).
            self._selected = None
            keys = sorted(global_state)
        elif self.train_mode == "fedGradFocus":
            self._selected = self.select(round_idx, global_state)
            chosen = set(self._selected)
            keys = [k for k in sorted(global_state) if layer_of(k) is None or layer_of(k) in chosen]
        else:
            self._selected = None
            keys = sorted(global_state)
        return [ClientPlan(client_id=cid, downlink=global_state, trainable=list(keys), upload=list(keys))
                for cid in clients]

    def attach_client_hooks(self, round_idx: int, plan: ClientPlan, store: Any) -> None:
        """FedProx: the proximal term anchored at the adapter the client received (built client-side)."""
        if self.fed_alg == "fedprox" and self.train_mode != "local" and plan.extra_loss is None:
            plan.extra_loss = proximal_term(plan.downlink, self.mu)

    def client_update(self, round_idx: int, plan: ClientPlan, trained: AdapterState, result: TrainResult, store: Any
                      ) -> ClientUpdate:
        if self.train_mode == "local":
            store.put(plan.client_id, LOCAL_NAME, {k: v.detach().float().clone() for k, v in trained.items()})
            return ClientUpdate(client_id=plan.client_id, tensors={}, num_examples=result.num_examples, job=plan.job,
                                metrics={"loss": result.mean_loss})
        return super().client_update(round_idx, plan, trained, result, store)

    def personal_state(self, client_id: int, global_state: AdapterState, store: Any) -> AdapterState | None:
        if self.train_mode != "local":
            return None
        return global_with_stored(global_state, store, client_id, LOCAL_NAME)

    # --- server -----------------------------------------------------------------------------------
    def aggregate(self, round_idx: int, global_state: AdapterState, updates: Sequence[ClientUpdate]) -> AggregateResult:
        if self.train_mode == "local":
            return AggregateResult(global_state={k: v.clone() for k, v in global_state.items()},
                                   metrics={"clients_trained": len(updates), "uplink_ratio": 0.0})
        averaged = self.average_updates(global_state, updates)
        new_global = self.apply_average(global_state, averaged)
        full = state_bytes(global_state)
        sent = state_bytes({k: global_state[k] for k in averaged})
        metrics: dict[str, Any] = {"uplink_ratio": sent / full if full else 0.0, "uplink_bytes_per_client": sent,
                                   "fedit_uplink_bytes_per_client": full, "fed_alg": self.fed_alg}
        if self._selected is not None:
            metrics.update({"selected_layers": list(self._selected), "num_selected_layers": len(self._selected),
                            "layer_scores": {str(k): v for k, v in self._scores.items()},
                            "grad_eval": self.grad_eval, "server_grad_seconds": self._grad_seconds})
        return AggregateResult(global_state=new_global, metrics=metrics)

"""LoRA algebra shared by the aggregation rules: scalings, client ranks, slicing and padding, stacked
products, factored SVD, and the base-weight deltas that FLoRA and FedEx-LoRA broadcast.

Conventions. A LoRA module holds A (r x d_in) and B (d_out x r) and adds s * B @ A to its frozen weight.
With one shared PEFT model of rank r_max, a client of rank r_k uses the first r_k rows of A and the first
r_k columns of B; everything beyond stays zero (its gradients are then zero too, and ``rank_mask``
zeroes them anyway). What a rank-r_k client sends or receives is the r_k slice only.

Client scaling. ``rank_scaling: constant`` (default) gives every client the model's scaling s
(alpha grows with the rank, alpha_k = s * r_k, as the FLoRA reference code does with alpha = 2 r_k);
``rank_scaling: alpha`` keeps one alpha, so s_k = alpha / r_k (or alpha / sqrt(r_k) with rsLoRA) and
the plan asks the engine for that scaling through ``ClientPlan.scaling``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import torch
from pydantic import Field, PositiveInt

from fedpeft.adapters import AdapterState, lora_pairs
from fedpeft.strategies.registry import MethodOptions

BASE_DELTA_A = ".base_delta.A"
BASE_DELTA_B = ".base_delta.B"
BASE_DELTA_DENSE = ".base_delta.dense"


# --- scalings -----------------------------------------------------------------------------------
def lora_scaling(alpha: float, r: int, rslora: bool = False) -> float:
    """s = alpha / r, or alpha / sqrt(r) with rsLoRA."""
    if r <= 0:
        raise ValueError(f"LoRA rank must be >= 1, got {r}")
    return float(alpha) / (math.sqrt(r) if rslora else r)


def require_option(options: Mapping[str, Any], key: str, method: str) -> Any:
    if options.get(key) is None:
        raise ValueError(
            f"method '{method}' needs options['{key}'] (the engine fills lora_alpha, r and rslora from the "
            f"peft section, and num_clients and seed from the config)"
        )
    return options[key]


def model_rank(state: Mapping[str, torch.Tensor]) -> int:
    """The rank r_max of the shared model's adapter (rows of any A)."""
    pairs = lora_pairs(state)
    if not pairs:
        raise ValueError("adapter state holds no LoRA A/B pair")
    ranks = {state[a].shape[0] for a, _ in pairs.values()}
    if len(ranks) != 1:
        raise ValueError(f"LoRA modules of different ranks {sorted(ranks)} are not supported by this method")
    return ranks.pop()


class RankOptions(MethodOptions):
    client_ranks: PositiveInt | list[PositiveInt] | None = Field(
        None, description="Rank r_k of client k: one rank for all, or a list repeated over client ids "
        "(client k gets client_ranks[k % len]); null: every client at peft.r.")
    rank_scaling: Literal["constant", "alpha"] = Field(
        "constant", description="LoRA scaling of a rank-r_k client: constant (the model's alpha/r) or alpha (alpha/r_k).")


class RankPlan:
    """Client ranks (per client, or a distribution repeated over client ids) and their scalings."""

    def __init__(self, options: Mapping[str, Any], method: str) -> None:
        self.method = method
        raw = options.get("client_ranks")
        if raw is None:
            self.ranks: list[int] | None = None
        else:
            values = [raw] if isinstance(raw, int) else list(raw)
            if not values or any(not isinstance(v, int) or isinstance(v, bool) or v < 1 for v in values):
                raise ValueError(f"method.options.client_ranks must be a positive int or a list of them, got {raw!r}")
            self.ranks = values
        self.mode = options.get("rank_scaling", "constant")
        if self.mode not in ("constant", "alpha"):
            raise ValueError(f"method.options.rank_scaling must be 'constant' or 'alpha', got {self.mode!r}")
        self.alpha = options.get("lora_alpha")
        self.rslora = bool(options.get("rslora", False))
        self.r_max: int | None = None
        self._model_scaling: float | None = None

    def bind(self, r_max: int) -> None:
        """Fix the model rank (from the initial adapter); client ranks must not exceed it."""
        self.r_max = r_max
        if self.ranks is not None and max(self.ranks) > r_max:
            raise ValueError(
                f"method.options.client_ranks has rank {max(self.ranks)} but the shared adapter has rank {r_max}: "
                f"set peft.r to at least {max(self.ranks)} (the largest client rank)"
            )

    def rank(self, client_id: int) -> int:
        if self.r_max is None:
            raise RuntimeError("RankPlan.bind(r_max) must be called (init_global) before ranks are used")
        if self.ranks is None:
            return self.r_max
        return self.ranks[client_id % len(self.ranks)]

    @property
    def model_scaling(self) -> float:
        if self._model_scaling is None:
            alpha = self.alpha
            if alpha is None:
                raise ValueError(f"method '{self.method}' needs options['lora_alpha'] (the engine fills it from peft.alpha)")
            self._model_scaling = lora_scaling(alpha, self.r_max or 1, self.rslora)
        return self._model_scaling

    def scaling(self, rank: int) -> float:
        """s_k: the scaling under which the factors of a rank-``rank`` client act."""
        model_scaling = self.model_scaling  # raises when lora_alpha is missing
        if self.mode == "constant":
            return model_scaling
        return lora_scaling(self.alpha, rank, self.rslora)

    def plan_scaling(self, rank: int) -> float | None:
        """What the engine must set as LoRA scaling for a rank-``rank`` client (None: the model's own)."""
        if self.mode == "constant" or rank == self.r_max:
            return None
        return self.scaling(rank)

    def factor(self, rank: int) -> float:
        """s_k / s: multiply a rank-``rank`` client's B by this to express it under the model's scaling."""
        return 1.0 if self.mode == "constant" else self.scaling(rank) / self.model_scaling


# --- slicing, padding, masks ----------------------------------------------------------------------
def is_a(key: str) -> bool:
    return ".lora_A." in key


def is_b(key: str) -> bool:
    return ".lora_B." in key


def is_lora(key: str) -> bool:
    """A LoRA factor; every other adapter key is a trained copy of a whole module (peft's
    ``modules_to_save``, e.g. a classification head), which the rank and factor algebra leaves alone."""
    return is_a(key) or is_b(key)


def slice_to_rank(state: Mapping[str, torch.Tensor], rank: int) -> AdapterState:
    """First ``rank`` rows of every A and columns of every B (contiguous copies: what goes on the wire)."""
    out: AdapterState = {}
    for key, value in state.items():
        if is_a(key):
            out[key] = value[:rank].clone()
        elif is_b(key):
            out[key] = value[:, :rank].clone()
        else:
            out[key] = value.clone()
    return out


def pad_to_rank(state: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor]) -> AdapterState:
    """Zero-pad sliced A rows / B columns up to the shapes of ``reference``."""
    out: AdapterState = {}
    for key, value in state.items():
        target = reference[key]
        if tuple(value.shape) == tuple(target.shape):
            out[key] = value.float().clone()
            continue
        padded = torch.zeros_like(target, dtype=torch.float32)
        if is_a(key) and value.shape[1:] == target.shape[1:] and value.shape[0] <= target.shape[0]:
            padded[: value.shape[0]] = value
        elif is_b(key) and value.shape[0] == target.shape[0] and value.shape[1] <= target.shape[1]:
            padded[:, : value.shape[1]] = value
        else:
            raise ValueError(f"tensor '{key}' of shape {tuple(value.shape)} cannot be padded to {tuple(target.shape)}")
        out[key] = padded
    return out


def zero_beyond_rank(state: Mapping[str, torch.Tensor], rank: int) -> AdapterState:
    """Full-shape copy with A rows and B columns beyond ``rank`` set to zero (a rank-r client's init)."""
    out: AdapterState = {}
    for key, value in state.items():
        value = value.clone()
        if is_a(key):
            value[rank:] = 0
        elif is_b(key):
            value[:, rank:] = 0
        out[key] = value
    return out


def rank_mask(rank: int) -> Callable[[Mapping[str, torch.nn.Parameter]], None]:
    """A grad transform that zeroes gradients of A rows / B columns beyond ``rank``."""

    def transform(params: Mapping[str, torch.nn.Parameter]) -> None:
        for key, p in params.items():
            if p.grad is None:
                continue
            if is_a(key):
                p.grad[rank:] = 0
            elif is_b(key):
                p.grad[:, rank:] = 0

    return transform


def scale_b(state: Mapping[str, torch.Tensor], factor: float) -> AdapterState:
    if factor == 1.0:
        return dict(state)
    return {k: (v * factor if is_b(k) else v) for k, v in state.items()}


def validate_finite(update: Mapping[str, torch.Tensor], client_id: int) -> None:
    for key, value in update.items():
        if not torch.isfinite(value).all():
            raise ValueError(f"update of client {client_id}: tensor '{key}' holds NaN or inf")


# --- products and decompositions ------------------------------------------------------------------
def stack_factors(bs: Sequence[torch.Tensor], as_: Sequence[torch.Tensor], coefficients: Sequence[float]):
    """B_stack = [B_1, ..., B_K], A_stack = [c_1 A_1; ...; c_K A_K], so B_stack @ A_stack = sum c_k B_k A_k."""
    b_stack = torch.cat([b.float() for b in bs], dim=1)
    a_stack = torch.cat([float(c) * a.float() for c, a in zip(coefficients, as_)], dim=0)
    return b_stack, a_stack


def frobenius_of_product(b: torch.Tensor, a: torch.Tensor) -> float:
    """||B @ A||_F without forming the product when the inner rank is small."""
    b, a = b.double(), a.double()
    if b.shape[1] >= min(b.shape[0], a.shape[1]):
        return float(torch.linalg.matrix_norm(b @ a))
    gram = (b.T @ b) * (a @ a.T)
    return float(gram.sum().clamp_min(0).sqrt())


def factored_svd(b: torch.Tensor, a: torch.Tensor):
    """SVD of B @ A (B: m x R, A: R x n) through QR of the factors: cost O((m + n) R^2), exact.

    Returns U (m x q), S (q), Vh (q x n) with q = min(R, m, n), singular values descending."""
    b = b.double()
    a = a.double()
    m, rank = b.shape
    n = a.shape[1]
    if rank >= min(m, n):
        u, s, vh = torch.linalg.svd(b @ a, full_matrices=False)
    else:
        qb, rb = torch.linalg.qr(b)
        qa, ra = torch.linalg.qr(a.T)
        uc, s, vhc = torch.linalg.svd(rb @ ra.T)
        u, vh = qb @ uc, vhc @ qa.T
    return u.float(), s.float(), vh.float()


# --- base-weight deltas on the wire ----------------------------------------------------------------
def delta_message(module: str, b: torch.Tensor, a: torch.Tensor) -> tuple[AdapterState, torch.Tensor]:
    """The cheaper of (factors B, A) and the dense B @ A, as broadcast tensors, and the dense delta."""
    dense = b @ a
    if b.numel() + a.numel() < dense.numel():
        return {module + BASE_DELTA_B: b.contiguous(), module + BASE_DELTA_A: a.contiguous()}, dense
    return {module + BASE_DELTA_DENSE: dense.contiguous()}, dense


def base_delta_from_broadcast(broadcast: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Module name -> dense delta, from the tensors FLoRA / FedEx-LoRA broadcast. A client (or a resumed
    run replaying saved broadcasts) rebuilds exactly the delta the server applied."""
    out: dict[str, torch.Tensor] = {}
    for key, value in broadcast.items():
        if key.endswith(BASE_DELTA_DENSE):
            out[key[: -len(BASE_DELTA_DENSE)]] = value.float()
        elif key.endswith(BASE_DELTA_B):
            module = key[: -len(BASE_DELTA_B)]
            a = broadcast.get(module + BASE_DELTA_A)
            if a is None:
                raise ValueError(f"broadcast has '{key}' without its A factor")
            out[module] = value.float() @ a.float()
    return out


def sliced_rank(reference: Mapping[str, torch.Tensor], update: Mapping[str, torch.Tensor], client_id: int) -> int:
    """The rank r_k of a sliced upload, checked against the full-rank ``reference`` (keys, shapes, values)."""
    ranks = set()
    for key, value in update.items():
        if key not in reference:
            raise ValueError(f"update of client {client_id} carries unknown tensor '{key}'")
        ref = reference[key]
        if is_a(key):
            ok = value.dim() == 2 and value.shape[1] == ref.shape[1] and 1 <= value.shape[0] <= ref.shape[0]
            ranks.add(value.shape[0])
        elif is_b(key):
            ok = value.dim() == 2 and value.shape[0] == ref.shape[0] and 1 <= value.shape[1] <= ref.shape[1]
            ranks.add(value.shape[1])
        else:
            ok = tuple(value.shape) == tuple(ref.shape)
        if not ok:
            raise ValueError(
                f"update of client {client_id}: tensor '{key}' has shape {tuple(value.shape)}, "
                f"not a rank slice of {tuple(ref.shape)}"
            )
        if not torch.isfinite(value).all():
            raise ValueError(f"update of client {client_id}: tensor '{key}' holds NaN or inf")
    if len(ranks) != 1:
        raise ValueError(f"update of client {client_id} mixes LoRA ranks {sorted(ranks)} (or holds no LoRA tensor)")
    return ranks.pop()

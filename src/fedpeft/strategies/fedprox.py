"""FedProx (Li et al. 2020): the client adds (mu/2) * ||theta - theta_global||^2 over its trainable
adapter parameters to the local loss; the server averages like FedIT (server optimizers compose).

Option ``mu`` (default 0.01): the proximal coefficient.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from pydantic import Field

from fedpeft.adapters import AdapterState
from fedpeft.strategies.base import ClientPlan
from fedpeft.strategies.fedit import FedIT
from fedpeft.strategies.registry import MethodOptions, register_method


class FedProxOptions(MethodOptions):
    mu: float = Field(0.01, ge=0, description="Proximal coefficient: the local loss gains (mu/2)||theta - theta_global||^2.")


def proximal_term(anchor: Mapping[str, torch.Tensor], mu: float):
    """extra_loss(params) = (mu/2) * sum over params of ||p - anchor[p]||^2 (anchor moved to p's device once)."""
    cache: dict[str, torch.Tensor] = {}

    def extra_loss(params: Mapping[str, torch.nn.Parameter]) -> torch.Tensor:
        total = None
        for key, p in params.items():
            ref = cache.get(key)
            if ref is None or ref.device != p.device:
                ref = cache[key] = anchor[key].detach().to(device=p.device, dtype=p.dtype)
            term = (p - ref).pow(2).sum()
            total = term if total is None else total + term
        if total is None:
            return torch.zeros(())
        return 0.5 * mu * total

    return extra_loss


@register_method
class FedProx(FedIT):
    name = "fedprox"
    summary = "FedIT + proximal term (mu/2)||theta - theta_global||^2 in the local loss"
    Options = FedProxOptions

    def __init__(self, options=None, server_optimizer=None) -> None:
        super().__init__(options, server_optimizer)
        self.mu = self.opts.mu

    def configure_client(self, round_idx: int, client_id: int, global_state: AdapterState, store) -> ClientPlan:
        return ClientPlan(client_id=client_id, downlink=global_state, info={"mu": self.mu})

    def attach_client_hooks(self, round_idx: int, plan: ClientPlan, store) -> None:
        # Built on the client from what it received: the global state it starts from is the anchor.
        anchor = plan.init_state if plan.init_state is not None else plan.downlink
        plan.extra_loss = proximal_term(anchor, float(plan.info.get("mu", self.mu)))

"""FedPer-style personal layers (Arivazhagan et al. 2019): chosen adapter tensors stay on each client,
the rest are averaged as FedAvg.

FedPer keeps the top layers (the head) personal and federates the base. Here the personal part is a
set of adapter keys chosen by the options: ``personal_modules`` (substrings of the adapter key, e.g.
``score`` for a classifier head, ``layers.1.`` for one layer, ``v_proj``) and/or ``personal_last_layers``
(the LoRA tensors of the last n transformer layers, found by their ``layers.<i>.`` index; default 1:
FedPer's personal top layer). Which keys
that selects is checked when the model is built, before round 1: selecting none (nothing personal) or
every key (nothing federated) is an error naming the option.

Each client trains all its adapter tensors; it receives and uploads only the shared ones, and keeps its
personal ones in its client store (``fedper_personal``; they start from the initial adapter). The
"global model" (``evaluation_state``) is the shared part with the example-weighted mean of the personal
parts of the clients that have one; each client's own adapter (``personal_state``) gives the per-client
mean ± std. Server optimizers compose (they step on the shared part).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch
from pydantic import Field, model_validator

from fedpeft.adapters import AdapterState, adapter_parameters
from fedpeft.strategies.base import AggregateResult, ClientPlan, ClientUpdate, TrainResult
from fedpeft.strategies.common import MethodStrategy, mean_of_personal_parts, refuse_uploaded
from fedpeft.strategies.registry import MethodOptions, register_method

PERSONAL_NAME = "fedper_personal"
NUM_EXAMPLES_KEY = "__num_examples__"
LAYER_INDEX = re.compile(r"\.layers?\.(\d+)\.")


class FedPerOptions(MethodOptions):
    personal_modules: list[str] = Field(default_factory=list, description="Adapter keys containing any of these "
                                        "substrings stay on the client (e.g. [score] for a classifier head, "
                                        "[layers.1.] for a layer).")
    personal_last_layers: int = Field(1, ge=0, description="The adapter tensors of the last n transformer layers "
                                      "stay on the client (FedPer's personal top layers; default the last one).")

    @model_validator(mode="after")
    def _something_personal(self) -> "FedPerOptions":
        if not self.personal_modules and self.personal_last_layers == 0:
            raise ValueError("fedper needs a personal part: set method.options.personal_modules (key substrings) "
                             "and/or method.options.personal_last_layers (n >= 1)")
        return self


def personal_keys(keys: Sequence[str], modules: Sequence[str], last_layers: int) -> set[str]:
    """The adapter keys ``modules`` (substrings) or ``last_layers`` (the n highest layer indices) select."""
    indices = {int(m.group(1)) for k in keys if (m := LAYER_INDEX.search(k))}
    top = set(sorted(indices)[-last_layers:]) if last_layers else set()
    chosen = set()
    for key in keys:
        m = LAYER_INDEX.search(key)
        if any(s in key for s in modules) or (m is not None and int(m.group(1)) in top):
            chosen.add(key)
    return chosen


@register_method
class FedPer(MethodStrategy):
    name = "fedper"
    seq2seq_refusal = ("its personal top layers are found by 'layers.<i>.' in the adapter keys, where T5's keys "
                       "number the sub-layers of a block (block.<i>.layer.<j>.)")
    summary = "FedPer-style personal layers: chosen adapter tensors stay on each client, the rest averaged"
    Options = FedPerOptions
    personalized = True

    def __init__(self, options=None, server_optimizer=None) -> None:
        super().__init__(options, server_optimizer)
        self.personal: set[str] | None = None

    def _select(self, keys: Sequence[str]) -> set[str]:
        chosen = personal_keys(keys, self.opts.personal_modules, self.opts.personal_last_layers)
        what = (f"personal_modules={self.opts.personal_modules}, personal_last_layers={self.opts.personal_last_layers}")
        if not chosen:
            raise ValueError(f"method.options ({what}) select no adapter tensor of this model; adapter keys look like "
                             f"{sorted(keys)[0]!r}")
        if len(chosen) == len(keys):
            raise ValueError(f"method.options ({what}) select every adapter tensor: nothing would be federated")
        return chosen

    def prepare_model(self, model: torch.nn.Module) -> None:
        self.personal = self._select(list(adapter_parameters(model)))  # checked before round 1

    def _is_personal(self, key: str) -> bool:
        return key in self.personal if self.personal is not None else False

    def _ensure(self, keys: Sequence[str]) -> None:
        if self.personal is None:  # built without prepare_model (a Flower node builds the same model anyway)
            self.personal = self._select(list(keys))

    def _stored(self, client_id: int, store: Any) -> tuple[AdapterState | None, int]:
        stored = store.get(client_id, PERSONAL_NAME) if store is not None else None
        if stored is None:
            return None, 0
        stored = dict(stored)
        return stored, int(stored.pop(NUM_EXAMPLES_KEY, torch.zeros(())).item())

    def configure_client(self, round_idx: int, client_id: int, global_state: AdapterState, store: Any) -> ClientPlan:
        self._ensure(list(global_state))
        shared = [k for k in global_state if not self._is_personal(k)]
        return ClientPlan(client_id=client_id, downlink={k: global_state[k] for k in shared}, upload=shared)

    def attach_client_hooks(self, round_idx: int, plan: ClientPlan, store: Any) -> None:
        personal, _ = self._stored(plan.client_id, store)  # merged on the client, from its own store
        if personal is not None:
            plan.init_state = {**plan.downlink, **personal}

    def client_update(self, round_idx: int, plan: ClientPlan, trained: AdapterState, result: TrainResult, store: Any) -> ClientUpdate:
        self._ensure(list(trained))
        update = super().client_update(round_idx, plan, trained, result, store)
        personal = {k: v.detach().float().clone() for k, v in trained.items() if self._is_personal(k)}
        personal[NUM_EXAMPLES_KEY] = torch.tensor(float(result.num_examples))
        update.private[PERSONAL_NAME] = personal
        return update

    def check_update(self, global_state: AdapterState, update: ClientUpdate) -> None:
        super().check_update(global_state, update)
        self._ensure(list(global_state))
        refuse_uploaded(update, self._is_personal, "fedper", "personal layers stay on the client")

    def aggregate(self, round_idx: int, global_state: AdapterState, updates: Sequence[ClientUpdate]) -> AggregateResult:
        return self.average_into_global(global_state, updates)

    # --- evaluation -----------------------------------------------------------------------------
    def personal_state(self, client_id: int, global_state: AdapterState, store: Any) -> AdapterState | None:
        personal, _ = self._stored(client_id, store)
        return {**global_state, **personal} if personal is not None else None

    def evaluation_state(self, global_state: AdapterState, store: Any) -> AdapterState:
        """The shared part with the example-weighted mean of the clients' personal parts."""
        return mean_of_personal_parts(global_state, store, self.options.get("num_clients"), self._stored)

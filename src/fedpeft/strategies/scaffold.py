"""SCAFFOLD (Karimireddy et al. 2020) over the adapter parameters.

- Each local step uses the corrected gradient g + c - c_k (``ClientPlan.grad_transform``). With
  ``training.max_grad_norm`` the local trainer clips the raw gradient g first and adds the correction
  after, so the step is clip(g) + c - c_k and option II's control below comes out as the mean of the
  clipped gradients the client followed (clipping after the correction would mix c - c_k into the
  control: c_k+ = c_k - c + mean(clip(g + c - c_k)), which is no gradient estimate).
- After K local steps the client's control becomes (option ``control_update``):
  ``option2`` (default, the paper's option II): c_k+ = c_k - c + (theta_global - theta_k) / (K * eta_l);
  ``mean_gradient``: c_k+ = the mean uncorrected gradient g (clipped, when clipping is on) over the K
  local steps (option I's gradient, evaluated along the local trajectory instead of an extra pass at
  theta_global).
  The client keeps c_k+ in its client store (``scaffold_control``) only once its update is accepted
  (``ClientUpdate.private``, written by ``commit_private``: a dropped client keeps its old c_k, so
  c = mean_k c_k still holds), and uploads theta_k together with the control delta c_k+ - c_k
  (``ClientUpdate.control``): the uplink doubles (bytes: 2 x the adapter up, adapter + c down).
- The server averages the models (p_k weights; server optimizers compose) and sets
  c <- c + (1/N) * sum_{k in S} (c_k+ - c_k), N = all registered clients (``options['num_clients']``).
- The server control c travels down with every plan (``ClientPlan.control``, metered) and is saved in
  the strategy state for resume.

With AdamW local steps the correction is added to the gradient before Adam's moments see it, so it is
rescaled per coordinate by 1 / sqrt(v) like the gradient itself: the step is Adam's direction for
g + c - c_k, not g's Adam step plus c - c_k (the paper analyses SGD only). ``mean_gradient`` controls
stay in gradient units either way.

Option II divides the model change by K * eta_l, which estimates a gradient only for plain SGD steps.
With Adam(W) the change per coordinate is about eta_l whatever the gradient, so option II's controls
come out orders of magnitude larger than the gradients they correct, every corrected step follows
sign(c - c_k), and the model collapses (measured on SmolLM2: server control norm 115 -> 414 in three
rounds, both clients' models identical, accuracy 0). Hence: with ``options['local_optimizer']`` (the
engine fills it from training.optimizer) other than ``sgd``, ``option2`` is refused with the fix
(training.optimizer=sgd, or control_update=mean_gradient, whose controls are in gradient units).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from pydantic import Field

from fedpeft.adapters import AdapterState
from fedpeft.strategies.base import ALL_PEFT_TYPES, AggregateResult, ClientPlan, ClientUpdate, TrainResult, example_weights
from fedpeft.strategies.common import MethodStrategy, aggregation_gap
from fedpeft.strategies.lora_math import require_option, validate_finite
from fedpeft.strategies.registry import MethodOptions, register_method

CONTROL_NAME = "scaffold_control"


CONTROL_UPDATES = ("option2", "mean_gradient")


def corrected_gradient(correction: Mapping[str, torch.Tensor], record: bool = False):
    """grad_transform adding (c - c_k) to each gradient in place. With ``record``, it also keeps the sum
    of the raw (uncorrected) gradients in ``transform.grad_sum`` and the step count in ``transform.calls``."""
    cache: dict[str, torch.Tensor] = {}

    def transform(params: Mapping[str, torch.nn.Parameter]) -> None:
        transform.calls += 1
        for key, p in params.items():
            if p.grad is None or key not in correction:
                continue
            if record:
                raw = p.grad.detach().to("cpu", torch.float32)
                transform.grad_sum[key] = transform.grad_sum[key] + raw if key in transform.grad_sum else raw.clone()
            corr = cache.get(key)
            if corr is None or corr.device != p.grad.device:
                corr = cache[key] = correction[key].to(device=p.grad.device, dtype=p.grad.dtype)
            p.grad.add_(corr)

    transform.calls = 0
    transform.grad_sum = {}
    return transform


class ScaffoldOptions(MethodOptions):
    control_update: Literal["option2", "mean_gradient"] = Field(
        "option2", description="option2: c_k+ = c_k - c + (theta_global - theta_k)/(K lr) (needs training.optimizer=sgd); "
        "mean_gradient: c_k+ = the mean raw gradient over the K local steps (any optimizer).")


@register_method
class Scaffold(MethodStrategy):
    name = "scaffold"
    peft_types = ALL_PEFT_TYPES  # control variates per adapter tensor, whatever the type
    Options = ScaffoldOptions
    summary = "control variates correct client drift (option II, or mean gradient for Adam); uplink doubles"
    dp_refusal = ("SCAFFOLD uploads control variates (a mean of the client's raw gradients) beside the adapter; "
                  "client-level DP bounds one clipped vector per client, not these unclipped extras")

    def __init__(self, options=None, server_optimizer=None) -> None:
        super().__init__(options, server_optimizer)
        self.num_clients = int(require_option(self.options, "num_clients", self.name))
        if self.num_clients < 1:
            raise ValueError(f"scaffold: options['num_clients'] must be >= 1, got {self.num_clients}")
        self.control_update = self.opts.control_update
        local_optimizer = self.options.get("local_optimizer")
        if self.control_update == "option2" and local_optimizer not in (None, "sgd"):
            raise ValueError(
                f"scaffold's option II control update, (theta_global - theta_k) / (K * lr), estimates a gradient only "
                f"for SGD local steps, not training.optimizer={local_optimizer} (its controls would swamp the "
                f"gradients): set training.optimizer=sgd, or method.options.control_update=mean_gradient"
            )
        self.control: AdapterState = {}

    def init_global(self, initial: AdapterState) -> AdapterState:
        if not self.control:
            self.control = {k: torch.zeros_like(v, dtype=torch.float32) for k, v in initial.items()}
        return super().init_global(initial)

    def _client_control(self, client_id: int, store: Any, like: AdapterState | None = None) -> AdapterState:
        stored = store.get(client_id, CONTROL_NAME) if store is not None else None
        shapes = like if like is not None else self.control
        return dict(stored) if stored is not None else {k: torch.zeros_like(v) for k, v in shapes.items()}

    def configure_client(self, round_idx: int, client_id: int, global_state: AdapterState, store: Any) -> ClientPlan:
        if not self.control:
            self.init_global(global_state)
        return ClientPlan(
            client_id=client_id,
            downlink=global_state,
            control={k: v.clone() for k, v in self.control.items()},
            info={"control_update": self.control_update},
        )

    def attach_client_hooks(self, round_idx: int, plan: ClientPlan, store: Any) -> None:
        # c_k is client-private (its own store); the server's c arrived with the plan.
        c_k = self._client_control(plan.client_id, store, like=plan.control)
        record = plan.info.get("control_update", self.control_update) == "mean_gradient"
        plan.grad_transform = corrected_gradient({k: plan.control[k] - c_k[k] for k in plan.control}, record=record)

    def client_update(self, round_idx: int, plan: ClientPlan, trained: AdapterState, result: TrainResult, store: Any) -> ClientUpdate:
        if result.steps <= 0 or result.lr <= 0:
            raise ValueError(f"scaffold needs K >= 1 local steps and lr > 0 (got K={result.steps}, lr={result.lr})")
        start = plan.init_state if plan.init_state is not None else plan.downlink
        keys = plan.trainable if plan.trainable is not None else list(trained)
        c = plan.control
        c_k = self._client_control(plan.client_id, store, like=c)
        scale = 1.0 / (result.steps * result.lr)
        c_new = dict(c_k)
        delta: AdapterState = {}
        if plan.info.get("control_update", self.control_update) == "mean_gradient":
            recorded = getattr(plan.grad_transform, "grad_sum", None)
            calls = getattr(plan.grad_transform, "calls", 0)
            if recorded is None or calls == 0:
                raise ValueError("scaffold mean_gradient: no gradients were recorded (grad_transform never ran)")
            for key in keys:
                c_new[key] = recorded[key] / calls if key in recorded else torch.zeros_like(c_k[key])
                delta[key] = c_new[key] - c_k[key]
        else:
            for key in keys:
                c_new[key] = c_k[key] - c[key] + (start[key].float() - trained[key].float()) * scale
                delta[key] = c_new[key] - c_k[key]
        return ClientUpdate(
            client_id=plan.client_id,
            tensors={k: trained[k] for k in keys},
            num_examples=result.num_examples,
            job=plan.job,
            control=delta,
            metrics={"loss": result.mean_loss},
            private={CONTROL_NAME: c_new},  # c_k+ is kept by the client once the update is accepted
        )

    def aggregate(self, round_idx: int, global_state: AdapterState, updates: Sequence[ClientUpdate]) -> AggregateResult:
        weights = example_weights(updates)
        averaged = self.average_updates(global_state, updates, weights)
        if not self.control:
            self.init_global(global_state)
        new_control = {k: v.clone() for k, v in self.control.items()}
        for update in updates:
            validate_finite(update.control, update.client_id)
            for key, value in update.control.items():
                if key not in new_control:
                    raise ValueError(f"scaffold: client {update.client_id} sent a control delta for unknown tensor '{key}'")
                new_control[key].add_(value.float(), alpha=1.0 / self.num_clients)
        self.control = new_control
        metrics = aggregation_gap(updates, weights, averaged)
        metrics["server_control_norm"] = float(sum(v.pow(2).sum() for v in new_control.values()) ** 0.5)
        return AggregateResult(global_state=self.apply_average(global_state, averaged), metrics=metrics)

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["control"] = {k: v.clone() for k, v in self.control.items()}
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.control = {k: torch.as_tensor(v).float().clone() for k, v in state.get("control", {}).items()}

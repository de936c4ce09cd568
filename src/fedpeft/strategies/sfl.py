"""Split federated learning (SFL, SplitLLM's layout; seed 004): the model is cut in three at ``cut: "a-b"``.

bottom = embeddings + blocks [0, a) and top = blocks [b, L) + final norm + head stay with the client;
the trunk = blocks [a, b) runs on the server. In this simulation (as in SplitLLM) every part lives in the
one shared model of the process and the client's local job trains through the cuts of ``split.SplitModel``:
each micro-batch sends the activations up at cut 1 and down at cut 2 and the gradients back, and every
one of those tensors is metered (bytes = batch * seq * hidden * dtype size). With no defence a split
step is exactly the unsplit step (``tests/test_split_parts.py``).

Adapters: LoRA trains in the parts named by ``lora_parts`` (the others stay at their initial value). The
trunk's adapter is the server's: ``trunk: shared`` starts every job from the global trunk; ``trunk:
per_client`` keeps each client's trained trunk in the client store (``sfl_trunk``) and continues it in that
client's next job. Either way, at the round's end the trained trunks are averaged with the ``base`` rule
(FedIT's sample-weighted mean by default; a server optimizer steps on it) into the global trunk. The
client parts are averaged the same way when ``aggregate_client_parts`` (default), else each client keeps
its own in its store (``sfl_client_parts``; the global model is then evaluated with their weighted mean).

Wire accounting: the engine's uplink/downlink bytes count the adapter tensors a job receives and returns,
trunk included (in the simulation the trunk adapter moves between the server and the job). The split's
own wire bytes (what crosses a real network: cut crossings plus the client parts' adapters when
aggregated) are reported in the ``aggregate`` event (docs/metrics.md).

Defences at cut 1 (see ``split/defences.py``): ``activation_noise`` (sigma of Gaussian noise on the
activations sent up), ``dchi_epsilon`` (d_chi-privacy on the input embeddings), ``nopeek_alpha`` (NoPeek's
distance-correlation loss). The simulation runs in one process: ``sfl`` is not for a Flower deployment.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, field_validator, model_validator
from safetensors.torch import save_file

from fedpeft.adapters import AdapterState, state_bytes
from fedpeft.seeding import derive_seed
from fedpeft.split.crossings import CROSSINGS, Defences, SplitModel
from fedpeft.split.layout import Layout, find_layout
from fedpeft.split.report import split_report_section
from fedpeft.split.spec import CUT_SETTING, CutSpec, check_cut, parse_cut, split_keys
from fedpeft.strategies.base import AggregateResult, ClientPlan, ClientUpdate, ServerContext, Strategy, TrainResult
from fedpeft.strategies.common import MethodStrategy
from fedpeft.strategies.registry import MethodOptions, capabilities, method_class, register_method

TRUNK_NAME = "sfl_trunk"
CLIENT_PARTS_NAME = "sfl_client_parts"
NUM_EXAMPLES_KEY = "__num_examples__"
Part = Literal["bottom", "trunk", "top"]


class SFLOptions(MethodOptions):
    cut: str = Field(..., description="'a-b': bottom = embeddings + blocks [0,a), trunk = blocks [a,b), "
                                      "top = blocks [b,L) + final norm + head (0 <= a < b <= L).")
    lora_parts: list[Part] = Field(default_factory=lambda: ["bottom", "trunk", "top"],
                                   description="Parts whose LoRA adapters train (the others stay at their init).")
    trunk: Literal["shared", "per_client"] = Field(
        "shared", description="shared: every job starts from the global trunk; per_client: the server keeps each "
                              "client's trunk in the client store and continues it.")
    aggregate_client_parts: bool = Field(
        True, description="Average the bottom and top adapters too (else each client keeps its own).")
    base: str = Field("fedit", description="Registered averaging rule the trunk (and client parts) go through.")
    activation_noise: float = Field(0.0, ge=0, description="Std of Gaussian noise on the activations sent up at cut 1.")
    dchi_epsilon: float | None = Field(None, gt=0, description="d_chi-privacy epsilon on the input embeddings (None: off).")
    nopeek_alpha: float = Field(0.0, ge=0, description="Weight of NoPeek's distance-correlation loss at cut 1.")
    save_crossings: int = Field(0, ge=0, description="Micro-batches per client job whose crossings (and true inputs) "
                                                     "are saved under <run>/split_crossings/ for attacks (0: none).")

    @field_validator("cut", mode="before")
    @classmethod
    def _cut(cls, value: Any) -> str:
        try:
            return str(parse_cut(value))
        except ValueError as exc:
            raise ValueError(str(exc).removeprefix(f"{CUT_SETTING}: ")) from None

    @field_validator("lora_parts")
    @classmethod
    def _parts(cls, value: list[str]) -> list[str]:
        if not value or len(set(value)) != len(value):
            raise ValueError("expected a non-empty list of distinct parts among bottom, trunk, top")
        return value

    @field_validator("base")
    @classmethod
    def _base(cls, value: str) -> str:
        base = method_class(value)  # an unknown name lists the registered ones
        caps = capabilities(base)
        if base.name == "sfl" or not caps.secure_mean or caps.personalized or caps.edits_base_weights:
            raise ValueError(f"'{value}' is not an averaging rule sfl can apply to the trunk; expected a registered "
                             "method whose server step is a weighted mean of the uploads (e.g. fedit)")
        return base.name

    @model_validator(mode="after")
    def _something_to_average(self) -> SFLOptions:
        if "trunk" not in self.lora_parts and not self.aggregate_client_parts:
            raise ValueError("lora_parts without 'trunk' and aggregate_client_parts=false leave nothing to upload or "
                             "average; train the trunk or average the client parts")
        return self

    def defences(self) -> Defences:
        return Defences(activation_sigma=self.activation_noise, dchi_epsilon=self.dchi_epsilon,
                        nopeek_alpha=self.nopeek_alpha)


def _without_count(state: AdapterState) -> tuple[AdapterState, int]:
    state = dict(state)
    n = int(state.pop(NUM_EXAMPLES_KEY, torch.zeros(())).item())
    return state, n


CROSSINGS_DIR = "split_crossings"


def save_crossings(run_dir: Path, round_idx: int, plan: ClientPlan, split: SplitModel, limit: int) -> Path:
    """The first ``limit`` micro-batches' crossings of a client job and its true inputs, as safetensors:
    ``<i>/act_up``, ``<i>/act_down``, ``<i>/grad_up``, ``<i>/grad_down`` (those that crossed) and
    ``<i>/input_ids``, ``<i>/attention_mask``, ``<i>/labels`` (the ground truth, never sent); metadata: the
    cut and the defences. Rewritten when a resumed run repeats the round."""
    tensors: dict[str, torch.Tensor] = {}
    for i, batch in enumerate(split.batches[:limit]):
        tensors.update({f"{i}/{k}": v.cpu().contiguous() for k, v in batch.items()})
    forward = -1
    for crossing in split.records:
        forward += crossing.name == "act_up"
        if 0 <= forward < limit and crossing.tensor is not None:
            tensors[f"{forward}/{crossing.name}"] = crossing.tensor.cpu().contiguous()
    d = split.defences
    meta = {"cut": str(split.cut), "round": str(round_idx), "client": str(plan.client_id), "job": plan.job,
            "activation_sigma": str(d.activation_sigma), "dchi_epsilon": str(d.dchi_epsilon),
            "nopeek_alpha": str(d.nopeek_alpha)}
    path = Path(run_dir) / CROSSINGS_DIR / f"round_{round_idx:04d}" / f"client_{plan.client_id}_{plan.job}.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=meta)
    split.records, split.batches = [], []
    return path


def _step_bytes(metrics: dict[str, float]) -> list[int]:
    """The per-step crossing bytes of a client's metrics (``split/step_bytes/<step>``), in step order."""
    prefix = "split/step_bytes/"
    steps = sorted((int(k[len(prefix):]), v) for k, v in metrics.items() if k.startswith(prefix))
    return [int(v) for _, v in steps]


@register_method
class SplitFederated(MethodStrategy):
    name = "sfl"
    image_refusal = "split learning cuts the token pipeline (input embeddings, decoder blocks) of a text model"
    seq2seq_refusal = ("split learning cuts one stack of blocks (split/layout.py: a decoder or an encoder); an "
                       "encoder-decoder has two, joined by cross-attention, and no cut is defined for it")
    summary = "split federated learning: bottom/top on the client, trunk on the server, cut crossings metered"
    Options = SFLOptions
    secure_mean = False  # the trunk is the server's: nothing for SecAgg+ to hide it from
    flower_refusal = ("the trunk runs on the server, but a Flower node would train the whole split model "
                      "itself (trunk weights and adapter included); the server-side trunk with the cut "
                      "crossings over the network is not built")
    dp_refusal = ("split learning sends activations and gradients across the cut at every local step; client-level "
                  "DP bounds one clipped upload per round, not those")
    report_section = staticmethod(split_report_section)

    def __init__(self, options=None, server_optimizer=None) -> None:
        super().__init__(options, server_optimizer)
        self.cut: CutSpec = parse_cut(self.opts.cut)
        common = {k: self.options[k] for k in MethodOptions.model_fields}
        self.base: Strategy = method_class(self.opts.base)(options=common, server_optimizer=server_optimizer)
        self.split: SplitModel | None = None
        self.layout: Layout | None = None
        self.run_dir: Path | None = None

    # --- set-up -------------------------------------------------------------------------------------
    def prepare_model(self, model: torch.nn.Module) -> None:
        """Install the cuts in the shared model (checked against its blocks: a clear error names
        ``method.options.cut``)."""
        self.layout = find_layout(model)
        check_cut(self.cut, self.layout.num_blocks)
        self.split = SplitModel(model, self.cut, self.opts.defences(), layout=self.layout)

    def begin_round(self, round_idx: int, server: ServerContext) -> None:
        self.run_dir = server.run_dir  # where save_crossings writes

    def parts(self, keys) -> dict[str, list[str]]:
        if self.layout is None:
            raise RuntimeError("sfl: prepare_model(model) must run before the parts are known")
        return split_keys(keys, self.layout.blocks_prefix, self.cut)

    def _client_keys(self, parts: dict[str, list[str]]) -> list[str]:
        return parts["bottom"] + parts["top"]

    def _trainable(self, parts: dict[str, list[str]]) -> list[str]:
        return [k for p in ("bottom", "trunk", "top") if p in self.opts.lora_parts for k in parts[p]]

    # --- per round -------------------------------------------------------------------------------------
    def configure_client(self, round_idx: int, client_id: int, global_state: AdapterState, store: Any) -> ClientPlan:
        parts = self.parts(global_state)
        trunk = {k: global_state[k] for k in parts["trunk"]}
        if self.opts.trunk == "per_client" and store is not None:
            kept = store.get(client_id, TRUNK_NAME)  # the server's copy of this client's trunk
            if kept is not None:
                trunk.update(_without_count(kept)[0])
        downlink = dict(trunk)
        if self.opts.aggregate_client_parts:
            downlink.update({k: global_state[k] for k in self._client_keys(parts)})
        trainable = self._trainable(parts)
        shared = set(parts["trunk"]) | (set(self._client_keys(parts)) if self.opts.aggregate_client_parts else set())
        return ClientPlan(client_id=client_id, downlink=downlink, trainable=trainable,
                          upload=[k for k in trainable if k in shared], info={"cut": str(self.cut)})

    def attach_client_hooks(self, round_idx: int, plan: ClientPlan, store: Any) -> None:
        if self.split is not None:  # defence noise seeded per job; this job's crossings metered from zero
            self.split.reseed(derive_seed(self.options.get("seed"), "sfl-defences", round_idx, plan.client_id, plan.job))
            self.split.reset_meter()
            if self.opts.save_crossings:
                self.split.start_recording(keep_tensors=True)
        if not self.opts.aggregate_client_parts and store is not None:
            kept = store.get(plan.client_id, CLIENT_PARTS_NAME)  # the client's own bottom and top
            if kept is not None:
                plan.init_state = {**plan.downlink, **_without_count(kept)[0]}

    def client_update(self, round_idx: int, plan: ClientPlan, trained: AdapterState, result: TrainResult,
                      store: Any) -> ClientUpdate:
        update = super().client_update(round_idx, plan, trained, result, store)
        parts = self.parts(trained)
        count = {NUM_EXAMPLES_KEY: torch.tensor(float(result.num_examples))}
        if self.opts.trunk == "per_client":
            update.private[TRUNK_NAME] = {**{k: trained[k].detach().float().clone() for k in parts["trunk"]}, **count}
        if not self.opts.aggregate_client_parts:
            update.private[CLIENT_PARTS_NAME] = {
                **{k: trained[k].detach().float().clone() for k in self._client_keys(parts)}, **count}
        if self.split is not None and self.opts.save_crossings:
            self.split.stop_recording()
            if self.run_dir is not None:
                save_crossings(self.run_dir, round_idx, plan, self.split, self.opts.save_crossings)
        if self.split is not None:
            meter = self.split.reset_meter()
            total = meter.total
            update.metrics.update({f"split/{name}_bytes": float(meter.bytes.get(name, 0)) for name in CROSSINGS})
            update.metrics["split/crossing_bytes"] = float(total)
            update.metrics["split/forwards"] = float(meter.forwards)
            update.metrics["split/bytes_per_step"] = total / max(result.steps, 1)
            for i, n in enumerate(meter.step_bytes(result.steps), 1):
                update.metrics[f"split/step_bytes/{i}"] = float(n)
            if meter.nopeek:
                update.metrics["split/nopeek_loss"] = float(torch.stack(meter.nopeek).mean())
        return update

    def aggregate(self, round_idx: int, global_state: AdapterState, updates: Sequence[ClientUpdate]) -> AggregateResult:
        result = self.base.aggregate(round_idx, global_state, updates)
        result.metrics.update(self.split_metrics(global_state, updates))
        return result

    def split_metrics(self, global_state: AdapterState, updates: Sequence[ClientUpdate]) -> dict[str, Any]:
        """Per client and for the round: bytes that crossed the cuts and the client parts' adapter bytes
        (down when aggregated, and up), i.e. what a real split deployment sends over the network."""
        parts = self.parts(global_state)
        client_keys = set(self._client_keys(parts))
        down = state_bytes({k: global_state[k] for k in client_keys}) if self.opts.aggregate_client_parts else 0
        per_client = {}
        for u in updates:
            crossing = int(u.metrics.get("split/crossing_bytes", 0))
            adapters = down + state_bytes({k: v for k, v in u.tensors.items() if k in client_keys})
            per_client[str(u.client_id)] = {
                **{name: int(u.metrics.get(f"split/{name}_bytes", 0)) for name in CROSSINGS},
                "crossing_bytes": crossing, "bytes_per_step": u.metrics.get("split/bytes_per_step", 0.0),
                "step_bytes": _step_bytes(u.metrics),
                "client_adapter_bytes": adapters, "wire_bytes": crossing + adapters,
                **({"nopeek_loss": u.metrics["split/nopeek_loss"]} if "split/nopeek_loss" in u.metrics else {}),
            }
        rows = per_client.values()
        return {
            "split_clients": per_client,
            "split_crossing_bytes": sum(r["crossing_bytes"] for r in rows),
            "split_client_adapter_bytes": sum(r["client_adapter_bytes"] for r in rows),
            "split_wire_bytes": sum(r["wire_bytes"] for r in rows),
        }

    # --- evaluation --------------------------------------------------------------------------------------
    def evaluation_state(self, global_state: AdapterState, store: Any) -> AdapterState:
        """The global trunk with, when the client parts are kept per client, their example-weighted mean."""
        num_clients = self.options.get("num_clients")
        if self.opts.aggregate_client_parts or store is None or num_clients is None:
            return global_state
        total, mean = 0.0, {}
        for client_id in range(int(num_clients)):
            kept = store.get(client_id, CLIENT_PARTS_NAME)
            if kept is None:
                continue
            state, n = _without_count(kept)
            total += max(n, 1)
            for key, value in state.items():
                mean[key] = mean.get(key, torch.zeros_like(value, dtype=torch.float32)) + max(n, 1) * value.float()
        if not total:
            return global_state
        return {**global_state, **{k: v / total for k, v in mean.items()}}

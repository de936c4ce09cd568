"""What a deployed run is told: Flower run config (same for the server and every client) and node config
(one per SuperNode). Plain Python, no Flower or torch import, so the CLI can use it cheaply.

Run config (``[tool.flwr.app.config]`` of the generated app, ``flwr run --run-config`` overrides it):

==================  ==========================================================================
``experiment``      the resolved experiment config as JSON (``fedpeft deploy`` fills it from
                    YAML + overrides, so no config file is needed on the other machines)
``run-dir``         where the ServerApp writes the run (a path on the SuperLink's machine;
                    empty: ``output.dir/<name>-<time>`` relative to the SuperLink's directory)
``resume``          continue ``run-dir`` from its last completed round
``min-clients``     fewest replies a round aggregates; fewer stops the run (last checkpoint kept)
``round-timeout``   seconds a round waits for replies at most
``straggler-timeout``  once ``min-clients`` replies are in, seconds to wait for the others (0: no limit
                    other than ``round-timeout``); a killed SuperNode is noticed this fast
``node-wait``       seconds to wait at the start for SuperNodes that serve every client
``secagg``          true: Flower's SecAgg+ protocol; the server learns only the weighted mean of
                    the round's updates, never one client's (methods whose aggregation is a
                    sample-weighted mean: fedit, fedprox, ffa_lora; see ``secagg.py``)
``secagg-shares``   SecAgg+ shares per client's secret, as a fraction of the round's clients (1.0)
``secagg-threshold``  shares needed to reconstruct a secret, as a fraction of the shares (0.5)
``secagg-clip``     updates (client minus global) are clipped to [-clip, clip] before quantisation (8.0)
``secagg-max-weight``  largest client weight (examples) the quantised weights must hold; 0: the
                    largest partition size among the round's clients (exact for partition-id
                    nodes; set it for nodes with their own data-path)
==================  ==========================================================================

Node config (``flower-supernode --node-config '...'``):

==================  ==========================================================================
``partition-id``    the client id this node trains (an index into the shared partition); or
``partition-ids``   several, as a string ``"0,2"`` (a rehearsal with fewer nodes than clients)
``num-partitions``  optional; checked against ``federation.num_clients``
``data-path``       a local data file: the node trains on all of it as client ``partition-id``
                    (real deployments; the file's format as for ``data.source``)
``model-path``      a local model directory or .gguf file (replaces ``model.name`` on this node)
``client-store``    directory for client-private state (default: a temp dir per node and run)
``warm-worker``     true (default): a long-lived worker process per (node, run) keeps the model loaded
                    across rounds (Flower starts a fresh ClientApp process per message); false: build
                    everything in each ClientApp process
``worker-idle``     seconds without work after which the warm worker exits (default 900)
==================  ==========================================================================
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

RUN_CONFIG_DEFAULTS: dict[str, Any] = {
    "experiment": "",
    "run-dir": "",
    "resume": False,
    "min-clients": 1,
    "round-timeout": 600.0,
    "straggler-timeout": 0.0,
    "node-wait": 120.0,
    "secagg": False,
    "secagg-shares": 1.0,
    "secagg-threshold": 0.5,
    "secagg-clip": 8.0,
    "secagg-max-weight": 0.0,
}


@dataclass
class DeploySettings:
    experiment: dict[str, Any]
    run_dir: str = ""
    resume: bool = False
    min_clients: int = 1
    round_timeout: float = 600.0
    straggler_timeout: float = 0.0
    node_wait: float = 120.0
    secagg: bool = False
    secagg_shares: float = 1.0
    secagg_threshold: float = 0.5
    secagg_clip: float = 8.0
    secagg_max_weight: float = 0.0

    @classmethod
    def from_run_config(cls, run_config: dict[str, Any]) -> DeploySettings:
        values = {**RUN_CONFIG_DEFAULTS, **dict(run_config)}
        text = str(values["experiment"]).strip()
        if not text:
            raise ValueError("Flower run config has no 'experiment': start the run with `fedpeft deploy run` "
                             "or generate the app with `fedpeft deploy app --config X.yaml`")
        return cls(
            experiment=json.loads(text), run_dir=str(values["run-dir"]), resume=bool(values["resume"]),
            min_clients=int(values["min-clients"]), round_timeout=float(values["round-timeout"]),
            straggler_timeout=float(values["straggler-timeout"]), node_wait=float(values["node-wait"]),
            secagg=_bool(values["secagg"]), secagg_shares=float(values["secagg-shares"]),
            secagg_threshold=float(values["secagg-threshold"]), secagg_clip=float(values["secagg-clip"]),
            secagg_max_weight=float(values["secagg-max-weight"]),
        )

    def config(self):
        from fedpeft.config import build_config

        return build_config(dict(self.experiment))


@dataclass
class NodeSettings:
    client_ids: list[int]
    num_partitions: int | None = None
    data_path: str | None = None
    model_path: str | None = None
    client_store: str | None = None
    warm_worker: bool = True
    worker_idle: float = 900.0
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_node_config(cls, node_config: dict[str, Any]) -> NodeSettings:
        cfg = dict(node_config)
        if "partition-ids" in cfg:
            raw = cfg.pop("partition-ids")
            ids = [int(x) for x in str(raw).replace(" ", "").split(",") if x != ""]
        elif "partition-id" in cfg:
            ids = [int(cfg.pop("partition-id"))]
        else:
            raise ValueError("node config needs 'partition-id' (or 'partition-ids=\"0,2\"'): start the SuperNode "
                             "with --node-config 'partition-id=0'")
        if not ids:
            raise ValueError("node config 'partition-ids' is empty")
        num = cfg.pop("num-partitions", None)
        warm = cfg.pop("warm-worker", True)
        if isinstance(warm, str):
            warm = warm.strip().lower() not in ("false", "0", "no", "off")
        settings = cls(ids, int(num) if num is not None else None, _opt(cfg.pop("data-path", None)),
                       _opt(cfg.pop("model-path", None)), _opt(cfg.pop("client-store", None)), bool(warm),
                       float(cfg.pop("worker-idle", 900.0)), cfg)
        if settings.data_path and len(ids) != 1:
            raise ValueError("node config 'data-path' serves exactly one client: give a single 'partition-id'")
        return settings

    def check(self, num_clients: int) -> None:
        if self.num_partitions is not None and self.num_partitions != num_clients:
            raise ValueError(f"node config num-partitions={self.num_partitions} but the experiment has "
                             f"federation.num_clients={num_clients}")
        bad = [c for c in self.client_ids if not 0 <= c < num_clients]
        if bad:
            raise ValueError(f"node config partition id(s) {bad} outside 0..{num_clients - 1} "
                             f"(federation.num_clients={num_clients})")


def _bool(value: Any) -> bool:
    if isinstance(value, str):  # --run-config "secagg='true'" arrives as a string
        if value.strip().lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise ValueError(f"run config: expected true or false, got {value!r}")
        return value.strip().lower() in ("true", "1", "yes")
    return bool(value)


def _opt(value: Any) -> str | None:
    return None if value in (None, "") else str(value)


def node_config_string(values: dict[str, Any]) -> str:
    """``{'partition-ids': '0,2'}`` -> ``partition-ids="0,2"`` for ``flower-supernode --node-config``."""
    parts = []
    for key, value in values.items():
        text = json.dumps(value) if isinstance(value, (str, bool)) else str(value)  # TOML: "x", true, 3
        parts.append(f"{key}={text}")
    return " ".join(parts)

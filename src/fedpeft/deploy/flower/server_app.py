"""The Flower ServerApp: the in-process engine's round loop with a ``FlowerTransport`` under it.

Sampling, ``strategy.configure_round``, aggregation, evaluation, ``metrics.jsonl``, checkpoints and the
final PEFT adapter are the engine's own code, so a deployed run writes the same run directory as a
simulated one (plus ``deploy_round`` events and ``deploy.json``). An exception here marks the Flower run
as failed (``flwr ls`` status ``finished:failed``).
"""

from __future__ import annotations

import functools
import json
import logging
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

log = logging.getLogger(__name__)

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    from fedpeft.deploy.flower.app import check_flower_method
    from fedpeft.deploy.flower.settings import DeploySettings
    from fedpeft.deploy.flower.transport import FlowerTransport
    from fedpeft.federation.engine import Engine, default_run_dir

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per HTTP call otherwise, log pushes included
    settings = DeploySettings.from_run_config(dict(context.run_config))
    cfg = settings.config()
    check_flower_method(cfg.method.name)  # also when the app was written by hand
    if settings.secagg:
        from fedpeft.deploy.flower.secagg import check_secure_method

        check_secure_method(cfg.method.name)
        if cfg.federation.uplink_compression != "none":
            raise ValueError("secagg: federation.uplink_compression must be 'none' (SecAgg+ quantises the update itself)")
    run_dir = Path(settings.run_dir) if settings.run_dir else default_run_dir(cfg)
    engine = Engine(cfg, run_dir, resume=settings.resume, transport=functools.partial(FlowerTransport, grid, settings))
    run_id = getattr(grid, "run", None)
    log.info("fedpeft deployed run -> %s", run_dir)
    summary = engine.run()
    info = {
        "flower_run_id": getattr(run_id, "run_id", None), "routes": {str(k): v for k, v in engine.transport.routes.items()},
        "min_clients": settings.min_clients, "round_timeout": settings.round_timeout,
        "straggler_timeout": settings.straggler_timeout, "seconds": summary.seconds,
        "final_metrics": summary.final_metrics,
    }
    (run_dir / "deploy.json").write_text(json.dumps(info, indent=1))
    log.info("fedpeft deployed run finished: %d rounds in %.1f s, final adapter %s", summary.rounds,
             summary.seconds, summary.final_adapter_dir)

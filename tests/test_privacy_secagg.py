"""Distributed DP under the SecAgg+ rehearsal (Flower's real ClientApp and mod behind a fake Grid): each
client adds its noise share before masking, so the unmasked mean the server gets already carries noise
of the central scale z C / m per coordinate; it equals the in-process distributed run within SecAgg's
quantisation bound, and its noise scale equals that of central DP (server-added)."""

from __future__ import annotations

import functools
import json
import math

import pytest

pytest.importorskip("flwr", reason="Flower is not installed (pip install 'fedpeft[flower]')")

from flower_fakes import FakeGrid, flower_env  # noqa: F401 (an autouse fixture)
from safetensors.torch import load_file
import torch

from fedpeft.config import load_config
from fedpeft.deploy.flower.app import run_config_values
from fedpeft.deploy.flower.local import rehearsal_node_configs
from fedpeft.deploy.flower.settings import DeploySettings
from fedpeft.deploy.flower.transport import FlowerTransport
from fedpeft.federation.engine import Engine, run_experiment

M, Z, CLIP = 3, 1.0, 1.0
ONE_ROUND = ["federation.rounds=1", "evaluation.before_training=false", "output.report=false",
             f"federation.num_clients={M}", f"federation.clients_per_round={M}", f"privacy.clip_norm={CLIP}"]


def _final(run_dir):
    return load_file(str(run_dir / "final" / "adapter_model.safetensors"))


def _flat_diff(a, b):
    return torch.cat([(a[k].double() - b[k].double()).flatten() for k in sorted(a)])


def test_distributed_dp_under_secagg_has_the_central_noise_scale(tmp_path):
    def cfg(mode, z):
        return load_config("configs/tiny.yaml", ONE_ROUND + [f"privacy.mode={mode}", f"privacy.noise_multiplier={z}"])

    secure_cfg = cfg("distributed", Z)
    run_config = run_config_values(secure_cfg, secagg=True, round_timeout=5.0)
    nodes = rehearsal_node_configs(M, M, tmp_path / "stores", warm_worker=False)
    engine = Engine(secure_cfg, tmp_path / "secure", transport=functools.partial(
        FlowerTransport, FakeGrid(run_config, nodes), DeploySettings.from_run_config(run_config)))
    secure = engine.run()
    in_process = run_experiment(cfg("distributed", Z), run_dir=tmp_path / "distributed")
    central = run_experiment(cfg("central", Z), run_dir=tmp_path / "central")
    quiet = run_experiment(cfg("distributed", 1e-9), run_dir=tmp_path / "quiet")  # the clipped mean, no noise

    [event] = [e for e in map(json.loads, (secure.run_dir / "metrics.jsonl").read_text().splitlines())
               if e["event"] == "deploy_round"]
    # The same client noise (derived seeds) whether the sum is masked or not: equal within the bound.
    assert float(_flat_diff(_final(secure.run_dir), _final(in_process.run_dir)).abs().max()) <= event["error_bound"]
    expected = Z * CLIP / M  # std per coordinate of the noise in the mean
    secure_noise = _flat_diff(_final(secure.run_dir), _final(quiet.run_dir))
    central_noise = _flat_diff(_final(central.run_dir), _final(quiet.run_dir))
    n = secure_noise.numel()
    tolerance = 6 / math.sqrt(2 * n)  # six standard errors of a sample std
    print(f"{n} coordinates: secagg+distributed std {float(secure_noise.std()):.4f}, central std "
          f"{float(central_noise.std()):.4f}, expected {expected:.4f} (tolerance {tolerance:.1%})")
    assert float(secure_noise.std()) == pytest.approx(expected, rel=tolerance)
    assert float(central_noise.std()) == pytest.approx(expected, rel=tolerance)

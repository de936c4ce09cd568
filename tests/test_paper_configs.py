"""Every full-scale config in configs/paper validates offline: the config model and the method's options,
no model or data load (they name 7B hub models and hub datasets)."""

from pathlib import Path

import pytest

from fedpeft.config import load_config
from fedpeft.strategies import build_experiment_strategy

PAPER = Path(__file__).resolve().parents[1] / "configs" / "paper"
FILES = sorted(PAPER.glob("*.yaml"))


def test_the_folder_holds_the_seed_scenarios():
    names = {f.stem for f in FILES}
    for task in ("commonsense", "alpaca_gpt4", "gsm8k"):
        for method in ("fedit", "ffa_lora", "flora", "fedls"):
            assert f"seed000_{task}_{method}" in names
    assert {"fltac_dolly_llama7b", "fltac_glue_bert", "fedgpl_gsm8k_llama2_7b", "flowertune_mistral7b_4bit"} <= names


@pytest.mark.parametrize("path", FILES, ids=[f.stem for f in FILES])
def test_paper_config_validates_offline(path, monkeypatch):
    import fedpeft.models.registry as registry

    monkeypatch.setattr(registry, "load_base_model", lambda *a, **k: pytest.fail("no model may load"))
    cfg = load_config(path)
    build_experiment_strategy(cfg)  # method options are checked too
    header = path.read_text().split("\nname:")[0]
    assert "Reproduces:" in header and "Model (hub" in header
    assert "Estimated per round on one H100" in header and "estimate" in header.lower()


def test_seed000_hyper_parameters_are_the_seeds():
    for path in PAPER.glob("seed000_*.yaml"):
        cfg = load_config(path)
        assert (cfg.peft.r, cfg.peft.alpha, cfg.federation.batch_size, cfg.federation.local_steps) == (32, 64, 8, 20)
        assert (cfg.federation.num_clients, cfg.federation.clients_per_round, cfg.federation.rounds) == (20, 2, 200)
        assert cfg.model.dtype == "bfloat16" and cfg.training.precision == "bf16"


def test_flowertune_recipe():
    cfg = load_config(PAPER / "flowertune_mistral7b_4bit.yaml")
    assert cfg.model.quantization == "4bit" and cfg.training.gradient_checkpointing
    assert (cfg.peft.r, cfg.peft.alpha, cfg.training.max_seq_len, cfg.federation.batch_size) == (32, 64, 512, 16)
    assert (cfg.federation.local_steps, cfg.federation.rounds) == (10, 200)

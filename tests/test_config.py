import pytest

from fedpeft.config import ConfigError, load_config, parse_override


def test_defaults_and_yaml(tiny_config_path):
    cfg = load_config(tiny_config_path)
    assert cfg.model.name == "tiny-llama"
    assert cfg.federation.num_clients == 4
    assert cfg.training.max_seq_len == 64


def test_overrides_are_typed(tiny_config_path):
    cfg = load_config(tiny_config_path, ["federation.rounds=7", "training.lr=3e-4", "training.lr_min=1e-5",
                                         "peft.target_modules=[q_proj]",
                                         "evaluation.max_examples=null"])
    assert cfg.federation.rounds == 7
    assert cfg.training.lr == pytest.approx(3e-4)
    assert cfg.peft.target_modules == ["q_proj"]
    assert cfg.evaluation.max_examples is None


def test_unknown_key_suggests_nearest(tiny_config_path):
    with pytest.raises(ConfigError) as err:
        load_config(tiny_config_path, ["federation.num_client=3"])
    assert "unknown key 'federation.num_client'" in str(err.value)
    assert "did you mean 'federation.num_clients'" in str(err.value)


def test_unknown_top_level_section(tiny_config_path):
    with pytest.raises(ConfigError, match="did you mean 'training'"):
        load_config(tiny_config_path, ["trainig.lr=1"])


def test_wrong_type_names_key_and_value(tiny_config_path):
    with pytest.raises(ConfigError) as err:
        load_config(tiny_config_path, ["federation.rounds=abc"])
    assert "federation.rounds" in str(err.value) and "'abc'" in str(err.value)


def test_cross_field_rule(tiny_config_path):
    with pytest.raises(ConfigError, match="clients_per_round=9 exceeds federation.num_clients=4"):
        load_config(tiny_config_path, ["federation.clients_per_round=9"])


def test_dirichlet_alpha_must_be_positive(tiny_config_path):
    with pytest.raises(ConfigError, match="alpha must be > 0"):
        load_config(tiny_config_path, ["data.partition.alpha=0"])


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="key.sub=value"):
        parse_override("federation.rounds")


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_resolved_config_round_trips(tiny_config_path, tmp_path):
    cfg = load_config(tiny_config_path, ["seed=5"])
    path = tmp_path / "c.yaml"
    path.write_text(cfg.to_yaml())
    assert load_config(path) == cfg


def test_switching_method_drops_the_files_method_options():
    from fedpeft.config import load_config

    base = load_config("configs/fltac_generated.yaml")
    assert base.method.options  # fltac's options in the file
    switched = load_config("configs/fltac_generated.yaml", ["method.name=fedit"])
    assert switched.method.name == "fedit" and switched.method.options == {}
    explicit = load_config("configs/fltac_generated.yaml", ["method.name=fedls", "method.options.rho=0.5"])
    assert explicit.method.options == {"rho": 0.5}  # the new method's options only
    same = load_config("configs/fltac_generated.yaml", ["method.name=fltac"])
    assert same.method.options == base.method.options

import pytest

from dist_seg.config import ConfigError, RunConfig, from_yaml, merge, save_config, to_yaml


def test_yaml_round_trip(tmp_path):
    cfg = merge(RunConfig(), overrides=["train.num_steps=123", "stego.dim=42", "data.root=/x/y", "method=ds2dl"])
    text = to_yaml(cfg)
    back = from_yaml(RunConfig, text)
    assert back == cfg, "YAML -> dataclass -> YAML must reproduce the config"
    path = save_config(cfg, tmp_path / "run" / "config.yaml")
    assert from_yaml(RunConfig, path.read_text()) == cfg


def test_yaml_file_then_overrides(tmp_path):
    f = tmp_path / "o.yaml"
    f.write_text("train:\n  num_steps: 7\n  seed: 3\nstego:\n  zero_clamp: false\n")
    cfg = merge(RunConfig(), yaml_files=[f], overrides=["train.seed=9"])
    assert (cfg.train.num_steps, cfg.train.seed, cfg.stego.zero_clamp) == (7, 9, False)
    assert isinstance(cfg, RunConfig) and cfg.data.res == 224, "untouched keys keep recipe values"


def test_unknown_key_is_named():
    with pytest.raises(ConfigError, match=r"train\.nmu_steps"):
        merge(RunConfig(), overrides=["train.nmu_steps=5"])


def test_unknown_key_in_yaml_is_named(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("stego:\n  dimm: 3\n")
    with pytest.raises(ConfigError, match=r"stego\.dimm"):
        merge(RunConfig(), yaml_files=[f])


def test_bad_type_is_named():
    with pytest.raises(ConfigError, match=r"train\.num_steps"):
        merge(RunConfig(), overrides=["train.num_steps=many"])


def test_bad_choice_and_value():
    with pytest.raises(ConfigError, match="train.mode"):
        merge(RunConfig(), overrides=["train.mode=sometimes"])
    with pytest.raises(ConfigError, match="data.batch_size"):
        merge(RunConfig(), overrides=["data.batch_size=0"])
    with pytest.raises(ConfigError, match="key.sub=value"):
        merge(RunConfig(), overrides=["train.num_steps"])


def test_configs_are_keyword_only():
    with pytest.raises(TypeError):
        RunConfig("stego")  # type: ignore[misc]


def test_string_overrides_keep_yaml_1_1_booleans_as_text():
    # `no`, `yes`, `off` are booleans in YAML 1.1: a string field must still get the text the user typed
    cfg = merge(RunConfig(), overrides=["train.mixed_precision=no", "tracking.run_name=off", "backbone.weights=null",
                                        "train.num_steps=7"])
    assert cfg.train.mixed_precision == "no"
    assert cfg.tracking.run_name == "off"
    assert cfg.backbone.weights is None
    assert cfg.train.num_steps == 7
    with pytest.raises(ConfigError, match="train.resume"):
        merge(RunConfig(), overrides=["train.resume=maybe"])

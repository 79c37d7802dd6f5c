"""Typed config: YAML loading, overrides and the errors a user sees."""
import pytest

from gafh_fast.config import Config, ConfigError, config_from_dict, load_config, save_config


def test_paper_config_is_the_spec():
    cfg = load_config("configs/gafh_ridn_paper.yaml")
    g = cfg.model.generator
    assert (g.nf, g.gc, g.num_dnb, g.ridb_per_dnb, g.idb_per_ridb) == (64, 32, 4, 3, 4)
    assert g.res_scale == 0.2 and g.trunk_norm == "batchnorm" and g.upsample == "nearest_conv"
    assert cfg.train.lr_g == 1e-4 and cfg.train.betas == (0.9, 0.999)
    assert cfg.train.content.layer == "relu4_3" and cfg.train.gan.weight == 1e-3
    assert cfg.data.hr_size == 256 and cfg.lr_size == 32


def test_unknown_key_names_key_and_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  generator:\n    nff: 32\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: unknown key 'model\.generator\.nff'"):
        load_config(path)


def test_mistyped_value_names_key_and_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  max_steps: ten\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: 'train\.max_steps' must be int, got 'ten'"):
        load_config(path)


def test_literal_choices_are_checked(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("kernels: cuda\n")
    with pytest.raises(ConfigError, match=r"'kernels' must be one of 'auto' \| 'triton' \| 'torch'"):
        load_config(path)


def test_section_given_a_scalar(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("data: 3\n")
    with pytest.raises(ConfigError, match="'data' is a section"):
        load_config(path)


def test_overrides_are_type_checked():
    cfg = load_config("configs/gafh_ridn_paper.yaml", ["train.max_steps=12", "data.root=/x", "kernels=torch",
                                                        "train.lr_g=1", "train.content.pretrained=false"])
    assert cfg.train.max_steps == 12 and cfg.data.root == "/x" and cfg.kernels == "torch"
    assert cfg.train.lr_g == 1.0 and isinstance(cfg.train.lr_g, float)
    assert cfg.train.content.pretrained is False
    with pytest.raises(ConfigError, match=r"override 'train\.max_steps=1\.5'.*must be int"):
        load_config(None, ["train.max_steps=1.5"])
    with pytest.raises(ConfigError, match=r"unknown key 'train\.maxsteps'"):
        load_config(None, ["train.maxsteps=3"])
    with pytest.raises(ConfigError, match="expected section.key=value"):
        load_config(None, ["train.max_steps"])


def test_bool_is_not_an_int():
    with pytest.raises(ConfigError):
        load_config(None, ["train.max_steps=true"])


def test_cross_field_checks():
    with pytest.raises(ConfigError, match="hr_size"):
        load_config(None, ["data.hr_size=100"])
    with pytest.raises(ConfigError, match="not a VGG-19 layer"):
        load_config(None, ["train.content.layer=relu9_9"])


def test_missing_file_is_clear(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_round_trip_through_yaml_and_dict(tmp_path):
    cfg = load_config("configs/gafh_ridn_paper.yaml", ["train.lr_milestones=[10, 20]"])
    save_config(cfg, tmp_path / "copy.yaml")
    assert load_config(tmp_path / "copy.yaml") == cfg
    assert config_from_dict(cfg.to_dict()) == cfg
    assert Config() == load_config(None)


@pytest.mark.parametrize("path", ["configs/gafh_ridn_paper.yaml", "configs/demo.yaml"])
def test_shipped_configs_load(path):
    import os
    if not os.path.exists(path):
        pytest.fail(f"{path} is missing")
    load_config(path)

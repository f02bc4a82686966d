import dataclasses

import pytest

from vip.config import (Config, ConfigError, DataConfig, config_from_file, load_config, save_config,
                        to_dict)


def test_defaults_and_preset_chain():
    cfg = load_config("tiny")
    assert cfg.data.num_frames == 6 and cfg.data.image_size == 64        # from tiny.yaml
    assert cfg.model.num_proxies == 4 and cfg.data.context_length == 70  # from default.yaml via _base_
    assert cfg.build.fps == ShardDefaults.fps                             # untouched dataclass default


class ShardDefaults:
    from vip.config import ShardBuildConfig
    fps = ShardBuildConfig().fps


def test_dotted_overrides_are_typed():
    cfg = load_config("tiny", ["data.batch_size=5", "data.train=false", "build.fps=4.5",
                               "build.ray_address=auto", "build.limit_shards=null", "model.pretrained=/x/y.pt"])
    assert cfg.data.batch_size == 5 and isinstance(cfg.data.batch_size, int)
    assert cfg.data.train is False
    assert cfg.build.fps == 4.5 and cfg.build.ray_address == "auto" and cfg.build.limit_shards is None
    assert cfg.model.pretrained == "/x/y.pt"


@pytest.mark.parametrize("bad", ["data.batch_size=abc", "data.nope=1", "nosection.x=1", "data.batch_size",
                                 "data.train=maybe", "data.batch_size=1.5"])
def test_bad_overrides_raise_config_error(bad):
    with pytest.raises(ConfigError):
        load_config("tiny", [bad])


def test_unknown_preset():
    with pytest.raises(ConfigError, match="no preset"):
        load_config("does-not-exist")


def test_frozen_and_save_roundtrip(tmp_path):
    cfg = load_config("tiny", ["data.seed=42"])
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.data.seed = 1  # library code can never mutate the config
    for name in ("cfg.yaml", "cfg.json"):
        save_config(cfg, tmp_path / name)
        back = config_from_file(tmp_path / name)
        assert back == cfg
    assert to_dict(cfg)["data"]["seed"] == 42


def test_yaml_preset_file(tmp_path):
    p = tmp_path / "mine.yaml"
    p.write_text("_base_: tiny\ndata:\n  batch_size: 2\n")
    cfg = load_config(str(p), ["data.num_workers=0"])
    assert cfg.data.batch_size == 2 and cfg.data.num_workers == 0 and cfg.data.image_size == 64
    assert isinstance(cfg, Config) and isinstance(cfg.data, DataConfig)

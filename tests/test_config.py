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


# --------------------------------------------------------------------------- choices and cross-field checks
@pytest.mark.parametrize("override,allowed", [
    ("loss.variant=x", ["'vs'", "'a'", "'b'", "'c'", "'d'"]),
    ("data.resize=fill", ["'squash'", "'crop'"]),
    ("model.video_encoder=foo", ["'vip'", "'meanpool'", "'seqtransf'", "'full'"]),
    ("train.precision=fp8", ["'auto'", "'bf16'", "'fp16'", "'fp32'"]),
    ("caption.decoding=nucleus", ["'auto'", "'beam'", "'greedy'", "'top_k'", "'top_p'"]),
    ("train.zero_stage=5", ["0", "1", "2", "3"]),
    ("build.aspect=wide", ["'square'", "'keep'"]),
])
def test_bad_choice_is_refused_at_load_naming_the_allowed_values(override, allowed):
    """A value outside a field's fixed choices stops load_config (not the command minutes later),
    and the message names the field, the bad value and every allowed one."""
    with pytest.raises(ConfigError) as e:
        load_config("tiny", [override])
    msg = str(e.value)
    field, bad = override.split("=")
    assert field in msg and bad in msg, msg
    for choice in allowed:
        assert choice in msg, (choice, msg)


def test_good_choices_keep_their_type():
    cfg = load_config("tiny", ["train.zero_stage=2", "loss.variant=c", "caption.decoding=top_p",
                               "data.resize=squash", "train.precision=bf16"])
    assert cfg.train.zero_stage == 2 and isinstance(cfg.train.zero_stage, int)
    assert (cfg.loss.variant, cfg.caption.decoding, cfg.train.precision) == ("c", "top_p", "bf16")


def _square_crop(*more):
    """The tiny preset (data.shards = build.out, build.aspect=square) read with data.resize=crop."""
    import dataclasses as dc
    cfg = load_config("tiny", list(more))
    return dc.replace(cfg, data=dc.replace(cfg.data, resize="crop"))


def test_cross_field_crop_of_square_shards_is_refused():
    from vip.checks import validate_config
    cfg = _square_crop()
    assert cfg.data.shards == cfg.build.out and cfg.build.aspect == "square"
    with pytest.raises(ConfigError) as e:
        validate_config(cfg)
    msg = str(e.value)
    for words in ("data.resize=crop", "build.aspect=square", cfg.build.out, "data.resize=squash", "build.aspect=keep"):
        assert words in msg, (words, msg)
    # the same folder spelled differently is still the same folder
    import dataclasses as dc
    with pytest.raises(ConfigError):
        validate_config(dc.replace(cfg, data=dc.replace(cfg.data, shards=f"./{cfg.build.out}/")))


@pytest.mark.parametrize("more", [["build.aspect=keep"], ["data.shards=/elsewhere/shards"]])
def test_cross_field_crop_is_fine_otherwise(more):
    """keep-aspect shards crop fine; other shards than the ones this config builds are checked
    by the reader when it opens them (their build_config.yaml), not here."""
    from vip.checks import validate_config
    validate_config(_square_crop(*more))
    validate_config(load_config("tiny"))                 # squash + square: the default
    validate_config(load_config("finetune"))             # the finetune section has no cross-field check


def test_load_config_runs_the_cross_field_checks():
    """load_config refuses the contradiction itself (vip.config calls vip.checks.validate_config)."""
    with pytest.raises(ConfigError, match="build.aspect=square"):
        load_config("tiny", ["data.resize=crop"])
    assert load_config("tiny", ["data.resize=crop", "build.aspect=keep"]).data.resize == "crop"


def test_finetune_reuses_the_shared_sections_and_faults_live_in_debug():
    """One place per setting: fine-tuning takes lr, batch sizes, precision, seed and output from
    optim / train / data (the finetune preset sets the reference values); fault injection is
    only in `debug`."""
    import dataclasses

    from vip.config import DebugConfig, FinetuneConfig, OptimConfig, TrainConfig
    ft = {f.name for f in dataclasses.fields(FinetuneConfig)}
    shared = {f.name for f in dataclasses.fields(OptimConfig)} | {f.name for f in dataclasses.fields(TrainConfig)}
    assert not ft & shared, ft & shared
    cfg = load_config("finetune", ["optim.lr=1e-3"])
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.train.global_batch, cfg.data.batch_size) == (1e-3, 0.2, 128, 16)
    for moved in ("train.fault_step=2", "caption.fault_exit_chunk=1", "finetune.lr=1e-3"):
        with pytest.raises(ConfigError, match="unknown field"):
            load_config("tiny", [moved])
    d = load_config("tiny", ["debug.fault_step=2", "debug.fault_rank=1", "debug.caption_fault_exit_chunk=3"]).debug
    assert d == DebugConfig(fault_step=2, fault_rank=1, caption_fault_exit_chunk=3)
    assert load_config("tiny").debug == DebugConfig()          # all off by default

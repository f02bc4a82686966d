"""Cross-field checks of a whole config, run once when it is loaded (`vip.config.load_config`).

A single field is checked by its type as it is read (a `Literal` field names its allowed values);
what only a combination of fields can get wrong is checked here, so that a command refuses a
config that cannot work before it starts anything (builds, Ray clusters, DeepSpeed engines).

Checks that need the files a config points at (a shard set's stored aspect, its caption sidecars)
belong to the code that opens them: `shards.reader.check_resize`, `shards.captions.count_sidecars`.
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # vip.config imports this module: no import of it at module level
    from vip.config import Config

__all__ = ["validate_config", "same_path"]


def same_path(a: str, b: str) -> bool:
    """Whether two config paths name the same folder (relative to the current directory)."""
    def norm(p: str) -> str:
        return os.path.normcase(os.path.abspath(os.path.expanduser(p)))
    return norm(a) == norm(b)


def validate_config(cfg: "Config") -> None:
    """Raise ConfigError (naming the fields and a way out) when sections of `cfg` contradict
    each other."""
    from vip.config import ConfigError

    data, build = cfg.data, cfg.build
    fusion = cfg.model.fusion
    if fusion is not None and fusion.audio_n_mels != data.audio_n_mels:
        raise ConfigError(f"model.fusion.audio_n_mels={fusion.audio_n_mels} but data.audio_n_mels="
                          f"{data.audio_n_mels}: the audio tower reads the reader's mel bands; set both alike")
    if fusion is not None and len(cfg.loss.fusion_weights) != 6:
        raise ConfigError(f"loss.fusion_weights needs 6 weights (t_v, t_a, v_a, t_va, v_ta, a_tv), got "
                          f"{len(cfg.loss.fusion_weights)}")
    if cfg.finetune.method == "eao" and cfg.finetune.head != "none":
        raise ConfigError(f"finetune.method=eao trains the fusion head; finetune.head={cfg.finetune.head} is a "
                          f"retrieval head of the CLIP-ViP method: set one of them only")
    if data.resize == "crop" and build.aspect == "square" and same_path(data.shards, build.out):
        raise ConfigError(
            f"data.resize=crop cannot read the shards this config builds (data.shards = build.out = "
            f"{build.out!r}) with build.aspect=square: square shards store clips already squashed to "
            f"short_side², so a crop would crop a distorted image. Use data.resize=squash, or "
            f"build.aspect=keep (and rebuild the shards).")

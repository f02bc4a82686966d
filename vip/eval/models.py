"""What the eval commands run on: an exported vip model or the MeanPool open_clip baseline,
on the Runtime of the command (`vip.train.runtime`), and the checks of their required options.

`vip eval`, `vip embed` and `vip analyze domain-gap` take every option as a dotted override
(`eval.…` / `analyze.…`); a missing one is a `ConfigError` naming the override to set (the
command line turns it into exit status 2).
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch.distributed as dist

from vip.config import ConfigError, ModelConfig
from vip.train.runtime import Runtime, init_runtime


# --------------------------------------------------------------------------- required options
def require(value, override: str, what: str) -> None:
    """ConfigError naming `override` (e.g. "eval.annotations=FILE.jsonl") when value is empty."""
    if not value:
        raise ConfigError(f"missing {what}: set {override}")


def require_path(path: str, key: str, kind: str = "file") -> None:
    """ConfigError when `path` (the value of `key`) is not an existing file / folder."""
    p = Path(path)
    ok = p.is_dir() if kind == "folder" else p.exists()
    if not ok:
        raise ConfigError(f"{key}={path}: no such {kind}")


def require_model(cfg, section: str) -> None:
    """cfg (EvalConfig or AnalyzeConfig) names an exported model or an open_clip checkpoint that exists."""
    if not cfg.model and not cfg.open_clip:
        raise ConfigError(f"missing the model: set {section}.model=DIR (an exported vip model) or "
                          f"{section}.open_clip=CKPT {section}.arch=ARCH (open_clip checkpoint, MeanPool baseline)")
    if cfg.model:
        require_path(cfg.model, f"{section}.model")
    else:
        require_path(cfg.open_clip, f"{section}.open_clip")


# --------------------------------------------------------------------------- runtime + model
@contextlib.contextmanager
def command_runtime(device: str = "auto", precision: str = "fp32"):
    """`init_runtime` for an eval command; leaves the process group it joined (under torchrun) on exit."""
    joined_before = dist.is_available() and dist.is_initialized()
    rt = init_runtime(device, precision)
    try:
        yield rt
    finally:
        if not joined_before and dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def load_eval_model(cfg, rt: Runtime):
    """(model in eval mode on rt.device in rt.dtype, its ModelConfig, a display name) from
    cfg.model (an export) or cfg.open_clip (MeanPool baseline of cfg.arch); cfg is an
    EvalConfig or an AnalyzeConfig."""
    from vip.model import build_model
    from vip.model.convert import load, read_model_config
    if cfg.model:
        mcfg = read_model_config(cfg.model)
        model, name = load(cfg.model, device=rt.device), Path(cfg.model).name
    elif cfg.open_clip:
        mcfg = ModelConfig(arch=cfg.arch, pretrained=cfg.open_clip, video_encoder="meanpool",
                           max_frames=getattr(cfg, "num_frames", 12), quick_gelu=cfg.quick_gelu)
        model, name = build_model(mcfg).to(rt.device), f"meanpool:{Path(cfg.open_clip).name}"
    else:
        raise ConfigError("set eval.model=DIR (exported vip model) or eval.open_clip=CKPT (open_clip checkpoint)")
    return model.to(rt.dtype).eval(), mcfg, name

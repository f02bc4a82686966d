"""`vip export`: a DeepSpeed checkpoint (any ZeRO stage) → safetensors + config JSON for `vip.load()`."""
from __future__ import annotations

import logging
from pathlib import Path

from vip.checkpoint import CheckpointManager
from vip.config import config_from_file

log = logging.getLogger(__name__)


def export_checkpoint(run: str | Path, out: str | Path | None = None, tag: str | None = None) -> Path:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from vip.model import build_model
    from vip.model.convert import export

    run = Path(run)
    ckpt_dir = run / "checkpoints"
    tag = tag or CheckpointManager(run, 0, 0, 1).latest()
    if tag is None:
        raise FileNotFoundError(f"no complete checkpoint under {ckpt_dir}")
    cfg = config_from_file(ckpt_dir / tag / "config.yaml")
    state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)
    model = build_model(cfg.model)
    own = model.state_dict()
    # the trainer holds 0-dim parameters (logit_scale) as [1]: restore the model's shapes
    state = {k: (v.reshape(own[k].shape) if k in own and v.numel() == own[k].numel() else v) for k, v in state.items()}
    model.load_state_dict(state, strict=True)
    out = Path(out) if out else run / "export"
    export(model, cfg.model, out)
    log.info("exported %s/%s → %s", ckpt_dir, tag, out)
    return out

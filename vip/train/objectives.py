"""What a training step optimises: forward, gather across ranks, loss. One per trainer.

An objective is a callable (module, batch) → (loss, {term: value}) that `train_step` calls;
the losses themselves (vip.losses) are pure functions of already gathered features.
"""
from __future__ import annotations

import torch

from vip.losses import clip_loss, ocl_loss
from vip.train.distributed import gather_features
from vip.train.runtime import Runtime


class PretrainObjective:
    """CLIP-ViP's omnisource cross-modal loss (variant vs|a|b|c|d) on a reader batch
    (docs/architecture.md, "Batches"): video, middle frame, subtitle, caption, has_caption.
    Only the inputs the variant uses are encoded (vs: no frame, no caption)."""

    INPUTS = {"vs": ("video", "subtitle"), "a": ("video", "subtitle", "frame", "caption"),
              "b": ("video", "subtitle", "caption"), "c": ("video", "subtitle", "frame", "caption"),
              "d": ("video", "subtitle", "frame", "caption")}

    def __init__(self, variant: str, rt: Runtime):
        if variant not in self.INPUTS:
            raise ValueError(f"loss.variant must be one of {sorted(self.INPUTS)}, got {variant!r}")
        self.variant, self.rt, self.inputs = variant, rt, self.INPUTS[variant]

    def __call__(self, module, batch: dict) -> tuple[torch.Tensor, dict]:
        dev, dt = self.rt.device, self.rt.dtype
        x = {k: batch[k].to(dev, dt if k in ("video", "frame") else None, non_blocking=True) for k in self.inputs}
        out = module(**x)         # video [B, T, 3, H, W], frame [B, 3, H, W], subtitle/caption [B, L] → [B, D]
        feats = {k: gather_features(out[k]) for k in ("video", "frame", "subtitle", "caption")}  # [world·B, D]
        has_caption = gather_features(batch["has_caption"].to(dev)) if "caption" in x else None
        return ocl_loss(self.variant, video=feats["video"], frame=feats["frame"], subtitle=feats["subtitle"],
                        caption=feats["caption"], has_caption=has_caption, logit_scale=out["logit_scale"])


class RetrievalObjective:
    """Fine-tuning: symmetric InfoNCE between videos and their (tokenised) captions."""

    def __init__(self, rt: Runtime):
        self.rt = rt

    def __call__(self, module, batch: dict) -> tuple[torch.Tensor, dict]:
        o = module(video=batch["video"].to(self.rt.device, self.rt.dtype, non_blocking=True),   # [B, T, 3, H, W]
                   subtitle=batch["text"].to(self.rt.device, non_blocking=True))                # [B, L]
        v, t = gather_features(o["video"]), gather_features(o["subtitle"])                      # [world·B, D]
        loss = clip_loss(v, t, o["logit_scale"].float().exp())
        return loss, {}

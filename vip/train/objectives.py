"""What a training step optimises: forward, gather across ranks, loss. One per trainer.

An objective is a callable (module, batch) → (loss, {term: value}) that `train_step` calls;
the losses themselves (vip.losses) are pure functions of already gathered features.
"""
from __future__ import annotations

import torch

from vip.losses import ce_diag, clip_loss, ocl_loss
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
    """Fine-tuning: symmetric InfoNCE between videos and their (tokenised) captions.

    head=False (default): pooled features, CE(t→v) + CE(v→t) (vip.losses.clip_loss).
    head=True: the model's retrieval head (vip.model.heads) on token-level features gathered
    across ranks with gradient (frames [B, T, D], words [B, L, D], masks, sentences), loss
    `head_retrieval_loss` (the originals' (CE + CEᵀ) / 2, plus λ · the head's regulariser: DRL's CDCR)."""

    def __init__(self, rt: Runtime, head: bool = False, regulariser_weight: float = 0.0, chunk_size: int = 256):
        self.rt, self.head, self.weight, self.chunk = rt, head, regulariser_weight, chunk_size

    def __call__(self, module, batch: dict) -> tuple[torch.Tensor, dict]:
        video = batch["video"].to(self.rt.device, self.rt.dtype, non_blocking=True)   # [B, T, 3, H, W]
        text = batch["text"].to(self.rt.device, non_blocking=True)                      # [B, L]
        if not self.head:
            o = module(video=video, subtitle=text)
            v, t = gather_features(o["video"]), gather_features(o["subtitle"])          # [world·B, D]
            return clip_loss(v, t, o["logit_scale"].float().exp()), {}
        o = module(video=video, subtitle=text, tokens=True)
        g = {k: gather_features(o[k]) for k in ("sentence", "words", "word_mask", "frames", "frame_mask")}
        head = getattr(module, "module", module).head                                   # inside the DeepSpeed engine
        out = head(g["sentence"], g["words"], g["word_mask"], g["frames"], g["frame_mask"],
                   chunk_size=self.chunk, regularise=bool(self.weight))                 # [world·B, world·B]
        sim, reg = out if self.weight else (out, None)
        return head_retrieval_loss(sim, o["logit_scale"], reg, self.weight)


def head_retrieval_loss(sim: torch.Tensor, logit_scale: torch.Tensor, regulariser: torch.Tensor | None = None,
                        weight: float = 0.0) -> tuple[torch.Tensor, dict]:
    """The CLIP4Clip / X-CLIP / DRL loss: logits = exp(logit_scale) · sim [n texts, n videos] (pair i on
    the diagonal), (CE(logits) + CE(logitsᵀ)) / 2 (the originals' CrossEn, averaged over the two
    directions), + weight · regulariser. Returns (loss, {"ce", "reg"}: detached)."""
    logits = logit_scale.float().exp() * sim.float()
    ce = (ce_diag(logits) + ce_diag(logits.T)) / 2
    if regulariser is None or not weight:
        return ce, {"ce": ce.detach()}
    return ce + weight * regulariser.float(), {"ce": ce.detach(), "reg": regulariser.detach()}

"""Baseline video encoders of the CLIP-ViP ablation (ModelConfig.video_encoder).

* ``meanpool``  — `MeanPoolViT`: every frame through the CLIP image tower independently;
  video = mean of the L2-normalised frame embeddings (renormalised by the caller).
* ``seqtransf`` — `SeqTransfViT`: CLIP4Clip's seqTransf: frame embeddings + a learnt frame
  position embedding → a small temporal transformer (4 layers) → residual to the frame
  embeddings → L2-normalise → mean over frames.
* ``full``      — `VideoViT(num_proxies=1, attention="full")`: joint space-time attention
  over all tokens with the temporal embedding, class token only (built in clipvip.py).

Both classes here are `VideoViT` subclasses with M = 1 and no temporal embedding, so the
CLIP weights keep the same parameter names (``visual.conv1`` …) in every encoder.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vip.model.vip_vit import VideoViT

Tensor = torch.Tensor


class MeanPoolViT(VideoViT):
    """Frame-wise CLIP; forward(video [B, T, 3, H, W]) → mean of normalised frame embeddings [B, D]."""

    def __init__(self, vit: nn.Module, max_frames: int = 12):
        super().__init__(vit, num_proxies=1, max_frames=max_frames, attention="full", temporal=False)

    def frame_features(self, video: Tensor) -> Tensor:
        """video [B, T, 3, H, W] → unnormalised per-frame CLIP embeddings [B, T, D]."""
        B, T = video.shape[:2]
        frames = video.flatten(0, 1).unsqueeze(1)                          # [B·T, 1, 3, H, W]
        return super().forward(frames).view(B, T, -1)                      # [B, T, D]

    def frame_tokens(self, video: Tensor) -> Tensor:
        """Per-frame features for the retrieval heads: the frames' CLIP embeddings [B, T, D]."""
        return self.frame_features(video)

    def forward(self, video: Tensor) -> Tensor:
        if video.ndim != 5:
            raise ValueError(f"video must be [B, T, 3, H, W], got {tuple(video.shape)}")
        return F.normalize(self.frame_features(video), dim=-1).mean(dim=1)  # [B, D]


class SeqTransfViT(MeanPoolViT):
    """CLIP4Clip seqTransf head on top of frame-wise CLIP.

    The temporal transformer (open_clip blocks, no mask) and the frame position table are
    initialised, as CLIP4Clip does, from the first `layers` blocks and the first rows of the
    position table of CLIP's text transformer when its width equals the embedding size;
    randomly otherwise."""

    def __init__(self, vit: nn.Module, max_frames: int = 12, layers: int = 4,
                 text_transformer: nn.Module | None = None, text_positional: Tensor | None = None,
                 act_layer: type[nn.Module] = nn.GELU):
        super().__init__(vit, max_frames=max_frames)
        from open_clip.transformer import Transformer
        D = self.output_dim
        compatible = (text_transformer is not None and text_transformer.width == D
                      and len(text_transformer.resblocks) >= layers)
        heads = text_transformer.resblocks[0].attn.num_heads if compatible else max(1, D // 64)
        self.seq_transformer = Transformer(D, layers, heads, act_layer=act_layer)
        self.frame_position = nn.Parameter(torch.empty(max_frames, D))     # [T_max, D]
        if compatible:
            for dst, src in zip(self.seq_transformer.resblocks, text_transformer.resblocks):
                dst.load_state_dict(src.state_dict())
        else:
            for blk in self.seq_transformer.resblocks:
                nn.init.normal_(blk.attn.in_proj_weight, std=D ** -0.5)
                nn.init.normal_(blk.attn.out_proj.weight, std=(D ** -0.5) * ((2 * layers) ** -0.5))
                nn.init.normal_(blk.mlp.c_fc.weight, std=(2 * D) ** -0.5)
                nn.init.normal_(blk.mlp.c_proj.weight, std=(D ** -0.5) * ((2 * layers) ** -0.5))
        if compatible and text_positional is not None and text_positional.shape[0] >= max_frames:
            self.frame_position.data.copy_(text_positional.detach()[:max_frames])
        else:
            nn.init.normal_(self.frame_position, std=0.01)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        super().set_grad_checkpointing(enable)
        self.seq_transformer.grad_checkpointing = enable

    def frame_tokens(self, video: Tensor) -> Tensor:
        """Per-frame features for the retrieval heads: the temporal transformer's output + residual [B, T, D]."""
        T = video.shape[1]
        if T > self.max_frames:
            raise ValueError(f"seqtransf has frame positions for {self.max_frames} frames, got {T}")
        x = self.frame_features(video)                                     # [B, T, D]
        return self.seq_transformer(x + self.frame_position[:T].to(x.dtype)) + x

    def forward(self, video: Tensor) -> Tensor:
        if video.ndim != 5:
            raise ValueError(f"video must be [B, T, 3, H, W], got {tuple(video.shape)}")
        T = video.shape[1]
        if T > self.max_frames:
            raise ValueError(f"seqtransf has frame positions for {self.max_frames} frames, got {T}")
        x = self.frame_features(video)                                     # [B, T, D]
        y = self.seq_transformer(x + self.frame_position[:T].to(x.dtype))  # [B, T, D]
        y = F.normalize(y + x, dim=-1)                                     # residual, as CLIP4Clip
        return y.mean(dim=1)                                               # [B, D]

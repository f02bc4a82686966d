"""Audio tower: log-mel spectrogram → time patches → a small transformer → audio tokens.

The Everything-at-Once original uses DAVEnet (a CNN over 40-bin log-mels, one 4096-d token per
64 STFT frames). Here the tower is a ViT over time patches (each patch: every mel bin over
`patch_frames` frames, a Conv1d with stride = kernel), a learnt position table (linearly
interpolated to other lengths), open_clip transformer blocks and a final LayerNorm. It starts
from random weights, or from a local weights file of this tower (`AudioTower.load`), as the
original starts from its own pretrained DAVEnet where the user has one.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

Tensor = torch.Tensor


class AudioTower(nn.Module):
    """forward(mel [B, n_mels, F], mask bool [B, F]) → (tokens [B, N, width], mask bool [B, N]),
    N = ceil(F / patch_frames). A token is real when any of its frames is (the original max-pools
    its frame mask the same way); a clip without audio has an all-False mask."""

    def __init__(self, n_mels: int = 40, width: int = 256, layers: int = 4, heads: int = 4,
                 patch_frames: int = 16, max_tokens: int = 128):
        super().__init__()
        from open_clip.transformer import Transformer
        self.n_mels, self.patch_frames, self.width = n_mels, patch_frames, width
        self.patch_embed = nn.Conv1d(n_mels, width, kernel_size=patch_frames, stride=patch_frames)
        self.positional_embedding = nn.Parameter(torch.randn(max_tokens, width) * 0.02)   # [N_max, W]
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = Transformer(width, layers, heads)
        self.ln_post = nn.LayerNorm(width)

    def forward(self, mel: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        if mel.ndim != 3 or mel.shape[1] != self.n_mels:
            raise ValueError(f"mel must be [B, {self.n_mels}, frames], got {tuple(mel.shape)}")
        B, _, n = mel.shape
        p = self.patch_frames
        pad = (-n) % p
        mel = F.pad(mel * mask[:, None].to(mel.dtype), (0, pad))          # padded frames are 0
        tmask = F.pad(mask.bool(), (0, pad)).view(B, -1, p).any(-1)        # [B, N]
        x = self.patch_embed(mel).transpose(1, 2)                          # [B, N, W]
        N = x.shape[1]
        pos = self.positional_embedding
        if N != pos.shape[0]:
            pos = F.interpolate(pos.T[None], size=N, mode="linear", align_corners=False)[0].T
        x = self.ln_pre(x + pos.to(x.dtype))
        # padded tokens are never attended to; a clip without audio attends to everything (ignored later)
        key_ok = tmask | ~tmask.any(dim=1, keepdim=True)                    # [B, N]
        attn = torch.zeros(B, 1, N, N, dtype=x.dtype, device=x.device)
        attn = attn.masked_fill(~key_ok[:, None, None, :], float("-inf"))
        heads = self.transformer.resblocks[0].attn.num_heads
        attn = attn.expand(B, heads, N, N).reshape(B * heads, N, N)
        x = self.transformer(x, attn_mask=attn)
        return self.ln_post(x), tmask

    @staticmethod
    def load(tower: "AudioTower", path: str | os.PathLike) -> None:
        """Load a local weights file of this tower (safetensors, or a torch state dict read with
        weights_only=True); keys may carry an `audio.` prefix (a vip export)."""
        path = os.fspath(path)
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file
            sd = load_file(path)
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        sd = {k.removeprefix("audio."): v for k, v in sd.items() if not k.startswith(("visual.", "fusion."))}
        tower.load_state_dict(sd, strict=True)

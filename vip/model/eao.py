"""`EAOModel`: CLIP-ViP's text and video towers + an audio tower + the Everything-at-Once fusion head.

A `CLIPViP` subclass, so the text/video parameter names (and `encode_text`, `encode_video`) are
CLIP-ViP's and an exported CLIP-ViP model loads into it with only `audio.*` and `fusion_head.*`
new. The backbones give token lists that the fusion head (vip/model/fusion.py) projects, fuses and
pools (docs/fusion.md):

* text: every token's final hidden state (after ln_final and the text projection) [B, L, D],
  padding (token id 0) masked;
* video: ViP — the M proxies and each frame's mean patch token, after ln_post and proj
  [B, M + T, D]; frame-wise encoders (meanpool, seqtransf) — the per-frame embeddings [B, T, D];
* audio: the audio tower's tokens [B, N, W] (vip/model/audio.py), masked where there is no audio.
"""
from __future__ import annotations

import torch
from torch import nn

from vip.config import ModelConfig
from vip.model.audio import AudioTower
from vip.model.clipvip import CLIPViP
from vip.model.fusion import FusionHead

Tensor = torch.Tensor


class EAOModel(CLIPViP):
    """forward(video, text, audio, audio_mask) → {t, v, a, tv, va, ta: [B, P] L2-normalised,
    present_t/v/a: bool [B], logit_scale}; any of the inputs may be left out."""

    def __init__(self, clip: nn.Module, cfg: ModelConfig):
        super().__init__(clip, cfg)
        fc = cfg.fusion
        self.audio = AudioTower(fc.audio_n_mels, fc.audio_width, fc.audio_layers, fc.audio_heads,
                                fc.audio_patch_frames, fc.audio_max_tokens)
        if fc.audio_pretrained:
            AudioTower.load(self.audio, fc.audio_pretrained)
        D = self.visual.output_dim
        self.fusion_head = FusionHead({"t": D, "v": D, "a": fc.audio_width}, fc.dim, fc.depth, fc.num_heads,
                                      fc.mlp_ratio, fc.projection_dim, fc.token_projection, fc.final_projection)
        self.fused_dim = fc.projection_dim

    # ------------------------------------------------------------------ backbone tokens
    def text_tokens(self, text: Tensor) -> tuple[Tensor, Tensor]:
        """tokens [B, L] → (per-token features [B, L, D], mask bool [B, L]: not padding)."""
        cast_dtype = self.transformer.get_cast_dtype()
        L = text.shape[1]
        x = self.token_embedding(text).to(cast_dtype) + self.positional_embedding[:L].to(cast_dtype)
        mask = self.attn_mask[:L, :L] if self.attn_mask is not None else None
        x = self.ln_final(self.transformer(x, attn_mask=mask))             # [B, L, W]
        if self.text_projection is not None:
            x = self.text_projection(x) if isinstance(self.text_projection, nn.Linear) else x @ self.text_projection
        return x, text != 0

    def video_tokens(self, video: Tensor) -> tuple[Tensor, Tensor]:
        """video [B, T, 3, H, W] → (tokens [B, N, D], mask all True [B, N]) (module docstring)."""
        v = self.visual
        if hasattr(v, "frame_features"):                                   # meanpool / seqtransf
            x = v.frame_features(video)                                    # [B, T, D]
        else:                                                              # vip / full
            p, f = v.encode_tokens(video)                                  # [B, M, C], [B, T, N, C]
            proj = v.proj.to(p.dtype)
            x = torch.cat([v.ln_post(p) @ proj, v.ln_post(f).mean(2) @ proj], dim=1)   # [B, M + T, D]
        return x, torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)

    # ------------------------------------------------------------------ embeddings
    def encode_audio(self, audio: Tensor, audio_mask: Tensor) -> Tensor:
        """log-mel [B, n_mels, F] + frame mask [B, F] → audio embedding [B, P] (normalised)."""
        return self.fuse(audio=audio, audio_mask=audio_mask)["a"]

    def fuse(self, video: Tensor | None = None, text: Tensor | None = None, audio: Tensor | None = None,
             audio_mask: Tensor | None = None) -> dict[str, Tensor]:
        """Every single-modality and pairwise fused embedding of the inputs given (FusionHead)."""
        tokens = {}
        if text is not None:
            tokens["t"] = self.text_tokens(text)
        if video is not None:
            tokens["v"] = self.video_tokens(video)
        if audio is not None:
            if audio_mask is None:
                audio_mask = torch.ones(audio.shape[0], audio.shape[2], dtype=torch.bool, device=audio.device)
            tokens["a"] = self.audio(audio, audio_mask)
        return self.fusion_head(tokens)

    def forward(self, video: Tensor | None = None, text: Tensor | None = None, audio: Tensor | None = None,
                audio_mask: Tensor | None = None) -> dict[str, Tensor]:
        out = self.fuse(video, text, audio, audio_mask)
        out["logit_scale"] = self.scale()
        return out

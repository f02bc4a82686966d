"""`CLIPViP`: a video encoder (ViP or a baseline) + open_clip's text tower + a learnable logit scale.

Parameter names follow open_clip's ``CLIP`` (``visual.*``, ``transformer.*``,
``token_embedding``, ``positional_embedding``, ``ln_final``, ``text_projection``,
``logit_scale``), so an open_clip checkpoint loads into a CLIPViP with only the new
parameters missing (``visual.proxies``, ``visual.temporal_embedding``, seqTransf's head).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from vip.config import ModelConfig

Tensor = torch.Tensor

LOGIT_SCALE_MAX = math.log(200.0)
VIDEO_ENCODERS = ("vip", "meanpool", "seqtransf", "full")


def make_video_encoder(clip: nn.Module, cfg: ModelConfig) -> nn.Module:
    """The vision side selected by ``cfg.video_encoder``, built around ``clip.visual``."""
    from vip.model.baselines import MeanPoolViT, SeqTransfViT
    from vip.model.vip_vit import VideoViT
    kind = cfg.video_encoder
    if kind == "vip":
        if cfg.attention not in ("fast", "dense"):
            raise ValueError(f"model.attention must be fast or dense, got {cfg.attention!r}")
        return VideoViT(clip.visual, cfg.num_proxies, cfg.max_frames,
                        attention="proxy" if cfg.attention == "fast" else "proxy_dense", proxy_init=cfg.proxy_init)
    if kind == "full":
        return VideoViT(clip.visual, 1, cfg.max_frames, attention="full")
    if kind == "meanpool":
        return MeanPoolViT(clip.visual, cfg.max_frames)
    if kind == "seqtransf":
        act = type(clip.transformer.resblocks[0].mlp.gelu)
        return SeqTransfViT(clip.visual, cfg.max_frames, cfg.seq_layers, text_transformer=clip.transformer,
                            text_positional=clip.positional_embedding, act_layer=act)
    raise ValueError(f"model.video_encoder must be one of {VIDEO_ENCODERS}, got {kind!r}")


class CLIPViP(nn.Module):
    """Video-text dual encoder. Build it with `build_model(ModelConfig)`.

    encode_video(video [B, T, 3, H, W]), encode_image(image [B, 3, H, W]) and
    encode_text(tokens [B, L]) return L2-normalised features [B, D]. `forward` runs whatever
    inputs it is given in one call (for the trainer) and returns them with the logit scale
    (log space; the losses take exp).
    """

    def __init__(self, clip: nn.Module, cfg: ModelConfig):
        super().__init__()
        self.visual = make_video_encoder(clip, cfg)
        # open_clip CLIP's text tower, same attribute names
        self.transformer = clip.transformer
        self.token_embedding = clip.token_embedding
        self.positional_embedding = clip.positional_embedding               # [context, W]
        self.ln_final = clip.ln_final
        self.text_projection = clip.text_projection                         # [W, D]
        self.register_buffer("attn_mask", clip.attn_mask, persistent=False)  # [context, context] causal, -inf
        self.text_pool_type = clip.text_pool_type
        self.text_eos_id = getattr(clip, "text_eos_id", None)
        self.context_length = clip.context_length
        self.vocab_size = clip.vocab_size
        self.logit_scale = nn.Parameter(torch.tensor(float(cfg.init_logit_scale)))
        if not 0.0 <= cfg.dropout < 1.0:
            raise ValueError(f"model.dropout must be in [0, 1), got {cfg.dropout}")
        # dropout on the final features before normalisation (training mode only; no parameters, so
        # checkpoints are the same with or without it); at 0 no module runs and no random number is drawn
        self.feature_dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        self.embed_dim = self.visual.output_dim
        self.head = None                     # a retrieval head (vip.model.heads.attach_head); none by default

    # ------------------------------------------------------------------ switches
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each transformer block in backward (vision and text)."""
        self.visual.set_grad_checkpointing(enable)
        self.transformer.grad_checkpointing = enable

    def scale(self) -> Tensor:
        """The logit scale in log space (a scalar tensor). As in CLIP and open_clip the forward
        uses the parameter as it is: the trainer clamps the parameter itself to [0, ln 200] after
        every optimiser step (vip.train.engine). A clamp here would zero its gradient whenever the
        stored value rounds above ln 200 (float32 does; bf16 by up to 0.03), and it would stay there."""
        return self.logit_scale

    # ------------------------------------------------------------------ encoders
    def encode_video(self, video: Tensor, normalize: bool = True) -> Tensor:
        """video [B, T, 3, H, W] (CLIP-normalised pixels) → [B, D]."""
        x = self.feature_dropout(self.visual(video))
        return F.normalize(x, dim=-1) if normalize else x

    def encode_image(self, image: Tensor, normalize: bool = True) -> Tensor:
        """image [B, 3, H, W] → [B, D]: a 1-frame video (ViP: middle temporal embedding)."""
        if image.ndim != 4:
            raise ValueError(f"image must be [B, 3, H, W], got {tuple(image.shape)}")
        return self.encode_video(image.unsqueeze(1), normalize)

    def _text_hidden(self, text: Tensor) -> Tensor:
        """tokens [B, L] → final hidden states after ln_final [B, L, W]."""
        L = text.shape[1]
        if L > self.context_length:
            raise ValueError(f"text has {L} tokens; the text tower's context length is {self.context_length}")
        cast_dtype = self.transformer.get_cast_dtype()
        x = self.token_embedding(text).to(cast_dtype)                       # [B, L, W]
        x = x + self.positional_embedding[:L].to(cast_dtype)
        mask = self.attn_mask[:L, :L] if self.attn_mask is not None else None
        x = self.transformer(x, attn_mask=mask)
        return self.ln_final(x)

    def _project_text(self, x: Tensor) -> Tensor:
        """[..., W] → [..., D] through the text projection."""
        if self.text_projection is None:
            return x
        return self.text_projection(x) if isinstance(self.text_projection, nn.Linear) else x @ self.text_projection

    def encode_text(self, text: Tensor, normalize: bool = True) -> Tensor:
        """tokens [B, L] (open_clip tokenizer, L <= context length) → [B, D]."""
        from open_clip.transformer import text_global_pool
        x = self._text_hidden(text)
        x = text_global_pool(x, text, self.text_pool_type, eos_token_id=self.text_eos_id)  # [B, W]
        x = self.feature_dropout(self._project_text(x))
        return F.normalize(x, dim=-1) if normalize else x

    # ------------------------------------------------------------------ token-level features (retrieval heads)
    def encode_text_tokens(self, text: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """tokens [B, L] → (sentence [B, D], words [B, L, D], word mask [B, L] bool), unnormalised.
        sentence is encode_text's pooled (EOS) feature; words are every position through ln_final
        and the text projection (X-CLIP / DRL's ``encode_text(return_hidden=True)``); the mask is
        True for real tokens (id != 0: SOT, words, EOT), False for padding."""
        from open_clip.transformer import text_global_pool
        h = self._text_hidden(text)                                         # [B, L, W]
        words = self.feature_dropout(self._project_text(h))                 # [B, L, D]
        pooled = text_global_pool(h, text, self.text_pool_type, eos_token_id=self.text_eos_id)
        sentence = self.feature_dropout(self._project_text(pooled))         # [B, D]
        return sentence, words, text != 0

    def encode_video_frames(self, video: Tensor) -> tuple[Tensor, Tensor]:
        """video [B, T, 3, H, W] → (frame features [B, T, D] unnormalised, frame mask [B, T] all True).
        What a frame feature is depends on the video encoder (docs/model.md, "Frame features"):
        meanpool: each frame's CLIP image embedding (as CLIP4Clip / X-CLIP / DRL take them);
        seqtransf: the temporal transformer's output per frame; vip / full: each frame's patch
        tokens after the last block, averaged, through ln_post and the projection."""
        if video.ndim != 5:
            raise ValueError(f"video must be [B, T, 3, H, W], got {tuple(video.shape)}")
        x = self.feature_dropout(self.visual.frame_tokens(video))
        return x, torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)

    # ------------------------------------------------------------------ training
    def forward(self, video: Tensor | None = None, frame: Tensor | None = None, subtitle: Tensor | None = None,
                caption: Tensor | None = None, tokens: bool = False) -> dict[str, Tensor | None]:
        """One call for the trainer: any of video [B, T, 3, H, W], frame [B, 3, H, W],
        subtitle [B, L], caption [B, L]. Returns {"video", "frame", "subtitle", "caption"}:
        L2-normalised features [B, D] (None for inputs not given) and "logit_scale": the
        log-space scale (scalar; clamped to [0, ln 200] by the trainer after each step). Subtitles and captions of the same length share one
        text-tower pass. tokens=True (fine-tuning with a retrieval head): video and subtitle give their
        token-level features instead: "frames" [B, T, D], "frame_mask" [B, T], "sentence" [B, D],
        "words" [B, L, D], "word_mask" [B, L] (unnormalised; see encode_video_frames / encode_text_tokens)."""
        if tokens:
            if video is None or subtitle is None or frame is not None or caption is not None:
                raise ValueError("tokens=True takes video and subtitle only")
            frames, frame_mask = self.encode_video_frames(video)
            sentence, words, word_mask = self.encode_text_tokens(subtitle)
            return {"frames": frames, "frame_mask": frame_mask, "sentence": sentence, "words": words,
                    "word_mask": word_mask, "logit_scale": self.scale()}
        out: dict[str, Tensor | None] = {"video": None, "frame": None, "subtitle": None, "caption": None}
        if video is not None:
            out["video"] = self.encode_video(video)
        if frame is not None:
            out["frame"] = self.encode_image(frame)
        if subtitle is not None and caption is not None and subtitle.shape[1] == caption.shape[1]:
            t = self.encode_text(torch.cat([subtitle, caption]))
            out["subtitle"], out["caption"] = t[:subtitle.shape[0]], t[subtitle.shape[0]:]
        else:
            if subtitle is not None:
                out["subtitle"] = self.encode_text(subtitle)
            if caption is not None:
                out["caption"] = self.encode_text(caption)
        out["logit_scale"] = self.scale()
        return out


def build_model(cfg: ModelConfig) -> CLIPViP:
    """CLIPViP from a ModelConfig: open_clip arch (+ pretrained weights: a local file, or a tag
    where the network is reachable) wrapped with the selected video encoder; an `EAOModel` when
    cfg.fusion is set."""
    from vip.model.archs import build_clip
    clip = build_clip(cfg.arch, cfg.pretrained, quick_gelu=cfg.quick_gelu)
    if cfg.fusion is not None:   # Everything at Once: + audio tower + fusion head (docs/fusion.md)
        from vip.model.eao import EAOModel
        return _grad_ckpt(EAOModel(clip, cfg), cfg)
    return _grad_ckpt(CLIPViP(clip, cfg), cfg)


def _grad_ckpt(model: CLIPViP, cfg: ModelConfig) -> CLIPViP:
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)
    return model

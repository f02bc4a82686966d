"""CLIP-ViP model: video-proxy ViT + baselines around open_clip's CLIP (docs/model.md).

Public API::

    from vip.model import build_model, CLIPViP
    model = build_model(ModelConfig(...))        # CLIPViP
    out = model(video=…, frame=…, subtitle=…, caption=…)   # normalised features + logit_scale
    from vip.model.convert import export, load, load_weights_into, import_clipvip
"""
from vip.model.archs import TINY_ARCHS, build_clip, clip_config
from vip.model.clipvip import CLIPViP, VIDEO_ENCODERS, build_model

__all__ = ["CLIPViP", "build_model", "build_clip", "clip_config", "TINY_ARCHS", "VIDEO_ENCODERS"]

"""Architectures: open_clip's named CLIP configs plus tiny random-weight configs for tests/CI.

`ModelConfig.arch` is any open_clip model name (ViT-B-32, ViT-B-16, ViT-L-14, their
``-quickgelu`` variants, …) or one of `TINY_ARCHS`. `build_clip` returns an open_clip
``CLIP`` with random weights, or with weights from ``pretrained``: a local file (state
dict / safetensors, loaded with ``weights_only``) or an open_clip pretrained tag (which
downloads, so it needs the network: clusters only, never tests).
"""
from __future__ import annotations

import copy
import os

import torch

_TINY_VISION = {"image_size": 64, "patch_size": 16, "width": 64, "layers": 2, "head_width": 16, "mlp_ratio": 4.0}
_TINY_TEXT = {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 2}

# tiny configs (random weights only): real tokenizer vocabulary, 2 layers, width 64
TINY_ARCHS: dict[str, dict] = {
    # 4×4 patches of 16 px at 64², embed 64
    "vip-tiny": {"embed_dim": 64, "vision_cfg": _TINY_VISION, "text_cfg": _TINY_TEXT},
    "vip-tiny-quickgelu": {"embed_dim": 64, "quick_gelu": True, "vision_cfg": _TINY_VISION, "text_cfg": _TINY_TEXT},
    # 8×8 patches of 8 px at 64², wider (bench --quick)
    "vip-small": {"embed_dim": 128, "vision_cfg": {**_TINY_VISION, "patch_size": 8, "width": 128, "layers": 4,
                                                    "head_width": 32},
                  "text_cfg": {**_TINY_TEXT, "width": 128, "layers": 2}},
}


def clip_config(arch: str, quick_gelu: bool = False) -> dict:
    """The open_clip model config dict (embed_dim, vision_cfg, text_cfg, quick_gelu) of an arch name."""
    if arch in TINY_ARCHS:
        cfg = copy.deepcopy(TINY_ARCHS[arch])
    else:
        import open_clip
        cfg = open_clip.get_model_config(arch)
        if cfg is None:
            raise ValueError(f"unknown arch {arch!r}: not an open_clip model name nor one of {sorted(TINY_ARCHS)}")
        cfg = copy.deepcopy(cfg)
    if quick_gelu:
        cfg["quick_gelu"] = True
    for key in ("custom_text", "multimodal_cfg"):
        if cfg.get(key):
            raise NotImplementedError(f"arch {arch!r} has {key}; CLIP-ViP needs a plain open_clip CLIP (ViT + text)")
    if "timm_model_name" in cfg["vision_cfg"] or "hf_model_name" in cfg["text_cfg"]:
        raise NotImplementedError(f"arch {arch!r} uses a timm/HF tower; CLIP-ViP needs open_clip's ViT and text tower")
    return cfg


def build_clip(arch: str, pretrained: str | None = None, quick_gelu: bool = False) -> torch.nn.Module:
    """An open_clip ``CLIP`` for `arch`: random weights, a local checkpoint file, or a pretrained tag."""
    import open_clip
    if pretrained and not os.path.isfile(pretrained):
        if arch in TINY_ARCHS:
            raise FileNotFoundError(f"{arch} has no pretrained tags; {pretrained!r} is not a file")
        # an open_clip tag: open_clip downloads (or finds in its cache) and loads it
        model = open_clip.create_model(arch, pretrained=pretrained, force_quick_gelu=quick_gelu)
    else:
        model = open_clip.CLIP(**clip_config(arch, quick_gelu))
        if pretrained:
            open_clip.load_checkpoint(model, pretrained, strict=True, weights_only=True)
    if type(model) is not open_clip.CLIP:
        raise NotImplementedError(f"{arch} builds a {type(model).__name__}; CLIP-ViP needs open_clip.CLIP")
    return model.float()


def image_size(model) -> int:
    """Input side length of the model's vision tower (grid × patch)."""
    v = model.visual
    grid = v.grid_size[0] if isinstance(v.grid_size, (tuple, list)) else v.grid_size
    patch = v.patch_size[0] if isinstance(v.patch_size, (tuple, list)) else v.patch_size
    return int(grid) * int(patch)


class Tokenizer:
    """texts → token ids [B, context_length] with the open_clip tokenizer of an arch (tiny test
    archs use the default CLIP BPE). Picklable: it can be part of a DataLoader's collate."""

    def __init__(self, arch: str, context_length: int):
        self.name = "ViT-B-32" if arch in TINY_ARCHS else arch
        self.context_length = context_length
        self._tok = None

    def __call__(self, texts) -> torch.Tensor:
        if self._tok is None:
            import open_clip
            self._tok = open_clip.get_tokenizer(self.name, context_length=self.context_length)
        return self._tok(list(texts), context_length=self.context_length)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_tok": None}


def tokenizer_for(arch: str, context_length: int) -> Tokenizer:
    """The open_clip tokenizer of `arch` at `context_length`."""
    return Tokenizer(arch, context_length)

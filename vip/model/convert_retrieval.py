"""Released CLIP4Clip, X-CLIP and DRL checkpoints → a CLIPViP (MeanPool video encoder) + its retrieval head.

The three repositories save ``model.state_dict()`` of one module (a ``module.`` prefix from
DistributedDataParallel is dropped). Their key layouts:

=============================================  ===============================================
original key                                   here
=============================================  ===============================================
``clip.<OpenAI CLIP name>`` (``visual.*``,      the same name without ``clip.`` (open_clip keeps
``transformer.*``, ``token_embedding.weight``,  OpenAI's names); the model is built with
``positional_embedding``, ``ln_final.*``,       ``video_encoder="meanpool"`` and QuickGELU: the
``text_projection``, ``logit_scale``)           originals encode every frame with CLIP
``frame_position_embeddings.weight`` [P, D]     ``head.temporal.frame_position_embeddings.weight``
``transformerClip.resblocks.i.*``               ``head.temporal.transformerClip.resblocks.i.*``
X-CLIP ``global_mat_weight``, ``local_mat_      ``head.<same name>``
weight`` [D, D], ``word_logit_weight``,
``word_mat_weight``, ``word_mat_weight2``
[L, L], ``frame_logit_weight``, ``frame_mat_
weight``, ``frame_mat_weight2`` [T, T]
DRL ``text_weight_fc.{0,2}.*``,                 ``head.<same name>`` (wti_arch 2)
``video_weight_fc.{0,2}.*``
=============================================  ===============================================

Which head: X-CLIP's matrices → xclip; DRL's weight MLPs → drl; ``transformerClip`` alone →
seqtransf (CLIP4Clip seqTransf; DRL ``--interaction dp --agg_module seqTransf`` too); nothing
else → meanp (CLIP4Clip meanP). Cross-encoder heads (CLIP4Clip tightTransf, DRL xti:
``cross.*``) and other DRL weight MLPs (wti_arch 1, 3) are not implemented: a clear error.
Heads of the temporal transformer = width / 64, as the originals compute them.
`to_original_layout` is the inverse (tests round-trip with it).
"""
from __future__ import annotations

import os
import re

from vip.config import ModelConfig

XCLIP_KEYS = ("global_mat_weight", "local_mat_weight", "word_logit_weight", "frame_logit_weight", "word_mat_weight",
              "frame_mat_weight", "word_mat_weight2", "frame_mat_weight2")
_CLIP_META = ("input_resolution", "context_length", "vocab_size")
_TEMPORAL = re.compile(r"^(frame_position_embeddings\.weight|transformerClip\..+)$")


def _unwrap(sd: dict) -> dict:
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}


def detect_head(sd: dict) -> str:
    """meanp | seqtransf | xclip | drl from an original state dict's keys."""
    if any(k.startswith(("cross.", "similarity_dense.")) for k in sd):
        raise NotImplementedError("cross-encoder checkpoints (CLIP4Clip tightTransf, DRL xti) are not supported")
    if any(k in sd for k in XCLIP_KEYS):
        return "xclip"
    if any(k.startswith(("text_weight_fc", "video_weight_fc")) for k in sd):
        if "text_weight_fc.0.weight" not in sd or any(k.startswith("text_weight_fc.4") for k in sd):
            raise NotImplementedError("DRL token-weight MLP other than wti_arch 2 (Linear-ReLU-Linear)")
        return "drl"
    return "seqtransf" if any(k.startswith("transformerClip.") for k in sd) else "meanp"


def infer_clip_arch(clip_sd: dict) -> str:
    """The quickgelu open_clip (or tiny) arch whose shapes match an OpenAI-layout CLIP state dict."""
    from vip.model.convert import match_clip_arch
    return match_clip_arch(clip_sd, "CLIP")


def head_spec(sd: dict, name: str, dim: int, max_words: int) -> dict:
    """The head's constructor arguments read off the original tensors' shapes."""
    temporal = "frame_position_embeddings.weight" in sd
    spec: dict = {"name": name, "context_length": max_words}
    if name == "meanp":
        return spec
    if temporal:
        layers = len({k.split(".")[2] for k in sd if k.startswith("transformerClip.resblocks.")})
        spec.update(layers=layers, heads=max(1, dim // 64), max_positions=sd["frame_position_embeddings.weight"].shape[0])
    spec["dim"] = dim
    if name == "xclip":
        spec.update(num_words=sd["word_logit_weight"].shape[0], num_frames=sd["frame_logit_weight"].shape[0],
                    temporal=temporal, context_length=sd["word_logit_weight"].shape[0])
    elif name == "drl":
        spec.update(temporal=temporal)
    elif not temporal:
        raise ValueError("seqtransf checkpoint without frame_position_embeddings")
    return spec


def import_retrieval_checkpoint(source, arch: str | None = None, num_frames: int = 12, max_words: int = 32):
    """A CLIP4Clip / X-CLIP / DRL checkpoint (path or state dict) → (CLIPViP with ``model.head``,
    ModelConfig). max_words: the text length the head was trained with (the originals' scripts:
    32), recorded for evaluation (X-CLIP's is read off its L×L matrices)."""
    from vip.model.clipvip import build_model
    from vip.model.convert import _load_strict, read_state_dict
    from vip.model.heads import attach_head, build_head
    sd = _unwrap(read_state_dict(source) if isinstance(source, (str, os.PathLike)) else dict(source))
    clip_sd = {k[len("clip."):]: v for k, v in sd.items() if k.startswith("clip.") and k[5:] not in _CLIP_META}
    rest = {k: v for k, v in sd.items() if not k.startswith("clip.")}
    name = detect_head(rest)
    cfg = ModelConfig(arch=arch or infer_clip_arch(clip_sd), quick_gelu=True, video_encoder="meanpool",
                      max_frames=num_frames)
    model = build_model(cfg)
    dim = model.embed_dim
    head = build_head(head_spec(rest, name, dim, max_words))
    attach_head(model, head)
    ours = dict(clip_sd)
    for k, v in rest.items():
        ours["head." + ("temporal." + k if _TEMPORAL.match(k) else k)] = v
    _load_strict(model, ours, f"{name} checkpoint")
    return model, cfg


def to_original_layout(model) -> dict:
    """Inverse of `import_retrieval_checkpoint`: a CLIPViP (meanpool) + head → the original keys."""
    out = {}
    for k, v in model.state_dict().items():
        if k.startswith("head."):
            k = k[len("head."):]
            out[k[len("temporal."):] if k.startswith("temporal.") else k] = v
        else:
            out["clip." + k] = v
    return out

"""Retrieval heads of the CLIP4Clip family on token-level features (docs/evaluation.md, "Heads").

    meanp      CLIP4Clip meanP (parameter-free)          vip.model.heads.clip4clip
    seqtransf  CLIP4Clip seqTransf                        vip.model.heads.clip4clip
    xclip      X-CLIP multi-grained + AOSM                vip.model.heads.xclip
    drl        DRL weighted token interaction + CDCR      vip.model.heads.drl

A head scores text features (sentence, words + mask) against video features (frames + mask);
`build_head` makes one from its `spec` (what an export records). `attach_head(model, head)`
makes it the model's ``head`` submodule, so it trains, checkpoints and exports with the model.
"""
from __future__ import annotations

from vip.model.heads.base import RetrievalHead, TemporalTransformer, masked_mean
from vip.model.heads.clip4clip import MeanPHead, SeqTransfHead
from vip.model.heads.drl import DRLHead
from vip.model.heads.xclip import XCLIPHead

HEADS = {"meanp": MeanPHead, "seqtransf": SeqTransfHead, "xclip": XCLIPHead, "drl": DRLHead}

__all__ = ["HEADS", "RetrievalHead", "MeanPHead", "SeqTransfHead", "XCLIPHead", "DRLHead", "TemporalTransformer",
           "masked_mean", "build_head", "make_head", "attach_head"]


def build_head(spec: dict) -> RetrievalHead:
    """A head from its spec ({"name": …, constructor arguments…})."""
    spec = dict(spec)
    name = spec.pop("name", None)
    if name not in HEADS:
        raise ValueError(f"unknown head {name!r}: one of {sorted(HEADS)}")
    return HEADS[name](**spec)


def default_cdcr_alpha1(model) -> float:
    """DRL scripts' α1 by backbone: 0.11 for patch-16 ViTs (ViT-B/16), 0.14 otherwise (ViT-B/32)."""
    patch = model.visual.patch_size
    return 0.11 if (patch[0] if isinstance(patch, (tuple, list)) else patch) == 16 else 0.14


def make_head(name: str, model, *, context_length: int, num_frames: int, layers: int = 4, temporal: bool = True,
              mask_padding: bool = False, length_weights: bool = True, temperature: float = 0.01,
              cdcr_alpha1: float | None = None, cdcr_alpha2: float = 0.0) -> RetrievalHead:
    """A new head for a CLIPViP, initialised as the originals do: the temporal transformer from the
    model's text tower (first `layers` blocks, position table) when the widths match; X-CLIP's
    matrices identity; DRL's token-weight MLPs N(0, 0.02). context_length (the texts' token count)
    is recorded so evaluation tokenises as training did."""
    D = model.embed_dim
    text_heads = model.transformer.resblocks[0].attn.num_heads
    heads = text_heads if model.transformer.width == D else None
    pos = model.context_length
    common = {"context_length": context_length}
    if name == "meanp":
        head = MeanPHead(**common)
    elif name == "seqtransf":
        head = SeqTransfHead(D, layers, heads, pos, **common)
    elif name == "xclip":
        head = XCLIPHead(D, context_length, num_frames, temperature, temporal, layers, heads, pos, mask_padding,
                         length_weights, **common)
    elif name == "drl":
        alpha1 = default_cdcr_alpha1(model) if cdcr_alpha1 is None else cdcr_alpha1
        head = DRLHead(D, temporal, layers, heads, pos, mask_padding, alpha1, cdcr_alpha2, **common)
    else:
        raise ValueError(f"unknown head {name!r}: one of {sorted(HEADS)}")
    temporal_module = getattr(head, "temporal", None)
    if temporal_module is not None:
        temporal_module.init_from_text(model.transformer, model.positional_embedding)
    return head


def attach_head(model, head: RetrievalHead | None):
    """Make `head` the model's ``head`` submodule (its parameters train, checkpoint and export as ``head.*``)."""
    model.head = head
    return model

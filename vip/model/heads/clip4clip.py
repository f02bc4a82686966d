"""CLIP4Clip's parameter-free and sequential similarity heads (ArrowLuo/CLIP4Clip, `_loose_similarity`).

* `MeanPHead` (meanP): sentence = the text's EOS feature; video = mean over the valid frames of the
  L2-normalised frame features, normalised again; similarity = cosine.
* `SeqTransfHead` (seqTransf): the frame features first go through the temporal transformer
  (`TemporalTransformer`: frame positions, 4 CLIP blocks initialised from the text tower, padded
  frames masked as keys, residual), then meanP.
"""
from __future__ import annotations

from torch import Tensor

from vip.model.heads.base import RetrievalHead, TemporalTransformer, l2n, masked_mean


class MeanPHead(RetrievalHead):
    """CLIP4Clip meanP: cos(sentence, normalise(masked mean of normalised frames))."""

    name = "meanp"

    def __init__(self, **spec):
        super().__init__(**spec)


class SeqTransfHead(RetrievalHead):
    """CLIP4Clip seqTransf: temporal transformer on the frames, then meanP."""

    name = "seqtransf"

    def __init__(self, dim: int, layers: int = 4, heads: int | None = None, max_positions: int = 77, **spec):
        super().__init__(dim=dim, layers=layers, heads=heads, max_positions=max_positions, **spec)
        self.temporal = TemporalTransformer(dim, layers, heads, max_positions)

    def prepare_video(self, frames: Tensor, frame_mask: Tensor) -> dict:
        x = self.temporal(frames, frame_mask)                                  # [Bv, T, D]
        return {"video": l2n(masked_mean(l2n(x), frame_mask))}

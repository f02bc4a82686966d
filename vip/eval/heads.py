"""The retrieval heads moved to `vip.model.heads` (training uses them too); re-exported here."""
from vip.model.heads import HEADS, DRLHead, MeanPHead, RetrievalHead, SeqTransfHead, XCLIPHead, masked_mean

__all__ = ["HEADS", "DRLHead", "MeanPHead", "RetrievalHead", "SeqTransfHead", "XCLIPHead", "masked_mean"]

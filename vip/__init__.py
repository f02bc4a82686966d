"""vip: CLIP-ViP post-pretraining on video-text corpora at cluster scale."""
__version__ = "0.1.0"


def load(path, **kw):
    """Load an exported CLIP-ViP model (safetensors + config JSON) as a VideoTextModel:
    encode_video(paths | arrays | tensors), encode_text(list[str]), similarity(videos, texts)."""
    from vip.inference import load as _load
    return _load(path, **kw)

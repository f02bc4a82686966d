"""vip: CLIP-ViP post-pretraining on video-text corpora at cluster scale."""
__version__ = "0.1.0"


def load(path):
    """Load an exported CLIP-ViP model (safetensors + config JSON) for inference."""
    from vip.model.convert import load as _load
    return _load(path)

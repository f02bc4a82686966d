"""Captioning: a Ray job that captions each clip's middle frame into caption sidecars (DESIGN.md §7).

captioners (interface, open_clip CoCa, HuggingFace image-to-text) · frames (chunks of a shard →
decoded JPEGs) · job (driver, actors, summary) · __main__ (`python -m captioning`) · tiny (random
test models, frame-only shards). Docs: docs/captioning.md.
"""

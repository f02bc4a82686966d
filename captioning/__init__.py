"""Captioning: a Ray job that captions each clip's middle frame into caption sidecars
(docs/architecture.md, "Captioning"; docs/captioning.md).

captioners (interface, open_clip CoCa, HuggingFace image-to-text) · frames (chunks of a shard →
decoded JPEGs) · job (driver, actors, summary; `run` is the body of `vip caption`) · config
(`CaptionConfig`) · tiny (random test models, frame-only shards). Docs: docs/captioning.md.
"""

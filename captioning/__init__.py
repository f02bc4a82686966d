"""Captioning: a Ray job that captions each clip's middle frame (DESIGN.md §7)."""

"""Evaluation: retrieval on annotation jsonl + a video folder (`vip eval`), retrieval heads."""

"""Parameter groups and the learning-rate schedule."""
from __future__ import annotations

import math

import torch

from vip.config import OptimConfig

# names (substrings) of parameters that take no weight decay besides biases and 1-D params
NO_DECAY_NAMES = ("logit_scale", "positional_embedding", "position_embedding", "class_embedding",
                  "token_embedding", "temporal_embedding", "proxies", "proxy", "added_cls", "frame_position")


def param_groups(model: torch.nn.Module, optim: OptimConfig) -> list[dict]:
    """AdamW groups: weight decay on weight matrices only; none on biases, norms, embeddings,
    proxies, logit_scale (everything 1-D or named in NO_DECAY_NAMES)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2 or name.endswith(".bias") or any(k in name for k in NO_DECAY_NAMES):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": optim.weight_decay, "name": "decay"},
            {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]


def lr_lambda(step: int, total: int, optim: OptimConfig) -> float:
    """Multiplier of the peak lr: linear warmup over warmup_ratio·total steps, then cosine to min_lr_ratio."""
    warmup = max(1, int(round(optim.warmup_ratio * total)))
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return optim.min_lr_ratio + (1 - optim.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

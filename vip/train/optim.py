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
    proxies, logit_scale (everything 1-D or named in NO_DECAY_NAMES). A model may carry
    ``param_lr = {name prefix: lr}`` (fine-tuning a retrieval head: ``{"head.": 1e-4}``, as the
    originals train their heads faster than CLIP): those parameters get groups of their own at
    that peak lr (the schedule scales every group alike)."""
    special = dict(getattr(model, "param_lr", None) or {})
    groups: dict[tuple, list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        nd = p.ndim < 2 or name.endswith(".bias") or any(k in name for k in NO_DECAY_NAMES)
        prefix = next((k for k in special if name.startswith(k)), None)
        groups.setdefault((nd, prefix), []).append(p)
    out = [{"params": groups.get((False, None), []), "weight_decay": optim.weight_decay, "name": "decay"},
           {"params": groups.get((True, None), []), "weight_decay": 0.0, "name": "no_decay"}]
    for prefix, lr in special.items():
        for nd in (False, True):
            if groups.get((nd, prefix)):
                out.append({"params": groups[(nd, prefix)], "weight_decay": 0.0 if nd else optim.weight_decay,
                            "lr": lr, "name": f"{prefix}{'no_decay' if nd else 'decay'}"})
    return out


def lr_lambda(step: int, total: int, optim: OptimConfig) -> float:
    """Multiplier of the peak lr: linear warmup over warmup_ratio·total steps, then cosine to min_lr_ratio."""
    warmup = max(1, int(round(optim.warmup_ratio * total)))
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return optim.min_lr_ratio + (1 - optim.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

"""The DeepSpeed config, derived from the project config (never written by hand)."""
from __future__ import annotations

import torch

from vip.config import DataConfig, OptimConfig, TrainConfig


def resolve_precision(precision: str, device_type: str) -> str:
    """auto → bf16 on GPUs that support it, fp32 otherwise (CPU)."""
    if precision != "auto":
        return precision
    if device_type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


def grad_accumulation(train: TrainConfig, data: DataConfig, world: int) -> int:
    per_step = data.batch_size * world
    if train.global_batch % per_step:
        raise ValueError(f"train.global_batch={train.global_batch} is not a multiple of "
                         f"data.batch_size × world = {data.batch_size} × {world}")
    return train.global_batch // per_step


def make_ds_config(train: TrainConfig, optim: OptimConfig, data: DataConfig, world: int, device_type: str) -> dict:
    """ds_config dict: batch sizes, precision, ZeRO, clipping, AdamW (torch impl on CPU)."""
    precision = resolve_precision(train.precision, device_type)
    cfg = {
        "train_batch_size": train.global_batch,
        "train_micro_batch_size_per_gpu": data.batch_size,
        "gradient_accumulation_steps": grad_accumulation(train, data, world),
        "gradient_clipping": optim.grad_clip,
        "zero_optimization": {"stage": train.zero_stage},
        "optimizer": {"type": "AdamW", "params": {
            "lr": optim.lr, "betas": list(optim.betas), "eps": optim.eps, "weight_decay": optim.weight_decay,
            # the fused CPU Adam needs a ~50 s C++ compile; torch's AdamW is exact and fine on CPU
            "torch_adam": device_type != "cuda", "adam_w_mode": True}},
        "steps_per_print": 10 ** 9,       # we log ourselves
        "wall_clock_breakdown": False,
    }
    if precision == "bf16":
        cfg["bf16"] = {"enabled": True}
    elif precision == "fp16":
        cfg["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16}
    elif precision != "fp32":
        raise ValueError(f"train.precision must be auto|bf16|fp16|fp32, got {precision!r}")
    return cfg


def promote_scalar_params(model: torch.nn.Module) -> list[str]:
    """DeepSpeed's parameter broadcast, ZeRO flattening and gradient clipping break on 0-dim
    parameters (CLIP's logit_scale): hold them as [1] while training. Broadcasting keeps every
    use the same; export squeezes them back (the saved names and shapes do not change)."""
    promoted = []
    for mod_name, mod in model.named_modules():
        for name, p in list(mod.named_parameters(recurse=False)):
            if p.ndim == 0:
                setattr(mod, name, torch.nn.Parameter(p.detach().reshape(1), requires_grad=p.requires_grad))
                promoted.append(f"{mod_name}.{name}" if mod_name else name)
    return promoted


def scalar_state_dict(model: torch.nn.Module, promoted: list[str]) -> dict:
    """The model's state dict with promoted parameters squeezed back to 0-dim."""
    return {k: (v.reshape(()) if k in promoted else v) for k, v in model.state_dict().items()}

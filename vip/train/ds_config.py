"""The DeepSpeed config, derived from the project config (never written by hand)."""
from __future__ import annotations

from vip.config import OptimConfig, TrainConfig


def grad_accumulation(global_batch: int, micro_batch: int, world: int) -> int:
    """Micro-batches per optimiser step: global = micro × accumulation × world."""
    per_step = micro_batch * world
    if global_batch % per_step:
        raise ValueError(f"train.global_batch={global_batch} is not a multiple of "
                         f"data.batch_size × world = {micro_batch} × {world}")
    return global_batch // per_step


def make_ds_config(train: TrainConfig, optim: OptimConfig, micro_batch: int, world: int, precision: str,
                   device_type: str, load_universal: bool = False) -> dict:
    """ds_config dict: batch sizes, precision (resolved: bf16|fp16|fp32), ZeRO stage, clipping,
    AdamW (torch's implementation on CPU). `load_universal`: the engine loads DeepSpeed universal
    checkpoints (an elastic resume of a ZeRO 1-3 run on another number of ranks)."""
    cfg = {
        "train_batch_size": train.global_batch,
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accumulation(train.global_batch, micro_batch, world),
        "gradient_clipping": optim.grad_clip,
        "zero_optimization": {"stage": train.zero_stage},
        "optimizer": {"type": "AdamW", "params": {
            "lr": optim.lr, "betas": list(optim.betas), "eps": optim.eps, "weight_decay": optim.weight_decay,
            # optim.adam=auto: the fused kernel on GPUs; on CPUs torch's AdamW (exact, no ~50 s compile)
            "torch_adam": optim.adam == "torch" or (optim.adam == "auto" and device_type != "cuda"),
            "adam_w_mode": True}},
        "steps_per_print": 10 ** 9,       # we log ourselves
        "wall_clock_breakdown": False,
    }
    if load_universal:
        cfg["checkpoint"] = {"load_universal": True}
    if precision == "bf16":
        cfg["bf16"] = {"enabled": True}
    elif precision == "fp16":
        cfg["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16}
    elif precision != "fp32":
        raise ValueError(f"precision must be resolved to bf16|fp16|fp32, got {precision!r}")
    return cfg

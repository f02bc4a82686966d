"""The one training engine: a DeepSpeed engine built from the config, one `train_step`, exports.

Pretraining, fine-tuning and `bench/train_step.py` all build their engine with `build_engine`
and advance it with `train_step`, so what the benchmark times is what training runs. The
0-dim parameter workaround (CLIP's `logit_scale`) lives here alone: promoted to [1] while
DeepSpeed holds the model, squeezed back in every export.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from vip.config import ModelConfig, OptimConfig, TrainConfig
from vip.model.clipvip import LOGIT_SCALE_MAX
from vip.train.distributed import same_batch_size
from vip.train.runtime import Runtime

log = logging.getLogger(__name__)

# (module, batch) → (loss, {term name: value}); see vip.train.objectives
Objective = Callable[[torch.nn.Module, dict], "tuple[torch.Tensor, dict]"]


# --------------------------------------------------------------------------- 0-dim parameters
def promote_scalar_params(model: torch.nn.Module) -> list[str]:
    """DeepSpeed's parameter broadcast, ZeRO flattening and gradient clipping break on 0-dim
    parameters: hold them as [1] while training (broadcasting keeps every use the same)."""
    promoted = []
    for mod_name, mod in model.named_modules():
        for name, p in list(mod.named_parameters(recurse=False)):
            if p.ndim == 0:
                setattr(mod, name, torch.nn.Parameter(p.detach().reshape(1), requires_grad=p.requires_grad))
                promoted.append(f"{mod_name}.{name}" if mod_name else name)
    return promoted


def restore_scalar_shapes(state: dict, reference: dict) -> dict:
    """A training state dict with the reference model's shapes back (promoted [1] → 0-dim)."""
    return {k: (v.reshape(reference[k].shape) if k in reference and v.shape != reference[k].shape
                and v.numel() == reference[k].numel() else v) for k, v in state.items()}


def export_state(state: dict, model_cfg: ModelConfig, out: str | Path, head_spec: dict | None = None) -> Path:
    """A (DeepSpeed or module) state dict → a `vip.load`-able folder (safetensors + config; with
    `head_spec`, the retrieval head it describes too: vip.model.heads)."""
    from vip.model import build_model
    from vip.model.convert import export
    model = build_model(model_cfg)
    if head_spec:
        from vip.model.heads import attach_head, build_head
        attach_head(model, build_head(head_spec))
    model.load_state_dict(restore_scalar_shapes(state, model.state_dict()), strict=True)
    return export(model, model_cfg, out)


def export_checkpoint(run: str | Path, out: str | Path | None = None, tag: str | None = None) -> Path:
    """`vip export`: a run's DeepSpeed checkpoint (any ZeRO stage) → safetensors + config JSON."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from vip.config import config_from_file
    from vip.train.checkpoint import CheckpointManager
    run = Path(run)
    ckpt_dir = run / "checkpoints"
    manager = CheckpointManager(run, 0, 0, 1)
    if tag is None:
        tag = manager.newest_verified()          # damaged checkpoints are logged and skipped
    elif problems := manager.verify(tag):
        raise ValueError(f"checkpoint {tag} under {ckpt_dir} does not verify: {problems} "
                         f"(`vip checkpoints verify {run}` lists every checkpoint's state)")
    if tag is None:
        raise FileNotFoundError(f"no complete checkpoint that verifies under {ckpt_dir}")
    cfg = config_from_file(ckpt_dir / tag / "config.yaml")
    state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)
    out = export_state(state, cfg.model, Path(out) if out else run / "export")
    log.info("exported %s/%s → %s", ckpt_dir, tag, out)
    return out


# --------------------------------------------------------------------------- engine
@dataclass
class Engine:
    """A DeepSpeed engine plus what the step needs around it."""

    ds: object                              # deepspeed.DeepSpeedEngine
    scheduler: object                       # torch LambdaLR (stepped by DeepSpeed)
    rt: Runtime
    train: TrainConfig
    promoted: list[str]
    # micro_batches: trained micro-batches of the whole run (DeepSpeed's micro_steps restarts at 0 on resume)
    counters: dict = field(default_factory=lambda: {"nonfinite_skipped": 0, "short_batch_skipped": 0,
                                                    "micro_batches": 0})
    nonfinite_run: int = 0

    @property
    def module(self) -> torch.nn.Module:
        return self.ds.module

    @property
    def global_steps(self) -> int:
        return self.ds.global_steps

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def logit_scale(self) -> float:
        """The scale the losses use: exp of the (clamped) parameter."""
        return self.module.logit_scale.detach().float().clamp(0, LOGIT_SCALE_MAX).exp().item()

    def clamp_logit_scale(self) -> None:
        """Clamp the parameter itself to [0, ln 200] after an optimiser step, as CLIP and open_clip
        do (clamping only in the forward would leave it stuck where its gradient is 0). Under
        ZeRO the optimiser's fp32 master copy is clamped too, or the next step would undo it."""
        from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param
        p = getattr(self.module, "logit_scale", None)
        if p is None:
            return
        with torch.no_grad():
            # the module's copy is the same on every rank and, rounding included, out of range whenever
            # the master is: only then touch the master (a collective). ZeRO-3 holds no local copy.
            if p.numel() and not bool(((p < 0) | (p > LOGIT_SCALE_MAX)).any()):
                return
            master = safe_get_full_fp32_param(p)
            if master is not None and ((master < 0) | (master > LOGIT_SCALE_MAX)).any():
                safe_set_full_fp32_param(p, master.clamp(0, LOGIT_SCALE_MAX))
            p.clamp_(0, LOGIT_SCALE_MAX)

    def export(self, model_cfg: ModelConfig, out: str | Path) -> Path | None:
        """The weights as a `vip.load`-able folder written by rank 0 (export_state restores the
        0-dim shapes); other ranks return None. Every rank calls it: under ZeRO-3 each rank holds
        a slice of every weight, and the ranks gather them together first."""
        if self.ds.zero_optimization_partition_weights():
            import deepspeed
            with deepspeed.zero.GatheredParameters(list(self.module.parameters()), modifier_rank=None):
                state = ({k: v.detach().clone() for k, v in self.module.state_dict().items()}
                         if self.rt.is_main else None)
        else:
            state = self.module.state_dict() if self.rt.is_main else None
        head = getattr(self.module, "head", None)
        spec = head.spec if head is not None else None
        return export_state(state, model_cfg, out, spec) if state is not None else None


def build_engine(model: torch.nn.Module, rt: Runtime, train: TrainConfig, optim: OptimConfig, micro_batch: int,
                 total_steps: int, load_universal: bool = False) -> Engine:
    """Wrap `model` in DeepSpeed: ds_config derived from the config, AdamW param groups, warmup +
    cosine over `total_steps` optimiser steps. `load_universal`: it will load a checkpoint written
    by another number of ranks (vip.train.checkpoint, elastic resume)."""
    import deepspeed

    from vip.train.ds_config import make_ds_config
    from vip.train.optim import lr_lambda, param_groups
    promoted = promote_scalar_params(model)
    ds_config = make_ds_config(train, optim, micro_batch, rt.world, rt.precision, rt.device.type, load_universal)
    ds, _, _, scheduler = deepspeed.initialize(
        model=model, model_parameters=param_groups(model, optim), config=ds_config,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_lambda(s, total_steps, optim)))
    if rt.is_main:
        log.info("engine: world %d, device %s, %s, micro-batch %d, grad accumulation %d, global batch %d, "
                 "ZeRO %d", rt.world, rt.device.type, rt.precision, micro_batch,
                 ds_config["gradient_accumulation_steps"], train.global_batch, train.zero_stage)
    return Engine(ds=ds, scheduler=scheduler, rt=rt, train=train, promoted=promoted)


# --------------------------------------------------------------------------- the step
@dataclass
class StepResult:
    status: str                             # ok | short_batch | nonfinite
    loss: torch.Tensor | None = None        # detached; .item() only when logging (no sync per step)
    terms: dict = field(default_factory=dict)
    boundary: bool = False                  # an optimiser step happened (end of gradient accumulation)

    @property
    def skipped(self) -> bool:
        return self.status != "ok"


def batch_size(batch: dict) -> int:
    return len(batch["key"]) if "key" in batch else len(next(iter(batch.values())))


def train_step(engine: Engine, batch: dict, objective: Objective) -> StepResult:
    """One micro-batch: loss, backward, optimiser step at accumulation boundaries.

    A micro-batch is skipped (and counted) on every rank when any rank holds a different number
    of samples (bad samples dropped by the reader), or when the loss is not finite; with
    train.on_nonfinite=stop, or after train.max_nonfinite consecutive non-finite losses, it
    raises FloatingPointError instead."""
    ds, tc, counters = engine.ds, engine.train, engine.counters
    step = ds.global_steps
    if not same_batch_size(batch_size(batch), engine.rt.device):
        counters["short_batch_skipped"] += 1
        log.warning("step %d: ranks hold batches of different sizes (bad samples); micro-batch skipped", step)
        return StepResult("short_batch")
    loss, terms = objective(ds, batch)
    if not torch.isfinite(loss):
        counters["nonfinite_skipped"] += 1
        engine.nonfinite_run += 1
        log.error("step %d: non-finite loss %s; batch keys %s", step, loss.item(), batch.get("key"))
        if tc.on_nonfinite == "stop":
            raise FloatingPointError(f"non-finite loss at step {step}")
        if engine.nonfinite_run >= tc.max_nonfinite:
            raise FloatingPointError(f"{engine.nonfinite_run} consecutive non-finite losses (last at step {step})")
        return StepResult("nonfinite")
    engine.nonfinite_run = 0
    counters["micro_batches"] += 1
    ds.backward(loss)
    with torch.no_grad():     # gloo's all_gather_into_tensor writes into split views: no autograd here
        ds.step()
    boundary = ds.global_steps != step
    if boundary:
        engine.clamp_logit_scale()
    return StepResult("ok", loss.detach(), terms, boundary)

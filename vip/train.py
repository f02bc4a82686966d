"""`vip pretrain`: CLIP-ViP post-pretraining with DeepSpeed.

One config → model, DeepSpeed engine (ds_config derived from it), streaming
reader, checkpoints with exact resume, logs. Run it through
`launch/pretrain.sh` (deepspeed launcher) or `torchrun`; a plain `python -m
vip.train` runs one process.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

from vip.checkpoint import CheckpointManager
from vip.ds_config import promote_scalar_params, scalar_state_dict
from vip.config import Config, save_config
from vip.metrics import MetricsLog, Throughput

log = logging.getLogger("vip.train")


# --------------------------------------------------------------------------- distributed setup
def init_distributed() -> tuple[int, int, torch.device]:
    """Join the process group the launcher set up (gloo on CPU, nccl on GPUs)."""
    import deepspeed
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if "MASTER_ADDR" not in os.environ:  # a bare `python -m vip.train`: one local process
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", "29511"),
                          RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    cuda = torch.cuda.is_available()
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    return rank, world, device


class Preemption:
    """SIGTERM/SIGINT set a flag; ranks agree on it at step boundaries, checkpoint, and exit."""

    def __init__(self):
        self.requested = False
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame):
        if not self.requested:
            log.warning("signal %d: will checkpoint and stop at the next step boundary", signum)
        self.requested = True

    def agreed(self, device) -> bool:
        flag = torch.tensor([1.0 if self.requested else 0.0], device=device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def _same_batch_size(n: int, device) -> bool:
    """True when every rank holds n samples (a short batch anywhere → skip it everywhere)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return True
    t = torch.tensor([n, -n], device=device, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t[0]) == n and int(-t[1]) == n


# --------------------------------------------------------------------------- the step
def compute_loss(model, batch: dict, variant: str, device, dtype) -> tuple[torch.Tensor, dict]:
    """Encode, gather across ranks (gradients flow back to the local slice), OCL loss."""
    from vip.distributed import gather_features
    from vip.losses import ocl_loss
    out = model(video=batch["video"].to(device, dtype, non_blocking=True),
                frame=batch["frame"].to(device, dtype, non_blocking=True),
                subtitle=batch["subtitle"].to(device, non_blocking=True),
                caption=batch["caption"].to(device, non_blocking=True))
    has_caption = batch["has_caption"].to(device)
    feats = {k: gather_features(out[k]) for k in ("video", "frame", "subtitle", "caption")}
    has_caption = gather_features(has_caption)
    return ocl_loss(variant, video=feats["video"], frame=feats["frame"], subtitle=feats["subtitle"],
                    caption=feats["caption"], has_caption=has_caption, logit_scale=out["logit_scale"])


# --------------------------------------------------------------------------- main
def pretrain(cfg: Config) -> int:
    """Run (or resume) pretraining; a failure on any rank is logged with the rank and step."""
    state = {"rank": os.environ.get("RANK", "0"), "step": 0}
    try:
        return _pretrain(cfg, state)
    except Exception as e:
        log.error("rank %s failed at step %s: %s: %s\n%s", state["rank"], state["step"], type(e).__name__, e,
                  traceback.format_exc())
        sys.stderr.flush()
        raise


def _pretrain(cfg: Config, report: dict) -> int:
    import deepspeed

    from shards.reader import StreamLoader
    from vip.ds_config import make_ds_config, resolve_precision
    from vip.model import build_model
    from vip.optim import lr_lambda, param_groups

    rank, world, device = init_distributed()
    report["rank"] = rank
    tc = cfg.train
    out = Path(tc.out)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
    torch.manual_seed(tc.seed)
    precision = resolve_precision(tc.precision, device.type)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)

    model = build_model(cfg.model)
    if tc.init_from:
        from vip.model.convert import load_weights_into
        load_weights_into(model, tc.init_from)
    promoted = promote_scalar_params(model)
    ds_config = make_ds_config(tc, cfg.optim, cfg.data, world, device.type)
    engine, _, _, scheduler = deepspeed.initialize(
        model=model, model_parameters=param_groups(model, cfg.optim), config=ds_config,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_lambda(s, tc.steps, cfg.optim)))
    # batches arrive on the device, pixels normalised there in the compute dtype (workers send uint8)
    loader = StreamLoader(cfg.data, rank=rank, world=world, pin_memory=device.type == "cuda", device=device,
                          dtype=dtype)
    ckpt = CheckpointManager(out, tc.keep_last, rank, world)
    metrics = MetricsLog(out, enabled=rank == 0, tensorboard=tc.tensorboard)
    counters = {"nonfinite_skipped": 0, "short_batch_skipped": 0}
    nonfinite_run = 0

    tag = ckpt.latest() if tc.resume == "auto" else (None if tc.resume == "none" else Path(tc.resume).name)
    if tag:
        client = ckpt.load(engine, tag)
        loader.load_state_dict(client["rank_state"]["data"])
        counters.update(client.get("counters", {}))
        log.info("rank %d resumed from %s at step %d (data position %s)", rank, tag, engine.global_steps,
                 loader.position)
    if rank == 0:
        log.info("world %d, device %s, precision %s, micro-batch %d, grad accumulation %d, global batch %d",
                 world, device.type, precision, cfg.data.batch_size, ds_config["gradient_accumulation_steps"],
                 tc.global_batch)

    keys_log = None
    if tc.log_keys:
        (out / "keys").mkdir(parents=True, exist_ok=True)
        keys_log = open(out / "keys" / f"rank{rank}.jsonl", "a")
    preempt = Preemption()
    meter = Throughput()
    step = engine.global_steps
    last_saved = step if tag else -1
    data_iter = iter(loader)
    engine.train()

    def save():
        nonlocal last_saved
        state = {"step": engine.global_steps, "counters": counters, "config": dataclasses.asdict(cfg),
                 "rank_state": {"data": loader.state_dict()}}
        ckpt.save(engine, engine.global_steps, state, cfg)
        last_saved = engine.global_steps

    try:
        while engine.global_steps < tc.steps:
            t_wait = time.perf_counter()
            batch = next(data_iter)
            wait = time.perf_counter() - t_wait
            step = report["step"] = engine.global_steps
            if tc.fault_step is not None and step == tc.fault_step and rank == tc.fault_rank:
                raise RuntimeError(f"injected fault (train.fault_step={tc.fault_step})")
            if not _same_batch_size(len(batch["key"]), device):
                counters["short_batch_skipped"] += 1
                log.warning("step %d: ranks hold batches of different sizes (bad samples); micro-batch skipped", step)
                continue
            loss, terms = compute_loss(engine, batch, cfg.loss.variant, device, dtype)
            if not torch.isfinite(loss):
                counters["nonfinite_skipped"] += 1
                nonfinite_run += 1
                log.error("step %d: non-finite loss %s; batch keys %s", step, loss.item(), batch["key"])
                if tc.on_nonfinite == "stop":
                    raise FloatingPointError(f"non-finite loss at step {step}")
                if nonfinite_run >= tc.max_nonfinite:
                    raise FloatingPointError(f"{nonfinite_run} consecutive non-finite losses (last at step {step})")
                continue
            nonfinite_run = 0
            engine.backward(loss)
            with torch.no_grad():  # gloo's all_gather_into_tensor writes into split views: no autograd here
                engine.step()
            boundary = engine.global_steps != step   # an optimizer step happened (accumulation boundary)
            meter.update(len(batch["key"]) * world, wait)
            if keys_log is not None:
                keys_log.write(json.dumps({"step": step, "micro": engine.micro_steps, "keys": batch["key"]}) + "\n")
                keys_log.flush()
            if not boundary:
                continue
            step = engine.global_steps
            if rank == 0 and (step % tc.log_every == 0 or step == tc.steps):
                rate = meter.read(world)
                scale = engine.module.logit_scale.detach().float().exp().item()
                rec = {"loss": loss.item(), **{f"loss_{k}": float(v) for k, v in terms.items()},
                       "lr": scheduler.get_last_lr()[0], "logit_scale": scale, **rate,
                       "epoch": loader.epoch, **counters}
                metrics.write(step, "train", rec)
                log.info("step %d/%d loss %.4f lr %.2e scale %.1f | %.1f samples/s (%.1f/gpu) data wait %.0f%%",
                         step, tc.steps, rec["loss"], rec["lr"], scale, rate["samples_per_s"],
                         rate["samples_per_s_per_gpu"], 100 * rate["data_wait_share"])
                meter.reset()
            if tc.eval_shards and tc.eval_every and step % tc.eval_every == 0 and step < tc.steps:
                _evaluate(engine.module, cfg, rank, world, device, dtype, metrics, step)
            if tc.save_every and step % tc.save_every == 0:
                save()
            if preempt.agreed(device):
                if last_saved != engine.global_steps:
                    save()
                log.warning("rank %d: stopped by signal after checkpoint %d", rank, engine.global_steps)
                return 143
        if last_saved != engine.global_steps:
            save()
        if tc.eval_shards:
            _evaluate(engine.module, cfg, rank, world, device, dtype, metrics, engine.global_steps)
        if rank == 0:
            from vip.model import build_model as _build
            from vip.model.convert import export
            final = _build(cfg.model)
            final.load_state_dict(scalar_state_dict(engine.module, promoted), strict=True)
            export(final, cfg.model, out / "final")
            log.info("done: %d steps; counters %s; read problems %s; final weights in %s",
                     engine.global_steps, counters, dict(loader.events), out / "final")
        return 0
    finally:
        data_iter.close()   # stops the DataLoader workers now rather than at interpreter exit
        if keys_log is not None:
            keys_log.close()
        metrics.close()


def _evaluate(model, cfg: Config, rank, world, device, dtype, metrics: MetricsLog, step: int) -> dict:
    from vip.zeroshot import zero_shot_retrieval
    res = zero_shot_retrieval(model, dataclasses.replace(cfg.data, shards=cfg.train.eval_shards, captions=None),
                              rank, world, device, dtype, cfg.train.eval_max_clips)
    if rank == 0:
        metrics.write(step, "eval", res)
        log.info("step %d zero-shot (%d clips): t2v R@1 %.1f R@5 %.1f R@10 %.1f | v2t R@1 %.1f", step,
                 res["clips"], res["t2v_R@1"], res["t2v_R@5"], res["t2v_R@10"], res["v2t_R@1"])
    return res


def launcher_main(run, prog: str, argv=None) -> int:
    """Entry for `python -m …` under a launcher: `--config P k=v …` (DeepSpeed adds --local_rank),
    rank-aware logging, `run(cfg)`, then a clean process-group shutdown."""
    import argparse
    from vip.config import load_config
    p = argparse.ArgumentParser(prog=prog)
    p.add_argument("--config", "-c", default="default")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    rank = os.environ.get("RANK", "0")
    logging.basicConfig(level=logging.INFO if rank == "0" else logging.WARNING,
                        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    rc = run(load_config(args.config, args.overrides))
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()   # a clean gloo shutdown: no teardown timeouts at exit
    return rc


def exit_now(code: int) -> None:
    """Flush and leave without the interpreter's final garbage collection: with torch, deepspeed
    and transformers loaded it takes ~10 s per rank, and everything is already written and closed."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main(argv=None) -> int:
    return launcher_main(pretrain, "vip pretrain", argv)


if __name__ == "__main__":
    exit_now(main())

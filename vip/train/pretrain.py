"""`vip pretrain`: CLIP-ViP post-pretraining with DeepSpeed.

One config → model, engine (vip.train.engine), streaming reader, checkpoints with exact resume,
logs. Run it through `launch/pretrain.sh` (deepspeed launcher) or `torchrun -m vip.train`; a
plain `python -m vip.train` runs one process.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import torch

from vip.config import Config, ConfigError, save_config
from vip.train.launcher import Preemption, failure_report, launcher_main
from vip.train.runtime import seed_everything

log = logging.getLogger("vip.train")


def preflight(cfg: Config) -> None:
    """Refuse, before any engine is built, a run that cannot do what its config says."""
    from shards.captions import count_sidecars
    if cfg.model.fusion is not None and not cfg.data.audio:
        raise ConfigError("model.fusion (Everything at Once) trains on the clips' audio: set data.audio=true "
                          "(shards built with build.audio=true)")
    if cfg.model.fusion is None and cfg.loss.variant != "vs" and count_sidecars(cfg.data.shards, cfg.data.captions) == 0:
        raise ConfigError(f"loss.variant={cfg.loss.variant} trains on captions, but no caption sidecars were "
                         f"found for {cfg.data.shards} (data.captions={cfg.data.captions}): run `vip caption` "
                         "first, or use loss.variant=vs")


def pretrain(cfg: Config) -> int:
    """Run (or resume) pretraining; a failure on any rank is logged with the rank and step."""
    from vip.train.runtime import init_runtime
    preflight(cfg)
    rt = init_runtime(precision=cfg.train.precision, training=True)
    with failure_report({"rank": rt.rank, "step": 0}) as where:
        return _pretrain(cfg, rt, where)


def _pretrain(cfg: Config, rt, where: dict) -> int:
    from shards.reader import StreamLoader
    from vip.model import build_model
    from vip.train.checkpoint import CheckpointManager, rng_state
    from vip.train.engine import build_engine, train_step
    from vip.train.logs import TrainLog
    from vip.train.objectives import PretrainObjective

    tc, out = cfg.train, Path(cfg.train.out)
    if rt.is_main:
        save_config(cfg, out / "config.yaml")
    seed_everything(tc.seed, rt.rank)
    torch.manual_seed(tc.seed)   # model init: the same on every rank (DeepSpeed also broadcasts it)
    model = build_model(cfg.model)
    if tc.init_from:
        from vip.model.convert import load_weights_into
        load_weights_into(model, tc.init_from)
    ckpt = CheckpointManager(out, tc.keep_last, rt.rank, rt.world)
    tag = ckpt.select(tc.resume)     # before the engine: a checkpoint of another world size loads differently
    elastic = tag is not None and ckpt.saved_world(tag) not in (None, rt.world)
    engine = build_engine(model, rt, tc, cfg.optim, cfg.data.batch_size, tc.steps,
                          load_universal=elastic and tc.zero_stage > 0)
    # batches arrive on the device, pixels normalised there in the compute dtype (workers send uint8)
    loader = StreamLoader(cfg.data, rank=rt.rank, world=rt.world, pin_memory=rt.device.type == "cuda",
                          device=rt.device, dtype=rt.dtype)
    ckpt.restore(engine, loader, tag)
    resumed_rng = rng_state() if tag else None     # restoring the RNG is the last thing resume does
    logs = TrainLog(out, rt.rank, rt.world, tc.log_every, tc.steps, tc.tensorboard, tc.log_keys)
    objective, preempt, data = PretrainObjective(cfg.loss.variant, rt), Preemption(), iter(loader)
    if cfg.model.fusion is not None:   # Everything at Once on shards with audio (docs/fusion.md)
        from vip.train.fusion_objective import FusionObjective
        objective = FusionObjective(cfg.loss, rt)
    saved = engine.global_steps if tag else -1

    def save():
        nonlocal saved
        ckpt.save(engine, loader, cfg)
        saved = engine.global_steps

    try:
        first = start_stream(data, resumed_rng, tc.seed, rt.rank) if engine.global_steps < tc.steps else None
        while engine.global_steps < tc.steps:
            (batch, wait), first = first or _timed_next(data), None
            step = where["step"] = engine.global_steps
            if cfg.debug.fault_step == step and rt.rank == cfg.debug.fault_rank:
                raise RuntimeError(f"injected fault (debug.fault_step={step})")
            res = train_step(engine, batch, objective)
            if res.skipped:
                continue
            logs.micro(step, engine.counters["micro_batches"], batch["key"], wait)
            if not res.boundary:
                continue
            step = engine.global_steps
            logs.step(step, res.loss, res.terms, {"lr": engine.lr(), "logit_scale": engine.logit_scale(),
                                                  "epoch": loader.epoch, **engine.counters})
            if tc.eval_shards and tc.eval_every and step % tc.eval_every == 0 and step < tc.steps:
                evaluate(engine.module, cfg, rt, logs.metrics, step)
            if tc.save_every and step % tc.save_every == 0:
                save()
            if preempt.agreed(rt.device):
                if saved != step:
                    save()
                log.warning("rank %d: stopped by signal after checkpoint %d", rt.rank, step)
                return 143
        if saved != engine.global_steps:
            save()
        if tc.eval_shards:
            evaluate(engine.module, cfg, rt, logs.metrics, engine.global_steps)
        engine.export(cfg.model, out / "final")      # every rank: ZeRO-3 gathers the weights first
        if rt.is_main:
            log.info("done: %d steps; counters %s; read problems %s; storage %s; final weights in %s",
                     engine.global_steps, engine.counters, dict(loader.events), dict(loader.io) or "local",
                     out / "final")
        return 0
    finally:
        data.close()   # stops the DataLoader workers now rather than at interpreter exit
        logs.close()


def start_stream(data, resumed_rng: dict | None, seed: int, rank: int) -> tuple:
    """Exact RNG from the first step on, whatever setup drew: start the DataLoader (its iterator
    draws the workers' base seed from the torch RNG: seeded just before, so it depends on (seed,
    rank) only), then give the step the saved RNG states (resume) or a fresh seed. Returns the
    first (batch, data wait)."""
    from vip.train.checkpoint import set_rng_state
    seed_everything(seed, rank)
    first = _timed_next(data)
    if resumed_rng is not None:
        set_rng_state(resumed_rng)
    else:
        seed_everything(seed, rank)
    return first


def _timed_next(it) -> tuple:
    """(next item of `it`, seconds spent waiting for it)."""
    t0 = time.perf_counter()
    item = next(it)
    return item, time.perf_counter() - t0


def evaluate(model, cfg: Config, rt, metrics, step: int) -> dict:
    """Zero-shot retrieval on train.eval_shards (subtitles as queries), written as an eval record."""
    from vip.eval.retrieval import evaluate_shards
    data = dataclasses.replace(cfg.data, shards=cfg.train.eval_shards, captions=None)
    res = evaluate_shards(model, data, rt, cfg.train.eval_max_clips)
    if rt.is_main:
        metrics.write(step, "eval", res)
        log.info("step %d zero-shot (%d clips): t2v R@1 %.1f R@5 %.1f R@10 %.1f | v2t R@1 %.1f", step,
                 res["clips"], res["t2v_R@1"], res["t2v_R@5"], res["t2v_R@10"], res["v2t_R@1"])
    return res


def main(argv=None) -> int:
    return launcher_main(pretrain, "vip pretrain", argv)

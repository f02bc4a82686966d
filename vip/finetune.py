"""`vip finetune`: downstream text↔video retrieval fine-tuning with DeepSpeed.

Each step samples one caption per video and T frames with training jitter;
the loss is the symmetric InfoNCE over features gathered across ranks. After
every epoch the model is evaluated on the validation split (vip.eval) and the
best epoch (validation t2v R@1, then R@5) is exported to `<out>/best`.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from shards.reader import normalise
from shards.video import decode_frames, sample_indices
from vip.config import Config, EvalConfig, FinetuneConfig, OptimConfig, TrainConfig, save_config

log = logging.getLogger("vip.finetune")


class TrainVideos(Dataset):
    """(video [T, 3, H, W], caption) with one caption and frame jitter drawn per (seed, epoch, item)."""

    def __init__(self, cfg: FinetuneConfig, size: int):
        from vip.eval.videos import index_folder, read_annotations
        items = read_annotations(cfg.annotations, cfg.paragraph)
        files = index_folder(cfg.videos)
        missing = [it.clip_id for it in items if it.clip_id not in files]
        if missing:
            log.warning("%d training videos missing (skipped): %s", len(missing), missing[:5])
        self.items = [it for it in items if it.clip_id in files]
        self.files, self.cfg, self.size, self.epoch = files, cfg, size, 0

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        from vip.eval.videos import count_frames
        it = self.items[i]
        rng = np.random.default_rng([self.cfg.seed, self.epoch, i])
        data = self.files[it.clip_id].read_bytes()
        idx = sample_indices(count_frames(data), self.cfg.num_frames, True, rng)
        frames = decode_frames(data, idx, self.size, self.cfg.resize)
        return normalise(frames), it.texts[int(rng.integers(len(it.texts)))]


def _collate(samples):
    return torch.stack([v for v, _ in samples]), [t for _, t in samples]       # [B, T, 3, H, W], B texts


def finetune(cfg: Config) -> int:
    import deepspeed

    from vip.distributed import gather_features
    from vip.ds_config import make_ds_config
    from vip.eval.retrieval_eval import evaluate, image_size, tokenizer_for
    from vip.losses import clip_loss
    from vip.metrics import MetricsLog
    from vip.model import build_model
    from vip.model.convert import export, load_weights_into, read_model_config
    from vip.optim import lr_lambda, param_groups
    from vip.ds_config import promote_scalar_params, scalar_state_dict
    from vip.train import init_distributed

    fc = cfg.finetune
    rank, world, device = init_distributed()
    out = Path(fc.out)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
    torch.manual_seed(fc.seed)
    model_cfg = dataclasses.replace(read_model_config(fc.init_from), pretrained=None)
    model = build_model(model_cfg)
    load_weights_into(model, fc.init_from)
    size = image_size(model)
    tokenize = tokenizer_for(model_cfg.arch, fc.context_length)
    data = TrainVideos(fc, size)
    sampler = torch.utils.data.distributed.DistributedSampler(data, world, rank, shuffle=True, seed=fc.seed,
                                                              drop_last=True)
    loader = DataLoader(data, batch_size=fc.batch_size, sampler=sampler, num_workers=fc.num_workers,
                        collate_fn=_collate, drop_last=True)
    steps_per_epoch = len(loader) * fc.batch_size * world // fc.global_batch
    if steps_per_epoch == 0:
        raise ValueError(f"{len(data)} training videos are fewer than one global batch ({fc.global_batch})")
    total = steps_per_epoch * fc.epochs
    optim = OptimConfig(lr=fc.lr, weight_decay=fc.weight_decay, warmup_ratio=fc.warmup_ratio)
    train_cfg = TrainConfig(global_batch=fc.global_batch, precision=fc.precision, zero_stage=1)
    ds = make_ds_config(train_cfg, optim, dataclasses.replace(cfg.data, batch_size=fc.batch_size), world,
                        device.type)
    promoted = promote_scalar_params(model)
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=param_groups(model, optim), config=ds,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_lambda(s, total, optim)))
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(
        "bf16" if "bf16" in ds else "fp16" if "fp16" in ds else "fp32", torch.float32)
    val = EvalConfig(annotations=fc.val_annotations, videos=fc.val_videos or fc.videos,
                     num_frames=fc.num_frames, resize=fc.resize, paragraph=fc.paragraph, batch_size=fc.batch_size)
    metrics = MetricsLog(out, enabled=rank == 0, tensorboard=False)
    best, best_key = None, (-1.0, -1.0)
    for epoch in range(fc.epochs):
        sampler.set_epoch(epoch)
        data.epoch = epoch
        engine.train()
        losses = []
        for video, texts in loader:
            o = engine(video=video.to(device, dtype), subtitle=tokenize(texts).to(device))
            v, t = gather_features(o["video"]), gather_features(o["subtitle"])   # [B·world, D]
            loss = clip_loss(v, t, o["logit_scale"].float().exp())
            engine.backward(loss)
            with torch.no_grad():
                engine.step()
            losses.append(loss.item())
        engine.eval()
        res = evaluate(engine.module, val, tokenize, device, name=f"epoch {epoch + 1}", progress=rank == 0)
        m = res["metrics"]
        if rank == 0:
            metrics.write(engine.global_steps, "finetune", {"epoch": epoch + 1, "loss": float(np.mean(losses)),
                                                            **{f"val_{k}": val_ for k, val_ in m.items()}})
            log.info("epoch %d/%d loss %.4f | val t2v R@1 %.1f R@5 %.1f R@10 %.1f | v2t R@1 %.1f", epoch + 1,
                     fc.epochs, float(np.mean(losses)), m["t2v_R@1"], m["t2v_R@5"], m["t2v_R@10"], m["v2t_R@1"])
        key = (m["t2v_R@1"], m["t2v_R@5"])
        if key > best_key:  # same on every rank: the metrics come from gathered features
            best_key, best = key, epoch + 1
            if rank == 0:
                final = build_model(model_cfg)
                final.load_state_dict(scalar_state_dict(engine.module, promoted), strict=True)
                export(final, model_cfg, out / "best")
                (out / "best" / "selection.json").write_text(json.dumps(
                    {"epoch": best, "val_metrics": m, "criterion": "val t2v R@1, then R@5"}, indent=2))
    if rank == 0:
        log.info("best epoch %d (val t2v R@1 %.1f) exported to %s", best, best_key[0], out / "best")
    metrics.close()
    return 0


def main(argv=None) -> int:
    from vip.train import launcher_main
    return launcher_main(finetune, "vip finetune", argv)


if __name__ == "__main__":
    from vip.train import exit_now
    exit_now(main())

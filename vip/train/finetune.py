"""`vip finetune`: downstream text↔video retrieval fine-tuning with DeepSpeed.

Each step samples one caption per video and T frames with training jitter;
the loss is the symmetric InfoNCE over features gathered across ranks
(vip.train.objectives), stepped by the same engine as pretraining
(vip.train.engine). With `finetune.head=meanp|seqtransf|xclip|drl` a retrieval head
(vip.model.heads) scores token-level features instead; it trains at `finetune.head_lr`, is
evaluated with, and is exported inside the model (docs/evaluation.md, "Retrieval heads").
After every epoch the model is evaluated on the validation split (vip.eval) and the best epoch (validation t2v R@1, then R@5) is exported
to `<train.out>/best`. Optimiser, batch sizes, precision and seed come from the
shared optim / train / data sections (preset `finetune`).
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from shards.atomic import write_json
from shards.reader import normalise
from shards.video import decode_frames, sample_indices
from vip.config import Config, ConfigError, EvalConfig, FinetuneConfig, save_config
from vip.train.launcher import failure_report, launcher_main
from vip.train.runtime import seed_everything

log = logging.getLogger("vip.train.finetune")


class TrainVideos(Dataset):
    """(video [T, 3, H, W], caption) with one caption and frame jitter drawn per (seed, epoch, item)."""

    def __init__(self, cfg: FinetuneConfig, size: int, seed: int):
        from vip.eval.videos import index_folder, read_annotations
        items = read_annotations(cfg.annotations, cfg.paragraph)
        files = index_folder(cfg.videos)
        missing = [it.clip_id for it in items if it.clip_id not in files]
        if missing:
            log.warning("%d training videos missing (skipped): %s", len(missing), missing[:5])
        self.items = [it for it in items if it.clip_id in files]
        self.files, self.cfg, self.size, self.seed, self.epoch = files, cfg, size, seed, 0

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        from vip.eval.videos import count_frames
        it = self.items[i]
        rng = np.random.default_rng([self.seed, self.epoch, i])
        data = self.files[it.clip_id].read_bytes()
        idx = sample_indices(count_frames(data), self.cfg.num_frames, True, rng)
        frames = decode_frames(data, idx, self.size, self.cfg.resize)
        return it.clip_id, normalise(frames), it.texts[int(rng.integers(len(it.texts)))]


class Collate:
    """Samples → {"key": [B], "video": [B, T, 3, H, W], "text": [B, L] token ids}."""

    def __init__(self, tokenize):
        self.tokenize = tokenize

    def __call__(self, samples):
        return {"key": [k for k, _, _ in samples], "video": torch.stack([v for _, v, _ in samples]),
                "text": self.tokenize([t for _, _, t in samples])}


def finetune(cfg: Config) -> int:
    from vip.train.runtime import init_runtime
    rt = init_runtime(precision=cfg.train.precision, training=True)
    with failure_report({"rank": rt.rank, "step": 0}) as where:
        return _finetune(cfg, rt, where)


def _finetune(cfg: Config, rt, where: dict) -> int:
    from vip.eval.retrieval import evaluate
    from vip.model.archs import image_size, tokenizer_for
    from vip.model.convert import build_exported, load_weights_into, read_model_config
    from vip.train.engine import build_engine, train_step
    from vip.train.logs import MetricsLog
    from vip.train.objectives import RetrievalObjective

    fc, tc = cfg.finetune, cfg.train
    out = Path(tc.out)
    if rt.is_main:
        save_config(cfg, out / "config.yaml")
    seed_everything(tc.seed, rt.rank)   # random, numpy, torch: the same run twice gives the same result
    torch.manual_seed(tc.seed)          # model init: the same on every rank
    if not tc.init_from:
        raise ConfigError("vip finetune needs the exported model to start from: set train.init_from=DIR")
    eao = fc.method == "eao"   # Everything at Once (vip/train/fusion_objective.py, docs/fusion.md)
    fusion = {}
    if eao and read_model_config(tc.init_from).fusion is None:      # a CLIP-ViP export gains the fusion parts
        from vip.config import FusionConfig
        fusion = {"fusion": cfg.model.fusion or FusionConfig()}
    model, model_cfg = build_exported(tc.init_from, **fusion)       # an export's head (if any) comes with it
    load_weights_into(model, tc.init_from)
    setup_head(model, fc)
    tokenize = tokenizer_for(model_cfg.arch, fc.context_length)
    data = TrainVideos(fc, image_size(model), tc.seed)
    collate = Collate(tokenize)
    if eao:
        from vip.train.fusion_objective import AudioClips, AudioCollate
        data, collate = AudioClips(data, cfg.data), AudioCollate(tokenize)
    micro = cfg.data.batch_size
    sampler = torch.utils.data.distributed.DistributedSampler(data, rt.world, rt.rank, shuffle=True, seed=tc.seed,
                                                              drop_last=True)
    loader = DataLoader(data, batch_size=micro, sampler=sampler, num_workers=fc.num_workers,
                        collate_fn=collate, drop_last=True)
    steps_per_epoch = len(loader) * micro * rt.world // tc.global_batch
    if steps_per_epoch == 0:
        raise ValueError(f"{len(data)} training videos are fewer than one global batch ({tc.global_batch})")
    engine = build_engine(model, rt, tc, cfg.optim, micro, steps_per_epoch * fc.epochs)
    objective = RetrievalObjective(rt, head=fc.head != "none",
                                   regulariser_weight=fc.cdcr_lambda if fc.head == "drl" else 0.0)
    if eao:
        from vip.train.fusion_objective import FusionObjective
        objective = FusionObjective(cfg.loss, rt)
    sel = "t2va" if eao else "t2v"                                     # model selection metric
    val = EvalConfig(annotations=fc.val_annotations, videos=fc.val_videos or fc.videos,
                     num_frames=fc.num_frames, resize=fc.resize, paragraph=fc.paragraph, batch_size=micro)
    metrics = MetricsLog(out, enabled=rt.is_main, tensorboard=False)
    best, best_key = None, (-1.0, -1.0)
    for epoch in range(fc.epochs):
        sampler.set_epoch(epoch)
        (data.videos if eao else data).epoch = epoch
        engine.ds.train()
        losses = []
        for batch in loader:
            where["step"] = engine.global_steps
            res = train_step(engine, batch, objective)
            if not res.skipped:
                losses.append(res.loss)
        engine.ds.eval()
        loss = float(torch.stack(losses).mean()) if losses else float("nan")
        if eao:
            from vip.eval.fusion import evaluate_fusion
            res = evaluate_fusion(engine.module, val, tokenize, rt, cfg.data, name=f"epoch {epoch + 1}")
        else:
            res = evaluate(engine.module, val, tokenize, rt, name=f"epoch {epoch + 1}", progress=rt.is_main)
        m = res["metrics"]
        if rt.is_main:
            metrics.write(engine.global_steps, "finetune", {"epoch": epoch + 1, "loss": loss, **engine.counters,
                                                            **{f"val_{k}": v for k, v in m.items()}})
            log.info("epoch %d/%d loss %.4f | val t2v R@1 %.1f R@5 %.1f R@10 %.1f | v2t R@1 %.1f%s", epoch + 1,
                     fc.epochs, loss, m["t2v_R@1"], m["t2v_R@5"], m["t2v_R@10"], m["v2t_R@1"],
                     f" | t2a R@1 {m['t2a_R@1']:.1f} | t2va R@1 {m['t2va_R@1']:.1f}" if eao else "")
        key = (m[f"{sel}_R@1"], m[f"{sel}_R@5"])
        if key > best_key:  # same on every rank: the metrics come from gathered features
            best_key, best = key, epoch + 1
            engine.export(model_cfg, out / "best")    # every rank: ZeRO-3 gathers the weights first
            if rt.is_main:
                write_json(out / "best" / "selection.json",
                           {"epoch": best, "val_metrics": m, "criterion": f"val {sel} R@1, then R@5"}, indent=2)
    if rt.is_main:
        log.info("best epoch %d (val %s R@1 %.1f) exported to %s", best, sel, best_key[0], out / "best")
    metrics.close()
    return 0


def setup_head(model, fc: FinetuneConfig) -> None:
    """Give the model the head `fc.head` asks for (kept when the starting export already has it,
    new otherwise, initialised as the originals do) and its learning rate; none: no head."""
    from vip.model.heads import attach_head, make_head
    have = getattr(model, "head", None)
    if fc.head == "none":
        if have is not None:
            log.warning("finetune.head=none: the %s head of train.init_from is dropped", have.spec["name"])
            attach_head(model, None)
        return
    if have is not None and have.spec["name"] != fc.head:
        raise ConfigError(f"train.init_from carries a {have.spec['name']} head; finetune.head={fc.head} "
                          f"(set finetune.head={have.spec['name']}, or start from a model without a head)")
    if have is not None and have.spec.get("context_length", fc.context_length) != fc.context_length:
        raise ConfigError(f"the {fc.head} head of train.init_from was trained on {have.spec['context_length']}-token "
                          f"texts: set finetune.context_length={have.spec['context_length']}")
    if have is None:
        attach_head(model, make_head(fc.head, model, context_length=fc.context_length, num_frames=fc.num_frames,
                                     layers=fc.head_layers, temporal=fc.head_temporal,
                                     mask_padding=fc.head_mask_padding, length_weights=fc.xclip_length_weights,
                                     temperature=fc.xclip_temperature, cdcr_alpha1=fc.cdcr_alpha1,
                                     cdcr_alpha2=fc.cdcr_alpha2))
    model.param_lr = {"head.": fc.head_lr}
    n = sum(p.numel() for p in model.head.parameters())
    log.info("head %s: %d parameters at lr %g (backbone at optim.lr)", fc.head, n, fc.head_lr)


def main(argv=None) -> int:
    return launcher_main(finetune, "vip finetune", argv, default_preset="finetune")


if __name__ == "__main__":
    from vip.train.launcher import exit_now
    exit_now(main())

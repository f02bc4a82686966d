"""The `vip` command: one config (preset + dotted overrides) → subcommands.

    vip data synth   [--config tiny] [synth.num_videos=4 …]
    vip shards build [--config tiny] [build.workers=8 …]
    vip shards read  [--config tiny] [data.batch_size=4 …]   (stream a few batches, print throughput)
    vip demo         [--config demo]
    vip pretrain     [--config tiny] [train.steps=100 …]      (one process; launch/pretrain.sh for many)
    vip finetune     [--config finetune] train.init_from=DIR finetune.annotations=A.jsonl finetune.videos=DIR …
    vip caption      [--config tiny] [caption.model=… …]      (Ray job; launch/caption.sh submits `python -m vip caption`)
    vip captioner train [--config demo] [captioner.steps=… …] (train the small synthetic-frame BLIP captioner; print its accuracy)
    vip plot         runs/pretrain/metrics.jsonl              (PNG curves)
    vip export       runs/pretrain [--out DIR]                (checkpoint → safetensors for vip.load)
    vip checkpoints verify runs/pretrain                      (each checkpoint's state: ok / incomplete / bad)
    vip eval         eval.model=DIR (or eval.open_clip=CKPT) eval.annotations=A.jsonl eval.videos=DIR [eval.k=v …]
    vip embed        eval.model=DIR (eval.videos=DIR | eval.shards=DIR) eval.out=emb.parquet   (embeddings → parquet)
    vip analyze domain-gap analyze.model=DIR analyze.corpora=[a=A.jsonl,b=B.txt] [analyze.pairs=[a:b]]  (NMI table)
    vip config       [--config tiny] [k=v …]                  (print the resolved config)
"""
from __future__ import annotations

import argparse
import json
import logging
import sys

from vip.config import ConfigError, load_config, to_dict

log = logging.getLogger("vip")


def _setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def cmd_config(cfg, args) -> int:
    import yaml
    print(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return 0


def cmd_synth(cfg, args) -> int:
    from shards.synth import make_corpus
    summary = make_corpus(cfg.synth)
    print(json.dumps(summary))
    return 0


def cmd_build(cfg, args) -> int:
    from shards.build import build_shards
    summary = build_shards(cfg.build)
    print(summary.table())
    return 0 if summary.shards_failed == 0 else 1


def cmd_read(cfg, args) -> int:
    from shards.reader import stream_report
    print(stream_report(cfg.data, num_batches=args.batches))
    return 0


def cmd_pretrain(cfg, args) -> int:
    from vip.train.pretrain import pretrain
    return pretrain(cfg)


def cmd_finetune(cfg, args) -> int:
    from vip.train.finetune import finetune
    return finetune(cfg)


def cmd_plot(cfg, args) -> int:
    from vip.plot import plot_metrics
    print(plot_metrics(args.metrics, args.out))
    return 0


def cmd_export(cfg, args) -> int:
    from vip.train.engine import export_checkpoint
    print(export_checkpoint(args.run, args.out, tag=args.tag))
    return 0


def cmd_checkpoints_verify(cfg, args) -> int:
    from vip.train.verify import format_table, verify_run
    rows, rc = verify_run(args.run)
    print(format_table(rows) if rows else f"no checkpoints under {args.run}")
    return rc


def cmd_caption(cfg, args) -> int:
    from captioning.job import run
    return run(cfg.caption, fault_exit_chunk=cfg.debug.caption_fault_exit_chunk)


def cmd_captioner_train(cfg, args) -> int:
    from captioning.trainer import accuracy_table, train_captioner
    rec = train_captioner(cfg.captioner, cfg.caption)
    print(accuracy_table(rec))
    print(f"saved to {cfg.captioner.out} (caption.captioner=hf caption.model={cfg.captioner.out}) in {rec['seconds']:.0f}s")
    return 0


def cmd_demo(cfg, args) -> int:
    from vip.demo import run_demo
    return run_demo(cfg)


def cmd_eval(cfg, args) -> int:
    from vip.eval.retrieval import run_eval
    run_eval(cfg.eval, audio=cfg.data)   # data.audio_*: soundtracks of a fusion model (docs/fusion.md)
    return 0


def cmd_embed(cfg, args) -> int:
    from vip.inference import run_embed
    summary = run_embed(cfg.eval)
    if summary:
        print(summary)
    return 0


def cmd_domain_gap(cfg, args) -> int:
    from vip.eval.domain_gap import run_domain_gap
    return run_domain_gap(cfg.analyze)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vip", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="group", required=True)

    def add(parser_group, name, fn, help_):
        sp = parser_group.add_parser(name, help=help_)
        sp.add_argument("--config", "-c", default="default", help="preset name (vip/configs) or YAML path")
        sp.add_argument("overrides", nargs="*", help="dotted overrides: section.field=value")
        sp.set_defaults(fn=fn)
        return sp

    data = sub.add_parser("data", help="synthetic data").add_subparsers(dest="cmd", required=True)
    add(data, "synth", cmd_synth, "write the synthetic HD-VILA-style corpus")
    sh = sub.add_parser("shards", help="build and read shards").add_subparsers(dest="cmd", required=True)
    add(sh, "build", cmd_build, "cut, re-encode and pack clips into webdataset shards")
    rd = add(sh, "read", cmd_read, "stream batches from shards and report throughput")
    rd.add_argument("--batches", type=int, default=10)
    add(sub, "pretrain", cmd_pretrain, "post-pretrain (one process; use launch/pretrain.sh for many)")
    ft = add(sub, "finetune", cmd_finetune, "downstream retrieval fine-tuning (python -m vip.train.finetune under a launcher)")
    ft.set_defaults(default_preset="finetune")
    pl = sub.add_parser("plot", help="metrics.jsonl → PNG curves")
    pl.add_argument("metrics")
    pl.add_argument("--out", default=None)
    pl.set_defaults(fn=cmd_plot, config="default", overrides=[])
    ex = sub.add_parser("export", help="a training run's checkpoint → safetensors + config for vip.load()")
    ex.add_argument("run", help="the run folder (train.out)")
    ex.add_argument("--out", default=None, help="default: <run>/export")
    ex.add_argument("--tag", default=None, help="checkpoint tag (default: latest complete)")
    ex.set_defaults(fn=cmd_export, config="default", overrides=[])
    ck = sub.add_parser("checkpoints", help="training checkpoints").add_subparsers(dest="cmd", required=True)
    cv = ck.add_parser("verify", help="check every checkpoint's files against its COMPLETE list (exit 1: the "
                       "newest complete one does not verify)")
    cv.add_argument("run", help="the run folder (train.out)")
    cv.set_defaults(fn=cmd_checkpoints_verify, config="default", overrides=[])
    add(sub, "caption", cmd_caption, "caption every clip's middle frame into caption sidecars (Ray)")
    ct = sub.add_parser("captioner", help="the small synthetic-frame captioner").add_subparsers(dest="cmd", required=True)
    add(ct, "train", cmd_captioner_train, "train a small CoCa on synthetic image-description pairs; print caption "
        "accuracy on held-out frames").set_defaults(default_preset="demo")
    d = add(sub, "demo", cmd_demo, "the end-to-end demo on tiny synthetic data")
    d.set_defaults(default_preset="demo")
    add(sub, "eval", cmd_eval, "text↔video retrieval on annotation jsonl + a video folder (eval.* overrides)")
    add(sub, "embed", cmd_embed, "video embeddings of a folder or shard set → parquet (eval.* overrides)")
    an = sub.add_parser("analyze", help="analyses").add_subparsers(dest="cmd", required=True)
    add(an, "domain-gap", cmd_domain_gap, "K-means NMI between text corpora in a CLIP text tower (analyze.* overrides)")
    add(sub, "config", cmd_config, "print the resolved config")
    return p


_RENAMED = {"corpus": "corpora", "pair": "pairs", "field": "text_field"}   # old analyze flags


def _unknown(parser: argparse.ArgumentParser, args, extra: list[str]) -> None:
    """Exit 2 on arguments no parser knows; for a `--flag` naming a field of the command's
    config section (the old eval/embed/analyze flags), say which override to use instead."""
    import typing
    from vip.config import Config
    section = {"eval": "eval", "embed": "eval", "analyze": "analyze"}.get(args.group)
    fields = set(typing.get_type_hints(typing.get_type_hints(Config)[section])) if section else set()
    hints = []
    for a in extra:
        name = a.lstrip("-").split("=", 1)[0].replace("-", "_")
        name = _RENAMED.get(name, name) if section == "analyze" else name
        if a.startswith("--") and name in fields:
            hints.append(f"{a} → {section}.{name}=…")
    hint = f" (options are dotted overrides now: {'; '.join(hints)})" if hints else ""
    parser.error(f"unrecognized arguments: {' '.join(extra)}{hint}")


def main(argv=None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        _unknown(parser, args, extra)
    _setup_logging(args.verbose)
    preset = args.config
    if preset == "default" and getattr(args, "default_preset", None):
        preset = args.default_preset
    try:
        cfg = load_config(preset, args.overrides)
    except ConfigError as e:
        print(f"vip: config error: {e}", file=sys.stderr)
        return 2
    try:
        return args.fn(cfg, args)
    except ConfigError as e:                     # a required option missing (vip eval, embed, analyze)
        print(f"vip: config error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

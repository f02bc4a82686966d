"""`python -m captioning [--config PRESET] [caption.field=value | field=value …]`

Runs the captioning job (captioning.job) with the `caption` section of the
project config; bare `field=value` overrides mean `caption.field=value`. With
no `caption.ray_address` it joins $RAY_ADDRESS (set by `ray job submit`) or
starts a private local Ray on 127.0.0.1. Exit status 0 when no shard failed.
"""
from __future__ import annotations

import argparse
import logging
import sys

from vip.config import ConfigError, load_config


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m captioning", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", "-c", default="default", help="preset name (vip/configs) or YAML path")
    p.add_argument("-v", "--verbose", action="store_true")
    p.add_argument("overrides", nargs="*", help="caption.field=value (or field=value)")
    return p.parse_args(argv)


def run(cfg) -> int:
    """Run the job for a full project config; print the summary table."""
    from captioning.job import run_caption_job
    try:
        summary = run_caption_job(cfg.caption)
    except Exception as e:  # the captioner cannot load, too many actor deaths, no shards, …
        logging.getLogger("captioning").error("caption job failed: %s: %s", type(e).__name__, e)
        return 1
    print(summary.table(), flush=True)
    return 0 if summary.shards_failed == 0 else 1


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    overrides = [o if "." in o.split("=", 1)[0] else f"caption.{o}" for o in args.overrides]
    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as e:
        print(f"captioning: config error: {e}", file=sys.stderr)
        return 2
    return run(cfg)


if __name__ == "__main__":
    sys.exit(main())

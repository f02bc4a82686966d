"""Data-pipeline benchmark: reader clips/s per CPU core vs. its decode floor and the naive path.

For each stored format (frame rate, short side, keyframe interval, x264 fastdecode) and each
synthetic content (flat: one shape on a plain background; natural: the same over a panning
1/f-noise background with grain, which decodes and compresses like camera footage), shards are
built from 720p sources (1280×720, 30 fps, clips of 13.4 s, HD-VILA's mean) and these paths are
timed (bench/data_paths.py says what each does):

    floor ≤ decode_frames ≤ worker (a data-loading core's work per clip; the trainer's setting:
    the GPU normalises) ≤ loader (+ CLIP normalisation on the CPU) ≪ naive (720p source)

plus bytes per clip and the projected size of 100M clips, and optionally a 2-worker DataLoader.

Throughput is clips per CPU-second of the process(es) doing the work (user+sys, one codec
thread, OMP_NUM_THREADS=1): "clips/s per core", meaningful when other jobs share the machine.
"cores per 1,000 clips/s" = 1,000 / worker clips/s/core: multiply by a GPU's clips/s
(bench/train_step.py) for the data-loading cores one GPU needs (bench/scaling.py does).

    .venv/bin/python bench/data.py                      # full run: 6 formats × 2 contents, ~15 min on 2 cores
    .venv/bin/python bench/data.py --quick              # CI smoke: tiny sources, < 60 s
    .venv/bin/python bench/data.py --formats 4:224:4:fast --content natural --json out.json
    .venv/bin/python bench/data.py --shards /data/shards   # your own shards (real video): worker/floor rows
    .venv/bin/python bench/data.py --out bench/out/data # keep (and reuse) corpora and shards
    .venv/bin/python bench/data.py --remote moto --formats 4:224:4:fast:square --content natural
                                       # + remote vs local: the shards uploaded to moto's S3 server on 127.0.0.1
    .venv/bin/python bench/data.py --shards s3://bucket/shards   # an existing remote set vs a local copy of it

A format is FPS:SHORT_SIDE:KEYFRAME_INTERVAL[:fast][:square] (fast = x264 --tune fastdecode;
square = build.aspect=square, clips stored SHORT_SIDE² as the reader's squash resize would make them).
Data go to a temporary directory unless --out is given (bench/out/ is git-ignored).
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import md_table  # noqa: E402
from bench.data_paths import (HDVILA_MEAN_SECONDS, load_clips, measure_decode_frames,  # noqa: E402
                              measure_floor, measure_loader, measure_naive, measure_worker)

log = logging.getLogger("bench.data")

DEFAULT_FORMATS = "8:224:8,4:224:4,4:224:4:fast,4:224:4:fast:square,4:224:2:fast:square,8:256:32"
QUICK_FORMATS = "8:64:8"
CONTENTS = ("flat", "natural")
PER_CLIPS_PER_S = 1000.0          # "cores per 1,000 clips/s"


# --------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class Format:
    """A stored training format (the build options that change what the reader decodes)."""

    fps: float
    short_side: int
    keyframe_interval: int
    fast_decode: bool = False
    square: bool = False           # build.aspect=square: stored short_side² (the squash done at build time)

    @classmethod
    def parse(cls, text: str) -> "Format":
        parts = text.strip().split(":")
        flags = set(parts[3:])
        if len(parts) < 3 or not flags <= {"fast", "square"}:
            raise argparse.ArgumentTypeError(f"format {text!r}: expected FPS:SHORT:GOP[:fast][:square], e.g. 8:224:8")
        try:
            return cls(float(parts[0]), int(parts[1]), int(parts[2]), "fast" in flags, "square" in flags)
        except ValueError:
            raise argparse.ArgumentTypeError(f"format {text!r}: FPS, SHORT and GOP must be numbers") from None

    @property
    def label(self) -> str:
        s = f"{self.fps:g} fps · {self.short_side}{'²' if self.square else ''} · gop {self.keyframe_interval}"
        return s + " · fastdecode" if self.fast_decode else s

    @property
    def slug(self) -> str:
        return (f"fps{self.fps:g}_s{self.short_side}_g{self.keyframe_interval}" + ("_fast" if self.fast_decode else "")
                + ("_sq" if self.square else ""))


@dataclass(frozen=True)
class Settings:
    out: Path
    formats: tuple
    contents: tuple = CONTENTS
    shards: tuple = ()             # existing shard folders (or URLs) to measure instead of synthetic ones
    remote: str | None = None      # also read each shard set from object storage: "moto" | s3://… | gs://…
    width: int = 1280
    height: int = 720
    src_fps: int = 30
    videos: int = 3
    clips_per_video: int = 4
    clip_seconds: float = HDVILA_MEAN_SECONDS
    num_frames: int = 12
    image_size: int = 224
    batch_size: int = 8
    seconds: float = 8.0          # measuring time per (format, path)
    naive_seconds: float = 10.0
    workers: int = 2              # 2-worker DataLoader measurement (0: skip)
    build_workers: int = 2
    seed: int = 0
    audio: bool = False           # sources with soundtracks; + the worker with audio (m4a decode + log-mel)


def settings_from_args(args: argparse.Namespace, out: Path) -> Settings:
    formats = tuple(Format.parse(f) for f in (args.formats or (QUICK_FORMATS if args.quick else DEFAULT_FORMATS)).split(","))
    contents = tuple(c.strip() for c in (args.content or ("flat" if args.quick else ",".join(CONTENTS))).split(","))
    for c in contents:
        if c not in CONTENTS:
            raise SystemExit(f"--content: {c!r} is not one of {CONTENTS}")
    shards = tuple(p if "://" in p else Path(p) for p in args.shards.split(",")) if args.shards else ()
    if args.quick:
        s = Settings(out=out, formats=formats, contents=contents, width=320, height=180, videos=2,
                     clips_per_video=3, clip_seconds=2.0, image_size=64, seconds=2.0, naive_seconds=1.0, workers=0)
    else:
        s = Settings(out=out, formats=formats, contents=contents)
    kw = {k: getattr(args, k) for k in ("seconds", "workers", "videos", "clips_per_video", "clip_seconds",
                                         "batch_size", "image_size") if getattr(args, k) is not None}
    if "seconds" in kw:
        kw["naive_seconds"] = kw["seconds"]
    return dataclasses.replace(s, shards=shards, audio=args.audio, remote=args.remote, **kw)


# --------------------------------------------------------------------------- data
def build_corpus(s: Settings, content: str) -> Path:
    """720p synthetic sources under out/synth-<content> (one make_corpus per video, in parallel
    processes); reused when unchanged."""
    from concurrent.futures import ProcessPoolExecutor
    import multiprocessing as mp

    from vip.config import SynthConfig
    root = s.out / f"synth-{content}"
    cfgs = [SynthConfig(out=str(root / f"part{i}"), num_videos=1, clips_per_video=s.clips_per_video,
                        clip_seconds=s.clip_seconds, gap_seconds=0.5, width=s.width, height=s.height,
                        fps=s.src_fps, seed=s.seed + i, texture=content, audio=s.audio) for i in range(s.videos)]
    from shards import synth
    stamp = json.dumps({"corpus": [dataclasses.asdict(c) for c in cfgs],      # + the texture calibration
                        "texture": [synth.TEXTURE_SLOPE, synth.TEXTURE_CONTRAST, synth.TEXTURE_CHROMA,
                                    synth.GRAIN_SIGMA, synth.PAN_PIXELS_PER_SECOND]}, sort_keys=True)
    if (root / "corpus.json").exists() and (root / "corpus.json").read_text() == stamp:
        return root
    for d in [root, *s.out.glob(f"shards-{content}-*")]:
        shutil.rmtree(d, ignore_errors=True)
    from shards.synth import make_corpus
    with ProcessPoolExecutor(max_workers=s.build_workers, mp_context=mp.get_context("spawn")) as pool:
        list(pool.map(make_corpus, cfgs))
    (root / "videos").mkdir(parents=True, exist_ok=True)
    for name in ("metadata.jsonl", "subtitles.jsonl", "truth.jsonl"):
        (root / name).write_text("".join((Path(c.out) / name).read_text() for c in cfgs))
    for c in cfgs:
        for v in (Path(c.out) / "videos").glob("*.mp4"):
            v.replace(root / "videos" / v.name)
        shutil.rmtree(c.out)
    (root / "corpus.json").write_text(stamp)
    return root


def build_format(s: Settings, corpus: Path, content: str, fmt: Format) -> tuple[Path, float]:
    """Shards of one format under out/shards-<content>-<slug> (2 clips per shard); (dir, build seconds)."""
    from shards.build import build_shards
    from vip.config import ShardBuildConfig
    out = s.out / f"shards-{content}-{fmt.slug}"
    frame_side = 256 if s.image_size >= 224 else s.image_size
    cfg = ShardBuildConfig(metadata=str(corpus / "metadata.jsonl"), subtitles=str(corpus / "subtitles.jsonl"),
                           videos=str(corpus / "videos"), out=str(out), clips_per_shard=2,
                           fps=fmt.fps, short_side=fmt.short_side, keyframe_interval=fmt.keyframe_interval,
                           fast_decode=fmt.fast_decode, aspect="square" if fmt.square else "keep",
                           frame_short_side=frame_side, workers=s.build_workers)
    t0 = time.perf_counter()
    summary = build_shards(cfg)
    if summary.shards_failed or summary.skips.total:
        raise RuntimeError(f"shard build for {fmt.label} had problems:\n{summary.table()}")
    return out, time.perf_counter() - t0


def format_of(shard_dir: Path) -> str:
    """A label for existing shards: their build config's format, else their first clip's json."""
    from vip.config import ShardBuildConfig, config_from_file
    cfg_file = shard_dir / "build_config.yaml"
    if cfg_file.exists():
        b = config_from_file(cfg_file, ShardBuildConfig)
        return Format(b.fps, b.short_side, b.keyframe_interval, b.fast_decode, b.aspect == "square").label
    return str(shard_dir)


# --------------------------------------------------------------------------- run
def measure_format(s: Settings, shard_dir: Path) -> dict:
    clips, acct = load_clips(shard_dir)
    row = {"storage": acct, "floor": measure_floor(s, clips), "decode_frames": measure_decode_frames(s, clips),
           "worker": measure_worker(s, shard_dir), "loader": measure_loader(s, shard_dir, 0)}
    if s.workers:
        log.info("  %d-worker DataLoader", s.workers)
        row["dataloader"] = measure_loader(s, shard_dir, s.workers)
    if s.audio or any(c.meta.get("has_audio") for c in clips):   # the same worker, decoding the sound too
        row["worker_audio"] = measure_worker(s, shard_dir, audio=True)
        row["audio_cost_ratio"] = row["worker"]["per_core"] / row["worker_audio"]["per_core"]
    w = row["worker"]["per_core"]
    row["worker_over_floor"] = w / row["floor"]["per_core"]
    row["worker_over_loader"] = w / row["loader"]["per_core"]
    row["cores_per_1000_clips_per_s"] = PER_CLIPS_PER_S / w
    return row


def run(s: Settings) -> dict:
    from bench.data_remote import remote_target
    with remote_target(s.remote) as target:
        return _run(s, target)


def _with_remote(s: Settings, row: dict, shard_dir: Path, target: str | None, name: str) -> dict:
    """row + the remote vs local measurement of shard_dir, uploaded to target/name first."""
    if target:
        from bench.data_remote import measure_pair, upload
        url = f"{target}/{name}"
        log.info("  uploading to %s, then remote vs local", url)
        upload(shard_dir, url)
        row["remote"] = {**measure_pair(s, shard_dir, url), "moto": s.remote == "moto"}
    return row


def _run(s: Settings, target: str | None) -> dict:
    import torch
    torch.set_num_threads(1)
    t_start = time.perf_counter()
    load0 = os.getloadavg()
    rows, naive, corpus_s = [], {}, 0.0
    for shard_dir in s.shards:
        if isinstance(shard_dir, str):            # a remote set: compared with a local copy of it
            from bench.data_remote import local_copy_of, measure_pair
            log.info("given remote shards %s: downloading a local copy", shard_dir)
            local = local_copy_of(shard_dir)
            row = {"content": "given", "label": format_of(local), "shards": shard_dir, **measure_format(s, local)}
            row["remote"] = measure_pair(s, local, shard_dir)
            rows.append(row)
            shutil.rmtree(local, ignore_errors=True)
            continue
        if not any(shard_dir.glob("shard-*.tar")):
            raise SystemExit(f"--shards {shard_dir}: no shard-*.tar there")
        log.info("given shards %s", shard_dir)
        rows.append(_with_remote(s, {"content": "given", "label": format_of(shard_dir), "shards": str(shard_dir),
                                     **measure_format(s, shard_dir)}, shard_dir, target, shard_dir.name))
    for content in ([] if s.shards else s.contents):
        log.info("building the %dx%d %s synthetic corpus (%d videos × %d clips × %.1f s) in %s",
                 s.width, s.height, content, s.videos, s.clips_per_video, s.clip_seconds, s.out)
        t0 = time.perf_counter()
        corpus = build_corpus(s, content)
        corpus_s += time.perf_counter() - t0
        log.info("%s: the naive path (%dx%d decode of every span frame)", content, s.width, s.height)
        naive[content] = measure_naive(s, corpus)
        for fmt in s.formats:
            log.info("%s, %s: build, then floor, decode_frames, worker, loader", content, fmt.label)
            shard_dir, build_s = build_format(s, corpus, content, fmt)
            row = {"content": content, "format": dataclasses.asdict(fmt), "label": fmt.label,
                   "build_seconds": round(build_s, 2), **measure_format(s, shard_dir)}
            row["worker_over_naive"] = row["worker"]["per_core"] / naive[content]["per_core"]
            rows.append(_with_remote(s, row, shard_dir, target, f"shards-{content}-{fmt.slug}"))
    return {"settings": {k: (str(v) if isinstance(v, Path) else [str(x) for x in v] if k == "shards" else v)
                         for k, v in dataclasses.asdict(s).items()},
            "naive": naive, "formats": rows,
            "corpus_seconds": round(corpus_s, 2), "total_seconds": round(time.perf_counter() - t_start, 2),
            "loadavg_start": load0, "loadavg_end": os.getloadavg(), "cpu_count": os.cpu_count(),
            "torch": torch.__version__, "av": __import__("av").__version__}


# --------------------------------------------------------------------------- report
def _kb(b: float) -> str:
    return f"{b / 1e3:,.0f} KB" if b >= 1e4 else f"{b / 1e3:.1f} KB"


def storage_table(res: dict) -> str:
    head = ["content", "format (fps · short side · GOP)", "stored", "mp4 kbit/s", "bytes/clip (13.4 s)",
            "TB / 100M clips"]
    rows = []
    for r in res["formats"]:
        st = r["storage"]
        rows.append([r["content"], r["label"], f"{st['width']}×{st['height']}, {st['frames_per_clip']:.0f} fr",
                     f"{st['mp4_kbit_per_s']:.0f}", _kb(st["bytes_per_13.4s_clip"]), f"{st['tb_per_100m_clips']:.1f}"])
    return md_table(head, rows)


def speed_table(res: dict) -> str:
    workers = res["settings"]["workers"]
    head = ["content", "format", "floor", "decode_frames", "**worker** (GPU normalises)", "loader (CPU normalises)",
            "worker / floor", "worker / loader", "naive", "worker / naive",
            f"cores per {PER_CLIPS_PER_S:,.0f} clips/s"]
    if workers:
        head.append(f"{workers}-worker DataLoader clips/s/core (wall clips/s)")
    rows = []
    for r in res["formats"]:
        naive = res["naive"].get(r["content"])
        cells = [r["content"], r["label"], f"{r['floor']['per_core']:.1f}", f"{r['decode_frames']['per_core']:.1f}",
                 f"**{r['worker']['per_core']:.1f}**", f"{r['loader']['per_core']:.1f}",
                 f"{r['worker_over_floor']:.2f}", f"{r['worker_over_loader']:.2f}×",
                 f"{naive['per_core']:.2f}" if naive else "–",
                 f"{r['worker_over_naive']:.0f}×" if naive else "–", f"**{r['cores_per_1000_clips_per_s']:.1f}**"]
        if workers:
            d = r.get("dataloader")
            cells.append(f"{d['per_core']:.1f} ({d['wall_clips_per_s']:.1f})" if d else "–")
        rows.append(cells)
    out = md_table(head, rows)
    audio = [r for r in res["formats"] if "worker_audio" in r]
    if audio:   # audio decode cost: the worker with data.audio=true (m4a → 16 kHz → log-mel) vs without
        out += "\n\n" + md_table(
            ["content", "format", "m4a KB/clip", "worker clips/s/core", "worker + audio clips/s/core",
             "CPU per clip with audio / without"],
            [[r["content"], r["label"], f"{r['storage'].get('m4a_bytes_per_clip', 0) / 1e3:.1f}",
              f"{r['worker']['per_core']:.1f}", f"{r['worker_audio']['per_core']:.1f}",
              f"{r['audio_cost_ratio']:.2f}"] for r in audio])
    return out


def breakdown(res: dict) -> str:
    """Where a clip's CPU time goes, from the nested measurements (ms per clip per core)."""
    head = ["content", "format", "decode (floor)", "+ RGB convert & resize", "+ rest of the worker (tar, json, "
            "jpeg, tokenise, collate)", "= worker", "+ normalise on the CPU", "= loader"]
    rows = []
    for r in res["formats"]:
        f, d, w, lo = (1e3 / r[k]["per_core"] for k in ("floor", "decode_frames", "worker", "loader"))
        rows.append([r["content"], r["label"], f"{f:.1f}", f"{d - f:.1f}", f"{w - d:.1f}", f"**{w:.1f}**",
                     f"{lo - w:.1f}", f"{lo:.1f}"])
    return md_table(head, rows)


def notes(res: dict) -> str:
    s = res["settings"]
    cw = [r["worker"]["timing"]["cpu_over_wall"] for r in res["formats"]]
    floor_fr = ", ".join(f"{r['floor']['frames_decoded_per_clip']:.0f}" for r in res["formats"])
    out = [
        f"- T={s['num_frames']} frames at {s['image_size']}², batch {s['batch_size']}, training sampling "
        "(random jitter). clips/s/core = clips per CPU-second (user+sys), one codec thread, "
        "OMP_NUM_THREADS=1, median of 3 rounds; all paths in one process (num_workers=0).",
        f"- floor decodes {floor_fr} frames per clip (rows in order).",
        "- off-GOP-grid keyframes (source keyframes carried into stored clips): " +
        ", ".join(f"{r['storage']['clips_with_off_grid_keyframes']}/{r['storage']['clips']}" for r in res["formats"]),
        f"- TB / 100M clips: mp4 bytes scaled to {HDVILA_MEAN_SECONDS} s per clip + jpg + json + tar headers.",
        f"- load average at start/end: {res['loadavg_start'][0]:.1f} / {res['loadavg_end'][0]:.1f} on "
        f"{res['cpu_count']} cores; worker CPU/wall {min(cw):.2f}–{max(cw):.2f} (below ~0.9: other jobs shared "
        "the core; CPU-time rates stay valid). Data in the page cache (no storage I/O); "
        f"total {res['total_seconds']:.0f} s (corpora {res['corpus_seconds']:.0f} s).",
    ]
    for content, n in res["naive"].items():
        out.append(f"- naive ({content}): {s['width']}×{s['height']} {s['src_fps']} fps source, decodes "
                   f"{n['frames_decoded_per_clip']:.0f} frames per clip ({n['span_frames_per_clip']:.0f} in the span "
                   "+ pre-roll from the keyframe before it); converts only the picked frames (a generous naive path).")
    if "flat" in res["naive"]:
        out.append("- flat content (one shape on a plain background) is a best case for the decoder; natural "
                   "content (panning 1/f-noise background + grain) is closer to camera footage. Measure your own "
                   "shards with --shards for the real figure.")
    return "\n".join(out)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny smoke run (320×180, 2-s clips, 64², 1 format; < 60 s)")
    p.add_argument("--out", type=Path, default=None,
                   help="data folder (kept, corpora and shards reused when unchanged); default: a temp dir, deleted")
    p.add_argument("--formats", default=None,
                   help=f"comma-separated FPS:SHORT:GOP[:fast][:square] (default {DEFAULT_FORMATS}; --quick {QUICK_FORMATS})")
    p.add_argument("--content", default=None, help=f"comma-separated of {CONTENTS} (default: both; --quick: flat)")
    p.add_argument("--shards", default=None, help="comma-separated existing shard folders to measure (no synthesis); "
                   "an s3://, gs:// or http(s):// URL is measured against a local copy of it")
    p.add_argument("--remote", default=None, help="also read each shard set from object storage: 'moto' (an S3 "
                   "server started on 127.0.0.1) or an s3://…/gs://… prefix to upload to")
    p.add_argument("--json", type=Path, default=None, help="also write the results as JSON here")
    p.add_argument("--seconds", type=float, default=None, help="measuring time per path and format")
    p.add_argument("--workers", type=int, default=None, help="also measure an N-worker DataLoader (0: skip)")
    p.add_argument("--videos", type=int, default=None)
    p.add_argument("--clips-per-video", type=int, default=None)
    p.add_argument("--clip-seconds", type=float, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--audio", action="store_true",
                   help="synthetic sources with soundtracks; also time the worker decoding audio (data.audio)")
    p.add_argument("-v", "--verbose", action="store_true", help="progress bars and library logs")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    if not args.verbose:
        os.environ.setdefault("TQDM_DISABLE", "1")  # make_corpus / build_shards progress bars
        log.setLevel(logging.INFO)
        log.addHandler(logging.StreamHandler(sys.stderr))
        log.propagate = False
    tmp = None
    if args.out is None:
        tmp = tempfile.mkdtemp(prefix="vip-bench-data-")
        out = Path(tmp)
    else:
        out = args.out
        out.mkdir(parents=True, exist_ok=True)
    try:
        res = run(settings_from_args(args, out))
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"\n## Data pipeline: worker vs. floor vs. naive ({'quick (smoke) run' if args.quick else 'full run'})\n")
    from bench.data_remote import remote_table
    for part in (speed_table(res), breakdown(res), storage_table(res), notes(res)):
        print(part + "\n")
    if remote_table(res):
        print("### Remote vs. local reading (the worker path, one process)\n")
        print(remote_table(res) + "\n")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res, indent=2, default=float))
    return res


if __name__ == "__main__":
    main(sys.argv[1:])

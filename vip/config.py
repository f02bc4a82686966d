"""One typed config for the whole program: dataclasses + YAML presets + dotted overrides.

A config is a tree of frozen dataclasses. It is built once from a preset YAML
file and `section.field=value` overrides given on the command line, then passed
down: each library function takes only the sections it needs and never mutates
them (use `dataclasses.replace` for a modified copy). `save_config` writes the
tree as YAML next to every checkpoint and shard set, `load_config` reads it back.
"""
from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import yaml

PRESET_DIR = Path(__file__).parent / "configs"


# --------------------------------------------------------------------------- sections
@dataclass(frozen=True)
class SynthConfig:
    """Synthetic HD-VILA-style corpus: moving coloured shapes with matching text."""

    out: str = "data/synth"
    num_videos: int = 8
    clips_per_video: int = 4
    clip_seconds: float = 4.0      # length of each clip span
    gap_seconds: float = 0.5       # unused footage between clips
    width: int = 1280
    height: int = 720
    fps: int = 30
    seed: int = 0
    crf: int = 23                  # x264 quality of the source videos
    preset: str = "ultrafast"      # x264 speed preset of the source videos
    texture: str = "flat"          # flat: plain background | natural: panning 1/f-noise background with
    #                                grain (decodes and compresses like camera footage; benchmarks)


@dataclass(frozen=True)
class ShardBuildConfig:
    """How clips are cut, re-encoded and packed into webdataset shards."""

    metadata: str = "data/synth/metadata.jsonl"
    subtitles: str = "data/synth/subtitles.jsonl"
    videos: str = "data/synth/videos"
    out: str = "data/shards"
    clips_per_shard: int = 1000     # ~100-300 MB shards at the default format
    # stored format, chosen by bench/data.py (docs/benchmarks.md): fewest reader cores per clip
    fps: float = 4.0               # stored frame rate (<= source rate)
    short_side: int = 224          # stored short side in pixels (even)
    keyframe_interval: int = 4     # GOP length of the stored clip, in frames
    crf: int = 23
    preset: str = "veryfast"
    jpeg_quality: int = 90
    frame_short_side: int = 256    # stored middle-frame JPEG (captioner input)
    fast_decode: bool = True       # x264 --tune fastdecode (no CABAC/deblock: faster reads, ~16% bigger files)
    aspect: str = "square"         # square: short_side² (the reader's default squash done once at build
    #                                time: 1.6x fewer reader cores, 38% less storage on textured 16:9 video,
    #                                docs/benchmarks.md; not readable with data.resize=crop) | keep: aspect kept
    max_clip_seconds: float = 60.0  # longer spans are cut to this
    workers: int = 2               # local processes (ignored with ray_address)
    ray_address: Optional[str] = None  # "auto", "ray://…" or "local" to use Ray
    limit_shards: Optional[int] = None  # build only the first N shards (tests, smoke runs)


@dataclass(frozen=True)
class DataConfig:
    """The streaming reader: shards → batches of DESIGN.md §3."""

    shards: str = "data/shards"
    captions: Optional[str] = None  # folder of caption sidecars; default <shards>/captions
    num_frames: int = 12
    image_size: int = 224
    resize: str = "squash"         # squash (reference) | crop (short-side resize + centre crop)
    context_length: int = 70
    tokenizer: str = "ViT-B-32"    # open_clip model name whose tokenizer is used
    batch_size: int = 8            # per rank (micro-batch)
    num_workers: int = 2
    shuffle_shards: int = 4        # shards interleaved at once by a worker
    seed: int = 0
    train: bool = True             # random frame jitter + shuffling; False: evenly spaced, in order
    decode_threads: int = 1        # codec threads per worker
    prefetch_factor: int = 2


@dataclass(frozen=True)
class ModelConfig:
    """CLIP-ViP model (vip/model): open_clip arch + video encoder (DESIGN.md §4)."""

    arch: str = "ViT-B-32"         # any open_clip ViT, or a tiny test config name
    pretrained: Optional[str] = None  # open_clip tag, or a local file
    video_encoder: str = "vip"     # vip | meanpool | seqtransf | full
    num_proxies: int = 4           # M video proxy tokens (proxy 0 = CLIP's class token)
    max_frames: int = 12           # rows of the temporal embedding (interpolated to other T)
    grad_checkpointing: bool = False
    quick_gelu: bool = False       # force QuickGELU (OpenAI / CLIP-ViP weights; *-quickgelu archs have it)
    attention: str = "fast"        # vip attention: fast (block-sparse) | dense (dense-mask oracle)
    seq_layers: int = 4            # seqtransf: temporal transformer layers
    init_logit_scale: float = 4.60  # log of the initial logit scale (clamped to [0, ln 200])


@dataclass(frozen=True)
class LossConfig:
    variant: str = "d"             # vs | a | b | c | d (DESIGN.md §5)


@dataclass(frozen=True)
class OptimConfig:
    """AdamW + linear warmup + cosine decay (reference hyper-parameters)."""

    lr: float = 5e-6
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    weight_decay: float = 0.05     # none on biases, norms, embeddings, proxies, logit_scale
    warmup_ratio: float = 0.01     # share of train.steps spent warming up linearly
    min_lr_ratio: float = 0.0      # cosine floor as a share of lr
    grad_clip: float = 5.0


@dataclass(frozen=True)
class TrainConfig:
    """The DeepSpeed run. Batch sizes live in one place: data.batch_size is the
    per-rank micro-batch, train.global_batch the optimizer batch; gradient
    accumulation is derived (global = micro × accumulation × world size)."""

    out: str = "runs/pretrain"
    steps: int = 10000             # optimizer steps
    global_batch: int = 1024
    precision: str = "auto"        # auto (bf16 on GPUs that have it, else fp32) | bf16 | fp16 | fp32
    zero_stage: int = 1
    seed: int = 0
    save_every: int = 1000         # steps between checkpoints (also at the end and on SIGTERM/SIGINT)
    keep_last: int = 3             # complete checkpoints kept
    resume: str = "auto"           # auto (latest complete checkpoint in out, if any) | none | <tag dir>
    log_every: int = 10
    eval_every: int = 0            # steps between zero-shot retrieval evaluations (0: only at the end)
    eval_shards: Optional[str] = None  # held-out shard folder for zero-shot retrieval
    eval_max_clips: int = 1000
    on_nonfinite: str = "skip"     # skip the step (and report it) | stop
    max_nonfinite: int = 20        # give up after this many consecutive non-finite losses
    tensorboard: bool = True
    init_from: Optional[str] = None  # exported vip weights to start from (instead of model.pretrained)
    log_keys: bool = False         # write each rank's consumed sample keys per step (resume audits, tests)
    fault_step: Optional[int] = None  # test hook: rank fault_rank raises at this step
    fault_rank: int = 0


@dataclass(frozen=True)
class CaptionConfig:
    """The captioning job (DESIGN.md §7): each clip's middle frame → caption sidecar rows."""

    shards: str = "data/shards"    # shard folder (shards.json or shard-*.tar)
    out: Optional[str] = None      # sidecar folder; default <shards>/captions
    captioner: str = "coca"        # coca (open_clip CoCa) | hf (any transformers image-to-text model)
    model: str = "coca_ViT-L-14"   # open_clip name or local-dir:PATH | HF hub id or local folder
    pretrained: Optional[str] = "mscoco_finetuned_laion2b_s13b_b90k"  # coca: open_clip tag or local weights file
    revision: Optional[str] = None  # hf: hub revision (branch, tag or commit) of `model`
    prompt: Optional[str] = None   # hf: text the caption continues (BLIP: "a picture of"); stripped from output
    decoding: str = "auto"         # auto (beam on GPU, greedy on CPU) | beam | greedy | top_k | top_p
    num_beams: int = 6
    num_beam_groups: int = 3       # coca diverse beam search groups (open_clip default)
    max_tokens: int = 30           # generated tokens per caption
    min_tokens: int = 5
    top_k: int = 50
    top_p: float = 0.9
    temperature: float = 1.0
    repetition_penalty: float = 1.0
    seed: int = 0                  # sampling seed (top_k/top_p), mixed with each batch's keys
    batch_size: int = 32           # images per generate() call (halved automatically on errors, e.g. OOM)
    chunk_size: int = 256          # images per unit of actor work; a shard is cut into chunks
    device: str = "auto"           # auto (cuda when the cluster has GPUs) | cuda | cpu
    precision: str = "auto"        # auto (fp16 on GPU, fp32 on CPU) | fp16 | bf16 | fp32
    num_actors: int = 0            # 0: one per GPU; on CPU as many as fit beside one decode task
    actor_cpus: float = 1.0        # CPUs reserved per captioner actor (its torch threads on CPU)
    decode_cpus: float = 1.0       # CPUs per JPEG decode task
    inflight_per_actor: int = 2    # chunks queued per actor: bounds memory to actors × this × chunk_size images
    max_attempts: int = 3          # tries per chunk (actor deaths) before its clips get error captioner_failed
    max_actor_restarts: int = 16   # replacement actors per job before the job gives up
    ray_address: Optional[str] = None  # None: $RAY_ADDRESS, else a private local Ray on 127.0.0.1 | auto | ray://…
    local_cpus: int = 0            # CPUs of the private local Ray (0: all cores)
    limit_shards: Optional[int] = None  # only the first N shards (smoke runs)
    fault_exit_chunk: Optional[int] = None  # FAULT INJECTION (tests only): actor 0 os._exit(1)s on its Nth chunk


@dataclass(frozen=True)
class EvalConfig:
    """Retrieval evaluation (`vip eval`) and embedding (`vip embed`) on annotation jsonl + a video folder."""

    annotations: str = ""          # jsonl: {"clip_id": str, "text": str | [str, ...]}
    videos: str = ""               # folder of <clip_id> or <clip_id>.<ext> videos (any container PyAV reads)
    model: Optional[str] = None    # exported vip model folder (vip.load)
    open_clip: Optional[str] = None  # local open_clip checkpoint file: MeanPool zero-shot baseline (when no model)
    arch: str = "ViT-B-32"         # open_clip arch of the open_clip checkpoint
    quick_gelu: bool = False       # open_clip baseline: force QuickGELU (OpenAI weights)
    tokenizer: Optional[str] = None  # open_clip tokenizer name; default: the model's arch
    paragraph: bool = False        # join a clip's caption list into one paragraph (DiDeMo)
    num_frames: int = 12           # frames sampled evenly over the whole video
    resize: str = "squash"         # squash (reference) | crop
    batch_size: int = 16           # videos per encode_video call
    text_batch_size: int = 256
    num_workers: int = 0           # decode workers (DataLoader)
    device: str = "auto"           # auto (cuda if available) | cuda | cpu
    out: str = "eval.json"         # metrics JSON (vip eval) / parquet (vip embed)
    shards: Optional[str] = None   # vip embed: a shard folder instead of a video folder


@dataclass(frozen=True)
class FinetuneConfig:
    """Downstream retrieval fine-tuning (`vip finetune`). Reference: lr 1e-6, wd 0.2, batch 128,
    12 frames; epochs MSR-VTT 5 / DiDeMo 20 / LSMDC 10 / ActivityNet 20. The best epoch is chosen
    on the validation split (never on test)."""

    annotations: str = ""          # train jsonl {"clip_id", "text": str | [str, ...]}
    videos: str = ""               # folder of the train videos
    val_annotations: str = ""      # validation jsonl (model selection)
    val_videos: Optional[str] = None  # default: videos
    init_from: str = ""            # exported vip model (vip export / end of pretraining)
    out: str = "runs/finetune"
    epochs: int = 5
    lr: float = 1e-6
    weight_decay: float = 0.2
    warmup_ratio: float = 0.1
    global_batch: int = 128
    batch_size: int = 16           # per rank (micro-batch)
    num_frames: int = 12
    context_length: int = 70
    resize: str = "squash"
    paragraph: bool = False        # DiDeMo: one paragraph per video
    num_workers: int = 2
    precision: str = "auto"
    seed: int = 0


@dataclass(frozen=True)
class Config:
    """The whole program's config; every command uses the sections it needs."""

    synth: SynthConfig = field(default_factory=SynthConfig)
    build: ShardBuildConfig = field(default_factory=ShardBuildConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    caption: CaptionConfig = field(default_factory=CaptionConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)


# --------------------------------------------------------------------------- machinery
class ConfigError(ValueError):
    """A preset or an override does not fit the config schema."""


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Convert a YAML/CLI value to the annotated type, or raise ConfigError."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "~")):
            if type(None) in args:
                return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{where}: {value!r} fits none of {tp}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return _from_dict(tp, value, where)
    if origin in (list, tuple, Sequence) or tp in (list, tuple):
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        inner = args[0] if args else Any
        items = [_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "no", "0", "off"):
            return False
        raise ConfigError(f"{where}: expected a bool, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected an int, got {value!r}")
        try:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected an int, got {value!r}") from None
    if tp is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a float, got {value!r}") from None
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    raise ConfigError(f"{where}: unsupported type {tp}")


def _from_dict(cls: type, data: dict, where: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ConfigError(f"{where or cls.__name__}: unknown field(s) {sorted(unknown)}; "
                          f"known: {sorted(names)}")
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}" if where else k) for k, v in data.items()}
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict:
    """Plain nested dict (tuples become lists) for YAML/JSON."""
    def conv(v):
        if dataclasses.is_dataclass(v):
            return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        return v
    return conv(cfg)


def _deep_merge(base: dict, upd: dict) -> dict:
    out = dict(base)
    for k, v in upd.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form section.field=value")
    key, raw = item.split("=", 1)
    path = [p for p in key.strip().split(".") if p]
    if not path:
        raise ConfigError(f"override {item!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, (dict,)):
        value = raw  # "a: b" style strings stay strings
    return path, value


def resolve_preset(name_or_path: str) -> Path:
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") and p.exists():
        return p
    cand = PRESET_DIR / f"{name_or_path}.yaml"
    if cand.exists():
        return cand
    known = sorted(x.stem for x in PRESET_DIR.glob("*.yaml"))
    raise ConfigError(f"no preset {name_or_path!r} (a YAML path, or one of {known})")


def load_config(preset: Optional[str] = None, overrides: Sequence[str] = (), cls: type = Config) -> Any:
    """Build the config: defaults ← preset YAML (with `_base_` chains) ← dotted overrides."""
    data: dict = {}
    if preset:
        data = _load_yaml_chain(resolve_preset(preset))
    for item in overrides:
        path, value = _parse_override(item)
        node = data
        for p in path[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {p} is not a section")
        node[path[-1]] = value
    return _from_dict(cls, data)


def _load_yaml_chain(path: Path, depth: int = 0) -> dict:
    if depth > 8:
        raise ConfigError(f"{path}: _base_ chain too deep")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a preset must be a mapping")
    base = data.pop("_base_", None)
    if base:
        base_path = resolve_preset(base) if not (path.parent / base).exists() else path.parent / base
        data = _deep_merge(_load_yaml_chain(base_path, depth + 1), data)
    return data


def save_config(cfg: Any, path: str | Path) -> None:
    """Write the config tree as YAML (or JSON for a .json path)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    d = to_dict(cfg)
    text = json.dumps(d, indent=2) if path.suffix == ".json" else yaml.safe_dump(d, sort_keys=False)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def config_from_file(path: str | Path, cls: type = Config) -> Any:
    """Read a config saved by `save_config` (YAML or JSON)."""
    text = Path(path).read_text()
    data = json.loads(text) if str(path).endswith(".json") else yaml.safe_load(text)
    return _from_dict(cls, data or {})

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
from typing import Any, Literal, Optional, Sequence

import yaml

from captioning.config import CaptionConfig, CaptionerTrainConfig
from shards.atomic import write_text
from shards.config import DataConfig, ShardBuildConfig, SynthConfig

__all__ = ["Config", "ConfigError", "load_config", "save_config", "config_from_file", "to_dict", "SynthConfig",
           "ShardBuildConfig", "DataConfig", "ModelConfig", "FusionConfig", "LossConfig", "OptimConfig", "TrainConfig",
           "CaptionConfig", "CaptionerTrainConfig", "EvalConfig", "FinetuneConfig", "DebugConfig"]

PRESET_DIR = Path(__file__).parent / "configs"


# --------------------------------------------------------------------------- sections
@dataclass(frozen=True)
class FusionConfig:
    """Everything-at-Once fusion on top of CLIP-ViP (vip/model/eao.py, docs/fusion.md). The defaults
    are the original's `everything_at_once_tva` setting: token space 4096, one block of 64 heads with
    MLP ratio 1, no CLS token, no positional embedding, gated token and final projections into a
    6144-d joint space."""

    dim: int = 4096                # common token space (fusion transformer width)
    depth: int = 1                 # fusion transformer blocks
    num_heads: int = 64
    mlp_ratio: float = 1.0
    projection_dim: int = 6144     # joint embedding space
    token_projection: Literal["gated", "minimal"] = "gated"   # backbone tokens → token space
    final_projection: Literal["gated", "minimal"] = "gated"   # per-modality fused tokens → joint space
    # audio tower (vip/model/audio.py): log-mel time patches → transformer
    audio_n_mels: int = 40         # must equal data.audio_n_mels
    audio_width: int = 256
    audio_layers: int = 4
    audio_heads: int = 4
    audio_patch_frames: int = 16   # STFT frames per audio token (16 × 10 ms hop = 0.16 s)
    audio_max_tokens: int = 128    # rows of the audio position table (interpolated to other lengths)
    audio_pretrained: Optional[str] = None   # local weights file of the audio tower (else random init)


@dataclass(frozen=True)
class ModelConfig:
    """CLIP-ViP model (vip/model): open_clip arch + video encoder (docs/architecture.md, "Model")."""

    arch: str = "ViT-B-32"         # any open_clip ViT, or a tiny test config name
    pretrained: Optional[str] = None  # open_clip tag, or a local file
    video_encoder: Literal["vip", "meanpool", "seqtransf", "full"] = "vip"
    num_proxies: int = 4           # M video proxy tokens (proxy 0 = CLIP's class token)
    proxy_init: Literal["class_token", "normal"] = "class_token"
    #   how proxies 1..M-1 start: class_token = CLIP's class embedding + small noise (starts where a
    #   pretrained CLIP already pools well); normal = N(0, 1), as the original CLIP-ViP code does
    #   (`torch.randn`), to reproduce the paper exactly (docs/model.md)
    max_frames: int = 12           # rows of the temporal embedding (interpolated to other T)
    grad_checkpointing: bool = False
    quick_gelu: bool = False       # force QuickGELU (OpenAI / CLIP-ViP weights; *-quickgelu archs have it)
    attention: Literal["fast", "dense"] = "fast"   # vip attention: fast (block-sparse) | dense (oracle)
    seq_layers: int = 4            # seqtransf: temporal transformer layers
    init_logit_scale: float = 4.60  # log of the initial logit scale (kept in [0, ln 200] after each step)
    dropout: float = 0.0           # dropout on the final video and text features (training only; 0 = off)
    fusion: Optional[FusionConfig] = None   # set: Everything-at-Once fusion model (audio tower + fusion head)


@dataclass(frozen=True)
class LossConfig:
    variant: Literal["vs", "a", "b", "c", "d"] = "d"   # OCL variant (docs/model.md, "Losses")
    # Everything-at-Once combinatorial loss (finetune.method=eao; docs/fusion.md): weights of the
    # terms t_v, t_a, v_a, t_va, v_ta, a_tv (total divided by their sum) and the NCE temperature
    fusion_weights: tuple[float, ...] = (1.0, 0.1, 0.1, 0.1, 0.1, 0.1)
    fusion_temperature: float = 0.05


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
    adam: Literal["auto", "fused", "torch"] = "auto"   # AdamW implementation: auto = DeepSpeed's fused
    #                                  kernel on GPUs, torch's AdamW on CPUs (the fused one needs a ~50 s
    #                                  C++ compile there); torch = torch's everywhere (no op build)


@dataclass(frozen=True)
class TrainConfig:
    """The DeepSpeed run. Batch sizes live in one place: data.batch_size is the
    per-rank micro-batch, train.global_batch the optimizer batch; gradient
    accumulation is derived (global = micro × accumulation × world size)."""

    out: str = "runs/pretrain"
    steps: int = 10000             # optimizer steps
    global_batch: int = 1024
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"   # auto: bf16 on GPUs that have it, else fp32
    zero_stage: Literal[0, 1, 2, 3] = 1
    seed: int = 0
    save_every: int = 1000         # steps between checkpoints (also at the end and on SIGTERM/SIGINT)
    keep_last: int = 3             # complete checkpoints kept
    resume: str = "auto"           # auto (latest complete checkpoint in out, if any) | none | <tag dir>
    log_every: int = 10
    eval_every: int = 0            # steps between zero-shot retrieval evaluations (0: only at the end)
    eval_shards: Optional[str] = None  # held-out shard folder for zero-shot retrieval
    eval_max_clips: int = 1000
    on_nonfinite: Literal["skip", "stop"] = "skip"   # skip the step (and report it) | stop
    max_nonfinite: int = 20        # give up after this many consecutive non-finite losses
    tensorboard: bool = True
    init_from: Optional[str] = None  # exported vip weights to start from (instead of model.pretrained);
    #                                  vip finetune: the exported model to fine-tune (required; its config is used)
    log_keys: bool = False         # write each rank's consumed sample keys per step (resume audits, tests)


@dataclass(frozen=True)
class EvalConfig:
    """Retrieval evaluation (`vip eval`) and embedding (`vip embed`) of an exported model (or the
    MeanPool open_clip baseline) on annotation jsonl + a video folder, or a shard folder (embed);
    docs/evaluation.md. `vip eval` needs annotations, videos and model (or open_clip)."""

    annotations: str = ""          # jsonl: {"clip_id": str, "text": str | [str, ...]}
    videos: str = ""               # folder of <clip_id> or <clip_id>.<ext> videos (any container PyAV reads)
    model: Optional[str] = None    # exported vip model folder (vip.load)
    open_clip: Optional[str] = None  # local open_clip checkpoint file: MeanPool zero-shot baseline (when no model)
    arch: str = "ViT-B-32"         # open_clip arch of the open_clip checkpoint
    quick_gelu: bool = False       # open_clip baseline: force QuickGELU (OpenAI weights)
    tokenizer: Optional[str] = None  # open_clip tokenizer name; default: the model's arch
    paragraph: bool = False        # join a clip's caption list into one paragraph (DiDeMo)
    num_frames: int = 12           # frames sampled evenly over the whole video
    resize: Literal["squash", "crop"] = "squash"
    batch_size: int = 16           # videos per encode_video call
    text_batch_size: int = 256
    num_workers: int = 0           # decode workers (DataLoader)
    device: str = "auto"           # auto (this rank's GPU if there is one, else CPU) | cuda | cuda:1 | cpu
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "fp32"   # weights and pixels; auto: bf16 on GPUs that have it
    out: str = "eval.json"         # metrics JSON (vip eval) / parquet (vip embed)
    shards: Optional[str] = None   # vip embed: a shard folder instead of a video folder
    head: Literal["auto", "none", "meanp", "seqtransf", "xclip", "drl"] = "auto"
    #   scoring: auto = the export's retrieval head if it has one, else text·video; none = text·video
    #   (pooled features); a name = that head (the export's trained one; meanp needs no weights)
    head_chunk: int = 256          # texts × videos scored per block with a head (memory: see docs/evaluation.md)


@dataclass(frozen=True)
class AnalyzeConfig:
    """`vip analyze domain-gap`: K-means NMI between text corpora in a model's text tower
    (docs/evaluation.md). Needs at least two corpora and model (or open_clip) unless features=words."""

    features: Literal["model", "words"] = "model"   # model: the text tower's features (the paper's);
    #                                words: TF-IDF of the words, no model needed (docs/evaluation.md)
    model: Optional[str] = None    # exported vip model folder
    open_clip: Optional[str] = None  # local open_clip checkpoint file (with arch), when no model
    arch: str = "ViT-B-32"         # open_clip arch of the open_clip checkpoint
    quick_gelu: bool = False       # open_clip checkpoint: force QuickGELU (OpenAI weights)
    tokenizer: Optional[str] = None  # open_clip tokenizer name; default: the model's arch
    corpora: tuple[str, ...] = ()  # NAME=PATH each (jsonl, or plain text one per line): [subs=a.jsonl,caps=b.txt]
    pairs: tuple[str, ...] = ()    # A:B each, names from corpora; empty: every pair
    text_field: str = "text"       # jsonl key holding the text (a string or a list of strings)
    n: int = 1000                  # texts sampled per corpus per repeat
    repeats: int = 10              # fresh samples (and K-means seeds); mean ± std over them
    seed: int = 0
    batch_size: int = 256          # texts per encode_text call
    device: str = "auto"           # auto (GPU if there is one) | cuda | cpu
    out: Optional[str] = None      # rows as JSON


@dataclass(frozen=True)
class FinetuneConfig:
    """Downstream retrieval fine-tuning (`vip finetune`): the dataset and the schedule in epochs.
    The model to start from, optimiser, batch sizes, precision, seed and output folder come
    from the shared `optim`, `train` (init_from, global_batch, precision, zero_stage, seed, out)
    and `data` (batch_size) sections;
    the `finetune` preset sets the reference values (lr 1e-6, wd 0.2, batch 128, 12 frames;
    epochs MSR-VTT 5 / DiDeMo 20 / LSMDC 10 / ActivityNet 20). The best epoch is chosen on the
    validation split (never on test)."""

    annotations: str = ""          # train jsonl {"clip_id", "text": str | [str, ...]}
    videos: str = ""               # folder of the train videos
    val_annotations: str = ""      # validation jsonl (model selection)
    val_videos: Optional[str] = None  # default: videos
    epochs: int = 5
    num_frames: int = 12
    context_length: int = 70
    resize: Literal["squash", "crop"] = "squash"
    paragraph: bool = False        # DiDeMo: one paragraph per video
    num_workers: int = 2
    # retrieval head (docs/evaluation.md, "Heads"): none = pooled features + InfoNCE (CLIP-ViP); meanp | seqtransf
    # (CLIP4Clip), xclip (X-CLIP), drl (DRL) train the head on token-level features with (CE_t2v + CE_v2t) / 2
    head: Literal["none", "meanp", "seqtransf", "xclip", "drl"] = "none"
    head_lr: float = 1.0e-4        # lr of the head's parameters (the originals: 1e-4; backbone optim.lr)
    head_layers: int = 4           # temporal transformer layers (seqtransf, xclip, drl)
    head_temporal: bool = True     # xclip / drl: seqTransf on the frames, as the originals' scripts
    head_mask_padding: bool = False  # option: leave padded words / frames out of xclip's softmaxes, drl's max
    xclip_length_weights: bool = True  # X-CLIP's L×L / T×T re-weighting matrices (false: any L and T)
    xclip_temperature: float = 0.01
    cdcr_lambda: float = 0.001     # DRL: weight of the channel decorrelation term (0: off)
    cdcr_alpha1: Optional[float] = None  # DRL: on-diagonal weight; default by backbone (0.11 patch 16, else 0.14)
    cdcr_alpha2: float = 0.0       # DRL: off-diagonal weight
    method: Literal["clipvip", "eao"] = "clipvip"   # eao: Everything-at-Once fusion of text, video and the
    #                                clips' audio (model.fusion, loss.fusion_*, data.audio_*; docs/fusion.md);
    #                                the best epoch is chosen on validation t→(video+audio) R@1


@dataclass(frozen=True)
class DebugConfig:
    """Fault injection for tests and drills; all off by default. Never set in a real run."""

    fault_step: Optional[int] = None   # pretraining: rank `fault_rank` raises at this step
    fault_rank: int = 0
    caption_fault_exit_chunk: Optional[int] = None  # captioning: actor 0 os._exit(1)s on its Nth chunk


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
    captioner: CaptionerTrainConfig = field(default_factory=CaptionerTrainConfig)   # vip captioner train
    eval: EvalConfig = field(default_factory=EvalConfig)
    analyze: AnalyzeConfig = field(default_factory=AnalyzeConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)


# --------------------------------------------------------------------------- machinery
class ConfigError(ValueError):
    """A preset or an override does not fit the config schema."""


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Convert a YAML/CLI value to the annotated type, or raise ConfigError."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is Literal:
        for choice in args:
            if value == choice and type(value) is type(choice):
                return choice
            if isinstance(value, str) and str(choice) == value.strip():   # "2" for a Literal[0, 1, 2, 3]
                return choice
        raise ConfigError(f"{where}: {value!r} is not one of {', '.join(repr(a) for a in args)}")
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
    cfg = _from_dict(cls, data)
    if isinstance(cfg, Config):
        from vip.checks import validate_config
        validate_config(cfg)
    return cfg


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
    d = to_dict(cfg)
    write_text(path, json.dumps(d, indent=2) if path.suffix == ".json" else yaml.safe_dump(d, sort_keys=False))


def config_from_file(path: str | Path, cls: type = Config) -> Any:
    """Read a config saved by `save_config` (YAML or JSON)."""
    text = Path(path).read_text()
    data = json.loads(text) if str(path).endswith(".json") else yaml.safe_load(text)
    return _from_dict(cls, data or {})

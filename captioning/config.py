"""The captioning job's config section (owned by this library; ``vip.config.Config`` composes it)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional


@dataclass(frozen=True)
class CaptionConfig:
    """The captioning job: each clip's middle frame → caption sidecar rows."""

    shards: str = "data/shards"    # shard folder (shards.json or shard-*.tar)
    out: Optional[str] = None      # sidecar folder; default <shards>/captions
    captioner: Literal["coca", "hf"] = "coca"        # coca (open_clip CoCa) | hf (any transformers image-to-text model)
    model: str = "coca_ViT-L-14"   # open_clip name or local-dir:PATH | HF hub id or local folder
    pretrained: Optional[str] = "mscoco_finetuned_laion2b_s13b_b90k"  # coca: open_clip tag or local weights file
    revision: Optional[str] = None  # hf: hub revision (branch, tag or commit) of `model`
    prompt: Optional[str] = None   # hf: text the caption continues (BLIP: "a picture of"); stripped from output
    decoding: Literal["auto", "beam", "greedy", "top_k", "top_p"] = "auto"         # auto (beam on GPU, greedy on CPU) | beam | greedy | top_k | top_p
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
    device: Literal["auto", "cuda", "cpu"] = "auto"           # auto (cuda when the cluster has GPUs) | cuda | cpu
    precision: Literal["auto", "fp16", "bf16", "fp32"] = "auto"        # auto (fp16 on GPU, fp32 on CPU) | fp16 | bf16 | fp32
    num_actors: int = 0            # 0: one per GPU; on CPU as many as fit beside one decode task
    actor_cpus: float = 1.0        # CPUs reserved per captioner actor (its torch threads on CPU)
    decode_cpus: float = 1.0       # CPUs per JPEG decode task
    inflight_per_actor: int = 2    # chunks queued per actor: bounds memory to actors × this × chunk_size images
    max_attempts: int = 3          # tries per chunk (actor deaths) before its clips get error captioner_failed
    max_actor_restarts: int = 16   # replacement actors per job before the job gives up
    ray_address: Optional[str] = None  # None: $RAY_ADDRESS, else a private local Ray on 127.0.0.1 | auto | ray://…
    local_cpus: int = 0            # CPUs of the private local Ray (0: all cores)
    limit_shards: Optional[int] = None  # only the first N shards (smoke runs)


@dataclass(frozen=True)
class CaptionerTrainConfig:
    """`vip captioner train`: a small BLIP image captioner (transformers' BlipForConditionalGeneration,
    its captioning loss) trained here on synthetic image–description pairs (a split of its own,
    never the corpus it later captions: as OFA was trained on other data than HD-VILA), saved as a
    local model directory the caption job loads (caption.captioner=hf; docs/captioning.md)."""

    out: str = "data/captioner"    # model directory (caption.captioner=hf caption.model=<out>)
    train_images: int = 4096       # rendered training frames (colour × shape × background × position)
    eval_images: int = 256         # held-out frames (other seed) for caption accuracy
    image_size: int = 64           # captioner input (the caption job resizes middle frames to this)
    patch_size: int = 8
    width: int = 64                # transformer width of every tower
    layers: int = 2
    steps: int = 1000              # optimiser steps (400: colour right, shape at chance; 1000: both 99.6 %)
    batch_size: int = 64
    lr: float = 1e-3               # AdamW, linear warmup then cosine to 0
    warmup_steps: int = 25
    weight_decay: float = 0.05
    context_length: int = 16       # training tokens per description (they are short)
    seed: int = 1234               # the image-description split's seed (≠ corpus seeds)
    threads: int = 1               # torch threads (0: torch default); 1: the tiny model gains nothing from more (0.15 s/step vs 0.2-1.6 s with 2 threads on the loaded 2-core machine)

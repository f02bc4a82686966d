"""A small image captioner that learned something: BLIP trained here on synthetic frames.

CLIP-ViP captions each clip's middle frame with OFA, an image captioner trained on other data
than HD-VILA. Offline there are no such weights, so this module trains a small BLIP
(`transformers.BlipForConditionalGeneration`: ViT image encoder + cross-attending text decoder)
with BLIP's own captioning objective (teacher-forced language-modelling cross-entropy of the
caption given the image) on an image–description split of its own: frames painted by the
synthetic corpus's renderer with random colour, shape, background and a position near the
middle, described in an image-caption register without motion (`shards.texts.image_description`).
The frames go through the same path as the caption job's inputs (JPEG q90 → resized to the
captioner's input, bicubic; the processor's normalisation), so the job feeds it what it trained on.

Why BLIP and not open_clip's CoCa (the job's default captioner): CoCa decodes with open_clip's
49 408-token BPE vocabulary; its output layer and softmax over that vocabulary cost ~2.5 s a step
on this machine's 2 cores. BLIP loads with its own tokenizer, so the small captioner gets a
word-level vocabulary of the ~40 words its captions use and trains in a couple of minutes.

The result is a local model directory (save_pretrained: config, weights, processor, vocabulary;
plus captioner.json, the training record) that `HFCaptioner` loads like any other
(`caption.captioner=hf caption.model=<dir>`). `caption_accuracy` scores its captions on held-out
frames: colour and shape named correctly (and no other colour or shape named).

A plain AdamW loop: this is a stand-in for an external captioner, not part of vip's training
(captioning/ never imports vip/).
"""
from __future__ import annotations

import dataclasses
import io
import json
import logging
import math
import time
from pathlib import Path

import numpy as np

from captioning.config import CaptionConfig, CaptionerTrainConfig

log = logging.getLogger("captioning")

RENDER_W, RENDER_H = 228, 128       # 16:9 like the corpus; short side ≥ 2× the input size
MIDDLE_JITTER = 0.08                # frames drawn at u ∈ 0.5 ± this (the middle frame, ± a frame or two)
RECORD = "captioner.json"


# --------------------------------------------------------------------------- data
def job_input(frame: np.ndarray, size: int, resize: str = "squash") -> np.ndarray:
    """A full-size RGB frame → what the caption job feeds the captioner: the shard's middle-frame
    JPEG (q90), decoded to size² (squash, or short side + centre crop), bicubic. uint8 [size, size, 3]."""
    from PIL import Image

    from shards.video import decode_jpeg
    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, format="JPEG", quality=90)
    return decode_jpeg(buf.getvalue(), size, resize, resample="bicubic")


def render_split(n: int, size: int, seed: int, resize: str = "squash") -> tuple[np.ndarray, list[dict]]:
    """n frames uint8 [n, size, size, 3] and their attributes {colour, shape, direction, background}."""
    from shards.synth import COLOURS, DIRECTIONS, SHAPES, ClipPlan, render_frame
    rng = np.random.default_rng(seed)
    images, attrs = [], []
    for i in range(n):
        a = {"colour": str(rng.choice(list(COLOURS))), "shape": str(rng.choice(SHAPES)),
             "direction": str(rng.choice(list(DIRECTIONS))),
             "background": tuple(int(v) for v in rng.integers(0, 90, size=3))}
        plan = ClipPlan(f"cap{i}", 0.0, 1.0, a["colour"], a["shape"], a["direction"], a["background"], 0)
        u = 0.5 + float(rng.uniform(-MIDDLE_JITTER, MIDDLE_JITTER))
        images.append(job_input(render_frame(plan, u, RENDER_W, RENDER_H), size, resize))
        attrs.append(a)
    return np.stack(images), attrs


def vocabulary() -> list[str]:
    """Every word the image descriptions use (the captioner's word-level vocabulary)."""
    from shards.synth import COLOURS, SHAPES
    from shards.texts import IMAGE_TEMPLATES
    words = {"a", "an", *COLOURS, *SHAPES}
    for t in IMAGE_TEMPLATES:
        words.update(w for w in t.split() if not w.startswith("{"))
    return sorted(words)


def build_blip(cfg: CaptionerTrainConfig, folder: Path):
    """(random-init BlipForConditionalGeneration, BlipProcessor) with a word-level vocabulary."""
    import torch
    from transformers import (BertTokenizerFast, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor,
                              BlipProcessor)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *vocabulary()]) + "\n")
    tok = BertTokenizerFast(vocab_file=str(vocab), model_max_length=cfg.context_length)
    tok.add_special_tokens({"bos_token": "[DEC]"})
    proc = BlipProcessor(image_processor=BlipImageProcessor(size={"height": cfg.image_size, "width": cfg.image_size},
                                                            resample=3), tokenizer=tok)     # 3: bicubic
    heads = max(1, cfg.width // 32)
    text = dict(vocab_size=len(tok), hidden_size=cfg.width, intermediate_size=4 * cfg.width,
                num_hidden_layers=cfg.layers, num_attention_heads=heads, encoder_hidden_size=cfg.width,
                max_position_embeddings=max(32, cfg.context_length), bos_token_id=tok.bos_token_id,
                sep_token_id=tok.sep_token_id, eos_token_id=tok.sep_token_id, pad_token_id=tok.pad_token_id)
    vision = dict(hidden_size=cfg.width, intermediate_size=4 * cfg.width, num_hidden_layers=cfg.layers,
                  num_attention_heads=heads, image_size=cfg.image_size, patch_size=cfg.patch_size)
    torch.manual_seed(cfg.seed)
    model = BlipForConditionalGeneration(BlipConfig(vision_config=vision, text_config=text, projection_dim=cfg.width))
    return model, proc


# --------------------------------------------------------------------------- train
def train_captioner(cfg: CaptionerTrainConfig, caption: CaptionConfig | None = None, progress: bool = True) -> dict:
    """Train, save to cfg.out, score on held-out frames through the caption job's HFCaptioner;
    returns the training record (also <out>/captioner.json). `caption`: the job's settings used
    for scoring (decoding, token limits); default greedy, 12 tokens."""
    import torch
    from tqdm import tqdm

    from shards.texts import image_description
    t0 = time.perf_counter()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out_dir = Path(cfg.out)
    model, proc = build_blip(cfg, out_dir)
    images, attrs = render_split(cfg.train_images, cfg.image_size, cfg.seed)
    pixels = proc.image_processor(list(images), return_tensors="pt")["pixel_values"]     # [N, 3, S, S]
    t_render = time.perf_counter() - t0
    tok, bos = proc.tokenizer, proc.tokenizer.bos_token_id
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, cfg.warmup_steps)) * 0.5 * (
        1 + math.cos(math.pi * min(1.0, s / max(1, cfg.steps)))))
    rng = np.random.default_rng(cfg.seed + 1)
    model.train()
    losses = []
    bar = tqdm(range(cfg.steps), desc="captioner", unit="step", disable=not progress, mininterval=2.0)
    t1 = time.perf_counter()
    for step in bar:
        idx = rng.choice(len(attrs), size=min(cfg.batch_size, len(attrs)), replace=False)
        texts = [image_description(attrs[i]["colour"], attrs[i]["shape"], rng) for i in idx]
        enc = tok(texts, padding="longest", truncation=True, max_length=cfg.context_length, return_tensors="pt")
        ids = enc["input_ids"].clone()
        ids[:, 0] = bos                                        # the decoder starts from [DEC], as in generate()
        labels = ids.masked_fill(enc["attention_mask"] == 0, -100)
        loss = model(pixel_values=pixels[idx], input_ids=ids, attention_mask=enc["attention_mask"],
                     labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if step % 25 == 0 or step == cfg.steps - 1:
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    t_train = time.perf_counter() - t1
    log.info("captioner: %d steps in %.1fs (%.0f images/s); caption loss %.3f → %.3f", cfg.steps, t_train,
             cfg.steps * cfg.batch_size / max(t_train, 1e-9), losses[0], losses[-1])
    model.eval()
    model.save_pretrained(out_dir)
    proc.save_pretrained(out_dir)
    acc = caption_accuracy(str(out_dir), cfg.eval_images, cfg.seed + 100_000, caption)
    record = {"config": dataclasses.asdict(cfg), "loss_first": losses[0], "loss_last": losses[-1],
              "render_seconds": round(t_render, 2), "train_seconds": round(t_train, 2),
              "seconds": round(time.perf_counter() - t0, 2),
              "accuracy": {k: v for k, v in acc.items() if k != "examples"}, "examples": acc["examples"][:8]}
    (out_dir / RECORD).write_text(json.dumps(record, indent=2))
    return record


# --------------------------------------------------------------------------- score
def score_caption(text: str, colour: str, shape: str) -> tuple[bool, bool]:
    """(colour right, shape right): the true word is named and no other colour (shape) word is."""
    from shards.synth import COLOURS, SHAPES
    words = set(text.lower().replace(",", " ").replace(".", " ").split())
    return words & set(COLOURS) == {colour}, words & set(SHAPES) == {shape}


def caption_config(model_dir: str, caption: CaptionConfig | None = None) -> CaptionConfig:
    """The caption job's settings for this captioner: `caption` (default: greedy, 2–12 tokens, as the
    tiny preset) pointed at it."""
    base = caption or CaptionConfig(decoding="greedy", max_tokens=12, min_tokens=2)
    return dataclasses.replace(base, captioner="hf", model=str(model_dir), pretrained=None, prompt=None,
                               revision=None, device="cpu")


def caption_accuracy(model_dir: str, n: int, seed: int, caption: CaptionConfig | None = None,
                     batch_size: int = 64) -> dict:
    """Load `model_dir` through the caption job's captioner class and caption n held-out frames
    (seed `seed`): share of captions naming the colour, the shape, and both correctly; chance levels."""
    from captioning.captioners import build_captioner
    from shards.synth import COLOURS, SHAPES
    cap = build_captioner(caption_config(model_dir, caption))
    images, attrs = render_split(n, cap.input_spec.size, seed, cap.input_spec.resize)
    texts: list[str] = []
    for i in range(0, n, batch_size):
        texts += cap.caption(images[i:i + batch_size], keys=[f"eval{j}" for j in range(i, min(n, i + batch_size))])
    ok = np.array([score_caption(t, a["colour"], a["shape"]) for t, a in zip(texts, attrs)])   # [n, 2]
    return {"images": n, "colour": float(ok[:, 0].mean()), "shape": float(ok[:, 1].mean()),
            "both": float(ok.all(1).mean()), "chance_colour": 1 / len(COLOURS), "chance_shape": 1 / len(SHAPES),
            "chance_both": 1 / (len(COLOURS) * len(SHAPES)),
            "examples": [{"caption": t, "colour": a["colour"], "shape": a["shape"]} for t, a in zip(texts, attrs)]}


def ensure_captioner(cfg: CaptionerTrainConfig, caption: CaptionConfig | None = None) -> dict:
    """Reuse the model directory when it holds a captioner trained with this same config, else train."""
    rec_path = Path(cfg.out) / RECORD
    if rec_path.exists() and (Path(cfg.out) / "config.json").exists():
        rec = json.loads(rec_path.read_text())
        if rec.get("config") == json.loads(json.dumps(dataclasses.asdict(cfg))):
            return {**rec, "reused": True}
    return train_captioner(cfg, caption)


def accuracy_table(rec: dict) -> str:
    a = rec["accuracy"]
    return "\n".join([
        f"caption accuracy on {a['images']} held-out frames (greedy):",
        "| named correctly | accuracy | chance |", "|---|---|---|",
        f"| colour | {100 * a['colour']:.1f} % | {100 * a['chance_colour']:.1f} % |",
        f"| shape | {100 * a['shape']:.1f} % | {100 * a['chance_shape']:.1f} % |",
        f"| both | {100 * a['both']:.1f} % | {100 * a['chance_both']:.1f} % |"])

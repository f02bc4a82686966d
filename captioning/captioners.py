"""Captioners: a batch of images → captions, plus the provenance that goes into every sidecar row.

Two implementations behind one small interface:

- `CocaCaptioner`: open_clip CoCa (the default; an encoder-decoder image
  captioner like OFA). `model` is an open_clip name with `pretrained` a tag
  (cluster) or a local weights file, or `local-dir:PATH` holding
  `open_clip_config.json` + weights (tests, offline machines).
- `HFCaptioner`: any HuggingFace `transformers` image-to-text model (BLIP,
  BLIP-2, GIT, VisionEncoderDecoder, …) by hub id or local folder.

Images arrive as uint8 arrays [N, H, W, 3] already resized by the decode tasks
(`Captioner.input_spec` says to what); the captioner normalises, runs batched
generation (fp16 on GPU by default, fp32 on CPU) and decodes text. Nothing here
knows about Ray or shards.
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from captioning.config import CaptionConfig

log = logging.getLogger(__name__)

DECODINGS = ("auto", "beam", "greedy", "top_k", "top_p")


@dataclass(frozen=True)
class InputSpec:
    """How decode tasks prepare images for this captioner (before its own normalisation)."""

    size: int                  # output is size × size
    resize: str = "crop"       # crop: short side → size, centre crop | squash: both sides → size


@dataclass(frozen=True)
class Provenance:
    """What the sidecar records about how each caption was made."""

    model: str                 # e.g. "open_clip:coca_ViT-L-14", "hf:Salesforce/blip-image-captioning-large"
    model_tag: str             # pretrained tag, hub revision, or "sha256:<16 hex>" of the weights file(s)
    generation: dict = field(default_factory=dict)  # decoding settings, prompt, precision, device, input size


# --------------------------------------------------------------------------- helpers
def resolve_device(device: str) -> str:
    import torch
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def resolve_precision(precision: str, device: str) -> str:
    if precision == "auto":
        return "fp16" if device.startswith("cuda") else "fp32"
    if precision not in ("fp16", "bf16", "fp32"):
        raise ValueError(f"caption.precision must be auto|fp16|bf16|fp32, got {precision!r}")
    return precision


def resolve_decoding(decoding: str, device: str) -> str:
    """auto → beam search on GPU (caption quality, OFA-style), greedy on CPU (beam search is slow there)."""
    if decoding not in DECODINGS:
        raise ValueError(f"caption.decoding must be one of {DECODINGS}, got {decoding!r}")
    if decoding == "auto":
        return "beam" if device.startswith("cuda") else "greedy"
    return decoding


def file_digest(paths: list[Path], chunk: int = 1 << 22) -> str:
    """sha256 over the files' bytes (sorted by name) → 'sha256:<16 hex>'."""
    h = hashlib.sha256()
    for p in sorted(paths, key=lambda p: p.name):
        h.update(p.name.encode())
        with open(p, "rb") as f:
            while block := f.read(chunk):
                h.update(block)
    return "sha256:" + h.hexdigest()[:16]


def weight_files(folder: Path) -> list[Path]:
    exts = (".safetensors", ".bin", ".pth", ".pt")
    return [p for p in folder.iterdir() if p.is_file() and p.suffix in exts]


def clean_text(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def batch_seed(seed: int, keys: list[str]) -> int:
    """Sampling seed from the batch's keys: reproducible wherever the batch runs."""
    return (seed * 1_000_003 + zlib.crc32("\n".join(keys).encode())) % (2 ** 31)


# --------------------------------------------------------------------------- interface
class Captioner:
    """Batch of uint8 images [N, H, W, 3] → N captions (str; '' when the model produced nothing)."""

    input_spec: InputSpec
    provenance: Provenance

    def caption(self, images: np.ndarray, keys: list[str] | None = None) -> list[str]:
        raise NotImplementedError


# --------------------------------------------------------------------------- open_clip CoCa
class CocaCaptioner(Captioner):
    """open_clip CoCa: `model.generate` (beam search / greedy / top-k / top-p), decoded with open_clip's BPE."""

    def __init__(self, cfg: CaptionConfig):
        import open_clip
        import torch
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        self.precision = resolve_precision(cfg.precision, self.device)
        self.decoding = resolve_decoding(cfg.decoding, self.device)
        model, _, _ = open_clip.create_model_and_transforms(
            cfg.model, pretrained=None if cfg.model.startswith("local-dir:") else cfg.pretrained,
            precision=self.precision, device=self.device)
        if not hasattr(model, "generate"):
            raise ValueError(f"{cfg.model} is not a captioning model (no generate(); use a coca_* model)")
        self.model = model.eval()
        pp = open_clip.get_model_preprocess_cfg(model)
        size = pp.get("size", 224)
        size = int(size[0] if isinstance(size, (tuple, list)) else size)
        mode = "squash" if pp.get("resize_mode") == "squash" else "crop"
        self.input_spec = InputSpec(size=size, resize=mode)
        self.dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[self.precision]
        self.mean = torch.tensor(pp.get("mean", (0.48145466, 0.4578275, 0.40821073)), device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(pp.get("std", (0.26862954, 0.26130258, 0.27577711)), device=self.device).view(1, 3, 1, 1)
        self.decode = open_clip.decode
        self.provenance = Provenance(
            model=f"open_clip:{cfg.model}", model_tag=self._tag(cfg), generation=self._generation())

    @staticmethod
    def _tag(cfg: CaptionConfig) -> str:
        if cfg.model.startswith("local-dir:"):
            return file_digest(weight_files(Path(cfg.model[len("local-dir:"):])))
        if cfg.pretrained and os.path.isfile(cfg.pretrained):
            return file_digest([Path(cfg.pretrained)])
        return cfg.pretrained or "random-init"

    def _kwargs(self) -> dict:
        c = self.cfg
        kw = {"seq_len": c.max_tokens + 1, "min_seq_len": min(c.min_tokens, c.max_tokens),
              "repetition_penalty": c.repetition_penalty, "temperature": c.temperature}
        if self.decoding == "beam":
            groups = c.num_beam_groups if c.num_beams % max(c.num_beam_groups, 1) == 0 else 1
            kw.update(generation_type="beam_search", num_beams=c.num_beams, num_beam_groups=groups)
        elif self.decoding == "greedy":
            kw.update(generation_type="top_k", top_k=1)
        elif self.decoding == "top_k":
            kw.update(generation_type="top_k", top_k=c.top_k)
        else:
            kw.update(generation_type="top_p", top_p=c.top_p)
        return kw

    def _generation(self) -> dict:
        return {"decoding": self.decoding, **self._kwargs(), "prompt": None, "precision": self.precision,
                "device": self.device, "input_size": self.input_spec.size, "resize": self.input_spec.resize,
                "seed": self.cfg.seed}

    def caption(self, images: np.ndarray, keys: list[str] | None = None) -> list[str]:
        import torch
        images = images if images.flags.writeable else np.array(images)  # Ray hands out read-only arrays
        x = torch.from_numpy(np.ascontiguousarray(images)).to(self.device).permute(0, 3, 1, 2).float().div_(255)
        x = ((x - self.mean) / self.std).to(self.dtype)
        if self.decoding in ("top_k", "top_p"):
            torch.manual_seed(batch_seed(self.cfg.seed, keys or []))
        with torch.inference_mode():
            tokens = self.model.generate(x, **self._kwargs())
        out = []
        for row in tokens.cpu():
            text = self.decode(row).split("<end_of_text>")[0].replace("<start_of_text>", "")
            out.append(clean_text(text))
        return out


# --------------------------------------------------------------------------- HuggingFace
_HF_AUTO_CLASSES = ("AutoModelForImageTextToText", "AutoModelForVision2Seq", "AutoModelForCausalLM")


class HFCaptioner(Captioner):
    """Any `transformers` image-to-text model: AutoProcessor (or image processor + tokenizer) + generate()."""

    def __init__(self, cfg: CaptionConfig):
        import torch
        import transformers
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        self.precision = resolve_precision(cfg.precision, self.device)
        self.decoding = resolve_decoding(cfg.decoding, self.device)
        local = os.path.isdir(cfg.model)
        kw = {"local_files_only": True} if local else {}
        if cfg.revision and not local:
            kw["revision"] = cfg.revision
        self.processor, self.tokenizer = self._load_processor(transformers, cfg.model, kw)
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[self.precision]
        self.model, err = None, None
        for name in _HF_AUTO_CLASSES:
            auto = getattr(transformers, name, None)
            if auto is None:
                continue
            try:
                self.model = auto.from_pretrained(cfg.model, torch_dtype=dtype, **kw)
                break
            except ValueError as e:  # "Unrecognized configuration class … for this kind of AutoModel"
                err = e
        if self.model is None:
            raise ValueError(f"{cfg.model}: no image-to-text auto class fits ({err})")
        self.model = self.model.to(self.device).eval()
        self.dtype = dtype
        self.input_spec = self._input_spec()
        revision = getattr(self.model.config, "_commit_hash", None)
        tag = file_digest(weight_files(Path(cfg.model))) if local else (revision or cfg.revision or "main")
        self.provenance = Provenance(model=f"hf:{cfg.model}", model_tag=tag, generation={
            "decoding": self.decoding, **self._kwargs(), "prompt": cfg.prompt, "precision": self.precision,
            "device": self.device, "input_size": self.input_spec.size, "resize": self.input_spec.resize,
            "seed": cfg.seed, "model_class": type(self.model).__name__})

    @staticmethod
    def _load_processor(transformers, name: str, kw: dict):
        """(image processor callable, tokenizer): AutoProcessor when it handles images, else the two parts."""
        proc = transformers.AutoProcessor.from_pretrained(name, **kw)
        if hasattr(proc, "image_processor"):
            return proc, getattr(proc, "tokenizer", proc)
        # VisionEncoderDecoder checkpoints often ship an image processor and a tokenizer separately
        image_proc = transformers.AutoImageProcessor.from_pretrained(name, **kw)
        tok = transformers.AutoTokenizer.from_pretrained(name, **kw)
        return image_proc, tok

    def _input_spec(self) -> InputSpec:
        ip = getattr(self.processor, "image_processor", self.processor)
        size = getattr(ip, "size", None) or {}
        crop = getattr(ip, "crop_size", None) if getattr(ip, "do_center_crop", False) else None
        if crop:
            return InputSpec(size=int(crop.get("height", 224)), resize="crop")
        if "shortest_edge" in size:
            return InputSpec(size=int(size["shortest_edge"]), resize="crop")
        return InputSpec(size=int(size.get("height", 224)), resize="squash")

    def _kwargs(self) -> dict:
        c = self.cfg
        kw = {"max_new_tokens": c.max_tokens, "min_new_tokens": min(c.min_tokens, c.max_tokens),
              "repetition_penalty": c.repetition_penalty}
        if self.decoding == "beam":
            kw.update(num_beams=c.num_beams, do_sample=False)
        elif self.decoding == "greedy":
            kw.update(num_beams=1, do_sample=False)
        elif self.decoding == "top_k":
            kw.update(do_sample=True, top_k=c.top_k, temperature=c.temperature)
        else:
            kw.update(do_sample=True, top_p=c.top_p, top_k=0, temperature=c.temperature)
        return kw

    def caption(self, images: np.ndarray, keys: list[str] | None = None) -> list[str]:
        import torch
        imgs = list(images)
        prompt = self.cfg.prompt
        if hasattr(self.processor, "image_processor"):
            inputs = self.processor(images=imgs, text=[prompt] * len(imgs) if prompt else None, return_tensors="pt")
        else:
            inputs = self.processor(images=imgs, return_tensors="pt")
            if prompt:
                inputs.update(self.tokenizer([prompt] * len(imgs), return_tensors="pt", add_special_tokens=False))
        inputs = {k: (v.to(self.device, self.dtype) if v.is_floating_point() else v.to(self.device))
                  for k, v in inputs.items()}
        if self.decoding in ("top_k", "top_p"):
            torch.manual_seed(batch_seed(self.cfg.seed, keys or []))
        with torch.inference_mode():
            out = self.model.generate(**inputs, **self._kwargs())
        ids = inputs.get("input_ids")
        if ids is not None and out.shape[1] >= ids.shape[1] and torch.equal(out[:, :ids.shape[1]], ids):
            out = out[:, ids.shape[1]:]  # decoder-only models return the prompt first
        texts = self.tokenizer.batch_decode(out, skip_special_tokens=True)
        return [self._strip_prompt(clean_text(t)) for t in texts]

    def _strip_prompt(self, text: str) -> str:
        p = clean_text(self.cfg.prompt or "")
        if p and text.lower().startswith(p.lower()):
            return text[len(p):].strip()
        return text


# --------------------------------------------------------------------------- factory
CAPTIONERS = {"coca": CocaCaptioner, "hf": HFCaptioner}


def build_captioner(cfg: CaptionConfig) -> Captioner:
    """The captioner named by cfg.captioner, loaded on cfg.device."""
    try:
        cls = CAPTIONERS[cfg.captioner]
    except KeyError:
        raise ValueError(f"caption.captioner must be one of {sorted(CAPTIONERS)}, got {cfg.captioner!r}") from None
    cap = cls(cfg)
    log.info("captioner %s (%s) on %s/%s, decoding %s, input %d px (%s)", cap.provenance.model,
             cap.provenance.model_tag, cap.provenance.generation.get("device"),
             cap.provenance.generation.get("precision"), cap.provenance.generation.get("decoding"),
             cap.input_spec.size, cap.input_spec.resize)
    return cap

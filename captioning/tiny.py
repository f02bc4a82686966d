"""Tiny random-weight captioners and frame-only shards for tests, benchmarks and offline smoke runs.

Nothing here touches the network: models are built from small configs with
random weights and saved to a local folder that the captioners then load like
any real checkpoint (`local-dir:` for open_clip, a folder for transformers).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

TINY_COCA_CFG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16,
                   "attentional_pool": True, "attn_pooler_heads": 2, "output_tokens": True},
    "text_cfg": {"context_length": 76, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2,
                 "embed_cls": True, "output_tokens": True},
    "multimodal_cfg": {"context_length": 76, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2,
                       "attn_pooler_heads": 2},
    "custom_text": True,
}


def make_tiny_coca(folder: str | Path, image_size: int | None = 32, seed: int = 0, arch: str | dict | None = None) -> str:
    """Random-weight open_clip CoCa saved as open_clip_config.json + open_clip_model.safetensors;
    returns 'local-dir:<folder>'. arch: None (the tiny config: vocab 49408 to match the tokenizer,
    width 64, 2 layers), an open_clip config dict, or a built-in name such as 'coca_ViT-B-32'
    (real size, random weights: for throughput benchmarks)."""
    import open_clip
    import torch
    from safetensors.torch import save_file
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if isinstance(arch, str):
        arch = open_clip.get_model_config(arch)
        if arch is None or "multimodal_cfg" not in arch:
            raise ValueError("arch must name an open_clip CoCa config (coca_*)")
    cfg = json.loads(json.dumps(arch or TINY_COCA_CFG))
    if image_size is not None:
        cfg["vision_cfg"]["image_size"] = image_size
    torch.manual_seed(seed)
    model = open_clip.CoCa(embed_dim=cfg["embed_dim"], vision_cfg=cfg["vision_cfg"], text_cfg=cfg["text_cfg"],
                           multimodal_cfg=cfg["multimodal_cfg"], quick_gelu=cfg.get("quick_gelu", False))
    with torch.no_grad():  # open_clip zero-initialises the decoder's output projection: all logits would tie
        proj = model.text_decoder.text_projection
        proj.normal_(std=proj.shape[0] ** -0.5)
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": {}}, indent=2))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    return f"local-dir:{folder}"


TINY_WORDS = ("a an the of in on with picture photo shape red green blue yellow white circle square triangle "
              "moves moving to left right up down across video frame background dark").split()


def make_tiny_blip(folder: str | Path, image_size: int = 32, seed: int = 0) -> str:
    """Random-weight BLIP captioner (BlipForConditionalGeneration + BlipProcessor with a small word
    vocabulary) saved with save_pretrained; returns the folder."""
    import torch
    from transformers import (BertTokenizerFast, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor,
                              BlipProcessor)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *TINY_WORDS]) + "\n")
    tok = BertTokenizerFast(vocab_file=str(vocab))
    tok.add_special_tokens({"bos_token": "[DEC]"})
    proc = BlipProcessor(image_processor=BlipImageProcessor(size={"height": image_size, "width": image_size}),
                         tokenizer=tok)
    text = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                encoder_hidden_size=32, max_position_embeddings=64, bos_token_id=tok.bos_token_id,
                sep_token_id=tok.sep_token_id, eos_token_id=tok.sep_token_id, pad_token_id=tok.pad_token_id)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  image_size=image_size, patch_size=16)
    torch.manual_seed(seed)
    model = BlipForConditionalGeneration(BlipConfig(vision_config=vision, text_config=text, projection_dim=32))
    model.save_pretrained(folder)
    proc.save_pretrained(folder)
    return str(folder)


def make_frame_shards(out: str | Path, num_shards: int, clips_per_shard: int, size: int = 256,
                      seed: int = 0) -> dict:
    """Shards holding only what captioning reads (`<key>.jpg` middle frames + a small json), rendered
    by the synthetic-corpus painter; writes shards.json. For benchmarks: no video encoding needed."""
    from PIL import Image
    import io
    from shards.synth import COLOURS, DIRECTIONS, SHAPES, ClipPlan, describe, render_frame
    from shards.writer import ShardWriter
    out = Path(out)
    rng = np.random.default_rng(seed)
    shards = []
    for s in range(num_shards):
        name = f"shard-{s:06d}.tar"
        with ShardWriter(out / name) as w:
            for c in range(clips_per_shard):
                key = f"bench{s:04d}_{c:04d}"
                plan = ClipPlan(clip_id=key, start=0.0, end=1.0, colour=str(rng.choice(list(COLOURS))),
                                shape=str(rng.choice(SHAPES)), direction=str(rng.choice(list(DIRECTIONS))),
                                background=tuple(int(v) for v in rng.integers(0, 90, 3)), template=0)
                frame = render_frame(plan, 0.5, size * 16 // 9, size)
                buf = io.BytesIO()
                Image.fromarray(frame).save(buf, format="JPEG", quality=90)
                w.add(key, {"jpg": buf.getvalue(), "json": {"clip_id": key, "subtitle": describe(
                    plan.colour, plan.shape, plan.direction)}})
        shards.append({"name": name, "num_samples": clips_per_shard, "bytes": (out / name).stat().st_size})
    index = {"num_samples": num_shards * clips_per_shard, "shards": shards}
    (out / "shards.json").write_text(json.dumps(index))
    return index

"""Weights in and out: our export format, and released CLIP-ViP (HuggingFace-CLIP-style) checkpoints.

Export format (a folder): ``model.safetensors`` (the CLIPViP state dict, open_clip-style
names) + ``config.json`` (``{"format": "vip.clipvip", "version": 1, "model": ModelConfig}``,
plus ``"head": {name, arguments}`` when the model carries a retrieval head, whose weights are
the ``head.*`` tensors).
`load(path)` rebuilds the model from the JSON (never downloading: ``pretrained`` is ignored)
and loads the tensors. Nothing here unpickles: safetensors, or ``torch.load(weights_only=True)``
for released ``.pt``/``.bin`` checkpoints.

Released CLIP-ViP checkpoints use HuggingFace CLIP key names under ``clipmodel.``
(`clipvip_to_vip_state_dict` maps them; `vip_to_clipvip_state_dict` is its inverse):

=========================================================  ====================================
``vision_model.embeddings.class_embedding`` [C]            ``visual.class_embedding``
``vision_model.embeddings.added_cls`` [M-1, C]             ``visual.proxies``
``vision_model.embeddings.temporal_embedding`` [1, T, C]   ``visual.temporal_embedding`` [T, C]
``vision_model.embeddings.patch_embedding.weight``         ``visual.conv1.weight``
``vision_model.embeddings.position_embedding.weight``      ``visual.positional_embedding``
``vision_model.pre_layrnorm`` / ``post_layernorm``         ``visual.ln_pre`` / ``visual.ln_post``
``….encoder.layers.i.self_attn.{q,k,v}_proj``              ``….resblocks.i.attn.in_proj_{weight,bias}`` (q;k;v)
``….self_attn.out_proj`` / ``layer_norm1`` / ``layer_norm2``  ``attn.out_proj`` / ``ln_1`` / ``ln_2``
``….mlp.fc1`` / ``mlp.fc2``                                ``mlp.c_fc`` / ``mlp.c_proj``
``visual_projection.weight`` [D, C] (no bias)              ``visual.proj`` = weight.T [C, D]
``text_model.embeddings.token_embedding.weight``           ``token_embedding.weight``
``text_model.embeddings.position_embedding.weight``        ``positional_embedding``
``text_model.final_layer_norm``                            ``ln_final``
``text_projection.weight`` [D, W]                          ``text_projection`` = weight.T
``logit_scale``                                            ``logit_scale``
=========================================================  ====================================

HF CLIP uses QuickGELU: imported models are built with ``quick_gelu=True``.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path

import torch


from shards.atomic import atomic_path, write_json
from vip.config import ModelConfig

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
FORMAT = "vip.clipvip"

_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "self_attn.out_proj": "attn.out_proj",
          "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
_FIXED = {  # HF name (without clipmodel.) → ours; transposes/reshapes handled in code
    "vision_model.embeddings.class_embedding": "visual.class_embedding",
    "vision_model.embeddings.added_cls": "visual.proxies",
    "vision_model.embeddings.patch_embedding.weight": "visual.conv1.weight",
    "vision_model.embeddings.position_embedding.weight": "visual.positional_embedding",
    "vision_model.pre_layrnorm.weight": "visual.ln_pre.weight",
    "vision_model.pre_layrnorm.bias": "visual.ln_pre.bias",
    "vision_model.post_layernorm.weight": "visual.ln_post.weight",
    "vision_model.post_layernorm.bias": "visual.ln_post.bias",
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
    "logit_scale": "logit_scale",
}
_IGNORED = re.compile(r"(position_ids|\.num_batches_tracked)$")


# --------------------------------------------------------------------------- CLIP-ViP (HF) ↔ ours
def _strip_prefix(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The HF CLIP part of a CLIP-ViP state dict: keys after ``clipmodel.`` (wrappers such as
    ``module.`` in front are dropped, other heads ignored); bare HF names pass through."""
    if any("clipmodel." in k for k in sd):
        return {k.split("clipmodel.", 1)[1]: v for k, v in sd.items() if "clipmodel." in k}
    return dict(sd)


def clipvip_to_vip_state_dict(hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map a CLIP-ViP (HuggingFace CLIP names, ``clipmodel.`` prefix optional) state dict to ours."""
    hf = _strip_prefix(hf)
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str, str], dict[str, torch.Tensor]] = {}
    unknown = []
    for k, v in hf.items():
        if _IGNORED.search(k):
            continue
        if k in _FIXED:
            out[_FIXED[k]] = v
            continue
        if k == "vision_model.embeddings.temporal_embedding":
            out["visual.temporal_embedding"] = v.reshape(v.shape[-2], v.shape[-1])   # [1, T, C] → [T, C]
            continue
        if k in ("visual_projection.weight", "text_projection.weight"):
            out["visual.proj" if k.startswith("visual") else "text_projection"] = v.T.contiguous()
            continue
        m = re.fullmatch(r"(vision|text)_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", k)
        if m is None:
            unknown.append(k)
            continue
        tower, i, name, kind = m.groups()
        base = f"{'visual.' if tower == 'vision' else ''}transformer.resblocks.{i}"
        pm = re.fullmatch(r"self_attn\.([qkv])_proj", name)
        if pm:
            qkv.setdefault((base, kind, tower), {})[pm.group(1)] = v
        elif name in _LAYER:
            out[f"{base}.{_LAYER[name]}.{kind}"] = v
        else:
            unknown.append(k)
    for (base, kind, _), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise KeyError(f"{base}: incomplete q/k/v projections {sorted(parts)}")
        out[f"{base}.attn.in_proj_{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    if unknown:
        raise KeyError(f"unrecognised CLIP-ViP keys: {unknown[:8]}{' …' if len(unknown) > 8 else ''}")
    return out


def vip_to_clipvip_state_dict(sd: dict[str, torch.Tensor], prefix: str = "clipmodel.") -> dict[str, torch.Tensor]:
    """Inverse of `clipvip_to_vip_state_dict` (ViP encoder weights → CLIP-ViP HF names)."""
    inv = {ours: hf for hf, ours in _FIXED.items()}
    inv_layer = {ours: hf for hf, ours in _LAYER.items()}
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if k in inv:
            out[inv[k]] = v
        elif k == "visual.temporal_embedding":
            out["vision_model.embeddings.temporal_embedding"] = v[None]
        elif k == "visual.proj":
            out["visual_projection.weight"] = v.T.contiguous()
        elif k == "text_projection":
            out["text_projection.weight"] = v.T.contiguous()
        else:
            m = re.fullmatch(r"(visual\.)?transformer\.resblocks\.(\d+)\.(.+)", k)
            if m is None:
                raise KeyError(f"{k} has no CLIP-ViP equivalent (only the vip video encoder exports)")
            tower = "vision_model" if m.group(1) else "text_model"
            base = f"{tower}.encoder.layers.{m.group(2)}"
            name = m.group(3)
            am = re.fullmatch(r"attn\.in_proj_(weight|bias)", name)
            if am:
                for part, chunk in zip("qkv", v.chunk(3, dim=0)):
                    out[f"{base}.self_attn.{part}_proj.{am.group(1)}"] = chunk.contiguous()
                continue
            mod, kind = name.rsplit(".", 1)
            if mod not in inv_layer:
                raise KeyError(f"{k} has no CLIP-ViP equivalent")
            out[f"{base}.{inv_layer[mod]}.{kind}"] = v
    return {prefix + k: v for k, v in out.items()}


ARCH_CANDIDATES = ("ViT-B-32-quickgelu", "ViT-B-16-quickgelu", "ViT-L-14-quickgelu", "ViT-L-14-336-quickgelu",
                   "vip-tiny-quickgelu")


def match_clip_arch(sd: dict[str, torch.Tensor], what: str) -> str:
    """The quickgelu open_clip (or tiny) arch whose shapes match a state dict in the OpenAI CLIP
    layout (ours): widths, depths, patch, positions and embedding size (head counts are not in
    the weights). `what` names the checkpoint in the error."""
    from vip.model.archs import clip_config
    C = sd["visual.conv1.weight"].shape[0]
    patch = sd["visual.conv1.weight"].shape[-1]
    n_pos = sd["visual.positional_embedding"].shape[0]
    layers = len({k.split(".")[3] for k in sd if k.startswith("visual.transformer.resblocks.")})
    text_w = sd["ln_final.weight"].shape[0]
    text_layers = len({k.split(".")[2] for k in sd if k.startswith("transformer.resblocks.")})
    embed = sd["text_projection"].shape[1]
    for arch in ARCH_CANDIDATES:
        try:
            cfg = clip_config(arch)
        except (ValueError, NotImplementedError):
            continue
        vc, tc = cfg["vision_cfg"], cfg["text_cfg"]
        grid = vc["image_size"] // vc["patch_size"]
        if (vc["width"], vc["layers"], vc["patch_size"], grid * grid + 1, tc["width"], tc["layers"],
                cfg["embed_dim"]) == (C, layers, patch, n_pos, text_w, text_layers, embed):
            return arch
    raise ValueError(f"no known arch matches this {what} (vision width {C}, {layers} layers, patch {patch}, "
                     f"{n_pos} positions; text width {text_w}, {text_layers} layers; embed {embed}): pass the "
                     f"model config / arch")


def infer_clipvip_config(hf: dict[str, torch.Tensor]) -> ModelConfig:
    """A ModelConfig (quick_gelu ViP) whose shapes match a CLIP-ViP checkpoint."""
    sd = clipvip_to_vip_state_dict(hf)
    arch = match_clip_arch(sd, "CLIP-ViP checkpoint")
    M = 1 + (sd["visual.proxies"].shape[0] if "visual.proxies" in sd else 0)
    T = sd["visual.temporal_embedding"].shape[0] if "visual.temporal_embedding" in sd else 12
    return ModelConfig(arch=arch, quick_gelu=True, video_encoder="vip", num_proxies=M, max_frames=T)


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint file without unpickling code: safetensors, or torch.load(weights_only=True)
    (unwrapping a ``state_dict`` / ``model`` entry)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(path))
    obj = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "module"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: not a state dict")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def import_clipvip(source, model_cfg: ModelConfig | None = None):
    """Build a CLIPViP from a released CLIP-ViP checkpoint (path or state dict).
    Returns (model, model_cfg); model_cfg is inferred from the shapes when not given."""
    from vip.model.clipvip import build_model
    hf = read_state_dict(source) if isinstance(source, (str, os.PathLike)) else dict(source)
    cfg = model_cfg or infer_clipvip_config(hf)
    cfg = dataclasses.replace(cfg, pretrained=None)
    model = build_model(cfg)
    _load_strict(model, clipvip_to_vip_state_dict(hf), "CLIP-ViP checkpoint")
    return model, cfg


# --------------------------------------------------------------------------- our export format
def _load_strict(model: torch.nn.Module, sd: dict[str, torch.Tensor], what: str) -> None:
    """load_state_dict(strict=True) with one readable error; one-element tensors may differ in
    rank ([1] vs 0-dim: DeepSpeed training holds logit_scale as [1])."""
    own = model.state_dict()
    sd = {k: v.reshape(own[k].shape) if k in own and v.numel() == 1 == own[k].numel() else v for k, v in sd.items()}
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    shapes = [f"{k}: {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in set(own) & set(sd)
              if sd[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        raise ValueError(f"{what} does not fit the model: missing {missing[:6]}, unexpected {unexpected[:6]}, "
                         f"shape mismatches {shapes[:6]}")
    model.load_state_dict(sd, strict=True)


def export(model: torch.nn.Module, model_cfg: ModelConfig, out: str | os.PathLike) -> Path:
    """Write ``out/model.safetensors`` + ``out/config.json`` (atomically, file by file)."""
    from safetensors.torch import save_file
    from vip.config import to_dict
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    sd = {k: (v.detach().float() if v.is_floating_point() else v.detach()).to("cpu").contiguous().clone()
          for k, v in model.state_dict().items()}                       # fp32 on disk whatever trained
    with atomic_path(out / WEIGHTS) as tmp:
        save_file(sd, str(tmp), metadata={"format": "pt", "producer": FORMAT})
    meta = {"format": FORMAT, "version": 1, "model": to_dict(model_cfg),
            "embed_dim": int(getattr(model, "embed_dim", 0)) or None}
    head = getattr(model, "head", None)
    if head is not None:
        meta["head"] = dict(head.spec)                                   # rebuilt by load(); weights are head.*
    write_json(out / CONFIG, meta, indent=2)
    return out


def _export_paths(path: str | os.PathLike) -> tuple[Path, Path]:
    """(weights, config.json) of an export folder or of a weights file. A path that does not
    exist is a FileNotFoundError naming it (not the config.json its parent folder would hold)."""
    given = path
    path = Path(path)
    if not os.fspath(given) or not path.exists():
        raise FileNotFoundError(f"no model at {os.fspath(given)!r}: no such file or folder (expected an "
                                f"exported model folder with {WEIGHTS} + {CONFIG}, or a weights file)")
    if path.is_dir():
        return path / WEIGHTS, path / CONFIG
    return path, path.with_name(CONFIG)


def read_model_config(path: str | os.PathLike) -> ModelConfig:
    """The ModelConfig saved next to exported weights (a folder, or its model.safetensors)."""
    _, cfg_path = _export_paths(path)
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{os.fspath(path)!r} is not a vip export: no {cfg_path} (vip export writes "
                                f"{WEIGHTS} + {CONFIG})")
    meta = json.loads(cfg_path.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{cfg_path}: not a vip export (format {meta.get('format')!r})")
    from vip.config import _from_dict
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    return _from_dict(ModelConfig, {k: v for k, v in meta["model"].items() if k in known})   # fusion: nested


def read_head_spec(path: str | os.PathLike) -> dict | None:
    """The retrieval head an export carries ({"name": …, constructor arguments}), or None."""
    _, cfg_path = _export_paths(path)
    if not cfg_path.is_file():
        return None
    return json.loads(cfg_path.read_text()).get("head")


def build_exported(path: str | os.PathLike, **overrides):
    """A fresh CLIPViP shaped like an export (its ModelConfig with `overrides`, plus its head if it
    has one), weights not loaded: (model, model_cfg)."""
    from vip.model.clipvip import build_model
    from vip.model.heads import attach_head, build_head
    cfg = dataclasses.replace(read_model_config(path), pretrained=None, **overrides)
    model = build_model(cfg)
    spec = read_head_spec(path)
    if spec:
        attach_head(model, build_head(spec))
    return model, cfg


def load(path: str | os.PathLike, device: str | torch.device = "cpu"):
    """An exported model (folder or its model.safetensors) ready for inference (eval mode), with
    its retrieval head (``model.head``) when the export has one."""
    weights, _ = _export_paths(path)
    model, _ = build_exported(path, grad_checkpointing=False)
    load_weights_into(model, weights)
    return model.to(device).eval()


def load_weights_into(model: torch.nn.Module, path: str | os.PathLike) -> dict:
    """Load weights into an existing CLIPViP: our export (folder / .safetensors), a released
    CLIP-ViP checkpoint (HF names), or an open_clip CLIP checkpoint (the new ViP parameters
    keep their initial values). Returns {"source": kind, "missing": [...]}."""
    weights, _ = _export_paths(path)
    sd = read_state_dict(weights)
    if any("clipmodel." in k or k.startswith("vision_model.") for k in sd):
        _load_strict(model, clipvip_to_vip_state_dict(sd), f"CLIP-ViP checkpoint {weights}")
        return {"source": "clipvip", "missing": []}
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    if missing and all(k.startswith(("visual.proxies", "visual.temporal_embedding", "visual.seq_transformer",
                                     "visual.frame_position")) for k in missing) and "logit_scale" in sd:
        sd = {**{k: own[k] for k in missing}, **sd}                        # open_clip CLIP checkpoint
        _load_strict(model, sd, f"open_clip checkpoint {weights}")
        return {"source": "open_clip", "missing": missing}
    new = ("audio.", "fusion_head.")                                       # EAOModel's own parts
    if missing and all(k.startswith(new) for k in missing) and not any(k.startswith(new) for k in sd):
        _load_strict(model, {**{k: own[k] for k in missing}, **sd}, f"CLIP-ViP export {weights}")
        return {"source": "vip", "missing": missing}                      # a CLIP-ViP export into an EAOModel
    _load_strict(model, sd, f"weights {weights}")
    return {"source": "vip", "missing": []}

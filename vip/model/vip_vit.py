"""The video-proxy vision transformer (CLIP-ViP), built around an open_clip VisionTransformer.

`VideoViT` adopts the open_clip tower's modules as its own (same attribute names, so an
open_clip state dict's ``visual.*`` keys load unchanged) and adds two parameters:

* ``proxies`` [M-1, C]: video proxy tokens 1..M-1 (proxy 0 is CLIP's ``class_embedding``);
* ``temporal_embedding`` [T_max, C]: zero-initialised, linearly interpolated to any T.

Tokens (docs/architecture.md, "Token layout"): ``[M proxies, T×N patches (frame-major)]``. Every proxy gets the class
position embedding and no temporal embedding; patch tokens get CLIP's spatial position
embedding plus the temporal embedding of their frame. The blocks are open_clip's resblocks
(ln_1, attn in_proj/out_proj, ln_2, mlp) run with proxy-guided attention. The video
embedding is proxy 0 after ``ln_post`` and ``proj``. An image is a 1-frame video. Only
proxy 0 is read, so the last block updates the proxies alone (its patch queries, patch
attention outputs and patch MLP would be discarded: ~1/layers of the work saved).

The same class with M = 1 and ``attention="full"`` is the FullAttention baseline; with M = 1,
no temporal embedding and T = 1 it computes exactly open_clip's image tower.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from vip.model.attention import ATTENTION, proxies_only_attention

Tensor = torch.Tensor


def check_supported_vit(vit: nn.Module) -> None:
    """Raise if an open_clip vision tower uses features this encoder does not reimplement."""
    from open_clip.transformer import ResidualAttentionBlock, VisionTransformer
    if not isinstance(vit, VisionTransformer):
        raise NotImplementedError(f"video encoders need an open_clip VisionTransformer, got {type(vit).__name__}")
    problems = []
    if vit.attn_pool is not None:
        problems.append("attentional pooling")
    if vit.pool_type != "tok" or vit.final_ln_after_pool:
        problems.append(f"pool_type={vit.pool_type!r}, final_ln_after_pool={vit.final_ln_after_pool}")
    if not isinstance(vit.patch_dropout, nn.Identity):
        problems.append("patch dropout")
    if vit.proj is None:
        problems.append("no projection")
    if not all(type(b) is ResidualAttentionBlock and not hasattr(b, "ln_1_kv") for b in vit.transformer.resblocks):
        problems.append("custom attention blocks (qk_norm, scaled cosine, ...)")
    if problems:
        raise NotImplementedError("unsupported open_clip ViT features: " + ", ".join(problems))


def interpolate_temporal(table: Tensor, num_frames: int) -> Tensor:
    """[T_max, C] → [T, C] by linear interpolation (align_corners=False, as the reference's
    F.interpolate(mode='linear')): T = T_max is the identity, T = 1 the middle value
    (T_max = 12: mean of rows 5 and 6)."""
    if num_frames == table.shape[0]:
        return table
    out = F.interpolate(table.float().T[None], size=num_frames, mode="linear", align_corners=False)
    return out[0].T.to(table.dtype)                                        # [T, C]


def interpolate_spatial(pos: Tensor, old_grid: tuple[int, int], new_grid: tuple[int, int]) -> Tensor:
    """Patch position table [gh·gw, C] resized to another grid (bicubic, as open_clip's resize_pos_embed)."""
    if tuple(old_grid) == tuple(new_grid):
        return pos
    C = pos.shape[-1]
    img = pos.float().reshape(1, old_grid[0], old_grid[1], C).permute(0, 3, 1, 2)
    img = F.interpolate(img, size=new_grid, mode="bicubic", antialias=True, align_corners=False)
    return img.permute(0, 2, 3, 1).reshape(new_grid[0] * new_grid[1], C).to(pos.dtype)


class VideoViT(nn.Module):
    """Video-proxy ViT. forward(video [B, T, 3, H, W]) → unnormalised embedding [B, D].

    attention: "proxy" (fast proxy-guided), "proxy_dense" (the dense-mask oracle; tests and
    benchmarks) or "full" (joint space-time attention, the FullAttention baseline).
    """

    def __init__(self, vit: nn.Module, num_proxies: int = 4, max_frames: int = 12, attention: str = "proxy",
                 temporal: bool = True, proxy_init: str = "class_token", proxy_init_std: float = 0.02):
        super().__init__()
        check_supported_vit(vit)
        if num_proxies < 1:
            raise ValueError(f"num_proxies must be >= 1, got {num_proxies}")
        if attention not in ATTENTION:
            raise ValueError(f"attention must be one of {sorted(ATTENTION)}, got {attention!r}")
        # adopt open_clip's modules under their own names (open_clip checkpoints load as visual.*)
        self.conv1 = vit.conv1
        self.class_embedding = vit.class_embedding                         # [C]  proxy 0
        self.positional_embedding = vit.positional_embedding               # [1 + gh·gw, C]
        self.ln_pre = vit.ln_pre
        self.transformer = vit.transformer
        self.ln_post = vit.ln_post
        self.proj = vit.proj                                               # [C, D]
        self.grid_size = tuple(vit.grid_size)
        self.patch_size = tuple(vit.patch_size)
        self.output_dim = vit.output_dim
        self.num_proxies = num_proxies
        self.max_frames = max_frames
        self.attention = attention
        width = self.class_embedding.shape[0]
        if num_proxies > 1 and proxy_init == "normal":
            # the original CLIP-ViP code: added_cls = torch.randn(M-1, C), i.e. N(0, 1)
            self.proxies = nn.Parameter(torch.randn(num_proxies - 1, width))          # [M-1, C]
        elif num_proxies > 1 and proxy_init == "class_token":
            # start the new proxies near CLIP's class token (a small perturbation breaks their symmetry)
            base = self.class_embedding.detach().float()
            noise = torch.randn(num_proxies - 1, width) * (proxy_init_std * base.std().clamp_min(1e-3))
            self.proxies = nn.Parameter(base.expand(num_proxies - 1, width) + noise)   # [M-1, C]
        elif num_proxies > 1:
            raise ValueError(f"proxy_init must be class_token or normal, got {proxy_init!r}")
        else:
            self.register_parameter("proxies", None)
        if temporal:
            self.temporal_embedding = nn.Parameter(torch.zeros(max_frames, width))   # [T_max, C]
        else:
            self.register_parameter("temporal_embedding", None)

    # ------------------------------------------------------------------ switches
    @property
    def grad_checkpointing(self) -> bool:
        return self.transformer.grad_checkpointing

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.transformer.grad_checkpointing = enable

    @property
    def width(self) -> int:
        return self.class_embedding.shape[0]

    # ------------------------------------------------------------------ embeddings
    def embed(self, video: Tensor) -> tuple[Tensor, Tensor]:
        """video [B, T, 3, H, W] → (proxies [B, M, C], patches [B, T, N, C]) after ln_pre."""
        B, T = video.shape[:2]
        dtype = self.conv1.weight.dtype
        x = self.conv1(video.flatten(0, 1).to(dtype))                      # [B·T, C, gh, gw]
        grid = tuple(x.shape[-2:])
        f = x.flatten(2).transpose(1, 2).reshape(B, T, grid[0] * grid[1], -1)  # [B, T, N, C]
        pos = self.positional_embedding.to(dtype)
        f = f + interpolate_spatial(pos[1:], self.grid_size, grid)         # + spatial [N, C]
        if self.temporal_embedding is not None:
            f = f + interpolate_temporal(self.temporal_embedding, T).to(dtype)[None, :, None]  # + [1, T, 1, C]
        tok = self.class_embedding[None]
        if self.proxies is not None:
            tok = torch.cat([tok, self.proxies], dim=0)                    # [M, C]
        p = (tok.to(dtype) + pos[:1]).unsqueeze(0).expand(B, -1, -1)       # [B, M, C]
        return self.ln_pre(p), self.ln_pre(f)

    # ------------------------------------------------------------------ blocks
    def _block(self, blk: nn.Module, p: Tensor, f: Tensor, patches: bool = True) -> tuple[Tensor, Tensor | None]:
        """One open_clip ResidualAttentionBlock on the two token streams (weights reused as is).
        p [B, M, C], f [B, T, N, C] → same shapes. patches=False (the last block: only proxy 0
        is read) skips the patches' attention outputs and MLP and returns f = None."""
        B, M, C = p.shape
        T, N = f.shape[1:3]
        attn = blk.attn
        H = attn.num_heads
        qkv_p = F.linear(blk.ln_1(p), attn.in_proj_weight, attn.in_proj_bias).view(B, M, 3, H, C // H)
        qkv_f = F.linear(blk.ln_1(f), attn.in_proj_weight, attn.in_proj_bias).view(B, T, N, 3, H, C // H)
        if patches:
            o_p, o_f = ATTENTION[self.attention](qkv_p, qkv_f)             # [B, M, H, d], [B, T, N, H, d]
            f = f + blk.ls_1(attn.out_proj(o_f.reshape(B, T, N, C)))
            f = f + blk.ls_2(blk.mlp(blk.ln_2(f)))
        else:
            o_p, f = proxies_only_attention(qkv_p, qkv_f), None
        p = p + blk.ls_1(attn.out_proj(o_p.reshape(B, M, C)))
        p = p + blk.ls_2(blk.mlp(blk.ln_2(p)))
        return p, f

    def encode_tokens(self, video: Tensor, patches: bool = True) -> tuple[Tensor, Tensor | None]:
        """video [B, T, 3, H, W] → final hidden states (proxies [B, M, C], patches [B, T, N, C]),
        before ln_post. patches=False: the last block computes the proxies only (patches None)."""
        p, f = self.embed(video)
        use_ckpt = self.grad_checkpointing and torch.is_grad_enabled()
        blocks = self.transformer.resblocks
        for i, blk in enumerate(blocks):
            need = patches or i < len(blocks) - 1
            if use_ckpt:
                p, f = checkpoint(self._block, blk, p, f, need, use_reentrant=False)
            else:
                p, f = self._block(blk, p, f, need)
        return p, f

    def pool(self, p: Tensor) -> Tensor:
        """Proxy 0 → ln_post → proj: [B, M, C] → [B, D]."""
        return self.ln_post(p[:, 0]) @ self.proj.to(p.dtype)

    def frame_tokens(self, video: Tensor) -> Tensor:
        """video [B, T, 3, H, W] → per-frame features [B, T, D] for the retrieval heads: each frame's
        patch tokens after the last block (proxy-guided or full attention), averaged over the frame,
        then ln_post and proj, the same path proxy 0 takes to the video embedding."""
        _, f = self.encode_tokens(video, patches=True)                     # [B, T, N, C]
        return self.ln_post(f.mean(dim=2)) @ self.proj.to(f.dtype)         # [B, T, D]

    def forward(self, video: Tensor) -> Tensor:
        """video [B, T, 3, H, W] → unnormalised video embedding [B, D]."""
        if video.ndim != 5:
            raise ValueError(f"video must be [B, T, 3, H, W], got {tuple(video.shape)}")
        p, _ = self.encode_tokens(video, patches=False)                    # only proxy 0 is read
        return self.pool(p)

    def extra_repr(self) -> str:
        return (f"num_proxies={self.num_proxies}, max_frames={self.max_frames}, attention={self.attention!r}, "
                f"temporal={self.temporal_embedding is not None}, grid={self.grid_size}")

"""Part 3, attention: the fast path vs the dense oracle vs full attention, SDPA backends, equality, FlexAttention."""
from __future__ import annotations

import argparse
import time
import traceback
from typing import TYPE_CHECKING

from bench.gpu_check.report import BACKENDS, PartTimeout, first_line, median_time, release_memory

if TYPE_CHECKING:
    from bench.gpu_check.__main__ import Check


# --------------------------------------------------------------------------- 3. attention
def attention_plan(ck: Check) -> tuple[str, list[tuple[int, int]], int]:
    """(arch, [(T, batch), …], reps)."""
    if not ck.cuda:
        return "vip-tiny", [(4, 1), (8, 1)] if ck.quick else [(4, 2), (8, 2)], 2
    if ck.quick:
        return "ViT-B-16", [(12, 4)], 3
    return "ViT-B-16", [(12, 8), (32, 4)], 5


def part_attention(ck: Check, res: dict) -> None:
    import torch

    from bench.model import bench_arch
    device = torch.device(ck.args.device)
    dtype = torch.bfloat16 if ck.cuda else torch.float32
    arch, shapes, reps = attention_plan(ck)
    res.update(arch=arch, dtype=str(dtype).replace("torch.", ""), proxies=4, encoders=[])
    for T, B in shapes:
        args = argparse.Namespace(batch=B, frames=T, proxies=4, image_size=None, reps=reps)
        for r in bench_arch(arch, args, device, dtype):
            res["encoders"].append({k: r[k] for k in ("arch", "variant", "tokens", "wall_med_s", "wall_x",
                                                       "peak_mib", "saved_mib", "saved_x")} | {"T": T, "batch": B})
        release_memory()
        ck.save()
    # the SDPA calls, their backends and the equality check, at the first shape
    T, B = shapes[0]
    H, d, N = attention_dims(arch)
    res["sdpa_shape"] = {"batch": B, "T": T, "proxies": 4, "patches": N, "heads": H, "head_dim": d}
    qkv_p, qkv_f = random_qkv(B, 4, T, N, H, d, device, torch.bfloat16 if ck.cuda else torch.float32)
    res["sdpa"] = sdpa_backends(qkv_p, qkv_f, device, reps)
    ck.save()
    res["equality"] = equality(B, 4, T, N, H, d, device)
    ck.save()
    res["flex"] = flex_check(ck, qkv_p, qkv_f, device, reps)
    bad = [c for c, r in res["sdpa"]["calls"].items() if not r.get("default", {}).get("ok")]
    if bad:
        res["error"] = f"default SDPA dispatch failed for {bad}"
    elif not res["equality"]["fp32_equal"]:
        res["error"] = f"fast path differs from the dense oracle in fp32: {res['equality']}"


def attention_dims(arch: str) -> tuple[int, int, int]:
    """(heads, head dim, patches per frame) of an arch's vision tower at its own image size."""
    from vip.model.archs import clip_config
    v = clip_config(arch)["vision_cfg"]
    width, head_width = v["width"], v.get("head_width", 64)
    return width // head_width, head_width, (v["image_size"] // v["patch_size"]) ** 2


def random_qkv(B, M, T, N, H, d, device, dtype, seed: int = 0):
    import torch
    g = torch.Generator().manual_seed(seed)
    qkv_p = torch.randn(B, M, 3, H, d, generator=g).to(device, dtype)
    qkv_f = torch.randn(B, T, N, 3, H, d, generator=g).to(device, dtype)
    return qkv_p, qkv_f


def capture_sdpa_calls(fn, *args) -> list[tuple]:
    """The (q, k, v, mask) of every SDPA call `fn` makes, exactly as it makes them (strides kept)."""
    import types

    import torch.nn.functional as F

    from vip.model import attention
    calls = []

    def record(q, k, v, attn_mask=None, **kw):
        calls.append((q, k, v, attn_mask))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, **kw)

    real = attention.F
    attention.F = types.SimpleNamespace(scaled_dot_product_attention=record)
    try:
        fn(*args)
    finally:
        attention.F = real
    return calls


def _describe(q, k, v, mask) -> str:
    s = f"q {list(q.shape)} k {list(k.shape)}"
    if mask is not None:
        s += f", {'bool' if str(mask.dtype) == 'torch.bool' else 'float'} mask {list(mask.shape)}"
    if not all(t.is_contiguous() for t in (q, k, v)):
        s += ", strided"
    return s


def sdpa_backends(qkv_p, qkv_f, device, reps: int) -> dict:
    """For every SDPA call of the attention functions: forward+backward under each backend alone
    (sdpa_kernel([b])) — ok and ms, or the error — and the backend the default dispatch picks."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend

    from vip.model import attention as A
    sources = {"proxy: patches → proxies + own frame": (A.proxy_attention, 0),
               "proxy: proxies → all tokens (−ln T bias)": (A.proxy_attention, 1),
               "last block: proxies only": (A.proxies_only_attention, 0),
               "dense oracle (bool mask)": (A.proxy_attention_dense, 0),
               "full attention": (A.full_attention, 0)}
    cache: dict = {}
    out = {"calls": {}, "functions": {}}
    for label, (fn, i) in sources.items():
        if fn not in cache:
            cache[fn] = capture_sdpa_calls(fn, qkv_p, qkv_f)
        q, k, v, mask = cache[fn][i]
        row = {"shape": _describe(q, k, v, mask)}
        try:
            row["dispatch"] = SDPBackend(int(torch._fused_sdp_choice(q, k, v, attn_mask=mask))).name
        except Exception as e:  # noqa: BLE001
            row["dispatch"] = f"? ({first_line(e, 120)})"
        g = torch.randn(q.shape[:-1] + v.shape[-1:], device=q.device, dtype=q.dtype)

        def step(q=q, k=k, v=v, mask=mask, g=g):
            leaves = [t.detach().requires_grad_() for t in (q, k, v)]
            F.scaled_dot_product_attention(*leaves, attn_mask=mask).backward(g)

        row.update(per_backend(step, device, reps))
        out["calls"][label] = row
    # the whole production function (both of its calls) under each backend
    for fname, fn in {"proxy_attention (fast path)": A.proxy_attention,
                      "proxy_attention_dense (oracle)": A.proxy_attention_dense,
                      "full_attention": A.full_attention}.items():
        p = qkv_p.detach().requires_grad_()
        f = qkv_f.detach().requires_grad_()

        def fstep(fn=fn, p=p, f=f):
            o_p, o_f = fn(p, f)
            (o_p.float().sum() + o_f.float().sum()).backward()

        row = per_backend(fstep, device, reps)
        out["functions"][fname] = row
    release_memory()
    return out


def per_backend(step, device, reps: int) -> dict:
    """Median ms of `step` under each SDPA backend alone and under the default dispatch; a backend
    that cannot run the call is recorded with its error."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    row = {}
    for name in (*BACKENDS, "default"):
        try:
            if name == "default":
                ms = 1e3 * median_time(step, device, reps)
            else:
                with sdpa_kernel([getattr(SDPBackend, name)]):
                    ms = 1e3 * median_time(step, device, reps)
            row[name] = {"ok": True, "ms": ms}
        except Exception as e:  # noqa: BLE001
            row[name] = {"ok": False, "error": first_line(e)}
    return row


def equality(B, M, T, N, H, d, device) -> dict:
    """The fast path's outputs vs the dense-mask oracle's on the same q/k/v: in bf16 (each also
    against an fp32 reference, so the bf16 rounding of either is seen) and in fp32."""
    import torch

    from vip.model.attention import proxy_attention, proxy_attention_dense
    p32, f32 = random_qkv(B, M, T, N, H, d, device, torch.float32, seed=1)
    p16, f16 = p32.bfloat16(), f32.bfloat16()

    def diff(a, b):
        return max((x.float() - y.float()).abs().max().item() for x, y in zip(a, b))

    with torch.no_grad():
        ref = proxy_attention_dense(p16.float(), f16.float())     # fp32 on the bf16-rounded inputs
        fast16, dense16 = proxy_attention(p16, f16), proxy_attention_dense(p16, f16)
        fast32, dense32 = proxy_attention(p32, f32), proxy_attention_dense(p32, f32)
    res = {"bf16_fast_vs_dense": diff(fast16, dense16), "bf16_fast_vs_fp32_ref": diff(fast16, ref),
           "bf16_dense_vs_fp32_ref": diff(dense16, ref), "fp32_fast_vs_dense": diff(fast32, dense32),
           "max_abs_output": max(t.abs().max().item() for t in ref)}
    res["fp32_equal"] = res["fp32_fast_vs_dense"] <= 1e-4 * max(1.0, res["max_abs_output"])
    # bf16: the fast path is no further from the fp32 result than the oracle is (2× slack + 1 bf16 ulp)
    res["bf16_as_accurate_as_oracle"] = res["bf16_fast_vs_fp32_ref"] <= (
        2 * res["bf16_dense_vs_fp32_ref"] + 2 ** -7 * res["max_abs_output"])
    return res


def flex_check(ck: Check, qkv_p, qkv_f, device, reps: int) -> dict:
    """FlexAttention over the flattened [M + T·N] sequence with the proxy-guided block mask: time
    (forward+backward, compiled on a GPU) against the fast path, and its output against the dense
    oracle. Measured only: the model does not use it. Its errors stay here (optional sub-part)."""
    import torch

    from vip.model.attention import _flat, _split, proxy_attention, proxy_attention_dense
    out: dict = {"used_by_model": False}
    if ck.cuda and ck.left() < 40:
        out["skipped"] = f"time budget ({ck.left():.0f} s left; compiling takes ~30 s)"
        return out
    t0 = time.monotonic()
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        B, T, N, _, H, d = qkv_f.shape
        M = qkv_p.shape[1]
        L = M + T * N
        group = torch.full((L,), -1, dtype=torch.long, device=device)
        group[M:] = torch.arange(T, device=device).repeat_interleave(N)

        def mask_mod(b, h, q_idx, kv_idx):
            return (group[q_idx] < 0) | (group[kv_idx] < 0) | (group[q_idx] == group[kv_idx])

        block_mask = create_block_mask(mask_mod, None, None, L, L, device=str(device))
        out["block_sparsity"] = float(block_mask.sparsity()) if hasattr(block_mask, "sparsity") else None
        flex = torch.compile(flex_attention) if ck.cuda else flex_attention
        out["compiled"] = ck.cuda

        def run(p, f):
            q, k, v = (t.transpose(1, 2) for t in _flat(p, f).unbind(2))        # [B, H, L, d]
            o = flex(q, k, v, block_mask=block_mask).transpose(1, 2)
            return _split(o, M, T, N)

        with torch.no_grad():
            o, ref = run(qkv_p, qkv_f), proxy_attention_dense(qkv_p, qkv_f)
            out["max_abs_diff_vs_dense"] = max((a.float() - b.float()).abs().max().item() for a, b in zip(o, ref))
        if not ck.cuda:
            out["note"] = "CPU: forward only (FlexAttention has no CPU backward)"
            with torch.no_grad():
                out["fwd_ms"] = 1e3 * median_time(lambda: run(qkv_p, qkv_f), device, reps)
                out["fast_path_fwd_ms"] = 1e3 * median_time(lambda: proxy_attention(qkv_p, qkv_f), device, reps)
        else:
            def step(fn):
                p, f = qkv_p.detach().requires_grad_(), qkv_f.detach().requires_grad_()
                o_p, o_f = fn(p, f)
                (o_p.float().sum() + o_f.float().sum()).backward()
            out["fwd_bwd_ms"] = 1e3 * median_time(lambda: step(run), device, reps, warmup=2)
            out["fast_path_fwd_bwd_ms"] = 1e3 * median_time(lambda: step(proxy_attention), device, reps)
            out["vs_fast_path"] = out["fwd_bwd_ms"] / out["fast_path_fwd_bwd_ms"]
        out["ok"] = True
    except PartTimeout:
        raise
    except Exception as e:  # noqa: BLE001
        out.update(ok=False, error=first_line(e, 500), traceback=traceback.format_exc()[-2000:])
    out["seconds"] = time.monotonic() - t0
    return out


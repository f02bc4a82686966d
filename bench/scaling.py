"""The HD-VILA-100M plan, computed from the other benchmarks' JSON: storage and shards, data-loading
cores per GPU, training GPU-hours per epoch, captioning GPU-hours, nodes, and where the
bottleneck moves as nodes are added (docs/scaling.md is its output plus prose).

    .venv/bin/python bench/scaling.py --data bench/out/data_full.json \\
        --train bench/out/train_step_cpu.json [--train bench/out/train_step_h100.json] \\
        [--caption bench/out/caption_flops.json] [--json bench/out/scaling.json]

Where a number comes from:
- measured here: bytes per clip and worker clips/s/core (bench/data.py, per format and content);
  model FLOPs per clip (bench/train_step.py, FlopCounterMode: device-independent); GPU clips/s when
  a --train JSON was taken on a GPU; FLOPs per caption (bench/captioning.py --count-flops);
  the contrastive loss's FLOPs at each global batch (counted below with FlopCounterMode);
- estimated (labelled so): GPU clips/s without a GPU run = matmul peak × --mfu / FLOPs per clip;
  captions/s without a GPU run = peak × --caption-mfu / FLOPs per caption; communication time
  = bytes / the bus bandwidths given (ring all-reduce model). Every assumption is a flag.
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import md_table  # noqa: E402
from vip.config import ShardBuildConfig, TrainConfig  # noqa: E402

HDVILA_CLIPS = 103e6                 # HD-VILA-100M: 103M clips from 3.3M videos, 371.5K hours
GLOBAL_BATCH = TrainConfig().global_batch                 # the reference recipe's global batch
CLIPS_PER_SHARD = ShardBuildConfig().clips_per_shard      # the shard builder's default


@dataclass(frozen=True)
class Cluster:
    """The assumed GPU cluster (flags override every field)."""

    gpu: str = "H100 SXM"
    peak_tflops: float = 798.0       # bf16 8192³ matmul on random data, measured on this workplace's H100
    mfu: float = 0.35                # assumed training MFU when no GPU run is given
    caption_mfu: float = 0.10        # assumed for autoregressive captioning (small matmuls, no KV cache)
    gpus_per_node: int = 8
    cores_per_node: int = 112        # DGX H100: 2 × 56-core Xeon 8480C
    trainer_cores_per_gpu: float = 1.0   # the training process itself (launch, pin-memory thread)
    nvlink_gbs: float = 360.0        # all-reduce bus bandwidth inside a node, GB/s (NVLink 4 order of size)
    ib_gbs: float = 45.0             # per-GPU all-reduce bus bandwidth across nodes, GB/s (8 × 400 Gb/s IB)
    grad_bytes: int = 4              # bytes per parameter reduced (DeepSpeed bf16: fp32 gradient reduction)
    param_bytes: int = 2             # bytes per parameter all-gathered after a ZeRO-1 step (bf16)


# --------------------------------------------------------------------------- inputs
def load_json(paths: list[str]) -> list[dict]:
    return [json.loads(Path(p).read_text()) for p in paths or []]


def train_rates(train: list[dict], cl: Cluster) -> dict:
    """arch → {gflops_per_clip, clips_per_s, source, params} for the ViP model (grad ckpt off; a GPU
    measurement wins over an estimate)."""
    out: dict = {}
    for res in train:
        gpu = res.get("info", {}).get("device", "cpu") != "cpu"
        for r in res["rows"]:
            if r["encoder"] != "vip" or r["grad_ckpt"]:
                continue
            a = out.setdefault(r["arch"], {"gflops_per_clip": r["gflops_per_clip"]})
            if gpu and r["clips_per_s"] > a.get("measured", 0):
                a.update(measured=r["clips_per_s"], device=res["info"]["device"], batch=r["batch"])
    for arch, a in out.items():
        est = cl.peak_tflops * 1e12 * cl.mfu / (a["gflops_per_clip"] * 1e9)
        a["estimate"] = est
        a["clips_per_s"] = a.get("measured", est)
        a["source"] = (f"measured on {a['device']} (micro-batch {a['batch']})" if "measured" in a
                       else f"estimate: {cl.peak_tflops:.0f} TFLOP/s × MFU {cl.mfu:.2f} / counted FLOPs")
        a["params"], a["embed_dim"] = model_facts(arch)
    return out


def model_facts(arch: str) -> tuple[int, int]:
    """(trainable parameters, embedding width) of CLIPViP on this arch (random weights, CPU)."""
    from vip.config import ModelConfig
    from vip.model import build_model
    m = build_model(ModelConfig(arch=arch))
    return sum(p.numel() for p in m.parameters() if p.requires_grad), m.embed_dim


@functools.lru_cache(maxsize=None)
def loss_flops(G: int, D: int) -> float:
    """FLOPs of the OCL loss (variant d) forward + backward on a global batch G, counted with
    FlopCounterMode at G = 64 and 128 and scaled by G² (the loss is three G×G×D products)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from vip.losses import ocl_loss
    counted = {}
    for g in (64, 128):
        f = {k: torch.nn.functional.normalize(torch.randn(g, D), dim=-1).requires_grad_() for k in
             ("video", "frame", "subtitle", "caption")}
        with FlopCounterMode(display=False) as fc:
            loss, _ = ocl_loss("d", **f, has_caption=torch.ones(g, dtype=torch.bool), logit_scale=torch.tensor(4.6))
            loss.backward()
        counted[g] = fc.get_total_flops()
    assert abs(counted[128] / counted[64] - 4) < 0.05, counted      # quadratic in G, as the formula says
    return counted[128] * (G / 128) ** 2


# --------------------------------------------------------------------------- the plan
def storage_rows(data: dict) -> list[dict]:
    rows = []
    for r in data["formats"]:
        st = r["storage"]
        b = st["bytes_per_13.4s_clip"]
        rows.append({"content": r["content"], "format": r["label"], "kbit_s": st["mp4_kbit_per_s"],
                     "bytes_per_clip": b, "tb": b * HDVILA_CLIPS / 1e12,
                     "shards": math.ceil(HDVILA_CLIPS / CLIPS_PER_SHARD), "shard_mb": b * CLIPS_PER_SHARD / 1e6,
                     "worker_per_core": r["worker"]["per_core"], "loader_per_core": r["loader"]["per_core"]})
    return rows


def cores_rows(storage: list[dict], rates: dict, cl: Cluster) -> list[dict]:
    rows = []
    for s in storage:
        for arch, a in rates.items():
            cores = a["clips_per_s"] / s["worker_per_core"]
            rows.append({"content": s["content"], "format": s["format"], "arch": arch,
                         "gpu_clips_per_s": a["clips_per_s"], "cores_per_gpu": cores,
                         "cores_per_gpu_cpu_normalise": a["clips_per_s"] / s["loader_per_core"],
                         "node_cores_needed": cl.gpus_per_node * (cores + cl.trainer_cores_per_gpu),
                         "read_mb_s_per_gpu": a["clips_per_s"] * s["bytes_per_clip"] / 1e6})
    return rows


def comm_seconds(nbytes: float, gpus: int, cl: Cluster) -> float:
    """Ring all-reduce of nbytes over `gpus` GPUs: 2(n-1)/n · bytes / bus bandwidth (NVLink in a node,
    the IB share across nodes)."""
    if gpus <= 1:
        return 0.0
    bw = cl.nvlink_gbs if gpus <= cl.gpus_per_node else cl.ib_gbs
    return 2 * (gpus - 1) / gpus * nbytes / (bw * 1e9)


def node_rows(arch: str, a: dict, cl: Cluster, storage: dict, nodes=(1, 2, 4, 8, 16, 32)) -> list[dict]:
    """Per node count, for one optimizer step of GLOBAL_BATCH clips: compute, gradient traffic,
    feature gather, replicated loss; and the epoch."""
    D, P = a["embed_dim"], a["params"]
    rows = []
    for n in nodes:
        gpus = n * cl.gpus_per_node
        per_gpu = GLOBAL_BATCH / gpus
        compute = per_gpu / a["clips_per_s"]
        grads = comm_seconds(P * cl.grad_bytes, gpus, cl) + comm_seconds(P * cl.param_bytes, gpus, cl) / 2
        # features: 4 modalities × G × D bf16 gathered forward; their gradients all-reduced backward
        feat_bytes = 4 * GLOBAL_BATCH * D * 2
        feats = comm_seconds(feat_bytes, gpus, cl) / 2 + comm_seconds(feat_bytes, gpus, cl)
        loss = loss_flops(GLOBAL_BATCH, D) / (cl.peak_tflops * 1e12 * cl.mfu)
        step = compute + grads + feats + loss          # no overlap assumed: an upper bound on step time
        rows.append({"nodes": n, "gpus": gpus, "micro_batch": per_gpu, "compute_ms": 1e3 * compute,
                     "grad_comm_ms": 1e3 * grads, "feature_comm_ms": 1e3 * feats, "loss_ms": 1e3 * loss,
                     "step_ms": 1e3 * step, "comm_share": (grads + feats) / step,
                     "epoch_hours": HDVILA_CLIPS / GLOBAL_BATCH * step / 3600,
                     "gpu_hours": HDVILA_CLIPS / GLOBAL_BATCH * step / 3600 * gpus,
                     "read_gb_s": GLOBAL_BATCH / step * storage["bytes_per_clip"] / 1e9})
    return rows


def caption_plan(caption: list[dict], cl: Cluster) -> list[dict]:
    """One row per --caption JSON: captions/s per GPU, measured from a timed GPU run of
    bench/captioning.py, else estimated from a --count-flops run (a CPU timing is no GPU figure: skipped)."""
    rows = []
    for c in caption:
        if "job" in c:          # a timed run: one actor per GPU
            a = c["args"]
            if not str(a.get("device", "cpu")).startswith("cuda"):
                continue
            row = {"model": a.get("model") or a.get("arch"), "decoding": a["decoding"],
                   "num_beams": c["alone"]["provenance"]["generation"].get("num_beams", 1),
                   "max_tokens": a["max_tokens"], "gflops_per_caption": float("nan"),
                   "captions_per_s": c["job"]["steady_captions_per_s"] / max(1, c["job"]["actors"]),
                   "source": "measured (job after startup, per GPU)"}
        else:
            row = {"model": c.get("arch") or c.get("model"), "decoding": c["decoding"],
                   "num_beams": c.get("num_beams", 1), "max_tokens": c["max_tokens"],
                   "gflops_per_caption": c["gflops_per_caption"],
                   "captions_per_s": cl.peak_tflops * 1e12 * cl.caption_mfu / (c["gflops_per_caption"] * 1e9),
                   "source": f"estimate: {cl.peak_tflops:.0f} TFLOP/s × {cl.caption_mfu:.2f} / counted FLOPs"}
        rows.append({**row, "gpu_hours": HDVILA_CLIPS / row["captions_per_s"] / 3600})
    return rows


# --------------------------------------------------------------------------- report
def report(plan: dict) -> str:
    cl = Cluster(**plan["cluster"])
    out = [f"Cluster assumed: {cl.gpu}, {cl.gpus_per_node} GPUs and {cl.cores_per_node} cores per node; "
           f"global batch {GLOBAL_BATCH}; {HDVILA_CLIPS / 1e6:.0f}M clips.", "", "### Storage and shards", ""]
    out.append(md_table(["content", "format", "mp4 kbit/s", "KB/clip", f"TB for {HDVILA_CLIPS / 1e6:.0f}M clips", f"shards ({CLIPS_PER_SHARD:,} clips)",
                    "MB/shard"],
                   [[s["content"], s["format"], f"{s['kbit_s']:.0f}", f"{s['bytes_per_clip'] / 1e3:.0f}",
                     f"{s['tb']:.1f}", f"{s['shards']:,}", f"{s['shard_mb']:.0f}"] for s in plan["storage"]]))
    out += ["", "### GPU throughput (training step, ViP, bf16)", ""]
    out.append(md_table(["arch", "GFLOP/clip (counted)", "params (M)", "clips/s per GPU", "source", "GPU-hours / epoch (compute only)"],
                   [[k, f"{a['gflops_per_clip']:.0f}", f"{a['params'] / 1e6:.0f}", f"{a['clips_per_s']:,.0f}",
                     a["source"], f"{HDVILA_CLIPS / a['clips_per_s'] / 3600:,.0f}"] for k, a in plan["rates"].items()]))
    out += ["", "### Data-loading cores per GPU", ""]
    out.append(md_table(["content", "format", "arch", "GPU clips/s", "cores/GPU (GPU normalises)",
                    "cores/GPU (CPU normalises)", f"cores/node needed (of {cl.cores_per_node})", "read MB/s per GPU"],
                   [[c["content"], c["format"], c["arch"], f"{c['gpu_clips_per_s']:,.0f}", f"**{c['cores_per_gpu']:.1f}**",
                     f"{c['cores_per_gpu_cpu_normalise']:.1f}", f"{c['node_cores_needed']:.0f}",
                     f"{c['read_mb_s_per_gpu']:.0f}"] for c in plan["cores"]]))
    for arch, rows in plan["nodes"].items():
        out += ["", f"### Nodes: {arch}, one optimizer step of {GLOBAL_BATCH} clips (no compute/comm overlap assumed)", ""]
        out.append(md_table(["nodes", "GPUs", "clips/GPU/step", "compute ms", "gradient comm ms", "feature gather ms",
                        "loss ms", "step ms", "comm share", "epoch h", "GPU-h/epoch", "read GB/s (all nodes)"],
                       [[str(r["nodes"]), str(r["gpus"]), f"{r['micro_batch']:g}", f"{r['compute_ms']:.1f}",
                         f"{r['grad_comm_ms']:.1f}", f"{r['feature_comm_ms']:.2f}", f"{r['loss_ms']:.2f}",
                         f"{r['step_ms']:.1f}", f"{100 * r['comm_share']:.0f}%", f"{r['epoch_hours']:.1f}",
                         f"{r['gpu_hours']:.0f}", f"{r['read_gb_s']:.1f}"] for r in rows]))
    if plan.get("caption"):
        out += ["", "### Captioning (one caption per clip)", "",
                md_table(["model", "decoding", "tokens", "GFLOP/caption (counted)", "captions/s per GPU", "source",
                     f"GPU-hours for {HDVILA_CLIPS / 1e6:.0f}M"],
                    [[c["model"], f"{c['decoding']} ({c['num_beams']} beams)" if c["num_beams"] > 1 else c["decoding"],
                      str(c["max_tokens"]), f"{c['gflops_per_caption']:.0f}", f"{c['captions_per_s']:.0f}",
                      c["source"], f"{c['gpu_hours']:,.0f}"] for c in plan["caption"]])]
    return "\n".join(out)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="bench/data.py --json output")
    p.add_argument("--train", action="append", required=True, help="bench/train_step.py --json output(s)")
    p.add_argument("--caption", action="append",
                   help="bench/captioning.py --json output: --count-flops (estimate) or a timed GPU run (measured)")
    p.add_argument("--format", default="4 fps · 224² · gop 4 · fastdecode", help="stored format for the node tables")
    p.add_argument("--content", default="natural", help="content row for the node tables' read bandwidth")
    for f, v in asdict(Cluster()).items():
        p.add_argument("--" + f.replace("_", "-"), type=type(v), default=v)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    cl = Cluster(**{f: getattr(args, f) for f in asdict(Cluster())})
    data = load_json([args.data])[0]
    rates = train_rates(load_json(args.train), cl)
    storage = storage_rows(data)
    pick = next((s for s in storage if s["format"] == args.format and s["content"] == args.content), None)
    if pick is None:
        raise SystemExit(f"--format {args.format!r} --content {args.content!r} is not in {args.data}; it has: "
                         + "; ".join(f"{s['content']} / {s['format']}" for s in storage))
    plan = {"cluster": asdict(cl), "rates": rates, "storage": storage, "cores": cores_rows(storage, rates, cl),
            "nodes": {arch: node_rows(arch, a, cl, pick) for arch, a in rates.items()},
            "node_table_storage": pick, "caption": caption_plan(load_json(args.caption), cl)}
    print(report(plan))
    if args.json:
        Path(args.json).write_text(json.dumps(plan, indent=2))
    return plan


if __name__ == "__main__":
    main()

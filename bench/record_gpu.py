"""Put a `bench/gpu.py` run's numbers into the docs.

    python bench/record_gpu.py DIR/gpu.json           # docs/benchmarks.md and docs/scaling.md, in place
    python bench/record_gpu.py DIR/gpu.json --allow-cpu --benchmarks /tmp/b.md --scaling /tmp/s.md   # CI smoke

docs/benchmarks.md: the block between `<!-- gpu-check:begin -->` and `<!-- gpu-check:end -->` becomes
the run's tables (device, date and command named). docs/scaling.md, "Taking the GPU numbers": the block
between `<!-- gpu-check:scaling:begin -->` and `<!-- gpu-check:scaling:end -->` becomes a short table of
the measured numbers (clips/s per GPU, MFU, data cores per GPU, captions/s) beside the estimates they
replace. Only the marked blocks change, and running it twice gives the same files. A JSON from a CPU
run is refused unless --allow-cpu (its numbers are no GPU measurement).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import md_table  # noqa: E402
from bench.gpu_check.report import render_md  # noqa: E402

BENCH_MARKERS = ("<!-- gpu-check:begin -->", "<!-- gpu-check:end -->")
SCALING_MARKERS = ("<!-- gpu-check:scaling:begin -->", "<!-- gpu-check:scaling:end -->")

# What docs/scaling.md estimated before a GPU run (its assumptions: bench/scaling.py's Cluster defaults)
PEAK_TFLOPS_H100 = 798.0          # bf16 8192³ matmul measured on an H100 SXM (bench/train_step.matmul_peak_flops)
ASSUMED_MFU = 0.35                # training
ASSUMED_CAPTION_MFU = 0.10        # autoregressive captioning
CAPTION_GFLOP = {"beam": 3516.0, "greedy": 586.0}   # CoCa ViT-L/14, 30 tokens, counted (docs/benchmarks.md)
DEV_WORKER_CLIPS_PER_CORE = 90.7  # natural content, default format, dev CPU (docs/benchmarks.md, bench/data.py)
CPU_VIP_VS_MEANPOOL = {"ViT-B-32": 1.04, "ViT-B-16": 1.01}   # train step on the dev CPU (docs/benchmarks.md)


def _n(x: float) -> str:
    """A measured number to about 3 significant digits (thousands separated)."""
    if x >= 100:
        return f"{x:,.0f}"
    return f"{x:.3g}"


def replace_block(text: str, markers: tuple[str, str], body: str, where: str) -> str:
    """text with everything between the two markers replaced by body (markers kept)."""
    begin, end = markers
    if text.count(begin) != 1 or text.count(end) != 1:
        raise SystemExit(f"{where}: expected exactly one {begin} and one {end}")
    i, j = text.index(begin) + len(begin), text.index(end)
    if j < i:
        raise SystemExit(f"{where}: {end} comes before {begin}")
    return text[:i] + "\n" + body.strip("\n") + "\n" + text[j:]


def _label(meta: dict) -> str:
    kind = "" if meta.get("device_type") == "cuda" else " — a CPU smoke run, not a GPU measurement"
    part = "" if meta.get("finished") else " (partial: the run did not finish)"
    return f"measured on {meta.get('device')}, {meta.get('date')}{kind}{part}"


def benchmarks_block(res: dict) -> str:
    meta = res["meta"]
    return "\n".join([f"#### {_label(meta)[0].upper() + _label(meta)[1:]}", "", render_md(res)])


def _vip_row(res: dict, arch: str, ckpt: bool = False) -> dict | None:
    rows = (res["parts"].get("train_step") or {}).get("rows") or []
    return next((r for r in rows if r["arch"] == arch and r["encoder"] == "vip" and r["grad_ckpt"] == ckpt), None)


def scaling_rows(res: dict) -> list[list[str]]:
    parts = res["parts"]
    rows = []
    dev = parts.get("device") or {}
    if dev.get("matmul"):
        m = dev["matmul"]
        rows.append([f"matmul peak, {m['dtype']} {m['n']}³ (the MFU denominator)", f"**{_n(m['tflops'])} TFLOP/s**",
                     f"{PEAK_TFLOPS_H100:.0f} TFLOP/s (H100 SXM, measured)"])
    data = parts.get("data") or {}
    per_core = data.get("clips_per_core")
    archs = [a for a in ("ViT-B-32", "ViT-B-16") if _vip_row(res, a)] or \
        sorted({r["arch"] for r in (parts.get("train_step") or {}).get("rows") or []})
    precision = (parts.get("train_step") or {}).get("precision", "?")
    for arch in archs:
        r = _vip_row(res, arch)
        if not r:
            continue
        est = PEAK_TFLOPS_H100 * 1e12 * ASSUMED_MFU / (r["gflops_per_clip"] * 1e9)
        rows.append([f"{arch} ViP clips/s per GPU ({precision}, micro-batch {r['batch']})",
                     f"**{_n(r['clips_per_s'])}**", f"{_n(est)} (estimate: {PEAK_TFLOPS_H100:.0f} TFLOP/s × MFU "
                     f"{ASSUMED_MFU} ÷ {_n(r['gflops_per_clip'])} GFLOP per clip)"])
        rows.append([f"{arch} MFU", f"**{_n(100 * r['mfu'])}%**", f"{100 * ASSUMED_MFU:.0f}% (assumed)"])
        if r.get("vs_meanpool") is not None:
            cpu = CPU_VIP_VS_MEANPOOL.get(arch)
            rows.append([f"{arch} ViP ÷ MeanPool clips/s", f"{r['vs_meanpool']:.2f}",
                         f"{cpu:.2f} (dev CPU)" if cpu else "–"])
        ck = _vip_row(res, arch, True)
        if ck:
            rows.append([f"{arch} ViP clips/s with gradient checkpointing (micro-batch {ck['batch']})",
                         _n(ck["clips_per_s"]), "–"])
        if per_core:
            rows.append([f"{arch} data-loading cores per GPU ({data.get('content')} content, {data.get('format')})",
                         f"**{_n(r['clips_per_s'] / per_core)}**",
                         f"{_n(est / DEV_WORKER_CLIPS_PER_CORE)} (estimated rate ÷ dev-CPU worker rate)"])
    if per_core:
        rows.append([f"data clips/s per core ({data.get('workers')} StreamLoader worker(s), {data.get('format')})",
                     _n(per_core), f"{DEV_WORKER_CLIPS_PER_CORE} (dev CPU, one worker in-process)"])
    cap = parts.get("captioning") or {}
    for decoding in ("beam", "greedy"):
        ok = [x for x in cap.get("rows") or [] if x["decoding"] == decoding and x.get("ok")]
        failed = [x for x in cap.get("rows") or [] if x["decoding"] == decoding and not x.get("ok")]
        l14 = "ViT-L-14" in str(cap.get("model"))
        est = (f"{PEAK_TFLOPS_H100 * 1e12 * ASSUMED_CAPTION_MFU / (CAPTION_GFLOP[decoding] * 1e9):.0f} "
               f"(estimate, MFU {ASSUMED_CAPTION_MFU})") if l14 else "–"
        what = f"captions/s, {'CoCa ViT-L/14' if l14 else cap.get('model')} {decoding}, {cap.get('max_tokens')} tokens"
        if ok:
            best = max(ok, key=lambda x: x["captions_per_s"])
            rows.append([f"{what} (batch {best['batch_size']})", f"**{_n(best['captions_per_s'])}**", est])
        elif failed:
            rows.append([what, f"failed: `{failed[0]['error'][:120]}`", est])
    pre = parts.get("pretrain") or {}
    if pre.get("runs"):
        w = pre.get("weights") or {}
        rows.append(["short `vip pretrain` (world 1), resumed half-way: final weights bit-identical",
                     ("yes" if pre.get("bit_identical") else
                      f"no ({w.get('tensors_differing')} of {w.get('tensors')} tensors, max abs diff "
                      f"{w.get('max_abs_diff', 0):.2g})"), "yes on CPU (tests/test_train.py)"])
    return rows


def scaling_block(res: dict) -> str:
    meta = res["meta"]
    rows = scaling_rows(res)
    head = ["quantity", f"{_label(meta)}", "estimate it replaces"]
    out = [md_table(head, rows) if rows else f"No numbers: {_label(meta)}; every part failed.", "",
           f"From `{meta.get('command')}` (commit {meta.get('git_commit') or 'unknown'}); every table of the run: "
           "docs/benchmarks.md, \"GPU check\"."]
    bad = [f"{n} ({r.get('status')})" for n, r in res["parts"].items() if r.get("status") not in ("ok",)]
    if bad:
        out.append(f"Parts not ok in this run: {', '.join(bad)}.")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("json", type=Path, help="DIR/gpu.json of a bench/gpu.py run")
    p.add_argument("--benchmarks", type=Path, default=ROOT / "docs" / "benchmarks.md")
    p.add_argument("--scaling", type=Path, default=ROOT / "docs" / "scaling.md")
    p.add_argument("--allow-cpu", action="store_true", help="accept a CPU run (smoke tests of this script)")
    args = p.parse_args(argv)
    res = json.loads(args.json.read_text())
    meta = res.get("meta") or {}
    if meta.get("device_type") != "cuda" and not args.allow_cpu:
        print(f"record_gpu: {args.json} is from a {meta.get('device_type', 'unknown')} run ({meta.get('device')}), "
              "not a GPU: refusing to put it in the docs (--allow-cpu to force, e.g. on copies in a test)",
              file=sys.stderr)
        return 2
    bench = replace_block(args.benchmarks.read_text(), BENCH_MARKERS, benchmarks_block(res), str(args.benchmarks))
    scaling = replace_block(args.scaling.read_text(), SCALING_MARKERS, scaling_block(res), str(args.scaling))
    args.benchmarks.write_text(bench)
    args.scaling.write_text(scaling)
    print(f"recorded {_label(meta)} into {args.benchmarks} and {args.scaling}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

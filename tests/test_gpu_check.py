"""bench/gpu.py (the prepared GPU check) in its CPU smoke form, and bench/record_gpu.py on copies of the
docs: every part runs and records finite numbers, a failing or overlong part never stops the others,
and recording replaces exactly the marked blocks (twice gives the same files). Timings are never
asserted."""
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PARTS = ["device", "train_step", "attention", "data", "captioning", "pretrain"]


def _run(script, *args, timeout=1200):
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "2", "TOKENIZERS_PARALLELISM": "false",
           "RAY_USAGE_STATS_ENABLED": "0"}
    return subprocess.run([sys.executable, str(ROOT / "bench" / script), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _strict_json(path):
    def refuse(c):
        raise ValueError(f"non-finite number {c} in {path}")
    return json.loads(Path(path).read_text(), parse_constant=refuse)


def _part_sections(md):
    """{part name: its markdown} from gpu.md (each part starts with a '**name** — status' line)."""
    out, name = {}, None
    for line in md.splitlines():
        if line.startswith("**") and "** — " in line:
            name = line[2:line.index("** — ")]
            out[name] = []
        elif name:
            out[name].append(line)
    return {k: "\n".join(v) for k, v in out.items()}


def _positive(*values):
    for v in values:
        assert isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0, values


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpucheck") / "gpu"
    t0 = time.monotonic()
    p = _run("gpu.py", "--device", "cpu", "--quick", "--out", str(out))
    assert p.returncode == 0, p.stderr[-4000:]
    return out, p, time.monotonic() - t0


@pytest.mark.slow
def test_cpu_quick_check_runs_every_part(quick_run):
    out, p, _ = quick_run
    res = _strict_json(out / "gpu.json")
    meta = res["meta"]
    assert meta["finished"] and meta["device_type"] == "cpu" and meta["torch"] and meta["date"]
    assert "bench/gpu.py" in meta["command"] and "--quick" in meta["command"]
    assert list(res["parts"]) == PARTS
    for name, r in res["parts"].items():
        assert r["ok"] and r["status"] == "ok" and r["error"] is None, (name, r.get("error"))
        _positive(r["seconds"])

    dev = res["parts"]["device"]
    _positive(dev["matmul"]["tflops"], dev["memory_gib"], dev["cpu_count"])

    ts = res["parts"]["train_step"]
    assert {(r["encoder"], r["grad_ckpt"]) for r in ts["rows"]} == {("vip", False), ("meanpool", False)}
    for r in ts["rows"]:
        assert r["arch"] == "vip-tiny" and r["batch"] == 2
        _positive(r["step_s"], r["clips_per_s"], r["gflops_per_clip"], r["mfu"], r["vs_meanpool"])
    assert not ts["skipped_rows"] and not ts["row_errors"]
    assert _strict_json(out / "train_step.json")["rows"] == ts["rows"]      # bench/scaling.py --train input

    att = res["parts"]["attention"]
    assert {e["variant"] for e in att["encoders"]} == {"floor", "ViP-fast", "ViP-dense", "FullAttention"}
    assert {e["T"] for e in att["encoders"]} == {4, 8}
    for e in att["encoders"]:
        _positive(e["wall_med_s"], e["tokens"])
    calls = att["sdpa"]["calls"]
    assert len(calls) == 5 and all(c["default"]["ok"] and c["MATH"]["ok"] for c in calls.values())
    for c in calls.values():
        _positive(c["default"]["ms"])
    eq = att["equality"]
    assert eq["fp32_equal"] and eq["bf16_as_accurate_as_oracle"] and eq["fp32_fast_vs_dense"] < 1e-4
    assert att["flex"]["ok"] and att["flex"]["max_abs_diff_vs_dense"] < 1e-4      # measured, not used

    data = res["parts"]["data"]
    assert data["workers"] == 1 and data["content"] == "natural"
    assert data["batch_shapes"]["video"][0] == [2, 4, 3, 64, 64]
    _positive(data["clips"], data["wall_clips_per_s"], data["clips_per_core"], data["cores_per_gpu"])
    assert data["cores_per_gpu"] == pytest.approx(data["train_clips_per_s"] / data["clips_per_core"])

    cap = res["parts"]["captioning"]
    assert [(r["decoding"], r["batch_size"], r["ok"]) for r in cap["rows"]] == [("greedy", 2, True)]
    _positive(cap["rows"][0]["captions_per_s"])
    assert "skipped" in cap["ray"]

    pre = res["parts"]["pretrain"]
    assert pre["steps"] == 4 and pre["resume_at"] == 2 and pre["backend"] == "gloo"
    assert [r["rc"] for r in pre["runs"].values()] == [0, 0, 0] and pre["runs"]["B2"]["resumed"]
    assert pre["losses_finite"] and pre["same_samples"] and pre["bit_identical"]
    assert pre["steps_a"] == pre["steps_b"] == 4 and pre["weights"]["tensors_differing"] == 0

    md = (out / "gpu.md").read_text()
    assert meta["device"] in md and meta["date"] in md and meta["command"] in md
    sections = _part_sections(md)
    assert list(sections) == PARTS
    for name, text in sections.items():
        assert "|---|" in text, name                   # a table per part
    assert md.strip() in p.stdout                      # the fragment is also printed


@pytest.mark.slow
def test_record_gpu_replaces_only_the_marked_blocks(quick_run, tmp_path):
    from bench.record_gpu import BENCH_MARKERS, SCALING_MARKERS
    out, _, _ = quick_run
    docs = {}
    for name in ("benchmarks.md", "scaling.md"):
        docs[name] = tmp_path / name
        shutil.copy(ROOT / "docs" / name, docs[name])
    before = {k: v.read_text() for k, v in docs.items()}
    args = [str(out / "gpu.json"), "--benchmarks", str(docs["benchmarks.md"]), "--scaling", str(docs["scaling.md"])]

    refused = _run("record_gpu.py", *args)
    assert refused.returncode == 2 and "--allow-cpu" in refused.stderr
    assert {k: v.read_text() for k, v in docs.items()} == before

    p = _run("record_gpu.py", *args, "--allow-cpu")
    assert p.returncode == 0, p.stderr[-3000:]
    after = {k: v.read_text() for k, v in docs.items()}
    meta = json.loads((out / "gpu.json").read_text())["meta"]
    for name, (begin, end) in (("benchmarks.md", BENCH_MARKERS), ("scaling.md", SCALING_MARKERS)):
        old, new = before[name], after[name]
        assert old.count(begin) == new.count(begin) == 1 and old.count(end) == new.count(end) == 1
        # outside the block: byte for byte the same
        assert new[:new.index(begin)] == old[:old.index(begin)]
        assert new[new.index(end):] == old[old.index(end):]
        block = new[new.index(begin):new.index(end)]
        assert meta["device"] in block and meta["date"] in block and "CPU smoke run" in block
        assert block != old[old.index(begin):old.index(end)]
    bench_block = after["benchmarks.md"][after["benchmarks.md"].index(BENCH_MARKERS[0]):]
    assert all(f"**{part}** — ok" in bench_block for part in PARTS) and meta["command"] in bench_block
    scaling_block = after["scaling.md"][after["scaling.md"].index(SCALING_MARKERS[0]):]
    assert "estimate it replaces" in scaling_block and "clips/s per GPU" in scaling_block
    assert "data-loading cores per GPU" in scaling_block and "captions/s" in scaling_block

    again = _run("record_gpu.py", *args, "--allow-cpu")                 # idempotent
    assert again.returncode == 0, again.stderr[-3000:]
    assert {k: v.read_text() for k, v in docs.items()} == after


def test_a_failing_part_does_not_stop_the_others():
    """--parts boom,device: the test-only failing part is recorded with its traceback, the next part
    still runs, and the JSON and markdown hold both."""
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        p = _run("gpu.py", "--device", "cpu", "--quick", "--parts", "boom,device", "--out", d, timeout=300)
        assert p.returncode == 0, p.stderr[-3000:]
        res = _strict_json(Path(d) / "gpu.json")
        boom, dev = res["parts"]["boom"], res["parts"]["device"]
        assert not boom["ok"] and boom["status"] == "error" and "boom (test-only part)" in boom["error"]
        assert "Traceback" in boom["error"] and boom["before_failure"] == 1     # partial results kept
        assert dev["ok"] and dev["matmul"]["tflops"] > 0
        sections = _part_sections((Path(d) / "gpu.md").read_text())
        assert list(sections) == ["boom", "device"] and all("|---|" in s for s in sections.values())
        assert "Error: `RuntimeError: boom (test-only part)`" in sections["boom"]


def test_a_part_over_its_budget_is_stopped_and_the_run_goes_on(tmp_path, monkeypatch):
    """In process: a part past its time budget is interrupted (status timeout), a part raising is an
    error, and the parts around them run; gpu.json is rewritten after every part."""
    sys.path.insert(0, str(ROOT))
    from bench.gpu_check import __main__ as gpu
    seen = []

    def first(ck, res):
        res["value"] = 1.5

    def slow(ck, res):
        res["started"] = True
        seen.append(json.loads((ck.out / "gpu.json").read_text())["parts"]["first"]["status"])
        time.sleep(30)

    def last(ck, res):
        res["value"] = 2.5

    monkeypatch.setitem(gpu.BUDGETS, "slow", ((1, 1), (1, 1)))
    args = gpu.parse_args(["--out", str(tmp_path), "--device", "cpu", "--parts", "device"])
    ck = gpu.Check(args, {"first": first, "boom": gpu.part_boom, "slow": slow, "last": last})
    t0 = time.monotonic()
    res = ck.run(["first", "boom", "slow", "last"])
    assert time.monotonic() - t0 < 20
    assert seen == ["ok"]                                   # written before the next part started
    st = {k: v["status"] for k, v in res["parts"].items()}
    assert st == {"first": "ok", "boom": "error", "slow": "timeout", "last": "ok"}
    assert res["parts"]["slow"]["started"] and "time budget" in res["parts"]["slow"]["error"]
    on_disk = _strict_json(tmp_path / "gpu.json")
    assert on_disk["meta"]["finished"] and on_disk["parts"]["last"]["value"] == 2.5
    assert not ck.tmp.exists()                              # the run's temp dir is removed


@pytest.mark.parametrize("limit,per_clip,cap,want", [(300, 0.25, 1024, 280), (250, 0.25, 1024, 224),
                                                     (10_000, 0.01, 512, 512)])
def test_largest_batch_from_two_probes(monkeypatch, limit, per_clip, cap, want):
    """The train_step part's micro-batch search on a (mocked) GPU: the peaks at 8 and 16 predict the
    batch that fills 90% of free memory; a miss backs off by 20%; --max-batch caps it."""
    from types import SimpleNamespace

    import torch
    sys.path.insert(0, str(ROOT))
    from bench.gpu_check import train
    gib = 2 ** 30
    peak = {"now": 0}
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (80 * gib, 80 * gib))
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda *a: peak.update(now=0))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a: peak["now"])
    tried = []

    class FakeBench:                 # 2 GiB of weights and optimizer + per_clip GiB per clip; OOM above `limit`
        @staticmethod
        def fits(arch, encoder, grad_ckpt, B, args, rt, objective):
            tried.append(B)
            peak["now"] = int((2 + per_clip * min(B, limit)) * gib)
            return B <= limit

    ck = SimpleNamespace(args=SimpleNamespace(max_batch=cap))
    B, probes = train.largest_batch(ck, FakeBench, train.Row("ViT-B-32", "vip", False, True), None,
                                  SimpleNamespace(device="cuda:0"), None)
    assert B == want and B % 8 == 0
    assert tried[:2] == [8, 16] and [p["batch"] for p in probes] == tried
    assert probes[-1]["fits"] and all(not p["fits"] for p in probes[2:-1])


def test_fused_adam_fallback_switches_the_trainer_to_torch_adamw(tmp_path):
    """On a GPU whose FusedAdam build does not finish within --adam-build-limit, the check uses
    torch's AdamW (the trainer's DeepSpeed config with torch_adam) and says so."""
    sys.path.insert(0, str(ROOT))
    import vip.train.ds_config as dsc
    from bench.gpu_check import __main__ as gpu
    from bench.gpu_check.device import ensure_optimizer
    from vip.config import OptimConfig, TrainConfig
    args = gpu.parse_args(["--out", str(tmp_path), "--device", "cpu", "--adam-build-limit", "0"])
    ck = gpu.Check(args, {})
    ck.args.device = "cuda"                  # as on the GPU machine, without touching CUDA
    res = {}
    try:
        ensure_optimizer(ck, res)
    finally:
        shutil.rmtree(ck.tmp, ignore_errors=True)
    assert ck.optimizer.startswith("torch AdamW (fallback") and res["optimizer"] == ck.optimizer
    assert ck.adam_build["proc"].poll() is not None                       # the build was stopped
    assert ck.adam() == "torch"                                            # optim.adam of its engines
    cfg = dsc.make_ds_config(TrainConfig(global_batch=8), OptimConfig(adam=ck.adam()), 8, 1, "bf16", "cuda")
    assert cfg["optimizer"]["params"]["torch_adam"] is True

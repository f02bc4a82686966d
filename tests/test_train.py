"""DeepSpeed pretraining end to end: 2 real CPU processes (gloo) through launch/pretrain.sh."""
import glob
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY_MODEL = ["model.arch=vip-tiny", "model.num_proxies=2", "model.max_frames=4"]


def _args(shard_dir, out, steps=8, **extra):
    base = ["--config", "tiny", f"data.shards={shard_dir}", "data.batch_size=2", "data.num_workers=1",
            "data.num_frames=4", "data.image_size=32", "data.context_length=32", f"train.out={out}",
            f"train.steps={steps}", "train.global_batch=4", "train.save_every=2", "train.log_every=1",
            "train.log_keys=true", "train.tensorboard=false", "optim.lr=1e-3", "optim.warmup_ratio=0.25",
            *TINY_MODEL]
    return base + [f"{k}={v}" for k, v in extra.items()]


def _launch(args, port, **popen):
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = ["bash", str(ROOT / "launch/pretrain.sh"), "--nproc", "2", "--master-port", str(port),
           "--python", sys.executable, "--", *args]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, **popen)


def _run(args, port, timeout=300):
    p = _launch(args, port)
    out, _ = p.communicate(timeout=timeout)
    return p.returncode, out


def _records(out):
    """Per rank: the keys log as [(step, micro, keys)], the last record per (step, micro) winning (a
    killed run's tail is redone with the same numbers)."""
    res = {}
    for r in (0, 1):
        recs = {}
        for line in (Path(out) / "keys" / f"rank{r}.jsonl").read_text().splitlines():
            rec = json.loads(line)
            recs[(rec["step"], rec["micro"])] = rec["keys"]
        res[r] = [(*k, recs[k]) for k in sorted(recs)]
    return res


def _keys(out):
    """Per rank: the keys of each micro-batch, in order."""
    return {r: [keys for _, _, keys in recs] for r, recs in _records(out).items()}


def _final(out):
    """Final weights as raw bytes per tensor (the safetensors header orders its metadata at random)."""
    from safetensors.torch import load_file
    sd = load_file(str(Path(out) / "final" / "model.safetensors"))
    return {k: (v.dtype, tuple(v.shape), v.numpy().tobytes()) for k, v in sorted(sd.items())}


@pytest.mark.slow
def test_kill9_and_sigterm_resume_bitwise(shard_dir, tmp_path, free_port):
    """Uninterrupted vs kill -9 after a checkpoint + resume vs SIGTERM (preemption) + resume:
    same sample keys in the same order on every rank, numbered (step, micro) alike across the
    resumes, and bit-identical final weights — with dropout, so the RNG states each step draws
    from must continue exactly too. The pre-empted launch exits 143."""
    drop = {"model.dropout": 0.1}
    port = free_port()
    rc, log_a = _run(_args(shard_dir, tmp_path / "a", **drop), port)
    assert rc == 0, log_a[-3000:]
    # DeepSpeed's CPU all-reduce buffers (one /dev/shm file per rank) are released, not leaked
    assert not glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_*_{port}_*")
    assert "samples/s" in log_a and "data wait" in log_a
    ref_keys, ref_final, ref_records = _keys(tmp_path / "a"), _final(tmp_path / "a"), _records(tmp_path / "a")
    assert len(ref_keys[0]) == 8 and set(ref_keys[0][0]).isdisjoint(ref_keys[1][0])
    assert [(step, micro) for step, micro, _ in ref_records[0]] == [(i, i + 1) for i in range(8)]

    # kill -9 the whole job once the step-4 checkpoint is complete and training has moved on
    b = tmp_path / "b"
    p = _launch(_args(shard_dir, b, **drop), free_port())
    deadline = time.time() + 240
    while not (b / "checkpoints" / "step00000004" / "COMPLETE").exists():
        assert p.poll() is None and time.time() < deadline, p.stdout.read()[-3000:]
        time.sleep(0.05)
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    assert not (b / "final").exists()
    rc, log_b = _run(_args(shard_dir, b, **drop), free_port())
    assert rc == 0, log_b[-3000:]
    assert "resumed from step0000000" in log_b
    assert _keys(b) == ref_keys
    assert _records(b) == ref_records           # the resumed run's micro numbering continues
    assert _final(b) == ref_final

    # SIGTERM to every process of the job (as a scheduler preempting it): checkpoint, exit, resume
    c = tmp_path / "c"
    p = _launch(_args(shard_dir, c, **drop, **{"train.save_every": 100}), free_port())
    while not (c / "metrics.jsonl").exists() or len((c / "metrics.jsonl").read_text().splitlines()) < 3:
        assert p.poll() is None and time.time() < deadline + 120, p.stdout.read()[-3000:]
        time.sleep(0.05)
    os.killpg(p.pid, signal.SIGTERM)
    log_c1, _ = p.communicate(timeout=120)
    assert p.returncode == 128 + signal.SIGTERM, log_c1[-3000:]    # a pre-emption, not a failure
    saved = [t.name for t in (c / "checkpoints").iterdir() if (t / "COMPLETE").exists()]
    assert len(saved) == 1 and "stopped by signal" in log_c1, log_c1[-3000:]
    rc, log_c = _run(_args(shard_dir, c, **drop, **{"train.save_every": 100}), free_port())
    assert rc == 0, log_c[-3000:]
    assert _keys(c) == ref_keys and _records(c) == ref_records and _final(c) == ref_final


def test_seed_everything_repeats_the_draws_of_every_generator():
    """Two fresh runs draw the same numbers from torch, numpy and random at their first step;
    ranks draw different ones."""
    import random

    import numpy as np
    import torch

    from vip.train.runtime import seed_everything

    def draws(seed, rank):
        seed_everything(seed, rank)
        return (torch.rand(4).tolist(), torch.nn.functional.dropout(torch.ones(16), 0.5).tolist(),
                np.random.rand(4).tolist(), [random.random() for _ in range(4)])

    first = draws(7, 1)
    torch.rand(100), np.random.rand(100), random.random()     # anything drawn in between (setup)
    assert draws(7, 1) == first
    other = draws(7, 0)
    assert all(a != b for a, b in zip(other, first))


def test_model_dropout_acts_in_training_only_and_adds_no_parameters(tiny_model_cfg):
    """model.dropout (what the resume test trains with): dropout on the final video and text
    features in training mode; no new parameters, and 0 (the default) draws no random numbers."""
    import dataclasses

    import torch

    from vip.model import build_model
    torch.manual_seed(0)
    plain = build_model(tiny_model_cfg)
    drop = build_model(dataclasses.replace(tiny_model_cfg, dropout=0.5))
    drop.load_state_dict(plain.state_dict())            # strict: the same parameters and buffers
    video, text = torch.randn(2, 2, 3, 32, 32), torch.randint(1, 100, (2, 16))
    with torch.no_grad():
        for m in (plain, drop):
            m.eval()
        ref = plain(video=video, subtitle=text)
        same = drop(video=video, subtitle=text)
        assert all(torch.equal(ref[k], same[k]) for k in ("video", "subtitle"))
        drop.train()
        plain.train()
        state = torch.get_rng_state()
        out = drop(video=video, subtitle=text)
        assert not torch.equal(out["video"], ref["video"]) and not torch.equal(out["subtitle"], ref["subtitle"])
        torch.set_rng_state(state)
        plain(video=video, subtitle=text)
        assert torch.equal(torch.get_rng_state(), state)    # dropout 0: nothing drawn


def test_preemption_takes_a_signal_that_arrived_while_blocked():
    """launch/pretrain.sh starts the launcher with SIGTERM/SIGINT blocked (so deepspeed's launcher
    never reacts to them) and the ranks inherit that: Preemption unblocks them, and a SIGTERM
    that arrived in the meantime is taken then."""
    import signal
    import threading

    from vip.train.launcher import Preemption
    old = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    try:
        signal.pthread_kill(threading.main_thread().ident, signal.SIGTERM)   # pending on this thread
        assert signal.SIGTERM in signal.sigpending()
        preempt = Preemption()
        assert preempt.requested
        assert signal.SIGTERM not in signal.pthread_sigmask(signal.SIG_BLOCK, [])
    finally:
        for s in old:
            signal.signal(s, lambda *a: None)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGINT})   # a pending one lands here
        for s, h in old.items():
            signal.signal(s, h)


@pytest.mark.slow
def test_a_failing_rank_fails_the_job_and_is_named(shard_dir, tmp_path, free_port):
    rc, log = _run(_args(shard_dir, tmp_path / "f", **{"debug.fault_step": 2, "debug.fault_rank": 1}), free_port())
    assert rc != 0
    assert "rank 1 failed at step 2" in log and "injected fault" in log


@pytest.mark.slow
def test_scheduler_mode_two_nodes_on_loopback(shard_dir, tmp_path, free_port):
    """launch/pretrain.sh as a scheduler runs it: once per node with --node-rank (no ssh). Two
    'nodes' of one process each on this machine form one 2-rank job."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    args, port = _args(shard_dir, tmp_path / "mn", steps=2), free_port()
    procs = [subprocess.Popen(["bash", str(ROOT / "launch/pretrain.sh"), "--node-rank", str(r), "--nnodes", "2",
                               "--master-addr", "127.0.0.1", "--master-port", str(port), "--nproc", "1",
                               "--python", sys.executable, "--", *args], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in (0, 1)]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs[0][-2000:] + logs[1][-2000:]
    assert "world 2" in logs[0] and "--node_rank=1" in logs[1]
    keys = _keys(tmp_path / "mn")
    assert len(keys[0]) == 2 and set(keys[0][0]).isdisjoint(keys[1][0])
    # `vip export` of the last checkpoint gives the same weights as the run's final export
    vip = str(Path(sys.executable).parent / "vip")
    p = subprocess.run([vip, "export", str(tmp_path / "mn"), "--out", str(tmp_path / "exp")], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    (tmp_path / "exp_final").mkdir()
    (tmp_path / "exp_final" / "final").symlink_to(tmp_path / "exp")
    assert _final(tmp_path / "exp_final") == _final(tmp_path / "mn")

"""Elastic resume: a run checkpointed on N ranks continues on M ≠ N.

The data side (shards.plan.redeal, StreamLoader.load_redealt) is checked against a simulation of
every sample each rank reads; the model side by loading real DeepSpeed checkpoints written by 2
CPU processes (launch/pretrain.sh, gloo) into a 1-process engine and comparing weights and Adam
moments with a consolidation of the per-rank files written here (a loop over ranks, independent
of DeepSpeed's converter); end to end by resuming through launch/pretrain.sh on 1 and on 2
processes and checking the logged keys against the shard set."""
import collections
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY_MODEL = ["model.arch=vip-tiny", "model.num_proxies=2", "model.max_frames=4"]


# --------------------------------------------------------------------------- the plan alone
def _simulate(shards, seed, group, worlds, rng):
    """Read with world sizes `worlds` in turn (a re-deal between them, a random number of batches
    in each), then every rank up to 2 epochs past the furthest: Counter of (epoch, shard, index)
    read, and the leads of the last re-deal."""
    from shards.plan import Position, RankPlan, redeal
    seen = collections.Counter()
    plans = [RankPlan(shards, r, worlds[0], seed, True, group) for r in range(worlds[0])]
    pos = [Position()] * worlds[0]
    leads = None
    for k, world in enumerate(worlds):
        if k:
            leads, start = redeal(plans, pos, world)
            plans = [RankPlan(shards, r, world, seed, True, group, lead=leads[r]) for r in range(world)]
            pos = [start] * world
        batch = int(rng.integers(1, 4))
        for _ in range(int(rng.integers(0, 8))):          # lockstep: every rank one batch per step
            for r in range(world):
                seen.update(plans[r].take(pos[r], batch))
                pos[r] = plans[r].advance(pos[r], batch)
    end = max(p.epoch for p in pos) + 2
    for r, plan in enumerate(plans):
        while pos[r].epoch < end:
            seen.update(x for x in plan.take(pos[r], 1) if x[0] < end)
            pos[r] = plan.advance(pos[r], 1)
    return seen, end, leads


def test_redeal_reads_every_sample_of_every_epoch_exactly_once():
    """Random shard sets, seeds, group sizes, batch sizes and world sizes changed twice (also
    before a re-dealt rest was finished, and to/from 1 rank): every sample of every epoch is
    read exactly once over the whole run; the leads of a re-deal differ by at most 1 sample."""
    from shards.plan import ShardSet
    rng = np.random.default_rng(0)
    for _ in range(150):
        n = int(rng.integers(4, 12))
        counts = tuple(int(c) for c in rng.integers(1, 7, n))
        shards = ShardSet("mem", tuple(f"s{i}" for i in range(n)), counts)
        worlds = [int(rng.integers(1, 5)) for _ in range(3)]
        seen, end, leads = _simulate(shards, int(rng.integers(100)), int(rng.integers(1, 4)), worlds, rng)
        want = collections.Counter((e, s, i) for e in range(end) for s in range(n) for i in range(counts[s]))
        assert seen == want, (counts, worlds)
        if leads and leads[0] is not None:
            lengths = [lead.length for lead in leads]
            assert max(lengths) - min(lengths) <= 1


def test_redeal_keeps_consumed_samples_out_and_later_epochs_follow_the_new_plan():
    """2 ranks read 5 samples each of epoch 0, re-dealt to 3: the leads hold exactly the rest of
    epoch 0 (as contiguous runs of the old streams), and epoch 1 is the plan for 3 ranks."""
    from shards.plan import Position, RankPlan, ShardSet, redeal
    shards = ShardSet("mem", tuple(f"s{i}" for i in range(6)), (4, 3, 5, 2, 4, 3))
    old = [RankPlan(shards, r, 2, 7, True, 2) for r in range(2)]
    consumed = {x for p in old for x in p.take(Position(), 5)}
    rest = [x for p in old for x in p.take(Position(0, 5), p.epoch_length(0) - 5)]
    leads, start = redeal(old, [Position(0, 5)] * 2, 3)
    assert start == Position(0, 0)
    new = [RankPlan(shards, r, 3, 7, True, 2, lead=leads[r]) for r in range(3)]
    got = [x for p in new for x in p.take(Position(0, 0), p.epoch_length(0))]
    assert got == rest and not consumed & set(got)
    for r, p in enumerate(new):
        ref = RankPlan(shards, r, 3, 7, True, 2)
        assert p.take(Position(1, 0), ref.epoch_length(1)) == ref.take(Position(1, 0), ref.epoch_length(1))
    # nothing read yet at the start of an epoch: no lead, the new plan from that epoch
    leads, start = redeal(old, [Position(1, 0)] * 2, 3)
    assert leads == [None] * 3 and start == Position(1, 0)


def test_loader_redeal_refuses_another_seed_or_shard_set(shard_dir, small_data):
    """StreamLoader.load_redealt continues any world's states of the same shard set and seed; a
    changed seed or shard set (names or counts) is refused with the reason."""
    import dataclasses

    from shards.plan import Position
    from shards.reader import StreamLoader, load_shardset
    cfg = small_data(shard_dir, train=True)
    old = [StreamLoader(cfg, rank=r, world=2) for r in range(2)]
    for lo in old:
        lo.position = Position(0, 2)
    states = [lo.state_dict() for lo in old]
    new = StreamLoader(cfg, rank=0, world=1)
    new.load_redealt(states)
    assert new.lead is not None and new.lead.length == 12 - 4 and new.state_dict()["lead"]
    with pytest.raises(ValueError, match="seed"):
        StreamLoader(dataclasses.replace(cfg, seed=cfg.seed + 1)).load_redealt(states)
    shards = load_shardset(shard_dir)
    other = dataclasses.replace(shards, counts=(shards.counts[0] - 1, *shards.counts[1:]))
    with pytest.raises(ValueError, match="shard_set"):
        StreamLoader(cfg, shards=other).load_redealt(states)
    with pytest.raises(ValueError, match="every old rank"):
        new.load_redealt(states[1:])


# --------------------------------------------------------------------------- end to end
def _args(shard_dir, out, steps, **extra):
    base = ["--config", "tiny", f"data.shards={shard_dir}", "data.batch_size=2", "data.num_workers=1",
            "data.num_frames=4", "data.image_size=32", "data.context_length=32", f"train.out={out}",
            f"train.steps={steps}", "train.global_batch=4", "train.save_every=2", "train.keep_last=10",
            "train.log_every=1", "train.log_keys=true", "train.tensorboard=false", "optim.lr=1e-3",
            "optim.warmup_ratio=0.25", *TINY_MODEL]
    return base + [f"{k}={v}" for k, v in extra.items()]


def _run(nproc, args, port, timeout=300):
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = ["bash", str(ROOT / "launch/pretrain.sh"), "--nproc", str(nproc), "--master-port", str(port),
           "--python", sys.executable, "--", *args]
    p = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                       timeout=timeout, start_new_session=True)
    assert p.returncode == 0, p.stdout[-4000:]
    return p.stdout


def _keys(out, rank):
    """[(step, keys of the micro-batch)] rank `rank` logged, in order."""
    path = Path(out) / "keys" / f"rank{rank}.jsonl"
    recs = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return [(r["step"], r["keys"]) for r in recs]


def _manifest(shard_dir):
    """Every sample key of the shard set, from the tars themselves."""
    from shards.tarindex import index_tar
    return sorted(k for t in sorted(Path(shard_dir).glob("shard-*.tar")) for k in index_tar(str(t)).keys)


def _plan_keys(shard_dir, cfg, rank, world, epoch):
    """Rank `rank` of `world`'s keys in epoch `epoch` of the plan (what a fresh run reads)."""
    from shards.plan import Position, RankPlan
    from shards.reader import load_shardset
    from shards.tarindex import index_tar
    shards = load_shardset(shard_dir)
    plan = RankPlan(shards, rank, world, cfg.seed, True, cfg.shuffle_shards)
    keys = {sid: index_tar(str(Path(shard_dir) / name)).keys for sid, name in enumerate(shards.names)}
    return [keys[s][i] for _, s, i in plan.take(Position(epoch, 0), plan.epoch_length(epoch))]


def _final(out):
    from safetensors.torch import load_file
    return load_file(str(Path(out) / "final" / "model.safetensors"))


def _consolidated(tag_dir):
    """Per parameter group, the flat (fp32 master, exp_avg, exp_avg_sq) over all parameters, joined
    here from a ZeRO 1-3 checkpoint's per-rank files by a loop over ranks (1/2: each rank holds a
    slice of the group's flat buffer; 3: each rank holds a ceil(numel / world) slice of every
    parameter)."""
    import torch
    tag_dir = Path(tag_dir)
    load = lambda p: torch.load(p, map_location="cpu", weights_only=False)  # noqa: E731  (DeepSpeed files)
    optim = sorted(tag_dir.glob("*_optim_states.pt"), key=lambda p: int(p.name.split("_")[3]))
    files = [load(p)["optimizer_state_dict"] for p in optim]
    world, out = len(files), []
    if "fp32_flat_groups" in files[0]:                         # ZeRO 3
        shapes = load(tag_dir / "zero_pp_rank_0_mp_rank_00_model_states.pt")["param_shapes"]
        for g, group in enumerate(shapes):
            per_rank = [(f["fp32_flat_groups"][g], f["optimizer_state_dict"]["state"][g]["exp_avg"],
                         f["optimizer_state_dict"]["state"][g]["exp_avg_sq"]) for f in files]
            parts, off = [[], [], []], 0
            for shape in group.values():
                numel, part = shape.numel(), -(-shape.numel() // world)
                for k in range(3):
                    parts[k].append(torch.cat([per_rank[r][k][off:off + part] for r in range(world)])[:numel])
                off += part
            out.append(tuple(torch.cat(p) for p in parts))
        return out
    shapes = load(tag_dir / "mp_rank_00_model_states.pt")["param_shapes"]           # ZeRO 1/2
    for g, group in enumerate(shapes):
        n = sum(s.numel() for s in group.values())
        flat = lambda get: torch.cat([get(f) for f in files])[:n]  # noqa: E731
        out.append((flat(lambda f: f["single_partition_of_fp32_groups"][g]),
                    flat(lambda f: f["base_optimizer_state"]["state"][g]["exp_avg"]),
                    flat(lambda f: f["base_optimizer_state"]["state"][g]["exp_avg_sq"])))
    return out


def _engine_flats(ds, lengths):
    """The same per-group flats of a 1-process ZeRO engine (its one partition is the whole group)."""
    opt = ds.optimizer
    stage3 = ds.zero_optimization_stage() == 3
    flats = opt.fp32_partitioned_groups_flat if stage3 else opt.single_partition_of_fp32_groups
    return [(f[:n], opt.optimizer.state[f]["exp_avg"][:n], opt.optimizer.state[f]["exp_avg_sq"][:n])
            for f, n in zip(flats, lengths)]


def _load_on_one_rank(train_rt, run, tag, stage, shard_dir):
    """Build a 1-process engine + loader the way `vip pretrain` does for an elastic resume of
    `run` and restore `tag` into it: (engine, loader)."""
    import torch

    from shards.reader import StreamLoader
    from vip.config import config_from_file
    from vip.model import build_model
    from vip.train.checkpoint import CheckpointManager
    from vip.train.engine import build_engine
    cfg = config_from_file(Path(run) / "config.yaml")
    torch.manual_seed(123)                              # other initial weights than the run's
    cm = CheckpointManager(run, 10, 0, 1)
    assert cm.select(str(Path(run) / "checkpoints" / tag)) == tag and cm.saved_world(tag) == 2
    engine = build_engine(build_model(cfg.model), train_rt, cfg.train, cfg.optim, micro_batch=2, total_steps=8,
                          load_universal=stage > 0)
    loader = StreamLoader(cfg.data, rank=0, world=1)
    assert cm.restore(engine, loader, tag) == tag
    return engine, loader


def _check_state_carried(engine, tag_dir, final=None):
    """The engine's fp32 weights and Adam moments are the checkpoint's, bit for bit; the moments
    are not zero (loaded, not fresh). ZeRO 0 keeps one replicated file: its optimizer state dict
    and module weights are compared as they are."""
    import torch
    if engine.ds.zero_optimization_stage() == 0:
        sd = torch.load(Path(tag_dir) / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
        got = engine.ds.optimizer.state_dict()["state"]
        assert set(got) == set(sd["optimizer"]["state"]) and got
        for i, st in sd["optimizer"]["state"].items():
            assert all(torch.equal(got[i][k], st[k]) for k in ("exp_avg", "exp_avg_sq")), i
        assert any(bool(st["exp_avg"].abs().sum() > 0) for st in got.values())
        mine = engine.module.state_dict()
        assert all(torch.equal(mine[k], v) for k, v in sd["module"].items())
        return
    ref = _consolidated(tag_dir)
    got = _engine_flats(engine.ds, [len(w) for w, _, _ in ref])
    assert len(got) == len(ref) == 2                        # decay and no-decay groups
    for (w, m, v), (rw, rm, rv) in zip(got, ref):
        assert torch.equal(w, rw) and torch.equal(m, rm) and torch.equal(v, rv)
        assert m.abs().sum() > 0 and v.abs().sum() > 0
    if final is not None:                   # the module's weights too (as the run's own export)
        sd = engine.module.state_dict()
        for k, v in final.items():
            assert torch.equal(sd[k].view(-1), v.view(-1)), k


@pytest.mark.slow
def test_two_ranks_resume_on_one(shard_dir, tmp_path, free_port, train_rt):
    """A 2-rank run checkpointed mid-epoch (step 2: 8 of 12 samples) resumes on 1 rank: weights
    and Adam moments are the checkpoint's; the 4 samples of epoch 0 not read yet are read once,
    none read before is read again; epochs 1 and 2 are the 1-rank plan's."""
    from vip.config import config_from_file
    run = tmp_path / "run"
    _run(2, _args(shard_dir, run, steps=2), free_port())
    before = {r: [k for _, ks in _keys(run, r) for k in ks] for r in (0, 1)}
    assert len(before[0]) == len(before[1]) == 4
    # the model side, in this process: a 1-rank engine restores the 2-rank ZeRO-1 checkpoint
    engine, loader = _load_on_one_rank(train_rt, run, "step00000002", 1, shard_dir)
    _check_state_carried(engine, run / "checkpoints" / "step00000002", _final(run))
    assert engine.global_steps == 2 and loader.lead.length == 4
    shutil.rmtree(run / "checkpoints" / "step00000002" / "universal")    # the launched run converts again
    log = _run(1, _args(shard_dir, run, steps=8), free_port())
    assert "elastic resume" in log and "universal checkpoint" in log
    after = [(s, k) for s, ks in _keys(run, 0)[2:] for k in ks]     # rank 0's records after its first 2
    manifest = _manifest(shard_dir)
    epoch0 = before[0] + before[1] + [k for s, k in after[:4]]
    assert sorted(epoch0) == manifest                      # nothing of epoch 0 repeated or skipped
    cfg = config_from_file(run / "config.yaml").data
    assert [k for _, k in after[4:16]] == _plan_keys(shard_dir, cfg, 0, 1, 1)
    assert [k for _, k in after[16:]] == _plan_keys(shard_dir, cfg, 0, 1, 2)[:8]
    assert [s for s, _ in after[:4]] == [2, 2, 2, 2]        # one optimiser step (2 micro-batches of 2)


@pytest.mark.slow
def test_one_rank_resumes_on_two(shard_dir, tmp_path, free_port):
    """A 1-rank run checkpointed at step 2 (8 of 12 samples) resumes on 2 ranks: the final
    weights of a resume with nothing left to train are the checkpoint's; then the 4 samples left
    of epoch 0 are split 2 + 2 between the ranks, none read twice, and epoch 1 is the 2-rank plan."""
    import torch

    from vip.config import config_from_file
    run = tmp_path / "run"
    _run(1, _args(shard_dir, run, steps=2), free_port())
    saved = _final(run)
    n0 = len(_keys(run, 0))
    before = [k for _, ks in _keys(run, 0) for k in ks]
    assert len(before) == 8
    log = _run(2, _args(shard_dir, run, steps=2), free_port())          # resume, nothing to train: export
    assert "elastic resume" in log
    resumed = _final(run)
    assert all(torch.equal(saved[k], resumed[k]) for k in saved)
    _run(2, _args(shard_dir, run, steps=6), free_port())
    new = {r: [k for _, ks in _keys(run, r)[(n0 if r == 0 else 0):] for k in ks] for r in (0, 1)}
    assert sorted(before + new[0][:2] + new[1][:2]) == _manifest(shard_dir)
    cfg = config_from_file(run / "config.yaml").data
    for r in (0, 1):
        assert new[r][2:] == _plan_keys(shard_dir, cfg, r, 2, 1)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 3])   # 1 in the tests above; 2 takes the same universal path as 1
def test_other_zero_stages_carry_weights_and_moments_to_another_world(stage, shard_dir, tmp_path, free_port,
                                                                      train_rt):
    """ZeRO 0 (replicated states, loaded as they are), 2 and 3 (through the universal checkpoint):
    a 2-rank checkpoint loads into a 1-rank engine with its fp32 weights and Adam moments; under
    ZeRO 3 the groups keep their own weight decay (DeepSpeed's loader gives all the first one's)."""
    run = tmp_path / "run"
    _run(2, _args(shard_dir, run, steps=1, **{"train.zero_stage": stage, "train.save_every": 1}), free_port())
    engine, _ = _load_on_one_rank(train_rt, run, "step00000001", stage, shard_dir)
    _check_state_carried(engine, run / "checkpoints" / "step00000001")
    base = getattr(engine.ds.optimizer, "optimizer", engine.ds.optimizer)
    assert sorted(g["weight_decay"] for g in base.param_groups) == [0.0, 0.05]
    assert (run / "checkpoints" / "step00000001" / "universal").is_dir() == (stage > 0)

"""vip.train.checkpoint in-process (a real DeepSpeed engine, world of one, gloo): verified
checkpoints (file list + CRC32 in COMPLETE), fallback to the newest checkpoint that verifies,
`vip checkpoints verify`, free-space and write errors that say what and where."""
from __future__ import annotations

import collections
import errno
import json
import logging
import os

import pytest
import torch

from vip.config import load_config

MODEL_FILE = "mp_rank_00_model_states.pt"
OPTIM_FILE = "zero_pp_rank_0_mp_rank_00_optim_states.pt"


@pytest.fixture
def rt(train_rt):
    return train_rt


@pytest.fixture(scope="module")
def cfg():
    return load_config("tiny")


class Loader:
    """The part of StreamLoader a checkpoint touches: its data position."""

    def __init__(self):
        self.position = 0

    def state_dict(self):
        return {"position": self.position}

    def load_state_dict(self, state):
        self.position = state["position"]


def _weights(engine):
    return {k: v.detach().clone() for k, v in engine.module.state_dict().items()}


def _step(engine, rt, model_batch):
    from vip.train.engine import train_step
    from vip.train.objectives import PretrainObjective
    res = train_step(engine, model_batch(), PretrainObjective("vs", rt))
    assert res.status == "ok" and res.boundary


def _train_and_save(rt, tiny_engine, model_batch, cfg, out, steps=2, keep_last=5):
    """`steps` optimiser steps, a checkpoint after each; returns (engine, loader, manager, weights per tag)."""
    from vip.train.checkpoint import CheckpointManager
    engine, loader = tiny_engine(), Loader()
    cm = CheckpointManager(out, keep_last=keep_last, rank=0, world=1)
    weights = {}
    for _ in range(steps):
        _step(engine, rt, model_batch)
        loader.position = 10 * engine.global_steps
        weights[cm.save(engine, loader, cfg)] = _weights(engine)
    return engine, loader, cm, weights


def _truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])


def _flip(path, at=0.5):
    data = bytearray(path.read_bytes())
    i = int(len(data) * at)
    data[i:i + 8] = bytes(b ^ 0xFF for b in data[i:i + 8])
    path.write_bytes(bytes(data))


def test_complete_lists_every_file_with_size_and_checksum(rt, tiny_engine, model_batch, cfg, tmp_path):
    from vip.train.verify import crc32_file
    _, _, cm, _ = _train_and_save(rt, tiny_engine, model_batch, cfg, tmp_path / "run", steps=1)
    tag_dir = cm.dir / "step00000001"
    marker = json.loads((tag_dir / "COMPLETE").read_text())
    assert marker["step"] == 1 and marker["world"] == 1 and "time" in marker and marker["checksum"] == "crc32"
    on_disk = sorted(p.relative_to(tag_dir).as_posix() for p in tag_dir.rglob("*")
                     if p.is_file() and p.name != "COMPLETE")
    assert [r["path"] for r in marker["files"]] == on_disk
    assert {MODEL_FILE, OPTIM_FILE, "config.yaml"} <= set(on_disk)
    for r in marker["files"]:
        assert r["bytes"] == (tag_dir / r["path"]).stat().st_size
        assert r["crc32"] == crc32_file(tag_dir / r["path"]) and r["rank"] == 0
    assert cm.verify("step00000001") == []


def test_truncated_newest_checkpoint_falls_back_to_the_previous(rt, tiny_engine, model_batch, cfg, tmp_path, caplog):
    from vip.train.checkpoint import CheckpointManager
    out = tmp_path / "run"
    _, _, cm, weights = _train_and_save(rt, tiny_engine, model_batch, cfg, out, steps=2)
    _truncate(cm.dir / "step00000002" / MODEL_FILE)
    engine, loader = tiny_engine(), Loader()
    with caplog.at_level(logging.INFO, logger="vip.train.checkpoint"):
        tag = CheckpointManager(out, 5, 0, 1).resume(engine, loader, "auto")
    assert tag == "step00000001" and engine.global_steps == 1 and loader.position == 10
    assert all(torch.equal(v, weights["step00000001"][k]) for k, v in _weights(engine).items())
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert any("step00000002" in m and MODEL_FILE in m and "size" in m for m in errors), errors
    assert any("falling back to step00000001" in m for m in errors), errors


def test_flipped_bytes_are_a_checksum_mismatch(rt, tiny_engine, model_batch, cfg, tmp_path, caplog):
    from vip.train.checkpoint import CheckpointError, CheckpointManager
    out = tmp_path / "run"
    _, _, cm, _ = _train_and_save(rt, tiny_engine, model_batch, cfg, out, steps=2)
    path = cm.dir / "step00000002" / OPTIM_FILE
    size = path.stat().st_size
    _flip(path)
    assert path.stat().st_size == size
    problems = cm.verify("step00000002")
    assert len(problems) == 1 and problems[0][0] == OPTIM_FILE and "checksum mismatch" in problems[0][1]
    assert cm.newest_verified() == "step00000001"
    # naming the damaged tag explicitly is refused, not silently replaced by another one
    with pytest.raises(CheckpointError, match=f"step00000002.*{OPTIM_FILE}.*checksum mismatch"):
        CheckpointManager(out, 5, 0, 1).resume(tiny_engine(), Loader(), str(cm.dir / "step00000002"))


def test_no_verifying_checkpoint_starts_from_scratch_loudly(rt, tiny_engine, model_batch, cfg, tmp_path, caplog):
    from vip.train.checkpoint import CheckpointManager
    out = tmp_path / "run"
    _, _, cm, _ = _train_and_save(rt, tiny_engine, model_batch, cfg, out, steps=1)
    (cm.dir / "step00000001" / OPTIM_FILE).unlink()
    engine = tiny_engine()
    with caplog.at_level(logging.INFO, logger="vip.train.checkpoint"):
        assert CheckpointManager(out, 5, 0, 1).resume(engine, Loader(), "auto") is None
    assert engine.global_steps == 0
    errors = " ".join(r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR)
    assert f"{OPTIM_FILE}: missing" in errors and "STARTING FROM SCRATCH" in errors


def test_old_marker_without_file_list_is_resumed_unverified(rt, tiny_engine, model_batch, cfg, tmp_path, caplog):
    from vip.train.checkpoint import CheckpointManager
    out = tmp_path / "run"
    _, _, cm, _ = _train_and_save(rt, tiny_engine, model_batch, cfg, out, steps=1)
    (cm.dir / "step00000001" / "COMPLETE").write_text(json.dumps({"step": 1, "time": 0.0, "world": 1}))
    engine = tiny_engine()
    with caplog.at_level(logging.WARNING, logger="vip.train.checkpoint"):
        assert CheckpointManager(out, 5, 0, 1).resume(engine, Loader(), "auto") == "step00000001"
    assert engine.global_steps == 1
    assert any("unverified" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)


def test_a_load_failure_names_the_tag_and_folder(rt, tiny_engine, model_batch, cfg, tmp_path):
    """A file that verifies (its marker rewritten to match) but torch cannot read."""
    from vip.train.checkpoint import CheckpointError, CheckpointManager
    from vip.train.verify import crc32_file
    out = tmp_path / "run"
    _, _, cm, _ = _train_and_save(rt, tiny_engine, model_batch, cfg, out, steps=1)
    tag_dir = cm.dir / "step00000001"
    (tag_dir / MODEL_FILE).write_bytes(b"not a zip archive at all")
    marker = json.loads((tag_dir / "COMPLETE").read_text())
    for r in marker["files"]:
        if r["path"] == MODEL_FILE:
            r.update(bytes=(tag_dir / MODEL_FILE).stat().st_size, crc32=crc32_file(tag_dir / MODEL_FILE))
    (tag_dir / "COMPLETE").write_text(json.dumps(marker))
    with pytest.raises(CheckpointError) as ei:
        CheckpointManager(out, 5, 0, 1).resume(tiny_engine(), Loader(), "auto")
    assert "step00000001" in str(ei.value) and str(tag_dir) in str(ei.value)


def test_cli_checkpoints_verify_table_and_exit_status(rt, tiny_engine, model_batch, cfg, tmp_path, capsys):
    from vip.cli import main
    out = tmp_path / "run"
    _, _, cm, _ = _train_and_save(rt, tiny_engine, model_batch, cfg, out, steps=2)
    (cm.dir / "step00000003").mkdir()                          # an interrupted save
    (cm.dir / "step00000003" / MODEL_FILE).write_bytes(b"partial")
    assert main(["checkpoints", "verify", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    print("\n".join(lines))
    assert [c.strip() for c in lines[0].split(" | ")] == ["tag", "step", "files", "bytes", "state"]
    rows = {ln.split(" | ")[0].strip(): [c.strip() for c in ln.split(" | ")] for ln in lines[2:]}
    n = len(json.loads((cm.dir / "step00000001" / "COMPLETE").read_text())["files"])
    assert rows["step00000001"][1:3] == ["1", str(n)] and rows["step00000001"][4] == "ok"
    assert rows["step00000002"][4] == "ok"
    assert rows["step00000003"][4] == "incomplete (no COMPLETE)"

    _truncate(cm.dir / "step00000002" / OPTIM_FILE)
    assert main(["checkpoints", "verify", str(out)]) == 1      # the newest complete one is damaged
    rows = {ln.split(" | ")[0].strip(): ln for ln in capsys.readouterr().out.splitlines()[2:]}
    assert f"bad: {OPTIM_FILE}: size" in rows["step00000002"] and rows["step00000001"].endswith("ok")

    (cm.dir / "step00000002" / "COMPLETE").write_text(json.dumps({"step": 2}))   # an old marker
    assert main(["checkpoints", "verify", str(out)]) == 0
    assert "unverified (old marker)" in capsys.readouterr().out

    (tmp_path / "empty").mkdir()
    assert main(["checkpoints", "verify", str(tmp_path / "empty")]) == 1
    assert "no checkpoints" in capsys.readouterr().out


def test_disk_full_is_refused_before_writing(rt, tiny_engine, model_batch, cfg, tmp_path, monkeypatch):
    from vip.train import checkpoint
    from vip.train.checkpoint import CheckpointWriteError
    engine, loader, cm, _ = _train_and_save(rt, tiny_engine, model_batch, cfg, tmp_path / "run", steps=1)
    last = sum(r["bytes"] for r in json.loads((cm.dir / "step00000001" / "COMPLETE").read_text())["files"])
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda p: usage(10 ** 9, 10 ** 9 - 1000, 1000))
    _step(engine, rt, model_batch)
    with pytest.raises(CheckpointWriteError) as ei:
        cm.save(engine, loader, cfg)
    msg = str(ei.value)
    assert isinstance(ei.value, OSError) and ei.value.errno == errno.ENOSPC
    assert f"not enough space for checkpoint step00000002 in {cm.dir}: 1000 B free" in msg
    assert checkpoint.human_bytes(last) in msg and "last checkpoint took" in msg
    assert not (cm.dir / "step00000002").exists()               # nothing written for the new tag
    monkeypatch.undo()
    assert cm.verify("step00000001") == [] and cm.latest() == "step00000001"
    cm.save(engine, loader, cfg)                                  # with room again, the save goes through
    assert cm.verify("step00000002") == []


@pytest.mark.parametrize("error", [
    RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 123 vs 456"),
    OSError(errno.ENOSPC, "No space left on device")], ids=["inline_container", "ENOSPC"])
def test_a_write_that_runs_out_of_space_says_so(rt, tiny_engine, model_batch, cfg, tmp_path, monkeypatch, error):
    from vip.train.checkpoint import CheckpointWriteError
    engine, loader, cm, _ = _train_and_save(rt, tiny_engine, model_batch, cfg, tmp_path / "run", steps=1)
    tag_dir = cm.dir / "step00000002"
    tag_dir.mkdir()                                  # an earlier run's checkpoint of this step …
    (tag_dir / "COMPLETE").write_text(json.dumps({"step": 2}))

    def full_disk(save_dir, tag, client_state, save_latest):
        os.makedirs(os.path.join(save_dir, tag), exist_ok=True)
        with open(os.path.join(save_dir, tag, MODEL_FILE), "wb") as f:
            f.write(b"PK\x03\x04" + b"\x00" * 123)
        raise error

    monkeypatch.setattr(engine.ds, "save_checkpoint", full_disk)
    _step(engine, rt, model_batch)
    with pytest.raises(CheckpointWriteError) as ei:
        cm.save(engine, loader, cfg)
    msg = str(ei.value)
    assert "no space left on device" in msg and str(tag_dir) in msg and "step00000002" in msg
    assert not (tag_dir / "COMPLETE").exists()       # … is no longer taken as complete
    assert cm.latest() == "step00000001" and cm.newest_verified() == "step00000001"
    assert cm.verify("step00000001") == []


def test_an_unwritable_checkpoint_folder_is_named(rt, tiny_engine, model_batch, cfg, tmp_path):
    from vip.train.checkpoint import CheckpointManager, CheckpointWriteError
    if os.geteuid() == 0:          # root writes through chmod 0o500: put the run under a regular file instead
        (tmp_path / "file").write_text("not a folder")
        out, expect = tmp_path / "file" / "run", f"{tmp_path / 'file'} is a file, not a folder"
    else:
        out, expect = tmp_path / "run", "permission denied"
        (out / "checkpoints").mkdir(parents=True)
        (out / "checkpoints").chmod(0o500)
    cm = CheckpointManager(out, 5, 0, 1)
    with pytest.raises(CheckpointWriteError) as ei:
        cm.check_writable()
    assert str(out / "checkpoints") in str(ei.value) and expect in str(ei.value)
    engine, loader = tiny_engine(), Loader()
    with pytest.raises(CheckpointWriteError, match="checkpoint"):      # resume checks before anything else
        cm.resume(engine, loader, "auto")
    _step(engine, rt, model_batch)
    with pytest.raises(CheckpointWriteError) as ei:
        cm.save(engine, loader, cfg)
    assert "step00000001" in str(ei.value) and str(out / "checkpoints") in str(ei.value) and expect in str(ei.value)

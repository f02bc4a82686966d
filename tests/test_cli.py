"""The `vip` console command end to end, as a user types it."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

VIP = shutil.which("vip", path=str(Path(sys.executable).parent)) or "vip"


def run(*args, cwd):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run([VIP, *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=300)
    return p


def test_config_command_prints_resolved_config(tmp_path):
    p = run("config", "--config", "tiny", "data.batch_size=3", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert "batch_size: 3" in p.stdout and "num_proxies: 4" in p.stdout
    bad = run("config", "--config", "tiny", "data.batch_size=three", cwd=tmp_path)
    assert bad.returncode == 2 and "config error" in bad.stderr


@pytest.mark.slow
def test_synth_build_read(tmp_path):
    common = ["--config", "tiny", "synth.num_videos=2", "synth.clips_per_video=2", "synth.width=160",
              "synth.height=90", "synth.clip_seconds=1.5", "build.clips_per_shard=2", "build.short_side=64",
              "data.image_size=32", "data.num_frames=4", "data.batch_size=2", "data.num_workers=1"]
    p = run("data", "synth", *common, cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout.strip().splitlines()[-1])["clips"] == 4
    p = run("shards", "build", *common, cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert "| clips written (this run) | 4 |" in p.stdout
    assert (tmp_path / "data/shards/shard-000001.tar").exists()
    p = run("shards", "read", *common, "--batches", "3", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert "video: (2, 4, 3, 32, 32)" in p.stdout and "clips/s" in p.stdout
    # re-running the build does nothing and says so
    p = run("shards", "build", *common, cwd=tmp_path)
    assert "| shards built / already done / failed | 0 / 2 / 0 |" in p.stdout


def test_eval_takes_overrides_and_refuses_old_flags(video_set, tiny_export, tmp_path, capsys):
    from vip.cli import main
    out = tmp_path / "cli.json"
    rc = main(["eval", "--config", "tiny", f"eval.model={tiny_export}", f"eval.annotations={video_set / 'ann.jsonl'}",
               f"eval.videos={video_set / 'videos'}", f"eval.out={out}", "eval.num_frames=2", "eval.paragraph=true",
               "eval.device=cpu"])
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["num_frames"] == 2 and res["paragraph"] and res["texts"] == res["videos"] == 4
    printed = capsys.readouterr().out
    assert "| t2v_R@1" in printed and f"| {Path(tiny_export).name} +DSL |" in printed
    # a missing option names the override to set (exit 2, no traceback)
    assert main(["eval", f"eval.model={tiny_export}", f"eval.videos={video_set / 'videos'}"]) == 2
    assert "set eval.annotations=" in capsys.readouterr().err
    # the old flags are gone: the console command refuses them and names the override
    old = run("eval", "--model", str(tiny_export), "--annotations", str(video_set / "ann.jsonl"), cwd=tmp_path)
    assert old.returncode == 2 and "--model → eval.model=" in old.stderr and "Traceback" not in old.stderr

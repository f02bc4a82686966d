"""launch/pretrain.sh and launch/caption.sh as a user runs them: option parsing (usage, unknown
options, missing or non-integer values, stray arguments), --dry-run, the explicit path options of
caption.sh, the scheduler mode of pretrain.sh (hostfile removed, exit status and SIGTERM passed
on) and its pre-emption handling (grace period, exit 143). Every script runs as a subprocess with
a fake `python` that leaves a mark when anything executes it, or with the real python and a fake
`deepspeed` package; nothing here needs deepspeed or ray."""
from __future__ import annotations

import base64
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PRETRAIN = REPO / "launch" / "pretrain.sh"
CAPTION = REPO / "launch" / "caption.sh"


@pytest.fixture
def fake_python(tmp_path):
    """An executable standing in for python: it appends its arguments to `ran` and exits 0."""
    d = tmp_path / "fake"
    d.mkdir()
    py = d / "python"
    py.write_text(f'#!/bin/sh\necho "$*" >> {shlex.quote(str(d / "ran"))}\nexit 0\n')
    py.chmod(0o755)
    return py


def ran(py: Path) -> bool:
    return (py.parent / "ran").exists()


@pytest.fixture
def env(tmp_path, fake_python):
    """No scheduler, Ray or port settings from the outside; $VIP_PYTHON is the fake too; a fresh TMPDIR."""
    e = {k: v for k, v in os.environ.items()
         if not k.startswith("SLURM_") and k not in ("RAY_ADDRESS", "MASTER_PORT", "MASTER_ADDR")}
    tmp = tmp_path / "tmpdir"
    tmp.mkdir()
    e.update(VIP_PYTHON=str(fake_python), TMPDIR=str(tmp))
    return e


@pytest.fixture
def cwd(tmp_path):
    d = (tmp_path / "cwd").resolve()
    d.mkdir()
    return d


def run(script, *args, env, cwd=None):
    e = dict(env)
    if cwd is not None:
        e["PWD"] = str(cwd)
    return subprocess.run(["bash", str(script), *map(str, args)], cwd=cwd, env=e, capture_output=True,
                          text=True, timeout=30)


def one_command(p) -> list[str]:
    """The single shell-quoted line a --dry-run prints, split back into its words."""
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert len(lines) == 1, p.stdout
    return shlex.split(lines[0])


# --------------------------------------------------------------------------- both scripts
@pytest.mark.parametrize("script", [PRETRAIN, CAPTION], ids=["pretrain", "caption"])
@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_prints_usage_only(script, flag, env, fake_python, cwd):
    p = run(script, "--python", fake_python, "--nproc" if script == PRETRAIN else "--port", "2", flag, env=env, cwd=cwd)
    assert p.returncode == 0 and p.stderr == ""
    assert p.stdout.startswith("usage: launch/") and "--dry-run" in p.stdout
    assert not [line for line in p.stdout.splitlines() if line.startswith("#")], p.stdout  # no comment marks
    assert "set -euo" not in p.stdout and "REPO=" not in p.stdout                          # no script code
    assert not ran(fake_python)
    assert not os.listdir(env["TMPDIR"])


@pytest.mark.parametrize("script,args,named", [
    (PRETRAIN, ["--nrpoc", "2", "--", "--config", "tiny"], "--nrpoc"),
    (PRETRAIN, ["--config", "tiny"], "--config"),           # a trainer option before `--`
    (PRETRAIN, ["-n", "2", "--"], "-n"),
    (CAPTION, ["--shard", "data/shards", "--"], "--shard"),
    (CAPTION, ["--dryrun"], "--dryrun"),
], ids=["pretrain-typo", "pretrain-trainer-option", "pretrain-short", "caption-typo", "caption-dryrun-typo"])
def test_unknown_option_is_refused(script, args, named, env, fake_python, cwd):
    p = run(script, *args, env=env, cwd=cwd)
    assert p.returncode == 2, p.stderr
    assert f"unknown option {named} " in p.stderr and "--help" in p.stderr
    assert p.stdout == "" and not ran(fake_python)


@pytest.mark.parametrize("script,args", [
    (PRETRAIN, ["--nproc"]),
    (PRETRAIN, ["--nproc", "--", "--config", "tiny"]),
    (PRETRAIN, ["--master-port", "--dry-run", "--"]),
    (PRETRAIN, ["--python"]),
    (PRETRAIN, ["--grace", "--", "--config", "tiny"]),
    (PRETRAIN, ["--hostfile", "", "--"]),
    (CAPTION, ["--port"]),
    (CAPTION, ["--shards", "--", "caption.batch_size=4"]),
    (CAPTION, ["--out", ""]),
    (CAPTION, ["--address"]),
], ids=lambda v: " ".join(v) if isinstance(v, list) else v.name)
def test_option_without_value_is_refused(script, args, env, fake_python, cwd):
    p = run(script, *args, env=env, cwd=cwd)
    assert p.returncode == 2, p.stderr
    assert f"{args[0]} needs a value" in p.stderr
    assert "unbound variable" not in p.stderr
    assert not ran(fake_python)


@pytest.mark.parametrize("script,opt,value", [
    (PRETRAIN, "--nproc", "two"), (PRETRAIN, "--nproc", "0"), (PRETRAIN, "--nproc", "1.5"),
    (PRETRAIN, "--master-port", "99999"), (PRETRAIN, "--master-port", "29500x"),
    (PRETRAIN, "--node-rank", "-1"), (PRETRAIN, "--nnodes", "many"), (PRETRAIN, "--grace", "2m"),
    (CAPTION, "--port", "x"), (CAPTION, "--dashboard-port", "70000"), (CAPTION, "--agent-port", "1e3"),
    (CAPTION, "--client-port", "-5"), (CAPTION, "--num-cpus", "four"), (CAPTION, "--num-gpus", "0.5"),
])
def test_non_integer_value_is_refused(script, opt, value, env, fake_python, cwd):
    p = run(script, opt, value, "--", "x=1", env=env, cwd=cwd)
    assert p.returncode == 2, p.stderr
    assert opt in p.stderr and re.search(r"needs an integer|must be at (least|most)", p.stderr), p.stderr
    assert not ran(fake_python)


@pytest.mark.parametrize("script,stray", [(PRETRAIN, "train.steps=5"), (CAPTION, "caption.shards=data/shards")])
def test_argument_before_separator_is_refused(script, stray, env, fake_python, cwd):
    p = run(script, stray, "--", "x=1", env=env, cwd=cwd)
    assert p.returncode == 2, p.stderr
    assert stray in p.stderr and "after `--`" in p.stderr
    assert not ran(fake_python)


# --------------------------------------------------------------------------- pretrain.sh
def world_info(n: int) -> str:
    """What deepspeed's runner hands its per-node launcher for one node of n processes."""
    return base64.urlsafe_b64encode(json.dumps({"localhost": list(range(n))}).encode()).decode()


@pytest.mark.parametrize("nproc", [1, 3, 12])
def test_pretrain_dry_run_one_node(nproc, env, fake_python, cwd):
    p = run(PRETRAIN, "--nproc", nproc, "--master-port", "29555", "--python", fake_python, "--dry-run", "--",
            "--config", "tiny", "train.out=runs/a b", "--help", env=env, cwd=cwd)
    assert one_command(p) == [str(fake_python), "-u", "-m", "deepspeed.launcher.launch",
                              f"--world_info={world_info(nproc)}", "--master_addr=127.0.0.1",
                              "--master_port=29555", "--module", "vip.train",
                              "--config", "tiny", "train.out=runs/a b", "--help"]
    assert not ran(fake_python)  # not even to build world_info


def test_pretrain_dry_run_hostfile(env, fake_python, cwd):
    p = run(PRETRAIN, "--hostfile", "hosts.txt", "--master-addr", "127.0.0.2", "--dry-run", "--", "--config", "b32",
            env=env, cwd=cwd)
    assert one_command(p) == [str(fake_python), "-m", "deepspeed.launcher.runner", "--master_port", "29500",
                              "--hostfile", "hosts.txt", "--master_addr", "127.0.0.2",
                              "--module", "vip.train", "--config", "b32"]
    assert not ran(fake_python)


def test_pretrain_scheduler_dry_run_writes_no_hostfile(env, fake_python, cwd):
    p = run(PRETRAIN, "--node-rank", "1", "--nnodes", "2", "--master-addr", "127.0.0.1", "--nproc", "4",
            "--dry-run", "--", "--config", "tiny", env=env, cwd=cwd)
    cmd = one_command(p)
    assert cmd[:4] == [str(fake_python), "-m", "deepspeed.launcher.runner", "--master_port"]
    i = cmd.index("--no_ssh")
    assert cmd[i:] == ["--no_ssh", "--node_rank", "1", "--num_nodes", "2", "--num_gpus", "4",
                       "--master_addr", "127.0.0.1", "--module", "vip.train", "--config", "tiny"]
    assert os.listdir(env["TMPDIR"]) == []
    assert not ran(fake_python)


def test_pretrain_scheduler_node_rank_checks(env, fake_python, cwd):
    p = run(PRETRAIN, "--node-rank", "2", "--nnodes", "2", "--master-addr", "h", "--dry-run", "--", env=env, cwd=cwd)
    assert p.returncode == 2 and "--node-rank 2" in p.stderr
    p = run(PRETRAIN, "--node-rank", "0", "--dry-run", "--", env=env, cwd=cwd)
    assert p.returncode == 2 and "--nnodes and --master-addr" in p.stderr
    assert os.listdir(env["TMPDIR"]) == [] and not ran(fake_python)


def test_pretrain_scheduler_removes_hostfile_and_passes_exit_status(tmp_path, env, cwd):
    """A launcher that fails (exit 3): its status comes back and the throwaway hostfile is gone."""
    seen = tmp_path / "seen"
    launcher = tmp_path / "launcher"
    launcher.write_text("#!/usr/bin/env bash\n"  # records the hostfile it was given, then fails
                        'while [[ $# -gt 0 && $1 != --hostfile ]]; do shift; done\n'
                        f'cat "$2" > {shlex.quote(str(seen))}\n'
                        "exit 3\n")
    launcher.chmod(0o755)
    p = run(PRETRAIN, "--node-rank", "0", "--nnodes", "2", "--master-addr", "127.0.0.1", "--nproc", "1",
            "--python", launcher, "--", "--config", "tiny", env=env, cwd=cwd)
    assert p.returncode == 3, p.stderr
    assert seen.read_text() == "node0 slots=1\nnode1 slots=1\n"  # it existed while the launcher ran
    assert os.listdir(env["TMPDIR"]) == []


def test_pretrain_scheduler_passes_sigterm_to_the_ranks(tmp_path, env, cwd):
    """SIGTERM to the script alone (a pod's PID 1 being preempted) reaches a 'rank' under the
    launcher; the script waits for it to finish, removes the hostfile, exits 128+15."""
    rank_pid, done = tmp_path / "rank_pid", tmp_path / "rank_done"
    launcher = tmp_path / "launcher"
    launcher.write_text("#!/usr/bin/env bash\n"  # like deepspeed's runner in --no_ssh mode: dies on SIGTERM
                        "( trap 'sleep 0.5; echo checkpointed > " + shlex.quote(str(done)) + "; exit 0' TERM\n"
                        "  echo $BASHPID > " + shlex.quote(str(rank_pid)) + "\n"
                        "  while :; do sleep 0.1; done ) &\n"
                        "wait\n")
    launcher.chmod(0o755)
    p = subprocess.Popen(["bash", str(PRETRAIN), "--node-rank", "0", "--nnodes", "2", "--master-addr", "127.0.0.1",
                          "--python", str(launcher), "--", "--config", "tiny"], cwd=cwd, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.time() + 20
        while not rank_pid.exists() or not rank_pid.read_text().strip():
            assert p.poll() is None and time.time() < deadline, p.communicate()
            time.sleep(0.05)
        assert len(os.listdir(env["TMPDIR"])) == 1  # the hostfile, while the job runs
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=30)
        assert p.returncode == 128 + signal.SIGTERM, err
        assert done.read_text() == "checkpointed\n"  # the rank got the signal and finished before the script
        with pytest.raises(ProcessLookupError):
            os.kill(int(rank_pid.read_text()), 0)
        assert os.listdir(env["TMPDIR"]) == []
    finally:
        _kill_group(p)


def _kill_group(p: subprocess.Popen) -> None:
    """Leave nothing running: SIGKILL the script's whole process group, reap the script."""
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    p.wait(timeout=30)


# pre-emption: a fake `deepspeed` package (first on PYTHONPATH) run by the real python, whose
# launcher behaves as deepspeed's does on a signal (terminate the ranks, kill them soon after, exit 1)
FAKE_LAUNCH = """\
# like deepspeed.launcher.launch: one process per rank; a rank exiting non-zero stops the others
# and its status is the launcher's; SIGTERM/SIGINT stop the ranks, kill them KILL_AFTER s later
# (deepspeed: 30 s) and exit 1
import os, signal, subprocess, sys, time
KILL_AFTER = 0.5
ranks = [subprocess.Popen([sys.executable, os.environ["FAKE_RANK"], str(r)]) for r in range(2)]

def stop(code):
    for p in ranks:
        if p.poll() is None:
            p.terminate()
    end = time.time() + KILL_AFTER
    while time.time() < end and any(p.poll() is None for p in ranks):
        time.sleep(0.02)
    for p in ranks:
        if p.poll() is None:
            p.kill()
    sys.exit(code)

signal.signal(signal.SIGTERM, lambda *a: stop(1))
signal.signal(signal.SIGINT, lambda *a: stop(1))
while True:
    codes = [p.poll() for p in ranks]
    bad = [c for c in codes if c not in (None, 0)]
    if bad:
        stop(bad[0])
    if all(c == 0 for c in codes):
        sys.exit(0)
    time.sleep(0.05)
"""
FAKE_RUNNER = """\
# like deepspeed.launcher.runner --no_ssh: runs the per-node launcher, exits with its status
import subprocess, sys
sys.exit(subprocess.call([sys.executable, "-u", "-m", "deepspeed.launcher.launch"]))
"""
FAKE_RANK = """\
# a rank of vip.train: on SIGTERM/SIGINT (which it unblocks, as vip.train.launcher.Preemption
# does) it 'checkpoints' for FAKE_CKPT_SECONDS, then exits 143
import os, signal, sys, time
from pathlib import Path
d, r = Path(os.environ["FAKE_DIR"]), sys.argv[1]
stop = []
signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
signal.signal(signal.SIGINT, lambda *a: stop.append(1))
signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGINT})
(d / f"rank{r}.pid").write_text(str(os.getpid()))
while not stop:
    time.sleep(0.02)
time.sleep(float(os.environ["FAKE_CKPT_SECONDS"]))
(d / f"rank{r}.done").write_text("checkpointed")
sys.exit(143)
"""


@pytest.fixture
def fake_deepspeed(tmp_path, env):
    """env for launch/pretrain.sh with the real python and a fake deepspeed launcher + ranks."""
    root = tmp_path / "ds"
    (root / "deepspeed" / "launcher").mkdir(parents=True)
    (root / "deepspeed" / "__init__.py").write_text("")
    (root / "deepspeed" / "launcher" / "__init__.py").write_text("")
    (root / "deepspeed" / "launcher" / "launch.py").write_text(FAKE_LAUNCH)
    (root / "deepspeed" / "launcher" / "runner.py").write_text(FAKE_RUNNER)
    (root / "rank.py").write_text(FAKE_RANK)
    marks = tmp_path / "marks"
    marks.mkdir()
    e = {**env, "VIP_PYTHON": sys.executable, "PYTHONPATH": str(root), "FAKE_RANK": str(root / "rank.py"),
         "FAKE_DIR": str(marks), "FAKE_CKPT_SECONDS": "1.5"}
    e.pop("VIP_PREEMPT_GRACE", None)
    return e, marks


MODES = {"one-node": ["--nproc", "2"],
         "scheduler": ["--node-rank", "0", "--nnodes", "1", "--master-addr", "127.0.0.1", "--nproc", "2"]}


def _preempt(mode, args, env, marks, cwd, to_group=True, timeout=60):
    """Start pretrain.sh, SIGTERM it (its process group, or the script alone) once both ranks run;
    returns (exit status, seconds from the signal to the exit, stderr)."""
    p = subprocess.Popen(["bash", str(PRETRAIN), *MODES[mode], *args, "--", "--config", "tiny"], cwd=cwd, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.time() + 30
        while not all((marks / f"rank{r}.pid").exists() for r in (0, 1)):
            assert p.poll() is None and time.time() < deadline, p.communicate()
            time.sleep(0.05)
        t0 = time.time()
        (os.killpg if to_group else os.kill)(p.pid, signal.SIGTERM)
        _, err = p.communicate(timeout=timeout)
        return p.returncode, time.time() - t0, err
    finally:
        _kill_group(p)


def _gone(pid_file: Path, wait: float = 5.0) -> bool:
    """The process has ended, or does within `wait` s (a zombie not yet reaped counts as ended)."""
    end = time.time() + wait
    while True:
        try:
            stat = Path(f"/proc/{int(pid_file.read_text())}/stat").read_text()
        except FileNotFoundError:
            return True
        if stat.rsplit(")", 1)[1].split()[0] in ("Z", "X"):
            return True
        if time.time() > end:
            return False
        time.sleep(0.05)


@pytest.mark.parametrize("to_group", [True, False], ids=["job", "script"])
@pytest.mark.parametrize("mode", list(MODES))
def test_pretrain_sigterm_gives_the_ranks_the_grace_period_and_exits_143(mode, to_group, fake_deepspeed, cwd):
    """SIGTERM to every process of the job (a scheduler pre-empting it) or to the script alone: the
    ranks checkpoint for longer than deepspeed's launcher would let them, the script exits 143."""
    env, marks = fake_deepspeed
    rc, took, err = _preempt(mode, [], env, marks, cwd, to_group)     # the default grace: 120 s
    assert rc == 128 + signal.SIGTERM, err
    assert [(marks / f"rank{r}.done").exists() for r in (0, 1)] == [True, True], err
    assert 1.5 <= took < 30 and "passed on to the ranks" in err
    assert all(_gone(marks / f"rank{r}.pid") for r in (0, 1))
    assert os.listdir(env["TMPDIR"]) == []   # scheduler mode: the throwaway hostfile is gone


@pytest.mark.parametrize("how", ["option", "env"])
def test_pretrain_grace_period_ends_by_killing_the_ranks(how, fake_deepspeed, cwd):
    """Ranks that take longer than --grace (or $VIP_PREEMPT_GRACE) are killed then; still exit 143."""
    env, marks = fake_deepspeed
    env["FAKE_CKPT_SECONDS"] = "600"
    args = ["--grace", "2"] if how == "option" else []
    if how == "env":
        env["VIP_PREEMPT_GRACE"] = "2"
    rc, took, err = _preempt("one-node", args, env, marks, cwd)
    assert rc == 128 + signal.SIGTERM, err
    assert 1 <= took < 15 and "did not stop within --grace 2s" in err
    assert not any((marks / f"rank{r}.done").exists() for r in (0, 1))
    assert all(_gone(marks / f"rank{r}.pid") for r in (0, 1))


def test_pretrain_grace_is_refused_with_a_hostfile(env, fake_python, cwd):
    p = run(PRETRAIN, "--hostfile", "hosts.txt", "--grace", "60", "--dry-run", "--", env=env, cwd=cwd)
    assert p.returncode == 2 and "--grace does not apply with --hostfile" in p.stderr
    p = run(PRETRAIN, "--dry-run", "--", env={**env, "VIP_PREEMPT_GRACE": "soon"}, cwd=cwd)
    assert p.returncode == 2 and "VIP_PREEMPT_GRACE needs an integer" in p.stderr
    assert not ran(fake_python)


# --------------------------------------------------------------------------- caption.sh
def captioning_args(cmd: list[str]) -> list[str]:
    """The arguments of the job's entrypoint, `python -m vip caption …`."""
    i = cmd.index("caption")
    assert cmd[i - 2:i] == ["-m", "vip"], cmd
    return cmd[i + 1:]


def test_caption_dry_run_makes_option_paths_absolute(env, fake_python, cwd):
    (cwd / "data").mkdir()  # a value that exists relative to the cwd is not rewritten any more
    p = run(CAPTION, "--shards", "rel/dir", "--out", "./rel/out", "--model-dir", "m", "--weights", "w/coca.pt",
            "--config", "cfg/caption.yaml", "--python", fake_python, "--no-wait", "--dry-run", "--",
            "caption.batch_size=4", "caption.prompt=data", "caption.revision=a b", env=env, cwd=cwd)
    cmd = one_command(p)
    assert cmd[1:3] == ["job", "submit"] and "--no-wait" in cmd and "--working-dir" in cmd
    assert cmd[cmd.index("--") + 1:cmd.index("--") + 5] == [str(fake_python), "-m", "vip", "caption"]
    assert captioning_args(cmd) == [
        "--config", f"{cwd}/cfg/caption.yaml",
        f"caption.shards={cwd}/rel/dir", f"caption.out={cwd}/rel/out", f"caption.model=local-dir:{cwd}/m",
        f"caption.pretrained={cwd}/w/coca.pt",
        "caption.batch_size=4", "caption.prompt=data", "caption.revision=a b"]
    assert not ran(fake_python)  # no probe of the cluster, no head started
    assert not (cwd / "rel").exists()


def test_caption_dry_run_passes_overrides_unchanged(env, fake_python, cwd):
    (cwd / "data" / "shards").mkdir(parents=True)
    p = run(CAPTION, "--config", "tiny", "--shards", "/abs/shards", "--dry-run", "--",
            "caption.shards=data/shards", "caption.out=out", "caption.model=local-dir:data", env=env, cwd=cwd)
    assert captioning_args(one_command(p)) == [
        "--config", "tiny", "caption.shards=/abs/shards",
        "caption.shards=data/shards", "caption.out=out", "caption.model=local-dir:data"]
    assert not ran(fake_python)

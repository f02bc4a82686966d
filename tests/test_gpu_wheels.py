"""scripts/gpu_wheels.sh: the wheels carried to the offline GPU machine (no network here either).

The pinned list names one exact version per package; every third-party module that vip/, shards/,
captioning/ and bench/ import is preinstalled on the GPU machine, carried as a wheel, or excluded
with a reason (a new import without a list entry fails here); `--check DIR` accepts a folder that
holds exactly the pinned wheels and rejects duplicates, missing, unknown and wrongly tagged ones;
the pinned packages' own requirements are carried or preinstalled, within their ranges."""
from __future__ import annotations

import ast
import importlib.metadata as md
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_wheels.sh"
CHECKED_DIRS = ("vip", "shards", "captioning", "bench")
LOCAL = {"vip", "shards", "captioning", "bench", "tests"}

# import name → distribution, where they differ (a module missing here is taken as its own
# distribution name, so an unknown new import fails unless that distribution is listed)
IMPORT_NAMES = {
    "av": "av",
    "open_clip": "open_clip_torch",
    "yaml": "pyyaml",
    "PIL": "pillow",
    "deepspeed": "deepspeed",
    "ftfy": "ftfy",
    "cpuinfo": "py-cpuinfo",
    "cv2": "opencv-python-headless",
    "sklearn": "scikit-learn",
    "skimage": "scikit-image",
    "google": "protobuf",
    "pynvml": "nvidia-ml-py",
}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    full = {**os.environ, "PYTHON": sys.executable, **(env or {})}
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, cwd=ROOT, env=full,
                          timeout=120)


def _pins() -> dict[str, tuple[str, str, str]]:
    """normalised name → (name as listed, version, reason), from `--list`."""
    r = _run("--list")
    assert r.returncode == 0, r.stderr
    pins = {}
    for line in r.stdout.splitlines():
        m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([0-9][A-Za-z0-9.+!-]*)\s+#\s+(\S.*)", line.strip())
        assert m, f"--list: not 'name==version  # reason': {line!r}"
        name, ver, why = m.groups()
        assert _norm(name) not in pins, f"{name} is listed twice"
        pins[_norm(name)] = (name, ver, why)
    return pins


def _preinstalled() -> dict[str, str | None]:
    r = _run("--preinstalled")
    assert r.returncode == 0, r.stderr
    out = {}
    for tok in r.stdout.split():
        name, _, ver = tok.partition("==")
        out[_norm(name)] = ver or None
    return out


def _excluded() -> dict[str, str]:
    r = _run("--excluded")
    assert r.returncode == 0, r.stderr
    return {_norm(line.split(None, 1)[0]): line.split(None, 1)[1] for line in r.stdout.splitlines() if line.strip()}


def _imports() -> dict[str, set[str]]:
    """Third-party top-level modules (at any depth: lazy imports count) → the files importing them."""
    found: dict[str, set[str]] = {}
    for d in CHECKED_DIRS:
        for f in sorted((ROOT / d).rglob("*.py")):
            for node in ast.walk(ast.parse(f.read_text(), str(f))):
                if isinstance(node, ast.Import):
                    mods = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    mods = [node.module]
                else:
                    continue
                for m in mods:
                    top = m.split(".")[0]
                    if top in LOCAL or top in sys.stdlib_module_names or top == "__future__":
                        continue
                    found.setdefault(top, set()).add(str(f.relative_to(ROOT)))
    return found


def _requirements_txt() -> dict[str, str]:
    """requirements.txt: normalised name → its version specifier."""
    out = {}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        m = re.match(r"([A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?\s*(.*)", line)
        if line and m:
            out[_norm(m.group(1))] = m.group(3).strip()
    return out


# (a) the pinned list

def test_list_names_one_pinned_version_per_package():
    pins = _pins()
    assert {"av", "open-clip-torch", "transformers", "tokenizers", "huggingface-hub", "deepspeed"} <= set(pins)
    for name, ver, why in pins.values():
        assert len(why) > 10, f"{name}: give the reason it is carried"
    # the same pins the project installs elsewhere
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    assert f'deepspeed=={pins["deepspeed"][1]}' in setup, "deepspeed: pin it as scripts/setup.sh does"
    from packaging.specifiers import SpecifierSet
    reqs = _requirements_txt()
    for d, (name, ver, _) in pins.items():
        if d in reqs and reqs[d]:
            assert SpecifierSet(reqs[d]).contains(ver, prereleases=True), \
                f"{name}=={ver} is outside requirements.txt's {reqs[d]}"


def test_list_needs_no_network_and_has_no_side_effects(tmp_path):
    r = _run("--list", env={"PYTHON": "/nonexistent/python"})  # prints without running pip or python
    assert r.returncode == 0 and r.stdout.count("==") == len(_pins())
    assert _run("--check").returncode == 2 and _run("--nope").returncode == 2


# (b) every third-party import is preinstalled, carried or excluded

def test_every_third_party_import_is_available_on_the_gpu_machine():
    pins, pre, excluded = _pins(), _preinstalled(), _excluded()
    assert {"torch", "numpy", "safetensors", "pyyaml", "pillow", "pyarrow", "tqdm", "matplotlib"} <= set(pre)
    missing = {}
    for mod, files in _imports().items():
        dist = _norm(IMPORT_NAMES.get(mod, mod))
        if dist not in pins and dist not in pre and dist not in excluded:
            missing[f"{mod} (distribution {dist})"] = sorted(files)
    assert not missing, ("imported by the code the GPU check runs, but neither preinstalled on the GPU machine "
                         "nor in scripts/gpu_wheels.sh's PINS nor EXCLUDED (add it, or its import name to "
                         f"IMPORT_NAMES here): {missing}")


def test_exclusions_are_explained_and_not_carried():
    pins, excluded = _pins(), _excluded()
    assert set(excluded) == {"ray", "webdataset", "s3fs"}, excluded
    assert all(len(why) > 10 for why in excluded.values()), excluded
    assert not set(excluded) & set(pins)


def test_the_test_sees_the_imports_it_guards():
    """The scan finds what the GPU check needs carried: a scan that found nothing would pass anything."""
    tops = set(_imports())
    assert {"torch", "av", "open_clip", "deepspeed", "transformers", "yaml"} <= tops, tops


def test_every_pin_is_needed():
    """Each wheel is imported by the code or required by another carried wheel (metadata installed here)."""
    pins = _pins()
    wanted = {_norm(IMPORT_NAMES.get(m, m)) for m in _imports()} & set(pins)
    from packaging.requirements import Requirement
    env = {"python_version": "3.12", "sys_platform": "linux", "platform_machine": "x86_64", "extra": ""}
    todo = list(wanted)
    while todo:
        name, ver, _ = pins[todo.pop()]
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            pytest.skip(f"{name} is not installed here: cannot read what it requires")
        if dist.version != ver:
            pytest.skip(f"{name} {dist.version} is installed here, not the pinned {ver}")
        for r in dist.requires or []:
            req = Requirement(r)
            d = _norm(req.name)
            if (not req.marker or req.marker.evaluate(env)) and d in pins and d not in wanted:
                wanted.add(d)
                todo.append(d)
    assert set(pins) == wanted, f"carried but needed by nothing: {sorted(set(pins) - wanted)}"


def test_pinned_requirements_are_carried_or_preinstalled():
    """The combination is coherent: every Requires-Dist of a pinned package (markers for Python 3.12 on
    Linux x86_64) is carried at a version in its range, or preinstalled there (in range where the
    version is known) — read from the metadata installed here for the packages at their pinned version."""
    r = _run("--check-installed")
    assert r.returncode == 0, r.stdout + r.stderr
    # the key ones were read, not skipped (installed here at their pinned version)
    for name in ("transformers", "tokenizers", "huggingface_hub", "open_clip_torch", "pydantic"):
        assert not re.search(rf"note: {name} (is not installed|\S+ is installed here)", r.stdout), r.stdout


# (c) --check on a folder of wheels

def _fake_dir(tmp_path: Path, pins: dict) -> Path:
    d = tmp_path / "whl"
    d.mkdir()
    for name, ver, _ in pins.values():
        (d / f"{name.replace('-', '_')}-{ver}-py3-none-any.whl").touch()
    return d


def test_check_accepts_one_wheel_per_package(tmp_path):
    d = _fake_dir(tmp_path, _pins())
    r = _run("--check", str(d))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "not wheel archives" in r.stdout  # empty files: only the names were checked


def test_check_rejects_a_second_version(tmp_path):
    pins = _pins()
    d = _fake_dir(tmp_path, pins)
    (d / "av-17.1.0-cp311-abi3-manylinux_2_28_x86_64.whl").touch()
    r = _run("--check", str(d))
    assert r.returncode == 1
    assert "av: 2 wheels" in r.stderr and "pinned to" in r.stderr, r.stderr


def test_check_rejects_a_missing_package(tmp_path):
    pins = _pins()
    d = _fake_dir(tmp_path, pins)
    name, ver, _ = pins["pydantic-core"]
    (d / f"{name}-{ver}-py3-none-any.whl").unlink()
    r = _run("--check", str(d))
    assert r.returncode == 1 and f"{name}=={ver}: no wheel" in r.stderr, r.stderr


def test_check_rejects_unknown_and_uninstallable_wheels(tmp_path):
    pins = _pins()
    d = _fake_dir(tmp_path, pins)
    (d / "ray-2.60.0-cp312-cp312-manylinux2014_x86_64.whl").touch()
    name, ver, _ = pins["av"]
    (d / f"{name}-{ver}-py3-none-any.whl").rename(d / f"{name}-{ver}-cp313-cp313-manylinux_2_28_x86_64.whl")
    r = _run("--check", str(d))
    assert r.returncode == 1
    assert "ray is not in the list" in r.stderr and "do not install on cp312" in r.stderr, r.stderr


def _wheel(path: Path, name: str, ver: str, requires: list[str]) -> None:
    meta = f"Metadata-Version: 2.1\nName: {name}\nVersion: {ver}\nRequires-Python: >=3.9\n"
    meta += "".join(f"Requires-Dist: {r}\n" for r in requires)
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{name}-{ver}.dist-info/METADATA", meta)


def test_check_reads_requirements_of_real_wheels(tmp_path):
    """A wheel archive's Requires-Dist is checked: a requirement outside the carried version, one the GPU
    machine lacks, and (accepted) one on the machine and one for another platform."""
    pins = _pins()
    d = _fake_dir(tmp_path, pins)
    name, ver, _ = pins["transformers"]
    path = d / f"{name}-{ver}-py3-none-any.whl"
    _wheel(path, name, ver, ["numpy>=1.17", 'pywin32; sys_platform == "win32"', "pytest; extra == 'testing'"])
    r = _run("--check", str(d))
    assert r.returncode == 0, r.stdout + r.stderr
    _wheel(path, name, ver, ["tokenizers<0.21", "no-such-package-here>=1", "numpy>=99"])
    r = _run("--check", str(d))
    assert r.returncode == 1
    assert "needs tokenizers<0.21: carried is" in r.stderr, r.stderr
    assert "needs no-such-package-here>=1: neither carried nor on the GPU machine" in r.stderr, r.stderr
    assert "needs numpy>=99: on the GPU machine is 2.5.2" in r.stderr, r.stderr


def test_building_a_complete_folder_is_offline_and_drops_stale_wheels(tmp_path):
    """With every pinned wheel present nothing is fetched: the run drops wheels not in the list, prints
    the size table, the check and the install line, and fails over the size limit."""
    d = _fake_dir(tmp_path, _pins())
    stale = [d / "av-17.1.0-cp311-abi3-manylinux_2_28_x86_64.whl", d / "ray-2.60.0-py3-none-any.whl"]
    for f in stale:
        f.touch()
    r = _run(str(d), env={"PIP_NO_INDEX": "1"})
    assert r.returncode == 0, r.stdout + r.stderr
    assert not any(f.exists() for f in stale)
    assert "total (" in r.stdout and "] downloading" not in r.stdout and "] building" not in r.stdout
    assert f"--target /tmp/site {d}/*.whl && export PYTHONPATH=/tmp/site" in r.stdout
    (d / f"av-{_pins()['av'][1]}-py3-none-any.whl").write_bytes(b"x" * 65536)
    r = _run(str(d), env={"GPU_WHEELS_LIMIT_MIB": "0.01", "PIP_NO_INDEX": "1"})
    assert r.returncode == 1 and "over the 0.01 MiB limit" in r.stderr, r.stdout + r.stderr

"""Declared dependencies match the code: every runtime requirement is imported by the runtime code
(shards/, captioning/, vip/) or is on the allow-list below with a reason that is itself checked;
test-only packages (requirements-test.txt) are imported by no runtime code; every third-party
module the runtime code imports comes from a declared runtime requirement."""
from __future__ import annotations

import ast
import importlib.metadata as md
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUNTIME_DIRS = ("shards", "captioning", "vip")
LOCAL = {"shards", "captioning", "vip", "bench", "tests"}

# distribution name (normalised) → the module names it provides, where they differ from the name
IMPORT_NAMES = {
    "open-clip-torch": ("open_clip",),
    "pyyaml": ("yaml",),
    "pillow": ("PIL",),
    "py-cpuinfo": ("cpuinfo",),
    "tensorboard": ("tensorboard",),
}

# Runtime requirements no runtime code imports, each with why it is needed. Each reason is checked
# by `_reason_holds`, so an entry that no longer applies fails the test.
INDIRECT = {
    "torchvision": "open_clip imports it (image transforms); it must be resolved in the same pip "
                   "command as torch (docs/install.md)",
    "tensorboard": "vip/train/logs.py writes TensorBoard events through torch.utils.tensorboard, "
                   "which imports the tensorboard package",
    "ninja": "a DeepSpeed requirement: builds DeepSpeed's C++ ops at first use",
    "hjson": "a DeepSpeed requirement, resolved with torch before DeepSpeed is installed",
    "py-cpuinfo": "a DeepSpeed requirement, resolved with torch before DeepSpeed is installed",
    "psutil": "a DeepSpeed requirement, resolved with torch before DeepSpeed is installed",
    "pydantic": "a DeepSpeed requirement (its config classes), resolved with torch before DeepSpeed is installed",
}

# Declared outside requirements.txt: scripts/setup.sh installs DeepSpeed (pinned) after it, built
# against its torch; pyproject.toml's `train` extra.
DECLARED_ELSEWHERE = {"deepspeed"}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirements(path: Path) -> list[str]:
    """Distribution names (normalised) of a pip requirements file (no -r/-c includes expected)."""
    names = []
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        assert not line.startswith("-"), f"{path.name}: options/includes are not expected here: {line}"
        m = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", line)
        assert m, f"{path.name}: cannot read the requirement {line!r}"
        names.append(_norm(m.group(0)))
    return names


def _runtime_imports() -> dict[str, set[str]]:
    """Every module named by an import statement (at any depth: lazy imports count) in the runtime
    code → the files that import it. `from a.b import c` records a.b and a.b.c."""
    found: dict[str, set[str]] = {}
    for d in RUNTIME_DIRS:
        for f in sorted((ROOT / d).rglob("*.py")):
            for node in ast.walk(ast.parse(f.read_text(), str(f))):
                mods = []
                if isinstance(node, ast.Import):
                    mods = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    mods = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
                for m in mods:
                    found.setdefault(m, set()).add(str(f.relative_to(ROOT)))
    return found


def _imported(dist: str, imports: dict) -> bool:
    tops = {m.split(".")[0] for m in imports}
    return any(mod in tops for mod in IMPORT_NAMES.get(dist, (dist.replace("-", "_"),)))


def _requires(dist: str) -> set[str]:
    try:
        reqs = md.requires(dist) or []
    except md.PackageNotFoundError:
        pytest.skip(f"{dist} is not installed here: cannot check what it requires")
    return {_norm(re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", r).group(0)) for r in reqs if "extra ==" not in r}


def _reason_holds(dist: str, imports: dict) -> bool:
    if dist == "torchvision":
        return "torchvision" in _requires("open_clip_torch") and _imported("open-clip-torch", imports)
    if dist == "tensorboard":
        return "torch.utils.tensorboard" in imports
    return dist in _requires("deepspeed") and "deepspeed" in {m.split(".")[0] for m in imports}


def test_every_runtime_requirement_is_used_by_runtime_code():
    imports = _runtime_imports()
    reqs = _requirements(ROOT / "requirements.txt")
    assert reqs and len(reqs) == len(set(reqs)), reqs
    unused = [r for r in reqs if not _imported(r, imports) and r not in INDIRECT]
    assert not unused, (f"requirements.txt lists {unused}, which nothing under {'/, '.join(RUNTIME_DIRS)}/ imports: "
                        "move test-only packages to requirements-test.txt, drop unused ones, or add them to "
                        "INDIRECT with the reason")
    for dist, why in INDIRECT.items():
        assert dist in reqs, f"INDIRECT lists {dist}, which requirements.txt no longer has"
        assert not _imported(dist, imports), f"{dist} is imported directly now: drop it from INDIRECT"
        assert _reason_holds(dist, imports), f"{dist}: the reason no longer holds: {why}"


def test_test_only_packages_stay_out_of_runtime_code():
    imports = _runtime_imports()
    test_reqs = _requirements(ROOT / "requirements-test.txt")
    assert {"pytest", "pytest-timeout", "webdataset", "pandas"} <= set(test_reqs)
    runtime = set(_requirements(ROOT / "requirements.txt"))
    assert not runtime & set(test_reqs), runtime & set(test_reqs)
    leaked = {d: sorted(f for m, fs in imports.items() if m.split(".")[0] in IMPORT_NAMES.get(d, (d.replace("-", "_"),))
                        for f in fs)
              for d in test_reqs if _imported(d, imports)}
    assert not leaked, f"runtime code imports test-only packages (move them to requirements.txt): {leaked}"


def test_every_third_party_import_is_declared():
    """The reverse direction: a module the runtime code imports comes from a declared requirement
    (not merely from something that happens to be installed alongside)."""
    imports = _runtime_imports()
    declared = set(_requirements(ROOT / "requirements.txt")) | DECLARED_ELSEWHERE
    provided = {mod for d in declared for mod in IMPORT_NAMES.get(d, (d.replace("-", "_"),))}
    tops = {m.split(".")[0] for m in imports} - LOCAL - set(sys.stdlib_module_names) - {"__future__"}
    undeclared = {t: sorted({f for m, fs in imports.items() if m.split(".")[0] == t for f in fs})
                  for t in tops - provided}
    assert not undeclared, f"imported by runtime code but declared nowhere (add to requirements.txt): {undeclared}"


def test_pyproject_matches_the_requirement_files():
    """pyproject's `dependencies` (for `pip install .`) are the runtime requirements the package
    imports, minus the ones only other tools need; its `test` extra holds the test-only ones."""
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    name = lambda r: _norm(re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", r).group(0))  # noqa: E731
    deps = {name(r) for r in project["dependencies"]}
    runtime = set(_requirements(ROOT / "requirements.txt"))
    imports = _runtime_imports()
    assert deps <= runtime, deps - runtime
    assert all(_imported(d, imports) or d == "torchvision" for d in deps), deps
    test_extra = {name(r) for r in project["optional-dependencies"]["test"]}
    assert set(_requirements(ROOT / "requirements-test.txt")) <= test_extra
    assert not test_extra & deps

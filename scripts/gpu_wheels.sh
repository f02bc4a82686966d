#!/usr/bin/env bash
# Wheels for an offline GPU machine (the lent H200: Python 3.12, torch 2.11, no network).
#
#   bash scripts/gpu_wheels.sh [DIR]      download/build the pinned wheels into DIR (default .whl/,
#                                         git-ignored), drop wheels not in the list, print a size
#                                         table and the install line; fails over the size limit
#   bash scripts/gpu_wheels.sh --list     the pinned list (name==version  # reason), no download
#   bash scripts/gpu_wheels.sh --check DIR
#                                         DIR holds exactly one wheel per listed package, at the
#                                         pinned version, with tags that install on cp312
#                                         manylinux x86_64, and no others; for real wheel archives
#                                         also every Requires-Dist (markers for that machine) is
#                                         carried or preinstalled there, within its range
#   bash scripts/gpu_wheels.sh --check-installed
#                                         the same requirement check from the metadata installed
#                                         in $PYTHON (no network, no wheels: what the tests use)
#   bash scripts/gpu_wheels.sh --preinstalled | --excluded
#                                         the GPU machine's package list / the imports left out
#
# Idempotent: a wheel already in DIR at its pinned version is not fetched again. Downloads use
# $PYTHON (default python3) with pip; DeepSpeed is built with the project's .venv (scripts/setup.sh),
# since its setup.py imports torch. GPU_WHEELS_LIMIT_MIB overrides the size limit.
set -euo pipefail
cd "$(dirname "$0")/.."

# Pinned wheels: one version each (two versions of one package stop the whole install).
# name  version  reason (what needs it on the GPU machine)
PINS='
av                 18.1.0  shards/ and bench/ decode and encode video (libx264 inside); >=17 for VideoReformatter.reformat(threads=); the cp311-abi3 wheel CI'"'"'s .venv runs (17.1/18.1/19.0 are 33.7/34.1/33.4 MiB)
open_clip_torch    3.3.0   vip/, captioning/, bench/: CLIP towers, tokenizer and the CoCa captioner (requirements.txt pin)
ftfy               6.3.1   open_clip'"'"'s tokenizer imports it
wcwidth            0.9.4   ftfy needs it (its pure-Python wheel: 0.29 MiB, the abi3 one 0.75 MiB)
transformers       4.55.4  open_clip CoCa generate() needs BeamSearchScorer (<4.56); the H200 has 5.17.0 (this one shadows it on PYTHONPATH)
tokenizers         0.21.4  transformers 4.55 needs >=0.21,<0.22 (the H200 has 0.23.2); cp39-abi3 manylinux wheel
huggingface_hub    0.36.2  transformers 4.55 and tokenizers 0.21 need <1.0 (the H200 has 1.33.0)
deepspeed          0.18.9  vip/train/ engine; no wheel on PyPI: built here with DS_BUILD_OPS=0 (py3-none-any); 0.19 fails on 0-dim parameters
hjson              3.1.0   deepspeed needs it
pydantic           2.14.4  deepspeed needs it (its config classes)
pydantic_core      2.50.5  pydantic 2.14.4 needs exactly this (cp312 manylinux wheel)
annotated_types    0.8.0   pydantic needs it
typing_inspection  0.4.5   pydantic needs it
typing_extensions  4.16.0  pydantic 2.14.4 and pydantic_core need >=4.16.0; the H200'"'"'s version was not read
'
# Fetched as their pure-Python (py3-none-any) wheel, where pip would pick a larger compiled one.
PURE='wcwidth'

# Third-party imports of vip/, shards/, captioning/, bench/ deliberately not carried.
EXCLUDED='
ray         the Ray 2.60.0 cp312 wheel alone is 75.6 MiB, over the 64 MiB a call carries; bench/gpu.py skips its Ray parts when ray is missing
webdataset  only tests read shards as plain webdataset (tests/test_reader.py); not needed on the GPU machine
s3fs        only s3:// shard sets need it (shards/storage.py imports it when one is opened); the GPU check reads local shards
'

# The GPU machine's Python packages. Source: the package list of the H200 image in the device notes
# (read on that machine 2026-11-17) and `python3 -m pip list` on the H200 (2026-11; Python 3.12.3 at
# /opt/torch/.venv/bin/python3) for the versions given; a name without ==version: version not read.
PREINSTALLED='
absl-py accelerate==1.15.0 aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs
botorch==0.18.1 build certifi charset-normalizer chex click cloudpickle cmake colorama contourpy
coverage cuda-bindings cuda-core cuda-pathfinder cuda-toolkit cupy-cuda13x==14.2.0 cycler cython
diffrax e3nn einops equinox etils execnet filelock flatbuffers flax fonttools formulaic frozenlist
fsspec gpytorch==1.15.2 grpcio h11 h5py hf-xet httpcore httpx huggingface-hub==1.33.0 humanize
hypothesis idna imageio iniconfig interface-meta jax==0.11.2 jax-cuda13-pjrt==0.11.2
jax-cuda13-plugin==0.11.2 jaxlib==0.11.2 jaxtyping==0.3.11 jinja2 joblib kiwisolver lazy-loader
lightning lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe
matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions
nanobind narwhals networkx ninja numba numba-cuda numpy==2.5.2 numpyro==0.21.0 nvidia-cublas
nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile
nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13 nvidia-ml-py nvidia-nccl-cu13
nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx==1.23.1 onnx-ir==1.0.0 onnxruntime==1.30.0
onnxscript==0.7.2 opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint
packaging pandas pathspec patsy peft pillow pip pluggy portalocker prometheus-client propcache
protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions pytest
pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist python-dateutil
pytorch-lightning==2.6.6 pyyaml regex requests rich sacrebleu safetensors==0.8.0 scikit-build-core
scikit-image scikit-learn scipy seaborn sentencepiece==0.2.2 sentence-transformers==6.0.1 setuptools
shellingham simplejson six sortedcontainers statsmodels sympy tabulate tensorboard
tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken==0.14.0 timm tokenizers==0.23.2
toolz torch==2.11.0 torchaudio==2.11.0 torchdiffeq==0.2.5 torch-geometric==2.8.0.post1
torchmetrics==1.9.0 torchvision==0.26.0 tqdm transformers==5.17.0 treescope triton==3.6.0 typer
typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash
yarl zipp
'

LIMIT_MIB=${GPU_WHEELS_LIMIT_MIB:-56}
PY=${PYTHON:-python3}
VENV=${VIP_VENV:-.venv}
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64)

pins() { printf '%s\n' "$PINS" | awk 'NF { print $1, $2 }'; }

list() {
  printf '%s\n' "$PINS" | awk 'NF { name = $1; ver = $2; $1 = ""; $2 = ""; sub(/^ +/, "");
                                    printf "%-34s # %s\n", name "==" ver, $0 }'
}

install_line() {
  local dir=$1
  echo "python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $dir/*.whl && export PYTHONPATH=/tmp/site"
}

# The checks (filenames, tags, duplicates, requirements) in Python: one implementation for a wheel
# folder (--check) and for the metadata installed in $PY (--check-installed).
pycheck() {
  GW_PINS=$PINS GW_PURE=$PURE GW_PRE=$PREINSTALLED "$PY" - "$@" <<'PYEOF'
import os, re, sys, zipfile
from email.parser import HeaderParser
try:
    from packaging.requirements import Requirement
    from packaging.specifiers import SpecifierSet
except ImportError:  # a bare interpreter: pip's own copy
    from pip._vendor.packaging.requirements import Requirement
    from pip._vendor.packaging.specifiers import SpecifierSet

norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()
pins = {norm(l.split()[0]): (l.split()[0], l.split()[1]) for l in os.environ["GW_PINS"].splitlines() if l.strip()}
pure = {norm(n) for n in os.environ["GW_PURE"].split()}
pre = {}
for tok in os.environ["GW_PRE"].split():
    name, _, ver = tok.partition("==")
    pre[norm(name)] = ver or None
# the GPU machine: Python 3.12.3, Linux x86_64
ENV = {"python_version": "3.12", "python_full_version": "3.12.3", "implementation_name": "cpython",
       "implementation_version": "3.12.3", "platform_python_implementation": "CPython",
       "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64",
       "os_name": "posix", "platform_release": "", "platform_version": "", "extra": ""}
problems, notes, unread = [], [], set()


def tags_ok(py, abi, plat):
    if plat == "any":
        plat_ok = True
    else:
        plat_ok = any(re.fullmatch(r"manylinux(1|2010|2014|_2_\d+)_x86_64", p) for p in plat.split("."))
    if not plat_ok:
        return False
    for p in py.split("."):
        if p in ("py3", "py312", "cp312") and abi in ("none", "abi3", "cp312"):
            return True
        m = re.fullmatch(r"cp3(\d+)", p)
        if m and abi == "abi3" and int(m.group(1)) <= 12:
            return True
    return False


def check_requires(name, ver, requires, requires_python):
    if requires_python and not SpecifierSet(requires_python).contains("3.12.3", prereleases=True):
        problems.append(f"{name} {ver} requires Python {requires_python}: the GPU machine has 3.12.3")
    for r in requires:
        req = Requirement(r)
        if req.marker and not req.marker.evaluate(ENV):
            continue
        d = norm(req.name)
        if d in pins:
            have, where = pins[d][1], "carried"
        elif d in pre:
            have, where = pre[d], "on the GPU machine"
        else:
            problems.append(f"{name} {ver} needs {r}: neither carried nor on the GPU machine (add it to PINS)")
            continue
        if have is None:
            if req.specifier:
                unread.add(f"{req.name}{req.specifier} ({name})")
        elif req.specifier and not req.specifier.contains(have, prereleases=True):
            problems.append(f"{name} {ver} needs {r}: {where} is {have}")


mode = sys.argv[1]
if mode == "dir":
    folder = sys.argv[2]
    wheels = sorted(f for f in os.listdir(folder) if f.endswith(".whl"))
    seen = {}
    for f in wheels:
        parts = f[:-4].split("-")
        if len(parts) not in (5, 6):
            problems.append(f"{f}: not a wheel file name")
            continue
        d, ver, (py, abi, plat) = norm(parts[0]), parts[1], parts[-3:]
        seen.setdefault(d, []).append(ver)
        if d not in pins:
            problems.append(f"{f}: {parts[0]} is not in the list")
        elif ver != pins[d][1]:
            problems.append(f"{f}: {parts[0]} is pinned to {pins[d][1]}, not {ver}")
        if d in pure and (abi, plat) != ("none", "any"):
            problems.append(f"{f}: {parts[0]} should be its pure-Python wheel (py3-none-any)")
        if not tags_ok(py, abi, plat):
            problems.append(f"{f}: tags {py}-{abi}-{plat} do not install on cp312 manylinux x86_64")
    for d, vers in seen.items():
        if len(vers) > 1:
            problems.append(f"{d}: {len(vers)} wheels ({', '.join(vers)}); keep exactly one")
    for d, (name, ver) in pins.items():
        if d not in seen:
            problems.append(f"{name}=={ver}: no wheel in {folder}")
    archives = 0
    for f in wheels:
        path = os.path.join(folder, f)
        if not zipfile.is_zipfile(path):
            continue
        with zipfile.ZipFile(path) as z:
            meta = [n for n in z.namelist() if re.fullmatch(r"[^/]+\.dist-info/METADATA", n)]
            if len(meta) != 1:
                problems.append(f"{f}: no single */METADATA")
                continue
            m = HeaderParser().parsestr(z.read(meta[0]).decode("utf-8", "replace"))
        archives += 1
        check_requires(m["Name"], m["Version"], m.get_all("Requires-Dist") or [], m["Requires-Python"])
    if archives < len(wheels):
        notes.append(f"{len(wheels) - archives} file(s) are not wheel archives: their requirements were not read")
    print(f"[gpu_wheels] {folder}: {len(wheels)} wheels for {len(pins)} pinned packages")
elif mode == "installed":
    import importlib.metadata as md
    for d, (name, ver) in pins.items():
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            notes.append(f"{name} is not installed here: its requirements were not read")
            continue
        if dist.version != ver:
            notes.append(f"{name} {dist.version} is installed here, not {ver}: its requirements were not read")
            continue
        check_requires(name, ver, dist.requires or [], dist.metadata["Requires-Python"])
    print(f"[gpu_wheels] requirements of {len(pins)} pinned packages, read from {sys.executable}")
if unread:
    notes.append("on the GPU machine, version not read (range not checked): " + ", ".join(sorted(unread)))
for n in notes:
    print(f"[gpu_wheels] note: {n}")
for p in problems:
    print(f"[gpu_wheels] ERROR: {p}", file=sys.stderr)
sys.exit(1 if problems else 0)
PYEOF
}

case "${1:-}" in
  --list) list; exit 0 ;;
  --preinstalled) read -ra names <<< "${PREINSTALLED//$'\n'/ }"; printf '%s\n' "${names[@]}"; exit 0 ;;
  --excluded) printf '%s\n' "$EXCLUDED" | awk 'NF'; exit 0 ;;
  --check)
    [[ $# -eq 2 && -d "$2" ]] || { echo "usage: $0 --check DIR (a folder)" >&2; exit 2; }
    pycheck dir "$2"; exit $? ;;
  --check-installed) pycheck installed; exit $? ;;
  -h|--help) sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
  -*) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
esac
[[ $# -le 1 ]] || { echo "usage: $0 [DIR] | --list | --check DIR" >&2; exit 2; }

DIR=${1:-.whl}
DIR=${DIR%/}
mkdir -p "$DIR"
t0=$SECONDS

# wheel file name → normalised "name version"
norm() { local s=${1,,}; s=${s//_/-}; echo "${s//./-}"; }
whl_key() { local b=${1##*/}; b=${b%.whl}; local r=${b#*-}; echo "$(norm "${b%%-*}") ${r%%-*}"; }

# 1. drop wheels that are not in the list (other versions from earlier runs, removed packages)
declare -A WANT
while read -r n v; do WANT["$(norm "$n") $v"]=1; done < <(pins)
shopt -s nullglob
declare -A ISPURE
for n in $PURE; do ISPURE[$(norm "$n")]=1; done
for f in "$DIR"/*.whl; do
  key=$(whl_key "$f")
  if [[ -z "${WANT[$key]:-}" ]]; then echo "[gpu_wheels] removing $f (not in the list)"; rm -f -- "$f"
  elif [[ -n "${ISPURE[${key% *}]:-}" && $f != *-none-any.whl ]]; then
    echo "[gpu_wheels] removing $f (the pure-Python wheel is wanted)"; rm -f -- "$f"; fi
done

have() {  # a wheel for name==version is in DIR
  local want f
  want="$(norm "$1") $2"
  for f in "$DIR"/*.whl; do [[ "$(whl_key "$f")" == "$want" ]] && return 0; done
  return 1
}

# 2. download what is missing (one pip command), 3. build DeepSpeed
missing=() missing_pure=()
while read -r n v; do
  [[ $n == deepspeed ]] && continue
  have "$n" "$v" && continue
  if [[ -n "${ISPURE[$(norm "$n")]:-}" ]]; then missing_pure+=("$n==$v"); else missing+=("$n==$v"); fi
done < <(pins)
fetch=(-m pip download -q --no-deps --only-binary=:all: --python-version 3.12 -d "$DIR")
if ((${#missing[@]})); then
  echo "[gpu_wheels] downloading ${missing[*]}"
  pf=(); for p in "${PLATFORMS[@]}"; do pf+=(--platform "$p"); done
  "$PY" "${fetch[@]}" --implementation cp "${pf[@]}" "${missing[@]}"
fi
if ((${#missing_pure[@]})); then
  echo "[gpu_wheels] downloading ${missing_pure[*]} (pure-Python wheels)"
  "$PY" "${fetch[@]}" --implementation py --platform any "${missing_pure[@]}"
fi
ds_ver=$(pins | awk '$1 == "deepspeed" { print $2 }')
if ! have deepspeed "$ds_ver"; then
  [[ -x "$VENV/bin/python" ]] || bash scripts/setup.sh
  echo "[gpu_wheels] building deepspeed==$ds_ver (DS_BUILD_OPS=0, against $VENV's torch)"
  tmp=$(mktemp -d)
  # --no-cache-dir: built now from the sdist, never a wheel pip cached from another build
  DS_BUILD_OPS=0 "$VENV/bin/python" -m pip wheel -q --no-cache-dir --no-deps --no-build-isolation \
    "deepspeed==$ds_ver" -w "$tmp"
  built=("$tmp"/deepspeed-*.whl)
  [[ ${#built[@]} -eq 1 && ${built[0]} == *-py3-none-any.whl ]] || {
    echo "[gpu_wheels] ERROR: the DeepSpeed wheel is not pure Python: ${built[*]##*/}" >&2; exit 1; }
  # no prebuilt op: ops built against this machine's torch would not load next to the H200's
  unzip -p "${built[0]}" deepspeed/git_version_info_installed.py | grep -q "^installed_ops=.*True" && {
    echo "[gpu_wheels] ERROR: the DeepSpeed wheel has prebuilt ops (DS_BUILD_OPS=0 expected)" >&2; exit 1; }
  mv "${built[0]}" "$DIR/"
  rm -rf "$tmp"
fi

# 4. sizes, limit, checks, install line
echo
printf '%-72s %8s\n' "wheel" "MiB"
total=0 count=0
for f in "$DIR"/*.whl; do
  s=$(stat -c %s "$f"); total=$((total + s)); count=$((count + 1))
  printf '%-72s %8.2f\n' "${f##*/}" "$(awk -v s="$s" 'BEGIN { print s / 1048576 }')"
done
total_mib=$(awk -v s="$total" 'BEGIN { printf "%.2f", s / 1048576 }')
printf '%-72s %8s\n' "total ($count wheels; limit $LIMIT_MIB MiB)" "$total_mib"
echo "[gpu_wheels] took $((SECONDS - t0)) s"
awk -v t="$total_mib" -v l="$LIMIT_MIB" 'BEGIN { exit !(t > l) }' && {
  echo "[gpu_wheels] ERROR: $total_mib MiB is over the $LIMIT_MIB MiB limit (the working tree travels too; 64 MiB per call)" >&2
  exit 1; }
pycheck dir "$DIR"
echo
echo "On the GPU machine (run(carry=[\"$DIR\"])), start the command with:"
echo "  $(install_line "$DIR")"

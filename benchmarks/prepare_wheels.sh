#!/usr/bin/env bash
# Fill .whl/ (git-ignored) with the Python packages the GPU machine's image lacks, as wheels for its Python 3.12 on
# x86-64 Linux, at the versions installed here (what the tests run against): `make wheels`.
#
# The image has torch, triton, torchvision, accelerate, numpy, msgpack, ninja, psutil, py-cpuinfo, packaging, tqdm,
# einops, nvidia-ml-py, pyyaml, pillow... (/work/.library/device/KINDS.md) but not deepspeed (+ hjson, pydantic and
# pydantic's own needs) nor webdataset (+ braceexpand). timm and typing-extensions are there at versions nobody has
# read: they travel too, pinned to ours (pydantic needs a recent typing-extensions).
# DeepSpeed is published as a source archive only: it is built here into a pure-Python wheel with no compiled ops
# (DS_BUILD_OPS=0; ZeRO with our torch AdamW needs none, and DeepSpeed JIT-builds an op if ever asked).
# The device call names ".whl" in carry; benchmarks/gpu_session.sh installs the folder into /tmp/site.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
DEST=${DEST:-.whl}
MAX_MIB=${MAX_MIB:-40}
PKGS=(pydantic pydantic-core annotated-types typing-inspection typing-extensions hjson webdataset braceexpand timm)

ver() { "$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1"; }

mkdir -p "$DEST"
rm -f "$DEST"/*.whl
specs=()
for p in "${PKGS[@]}"; do specs+=("$p==$(ver "$p")"); done
echo "downloading: ${specs[*]}"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any -d "$DEST" "${specs[@]}"

ds="deepspeed==$(ver deepspeed)"
echo "building: $ds (DS_BUILD_OPS=0, pure Python)"
DS_BUILD_OPS=0 DS_ACCELERATOR=${DS_ACCELERATOR:-cpu} "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$DEST" "$ds"

# one version per project (two stop the whole install on the device), and the size the device call carries
"$PY" - "$DEST" "$MAX_MIB" <<'EOF'
import collections, pathlib, re, sys
dest, max_mib = pathlib.Path(sys.argv[1]), float(sys.argv[2])
wheels = sorted(dest.glob("*.whl"))
names = collections.Counter(re.sub(r"[-_.]+", "_", w.name.split("-")[0]).lower() for w in wheels)
dup = [n for n, c in names.items() if c > 1]
total = sum(w.stat().st_size for w in wheels) / 2**20
for w in wheels:
    print(f"{w.stat().st_size / 2**20:7.2f} MiB  {w.name}")
print(f"{len(wheels)} wheels, {total:.1f} MiB in {dest}/")
if dup:
    sys.exit(f"more than one version of: {dup}")
if total > max_mib:
    sys.exit(f"{total:.1f} MiB > {max_mib} MiB: the device call carries at most 64 MiB with the working tree")
EOF

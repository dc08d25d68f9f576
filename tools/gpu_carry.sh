#!/usr/bin/env bash
# Fill .whl/ and .deb/ (both git-ignored) with what a GPU machine without a package registry needs for
# tools/gpu_check.sh and tools/gpu_peers.sh, here where PyPI and Debian are reachable. The device image
# is taken to have Python 3.12 with torch (CUDA), numpy, safetensors, transformers, peft, ninja, psutil,
# py-cpuinfo, msgpack, einops, tqdm and cupy-cuda13x (the H200 image of 2026-11/12); what it lacks:
#   fuyou:      pydantic, pydantic-core, annotated-types, typing-inspection
#   kvikio:     kvikio-cu13, libkvikio-cu13, rapids-logger (CUDA 13 builds)
#   DeepSpeed:  deepspeed (a pure-Python wheel built here: its ops compile on first use there), hjson;
#               libaio1 and libaio-dev (Debian packages) for its async_io op
# About 9 MiB in all. Usage: bash tools/gpu_carry.sh   (then carry ".whl" and ".deb" to the machine)
set -euo pipefail
cd "$(dirname "$0")/.."
PYV=${GPU_PYTHON_VERSION:-3.12}
DS_VERSION=0.19.8
rm -rf .whl .deb
mkdir -p .whl .deb
plat=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64; do
  plat+=(--platform "$p")
done
dl() { python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PYV" --implementation cp "${plat[@]}" -d .whl "$@"; }
# the versions this machine's fuyou runs with, so both sides validate configs alike
ver() { python3 -c "import importlib.metadata as m; print(m.version('$1'))" 2>/dev/null || true; }
pin() { local v; v=$(ver "$1"); if [ -n "$v" ]; then echo "$1==$v"; else echo "$1"; fi; }
dl "$(pin pydantic)" "$(pin pydantic-core)" "$(pin annotated-types)" "$(pin typing-inspection)" hjson
dl kvikio-cu13 libkvikio-cu13 "rapids-logger==0.3.*"
# DeepSpeed publishes only a source archive; its setup.py imports torch, hence no build isolation.
python3 -m pip wheel -q --no-deps --no-build-isolation "deepspeed==$DS_VERSION" -w .whl
# libaio1 on Debian 12 and Ubuntu 22.04, libaio1t64 from Debian 13 and Ubuntu 24.04 (same library)
(cd .deb && { apt-get download libaio1 libaio-dev || apt-get download libaio1t64 libaio-dev; })
ls -l .whl .deb
du -sh .whl .deb

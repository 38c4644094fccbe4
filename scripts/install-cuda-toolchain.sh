#!/usr/bin/env bash
# Installs nvcc 13.0 and NVRTC 13.0 from NVIDIA's PyPI wheels into a project-local folder (no GPU
# needed; CI compiles every kernel with both).
# Usage: scripts/install-cuda-toolchain.sh [DEST]   (default: .cuda-toolchain)
# Prints the nvcc path last; export NVCC=<that path> (or CUDA_HOME=DEST/nvidia/cu13) for build.rs.
# Kept at 13.0: PTX from a newer nvcc does not load on a 13.0 driver.
set -euo pipefail
dest=${1:-.cuda-toolchain}
nvcc="$dest/nvidia/cu13/bin/nvcc"
if [ -x "$nvcc" ] && [ -f "$dest/nvidia/cu13/lib/libnvrtc.so.13" ]; then echo "$nvcc"; exit 0; fi
py=$(command -v python3 || command -v python)
mkdir -p "$dest/wheels"
"$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_12_x86_64 \
  -d "$dest/wheels" \
  nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88 \
  nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85 nvidia-cuda-nvrtc==13.0.88 >&2
for w in "$dest"/wheels/*.whl; do
  "$py" -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])' "$w" "$dest"
done
chmod +x "$dest"/nvidia/cu13/bin/* "$dest"/nvidia/cu13/nvvm/bin/* 2>/dev/null || true
"$nvcc" --version >&2
echo "$nvcc"

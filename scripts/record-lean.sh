#!/usr/bin/env bash
# Records tests/data/lean/torchao.json (torchao's quantization maps and block codes, for
# tests/lean.rs) and torchao's AdamW8bit/AdamW4bit trajectories
# (tests/data/lean/torchao-adamw{8,4}bit.safetensors, for tests/lean_step.rs) by running torchao on
# the CPU. Installs pinned PyTorch and torchao into a virtual environment (the conformance one by
# default). Usage: scripts/record-lean.sh [VENV]
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${1:-.venv-conformance}
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/pip" install -q torch==2.15.0 torchao==0.18.0 numpy==2.4.6 safetensors==0.6.2 packaging
"$venv/bin/python" scripts/record_lean.py tests/data/lean/torchao.json
"$venv/bin/python" scripts/record_lean_trajectory.py tests/data/lean

#!/usr/bin/env bash
# Records the conformance cases under tests/data/conformance by running the real frameworks.
# Installs pinned PyTorch, TensorFlow (with Keras 3) and Optax from PyPI into a virtual environment
# (CPU is enough), then runs scripts/record_conformance.py. Usage: scripts/record-conformance.sh [VENV]
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${1:-.venv-conformance}
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --upgrade pip
  "$venv/bin/pip" install -q torch==2.15.0 tensorflow-cpu==2.21.0 keras==3.15.1 lion-pytorch==0.2.5 \
    schedulefree==1.4.1 jax==0.10.2 jaxlib==0.10.2 optax==0.2.8 numpy==2.4.6
fi
out=tests/data/conformance
rm -rf "$out/optimizers" "$out/schedules"
"$venv/bin/python" scripts/record_conformance.py "$out"

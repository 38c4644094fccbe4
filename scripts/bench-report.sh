#!/usr/bin/env bash
# Runs the PyTorch baseline and the fusedopt benchmark program in one go on one device and writes
# the raw JSON and a markdown report with every ratio under benches/results/.
# Usage: scripts/bench-report.sh cpu|cuda [PYTHON] [extra microbench args, e.g. --quick]
# Time the CPU only on an otherwise idle machine.
set -euo pipefail
cd "$(dirname "$0")/.."
device=$1
py=${2:-python3}
shift $(( $# < 2 ? $# : 2 ))
stamp=$(date -u +%Y-%m-%d)
out=benches/results
mkdir -p "$out"
cargo build --release --bench microbench
"$py" benches/torch_baseline.py --device "$device" --json "$out/$stamp-$device-torch.json" "$@"
cargo bench --bench microbench -- --device "$device" --json "$out/$stamp-$device-fusedopt.json" \
  --baseline "$out/$stamp-$device-torch.json" "$@"
python3 scripts/perf_report.py "$out/$stamp-$device-fusedopt.json" "$out/$stamp-$device-torch.json" \
  > "$out/$stamp-$device.md"
cat "$out/$stamp-$device.md"

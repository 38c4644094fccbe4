#!/usr/bin/env bash
# Runs the PyTorch baseline and the fusedopt benchmark program on one device, alternating profile
# by profile for ROUNDS rounds (so both see the same machine conditions), then writes the median
# of each configuration as JSON and a markdown report with every ratio under benches/results/.
# Usage: scripts/bench-report.sh cpu|cuda [PYTHON] [ROUNDS] [PROFILES]
# Time the CPU only on an otherwise idle machine.
set -euo pipefail
cd "$(dirname "$0")/.."
device=$1
py=${2:-python3}
rounds=${3:-3}
case "$device" in
  cpu) profiles=${4:-1M,16M,10Mx100,10Mx5000,10000x4096} ;;
  *) profiles=${4:-1M,16M,256M,10000x4096,gpt2-medium} ;;
esac
stamp=$(date -u +%Y-%m-%d)
out=benches/results
work=$(mktemp -d)
mkdir -p "$out"
cargo build --release --bench microbench
for round in $(seq 1 "$rounds"); do
  for p in ${profiles//,/ }; do
    "$py" benches/torch_baseline.py --device "$device" --quick --profiles "$p" --json "$work/torch-$round-$p.json"
    cargo bench --bench microbench -- --device "$device" --quick --profiles "$p" --json "$work/ours-$round-$p.json"
  done
done
python3 scripts/merge_bench.py "$out/$stamp-$device-torch.json" "$work"/torch-*.json
python3 scripts/merge_bench.py "$out/$stamp-$device-fusedopt.json" "$work"/ours-*.json
python3 scripts/perf_report.py "$out/$stamp-$device-fusedopt.json" "$out/$stamp-$device-torch.json" \
  > "$out/$stamp-$device.md"
python3 scripts/readme.py perf
cat "$out/$stamp-$device.md"

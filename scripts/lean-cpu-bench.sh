#!/usr/bin/env bash
# CPU step time of AdamW with f32, 8-bit and 4-bit state (fusedopt's benchmark program) beside
# PyTorch's fused AdamW and torchao's AdamW8bit / AdamW4bit, in the same run, alternating, on one
# tensor of 2^24 elements. Writes a markdown report. Run it on an otherwise idle machine.
# Usage: scripts/lean-cpu-bench.sh OUT.md [VENV] (VENV with torch and torchao: scripts/record-lean.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
out=$1
venv=${2:-.venv-conformance}
n=$((16 << 20))
tmp=$(mktemp -d)
versions=$("$venv/bin/python" -c 'import torch, torchao; print(f"torch {torch.__version__}, torchao {torchao.__version__}")' 2>/dev/null)
cargo bench --bench microbench --no-run -q 2>/dev/null
for round in 1 2; do
  for state in f32 block8 block4; do
    cargo bench -q --bench microbench -- --device cpu --rules adamw --profiles 16M \
      --state "$state" 2>/dev/null | awk -v s="$state" -v r="$round" \
      '$1 == "adamw" && $2 == "fp32" && $4 == "false" {print r, "fusedopt_adamw_" s, $6}' >> "$tmp/rows"
  done
  "$venv/bin/python" benches/torch_lean_baseline.py "$n" 2>/dev/null \
    | awk -v r="$round" '{print r, $1, $3}' >> "$tmp/rows"
done
{
  echo "# CPU step time: lean AdamW state"
  echo
  echo "- command: \`scripts/lean-cpu-bench.sh $out\`"
  echo "- commit: $(git rev-parse --short HEAD), date: $(date -u +%Y-%m-%d)"
  echo "- machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
  echo "- $versions"
  echo "- one fp32 tensor of 2^24 parameters, AdamW lr 1e-3, no clipping; median ms per step; two rounds"
  echo "  alternating implementation by implementation; ratio: the implementation's time ÷ fusedopt's with"
  echo "  the same state (above 1: fusedopt is faster)."
  echo
  echo "| round | implementation | ms / step | ÷ fusedopt, same state |"
  echo "|---|---|---:|---:|"
  awk '{t[$1" "$2] = $3; k[NR] = $1" "$2}
       END {
         for (i = 1; i <= NR; i++) {
           split(k[i], a, " "); r = a[1]; name = a[2]; ref = "";
           if (name == "torch_fused_adamw_f32") ref = r" fusedopt_adamw_f32";
           if (name == "torchao_adamw8bit") ref = r" fusedopt_adamw_block8";
           if (name == "torchao_adamw4bit") ref = r" fusedopt_adamw_block4";
           printf "| %s | %s | %.2f | %s |\n", r, name, t[k[i]], ref == "" ? "" : sprintf("%.2f", t[k[i]] / t[ref]);
         }
       }' "$tmp/rows"
} > "$out"
rm -rf "$tmp"
cat "$out"

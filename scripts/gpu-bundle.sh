#!/usr/bin/env bash
# Builds, here (no GPU needed), everything a real-GPU validation run needs, into DIR (default
# .gpu-bundle, which git ignores; carry it to the GPU machine): the test binaries that touch the
# GPU, the replay, quickstart and train examples, the benchmark programs (stripped), the committed
# conformance cases and their replay on the emulated GPU (to compare bit for bit), the PyTorch
# baseline, and gpu-validate.sh, which runs it all there in one command; the executables as
# bin.tar.xz, which gpu-validate.sh unpacks. Refuses a build whose kernels would come from NVRTC
# (no fatbin embedded).
# Usage: scripts/gpu-bundle.sh [DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:-.gpu-bundle}
nvcc=$(scripts/install-cuda-toolchain.sh .cuda-toolchain | tail -n 1)
export NVCC="$PWD/$nvcc"
unset FUSEDOPT_NO_FATBIN

# The executables cargo builds, by target name.
artifacts=$( { cargo test --release --no-run --message-format=json --test gpu --test parallel \
                 --test step_decision --test checkpoint --test custom_rules --test lean --test lean_step \
                 --test lean_masters --test sharded;
               cargo build --release --examples --benches --message-format=json; } 2>/dev/null)
pick() {  # NAME: the executable of that target (the newest when several)
  printf '%s\n' "$artifacts" | python3 -c '
import json, sys
name = sys.argv[1]
found = [m["executable"] for m in map(json.loads, sys.stdin)
         if m.get("reason") == "compiler-artifact" and m.get("target", {}).get("name") == name
         and m.get("executable")]
print(found[-1] if found else "")' "$1"
}
out_dir=$(printf '%s\n' "$artifacts" | python3 -c '
import json, sys
for m in map(json.loads, sys.stdin):
    if m.get("reason") == "build-script-executed" and "#fusedopt@" in m.get("package_id", ""):
        print(m["out_dir"])' | tail -n 1)
fatbins=$(grep -c 'include_bytes' "$out_dir/kernels.rs" || true)
if [ "$fatbins" -lt 3 ]; then
  echo "no fatbin embedded ($out_dir/kernels.rs): the GPU would compile every kernel with NVRTC" >&2
  exit 1
fi

rm -rf "$dir"
mkdir -p "$dir/bin" "$dir/tests/data"
for name in gpu parallel step_decision checkpoint custom_rules lean lean_step lean_masters sharded replay \
            quickstart train \
            microbench allreduce; do
  exe=$(pick "$name")
  [ -n "$exe" ] || { echo "no executable for $name" >&2; exit 1; }
  cp "$exe" "$dir/bin/$name"
  strip "$dir/bin/$name"
done
cp -r tests/data/conformance tests/data/lean "$dir/tests/data/"
cp benches/torch_baseline.py scripts/gpu-validate.sh scripts/compare_replays.py \
  scripts/merge_bench.py scripts/perf_report.py "$dir/"
cp "$out_dir/ptxas-report.txt" "$dir/"
# The same cases on the emulated GPU, for gpu-validate.sh to compare with the real one bit for bit
# (the emulator's one validation).
emulated=$(mktemp -d)
scripts/emulated-gpu.sh "$dir/bin/replay" --device cuda --out "$emulated" \
  tests/data/conformance/optimizers/*.json tests/data/conformance/schedules/*.json \
  > "$emulated.log" 2>&1 \
  || { cat "$emulated.log" >&2; echo "the replay failed on the emulated GPU" >&2; exit 1; }
python3 scripts/compare_replays.py --combine "$dir/replay-emulated.json" "$emulated"
rm -rf "$emulated" "$emulated.log"
git rev-parse --short HEAD > "$dir/COMMIT" 2>/dev/null || echo unknown > "$dir/COMMIT"
# The executables travel xz-compressed (each embeds every fatbin; together they outgrow a device
# call uncompressed), with a dictionary larger than all of them so that the fatbins every
# executable repeats are stored once; gpu-validate.sh unpacks them with Python's own lzma before
# its first step.
python3 - "$dir" <<'PY'
import lzma, sys, tarfile
d = sys.argv[1]
filters = [{"id": lzma.FILTER_LZMA2, "preset": 6, "dict_size": 384 << 20}]
with lzma.open(f"{d}/bin.tar.xz", "wb", filters=filters) as f:
    with tarfile.open(fileobj=f, mode="w") as t:
        t.add(f"{d}/bin", arcname="bin")
PY
rm -rf "$dir/bin"
size=$(du -sm "$dir" | cut -f1)
if [ "$size" -ge 60 ]; then
  echo "the bundle is $size MiB: over what one device call carries (64 MiB with the tree)" >&2
  exit 1
fi
echo "bundle: $dir ($size MiB, $fatbins fatbins, commit $(cat "$dir/COMMIT"))"
echo "on the GPU machine: cd $dir && ./gpu-validate.sh \"\$OUT\""

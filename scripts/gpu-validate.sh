#!/usr/bin/env bash
# The real-GPU validation, in one command that fits a 10-minute call: run from the bundle that
# scripts/gpu-bundle.sh builds (cd BUNDLE && ./gpu-validate.sh [OUT]). Writes at most 8 files to
# OUT (default $OUT) and prints a summary table last; exits 1 when a step failed or timed out. Each step is time-boxed, and all of them
# together stay within FUSEDOPT_VALIDATE_BUDGET seconds (540): a step that would start with too
# little time left is skipped and says so. A failed step is reported and the next one runs.
#
#   nvidia-smi · the GPU tests with FUSEDOPT_REQUIRE_GPU=1 (one test thread) · the data-parallel
#   tests (NCCL with one rank, from the PyPI wheel's libnccl.so.2 when present; single-GPU
#   replicas) · the step decision on host and device bit for bit · checkpoints across devices ·
#   sharded optimizer state bit for bit the unsharded step (one GPU, NCCL) ·
#   custom rules (their kernels compiled by NVRTC at run time) bit for bit the built-in rules ·
#   lean state's device kernels (quantization, remainders, stochastic rounding) against the CPU ·
#   quantized state and 4-byte / stochastic bf16 masters in the fused step against the CPU ·
#   replay --device cuda over the conformance cases, then compared bit for bit with the
#   same replay on the emulated GPU (carried in the bundle) · compute-sanitizer memcheck,
#   racecheck, synccheck on a selection · ncu on the Adam and norm kernels · the benchmark program
#   against the PyTorch baseline, alternating profile by profile (host time per step, eager and
#   graph-replayed, is in its output) · quickstart
#
# On the emulated GPU (FUSEDOPT_EMULATED_GPU set, as scripts/emulated-gpu.sh does) it runs the same
# steps minus nvidia-smi, the sanitizers, ncu and PyTorch, and benchmarks one small profile only:
# that checks the script, never the speed.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${1:-${OUT:?give an output folder, or set OUT}}
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$here"
# The bundle carries its executables xz-compressed: unpack them once (Python's lzma, no xz needed).
if [ ! -d bin ] && [ -f bin.tar.xz ]; then
  python3 -c 'import tarfile; tarfile.open("bin.tar.xz").extractall(".")' \
    || { echo "cannot unpack bin.tar.xz" >&2; exit 1; }
fi
export FUSEDOPT_REPO="$here" FUSEDOPT_REQUIRE_GPU=1 RUST_BACKTRACE=1
emulated=${FUSEDOPT_EMULATED_GPU:+yes}
deadline=$((SECONDS + ${FUSEDOPT_VALIDATE_BUDGET:-540}))
log="$out/validate.log"
summary=()
failures=0
: > "$log"
exec > >(tee -a "$log") 2>&1

# step NAME SECONDS COMMAND...: runs, time-boxed (never past the deadline), and records the
# outcome for the summary.
step() {
  local name=$1 limit=$2; shift 2
  local left=$((deadline - SECONDS))
  if [ "$left" -lt 15 ]; then
    summary+=("| $name | skipped: the time budget is spent | |")
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  local start=$SECONDS rc
  echo; echo "== $name (at most ${limit} s)"
  timeout --kill-after=5 "$limit" "$@"
  rc=$?
  local verdict=ok
  { [ $rc -eq 124 ] || [ $rc -eq 137 ]; } && verdict="TIMED OUT"
  [ $rc -ne 0 ] && [ "$verdict" = ok ] && verdict="FAILED ($rc)"
  [ $rc -ne 0 ] && failures=$((failures + 1))
  summary+=("| $name | $verdict | $((SECONDS - start)) s |")
}
skip() { summary+=("| $1 | skipped: $2 | |"); }
real_gpu_only() {  # NAME TOOL: skips NAME on the emulated GPU or without TOOL; true if it may run
  if [ -n "$emulated" ]; then skip "$1" "emulated GPU"; return 1; fi
  if ! command -v "$2" >/dev/null; then skip "$1" "$2 not installed"; return 1; fi
}

echo "fusedopt GPU validation, commit $(cat COMMIT 2>/dev/null), $(date -u +%FT%TZ)"
if real_gpu_only "nvidia-smi" nvidia-smi; then
  step "nvidia-smi" 20 nvidia-smi
  # NCCL from the PyPI wheel, when the python environment has it.
  wheel_nccl=$(python3 -c 'import nvidia.nccl, os; print(os.path.join(os.path.dirname(nvidia.nccl.__file__), "lib", "libnccl.so.2"))' 2>/dev/null)
  if [ -n "$wheel_nccl" ] && [ -f "$wheel_nccl" ]; then
    export FUSEDOPT_NCCL_LIB="$wheel_nccl"
    echo "NCCL: $wheel_nccl"
  fi
fi

# The emulated GPU runs kernels as host code on one thread: far slower than any GPU.
gpu_tests_limit=150
[ -n "$emulated" ] && gpu_tests_limit=360
step "GPU tests, one thread" "$gpu_tests_limit" bin/gpu --test-threads 1
step "data-parallel tests (NCCL, single-GPU replicas)" 60 bin/parallel --test-threads 1
step "the step decision on host and device, bit for bit" 30 bin/step_decision --test-threads 1
step "checkpoints across devices" 30 bin/checkpoint --test-threads 1
step "sharded optimizer state, bit for bit unsharded (one GPU, NCCL)" 60 bin/sharded --test-threads 1
step "custom rules: kernels compiled by NVRTC, bit for bit the built-in rules" 90 \
  bin/custom_rules --test-threads 1
step "lean state's device kernels, bit for bit the CPU's" 30 bin/lean --test-threads 1
step "quantized state in the fused step, bit for bit the CPU's" 30 bin/lean_step --test-threads 1 \
  the_gpu_steps_quantized_state_as_the_cpu_does
step "bf16 weights with remainders or stochastic rounding, bit for bit the CPU's" 30 \
  bin/lean_masters --test-threads 1 the_gpu_steps_lean_masters_as_the_cpu_does
replays=$(mktemp -d)
step "replay --device cuda, every conformance case" 60 \
  bin/replay --device cuda --out "$replays" tests/data/conformance/optimizers/*.json \
  tests/data/conformance/schedules/*.json
python3 compare_replays.py --combine "$out/replay-cuda.json" "$replays" && rm -rf "$replays"
if [ -f replay-emulated.json ]; then
  step "replay: this device and the emulated GPU bit for bit" 20 \
    python3 compare_replays.py "$out/replay-cuda.json" replay-emulated.json
else
  skip "replay against the emulated GPU" "the bundle carries no replay-emulated.json"
fi

if real_gpu_only "compute-sanitizer" compute-sanitizer; then
  : > "$out/sanitizer.txt"
  for tool in memcheck racecheck synccheck; do
    step "compute-sanitizer $tool" 45 sh -c "compute-sanitizer --tool $tool --error-exitcode 1 \
      bin/gpu --test-threads 1 steps_are_deterministic non_finite norm_over >> '$out/sanitizer.txt' 2>&1"
  done
fi

if real_gpu_only "ncu" ncu; then
  step "ncu: Adam and norm kernels" 90 sh -c "ncu --kernel-name regex:'update_adam_f32_f32|norm_f32' \
    --launch-skip 4 --launch-count 4 --section SpeedOfLight --section LaunchStats --section Occupancy \
    --metrics dram__bytes_read.sum.per_second,dram__bytes_write.sum.per_second \
    bin/microbench --device cuda --quick --profiles 256M > '$out/ncu.txt' 2>&1"
fi

# Benchmarks: fusedopt and PyTorch alternating profile by profile, medians over the rounds.
bench=$(mktemp -d)
# The rules the first GPU minutes are for (every rule's kernel is checked by the tests above).
rules=adam,adamw,sgd_momentum,nadam,lion
if [ -z "$emulated" ]; then
  profiles="256M 10000x4096 16M 1M gpt2-medium"; rounds=2; bench_limit=60
else
  profiles="64K"; rounds=1; bench_limit=150; rules=adam,lion  # every launch is slow on the host
fi
torch_ok=
[ -z "$emulated" ] && python3 -c 'import torch; assert torch.cuda.is_available()' 2>/dev/null && torch_ok=yes
for round in $(seq "$rounds"); do
  for p in $profiles; do
    if [ -n "$torch_ok" ]; then
      step "PyTorch $p (round $round)" 60 python3 torch_baseline.py --device cuda --quick \
        --profiles "$p" --rules "$rules" --json "$bench/torch-$round-$p.json"
    fi
    # Adam written as a custom rule too (its kernels compiled at run time), against the built-in.
    step "fusedopt $p (round $round)" "$bench_limit" bin/microbench --device cuda --quick \
      --profiles "$p" --rules "$rules,adam_custom" --json "$bench/ours-$round-$p.json"
  done
done
ls "$bench"/ours-*.json >/dev/null 2>&1 && python3 merge_bench.py "$out/bench-fusedopt.json" "$bench"/ours-*.json
if [ -n "$torch_ok" ]; then
  if ls "$bench"/torch-*.json >/dev/null 2>&1; then
    python3 merge_bench.py "$out/bench-torch.json" "$bench"/torch-*.json
    python3 perf_report.py "$out/bench-fusedopt.json" "$out/bench-torch.json" > "$out/bench.md"
  fi
elif [ -n "$emulated" ]; then
  skip "PyTorch baseline" "emulated GPU"
else
  skip "PyTorch baseline" "torch with CUDA not available"
fi

step "quickstart" 40 bin/quickstart

echo
echo "== summary (commit $(cat COMMIT 2>/dev/null); files in $out: $(ls "$out" | tr '\n' ' '))"
echo "| step | result | time |"
echo "|---|---|---|"
printf '%s\n' "${summary[@]}"
[ "$failures" -eq 0 ] || { echo "$failures step(s) failed or timed out"; exit 1; }

#!/usr/bin/env bash
# Runs CMD with the emulated GPU in place of a real one: builds it if needed (emulated-gpu/build.sh)
# and puts its stand-in libcuda.so and libnccl.so first on the library path, where cudarc finds
# them. Example: scripts/emulated-gpu.sh env FUSEDOPT_REQUIRE_GPU=1 cargo test --release
# FUSEDOPT_EMU_MODE=asan|tsan runs the sanitizer builds (with their runtime preloaded);
# FUSEDOPT_EMU_KERNELS=DIR and FUSEDOPT_EMU_OUT=DIR build another kernel folder elsewhere (the
# planted-bug tests, tests/emulator.rs).
# The emulated device tests logic, never speed: see emulated-gpu/README.md.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
mode=${FUSEDOPT_EMU_MODE:-plain}
lib=$("$root/emulated-gpu/build.sh" "$mode" ${FUSEDOPT_EMU_OUT:+"$FUSEDOPT_EMU_OUT"} | tail -n 1)
export LD_LIBRARY_PATH="$lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export FUSEDOPT_EMULATED_GPU="$mode"
# Where the stand-ins are (tests find the NCCL 2.12 variant, nccl-2.12/libnccl.so.2, there).
export FUSEDOPT_EMULATED_GPU_DIR="$lib"
# NVRTC is the stand-in (a custom rule's kernels compiled as host C++), which reads the emulator's
# CUDA headers; it has the real NVRTC 13.0 compile everything first when the project-local
# toolchain (scripts/install-cuda-toolchain.sh) has one, so what NVRTC refuses is refused here.
export FUSEDOPT_NVRTC_LIB="${FUSEDOPT_NVRTC_LIB:-$lib/libnvrtc.so.13}"
export FUSEDOPT_CUDA_INCLUDE="${FUSEDOPT_CUDA_INCLUDE:-$root/emulated-gpu/include}"
real_nvrtc="$root/.cuda-toolchain/nvidia/cu13/lib/libnvrtc.so.13"
if [ -z "${FUSEDOPT_EMU_REAL_NVRTC+set}" ] && [ -f "$real_nvrtc" ]; then
  export FUSEDOPT_EMU_REAL_NVRTC="$real_nvrtc"
fi
# Sanitizer builds: the runtime is preloaded into the program under test (Rust code is not
# instrumented; the stand-ins are). Through cargo's runner for cargo commands, so that cargo,
# rustc and nvcc themselves run without it.
preload=
case "$mode" in
  asan)
    preload="$(g++ -print-file-name=libasan.so):$(g++ -print-file-name=libubsan.so)"
    # Rust's own allocations are not instrumented; leaks at exit are not the kernels' concern.
    export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:${ASAN_OPTIONS:-}"
    export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:${UBSAN_OPTIONS:-}" ;;
  tsan)
    preload="$(g++ -print-file-name=libtsan.so)"
    # Only the stand-ins are instrumented: what uninstrumented Rust code copies is not watched.
    export TSAN_OPTIONS="suppressions=$root/emulated-gpu/tsan.supp:ignore_noninstrumented_modules=1:halt_on_error=1:abort_on_error=1:${TSAN_OPTIONS:-}" ;;
esac
# A command that runs cargo (directly, or through env) gets the preload through cargo's runner.
runs_cargo=
for arg in "$@"; do [ "$(basename -- "$arg")" = cargo ] && runs_cargo=yes && break; done
if [ -n "$preload" ]; then
  if [ -n "$runs_cargo" ]; then
    export CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUNNER="env LD_PRELOAD=$preload"
  else
    export LD_PRELOAD="$preload"
  fi
fi
exec "$@"

#!/usr/bin/env bash
# Runs the test suite RUNS times in a row while BURNERS processes keep the CPU busy, to show that no
# test depends on timing: scripts/stress-tests.sh [--debug] [RUNS] [BURNERS] [-- WRAPPER...]
# (default: release profile, 10 runs, 2 burners; --debug: the debug profile, where arithmetic
# overflow panics). A wrapper runs each test binary, e.g.
# `scripts/stress-tests.sh 3 2 -- scripts/emulated-gpu.sh env FUSEDOPT_REQUIRE_GPU=1`.
# Builds once, copies the test binaries aside (so a rebuild meanwhile cannot touch them), then runs
# them directly; stops at the first failure.
set -euo pipefail
cd "$(dirname "$0")/.."
profile=(--release)
if [ "${1:-}" = "--debug" ]; then profile=(); shift; fi
runs=${1:-10}
burners=${2:-2}
shift $(( $# >= 2 ? 2 : $# ))
[ "${1:-}" = "--" ] && shift
wrapper=("$@")

mapfile -t binaries < <(cargo test "${profile[@]}" --no-run --message-format=json 2>/dev/null | python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("profile", {}).get("test") and m.get("executable"):
        print(m["executable"])
')
aside=target/stress-tests
rm -rf "$aside"; mkdir -p "$aside"
for i in "${!binaries[@]}"; do
  cp "${binaries[$i]}" "$aside/"
  binaries[$i]="$PWD/$aside/$(basename "${binaries[$i]}")"
done
echo "${#binaries[@]} test binaries (${profile[*]:-debug}); $runs runs with $burners CPU burners"
pids=()
for _ in $(seq "$burners"); do (while :; do :; done) & pids+=($!); done
trap 'kill "${pids[@]}" 2>/dev/null' EXIT
for run in $(seq "$runs"); do
  start=$SECONDS
  for bin in "${binaries[@]}"; do
    if ! out=$("${wrapper[@]}" "$bin" 2>&1); then
      echo "run $run: $(basename "$bin") FAILED"; echo "$out" | tail -n 40; exit 1
    fi
  done
  echo "run $run: all ${#binaries[@]} binaries passed ($((SECONDS - start)) s)"
done

#!/usr/bin/env bash
# Runs the CPU step benchmark RUNS times (default 3) and writes a markdown report with each run's
# bytes/s and its ratios to the same run's copy and in-place read-modify-write rooflines.
# Usage: scripts/cpu-bench-report.sh OUT.md [RUNS]. Run it on an otherwise idle machine.
set -euo pipefail
cd "$(dirname "$0")/.."
out=$1
runs=${2:-3}
{
  echo "# CPU step benchmark"
  echo
  echo "- command: \`scripts/cpu-bench-report.sh $out $runs\` (criterion: \`cargo bench --bench cpu_step\`)"
  echo "- commit: $(git rev-parse --short HEAD), date: $(date -u +%Y-%m-%d)"
  echo "- machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(free -g | awk '/Mem:/{print $2}') GiB"
  echo "- 10M fp32 parameters; bytes by the roofline count (SGD-momentum and RMSProp 20 B/param, Adam 28 B/param)."
  echo "  Rooflines in the same run: \`copy\` into a second buffer (pays an uncounted read-for-ownership of"
  echo "  the destination) and \`rmw\`, an in-place read-modify-write pass (the step's own access pattern)."
  echo
  echo "| run | benchmark | GiB/s | ÷ copy | ÷ rmw |"
  echo "|---|---|---|---|---|"
} > "$out"
for run in $(seq 1 "$runs"); do
  cargo bench --bench cpu_step 2>/dev/null \
    | awk '/^cpu_step\//{name=$1} /thrpt:/ && name {print name, $(NF-3); name=""}' \
    | awk -v run="$run" '
        $1 == "cpu_step/copy" {copy = $2; next}
        $1 == "cpu_step/read_modify_write" {rmw = $2; printf "| %d | copy | %.1f | | |\n| %d | rmw | %.1f | | |\n", run, copy, run, rmw; next}
        {sub("cpu_step/", "", $1); printf "| %d | %s | %.1f | %.2f | %.2f |\n", run, $1, $2, $2 / copy, $2 / rmw}' >> "$out"
done
cat "$out"

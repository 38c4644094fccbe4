#!/usr/bin/env python3
"""Regenerates the README's generated sections, each between <!-- NAME:begin --> and
<!-- NAME:end -->, from what the project's commands committed. One tool for every section:

  perf     the newest benches/results/*-fusedopt.json with its *-torch.json, per device
           (written by scripts/bench-report.sh), through scripts/readme_perf.py
  scaling  the scaling model's table (scripts/scaling_model.py: formulas, not measurements)
  compare  benches/results/compare/table.md (written by
           `cargo run --release --example train -- --compare --out benches/results/compare`)
  state    benches/results/compare/state.md (written by
           `cargo run --release --example train -- --compare-state --out benches/results/compare`)
  async    benches/results/compare/async.md (written by
           `cargo run --release --example train -- --compare-async --out benches/results/compare`)
  shard    benches/results/compare/shard.md (written by
           `cargo run --release --example train -- --compare-shard --out benches/results/compare`)
  drill    benches/results/fault-drill.md (written by `scripts/emulated-gpu.sh cargo run --release
           --features mpi --example fault_drill -- --out benches/results/fault-drill.md`)

Usage: python3 scripts/readme.py [NAME...]   (default: every section)
"""
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def from_script(name):
    return lambda: subprocess.run([sys.executable, os.path.join(ROOT, "scripts", name)],
                                  check=True, capture_output=True, text=True).stdout


def from_file(path):
    return lambda: open(os.path.join(ROOT, path)).read()


SECTIONS = {
    "perf": from_script("readme_perf.py"),
    "scaling": from_script("scaling_model.py"),
    "compare": from_file("benches/results/compare/table.md"),
    "state": from_file("benches/results/compare/state.md"),
    "async": from_file("benches/results/compare/async.md"),
    "shard": from_file("benches/results/compare/shard.md"),
    "drill": from_file("benches/results/fault-drill.md"),
}


def main(names):
    path = os.path.join(ROOT, "README.md")
    text = open(path).read()
    for name in names or SECTIONS:
        if name not in SECTIONS:
            sys.exit(f"unknown section '{name}' (one of {', '.join(SECTIONS)})")
        body = SECTIONS[name]().rstrip("\n") + "\n"
        text, n = re.subn(rf"(<!-- {name}:begin -->\n).*?(<!-- {name}:end -->)",
                          lambda m: m.group(1) + body + m.group(2), text, flags=re.S)
        if n != 1:
            sys.exit(f"README.md has no <!-- {name}:begin --> … <!-- {name}:end --> block")
        print(f"README.md: {name} regenerated")
    open(path, "w").write(text)


if __name__ == "__main__":
    main(sys.argv[1:])

#!/usr/bin/env python3
"""Compares two sets of replay outputs (examples/replay.rs) bit for bit: a folder of <case>.json,
or one JSON object {case: output} as gpu-validate.sh writes it. Every value is an f32 written in
its shortest form, so equal text is equal bits; NaN and the infinities are strings on both sides.

Usage: compare_replays.py A B [--combine OUT.json]
  compare_replays.py --combine OUT.json DIR   writes DIR's outputs as one object (no comparison)
Exits 1 when a case is missing on one side or differs, naming the first difference of each.
"""
import json
import os
import sys


def load(path):
    if os.path.isdir(path):
        out = {}
        for name in sorted(os.listdir(path)):
            if name.endswith(".json"):
                with open(os.path.join(path, name)) as f:
                    out[name[:-5]] = json.load(f)
        return out
    with open(path) as f:
        return json.load(f)


def first_difference(a, b, where=""):
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return f"{where}: lengths {len(a)} and {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            d = first_difference(x, y, f"{where}[{i}]")
            if d:
                return d
        return None
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if k not in a or k not in b:
                return f"{where}.{k}: on one side only"
            d = first_difference(a[k], b[k], f"{where}.{k}")
            if d:
                return d
        return None
    return None if a == b else f"{where}: {a!r} and {b!r}"


def main(argv):
    if argv[:1] == ["--combine"]:
        with open(argv[1], "w") as f:
            json.dump(load(argv[2]), f)
        return 0
    a, b = load(argv[0]), load(argv[1])
    bad = 0
    for name in sorted(set(a) | set(b)):
        if name not in a or name not in b:
            print(f"{name}: on one side only")
            bad += 1
            continue
        d = first_difference(a[name], b[name])
        if d:
            print(f"{name}{d}")
            bad += 1
    print(f"{len(set(a) | set(b))} cases: {bad} differ")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

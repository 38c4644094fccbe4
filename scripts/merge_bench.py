#!/usr/bin/env python3
"""Merges benchmark JSON files of several rounds into one: the median step and host time per
configuration, and the median copy bandwidth; GB/s and ÷copy are recomputed from the medians.

Usage: merge_bench.py OUT.json IN.json...
"""
import json
import statistics
import sys

out_path, paths = sys.argv[1], sys.argv[2:]
runs = [json.load(open(p)) for p in paths]
copy = statistics.median(r["copy_gbps"] for r in runs)
groups = {}
for run in runs:
    for r in run["results"]:
        k = (r["impl"], r["rule"], r["dtypes"], r["profile"], r["clip"], r["graph"])
        groups.setdefault(k, []).append(r)
results = []
for rows in groups.values():
    r = dict(rows[0])
    r["step_ms"] = statistics.median(x["step_ms"] for x in rows)
    r["host_us"] = statistics.median(x["host_us"] for x in rows)
    r["gbps"] = r["gbps"] * rows[0]["step_ms"] / r["step_ms"]
    r["frac_of_copy"] = r["gbps"] / copy
    r["rounds"] = len(rows)
    results.append(r)
merged = dict(runs[0])
merged.update({"copy_gbps": copy, "results": results,
               "rounds": max((r["rounds"] for r in results), default=0)})
json.dump(merged, open(out_path, "w"), indent=1)

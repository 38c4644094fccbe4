#!/usr/bin/env python3
"""Markdown report from the benchmark program's and the PyTorch baseline's JSON (one run, one device).

Usage: perf_report.py FUSEDOPT.json TORCH.json > report.md
Speedup = PyTorch step time / fusedopt step time (above 1: fusedopt is faster).
"""
import json
import sys

ours, torch = (json.load(open(p)) for p in sys.argv[1:3])


def key(r):
    return (r["rule"], r["dtypes"], r["profile"], r["clip"])


best = {}
for r in ours["results"]:
    k = key(r)
    if k not in best or r["step_ms"] < best[k]["step_ms"]:
        best[k] = r

# The aims of the benchmark issue that this device can answer.
AIMS = {
    "cpu": [
        ("Adam fp32, 10M params as 100 tensors, vs Adam(fused=True)", ("adam", "fp32", "10Mx100", False), "torch_fused", 1.1),
        ("Adam fp32, 10M params as 5,000 tensors, vs Adam(fused=True)", ("adam", "fp32", "10Mx5000", False), "torch_fused", 3.0),
    ],
    "gpu": [
        ("Adam fp32, 256M params, vs Adam(fused=True)", ("adam", "fp32", "256M", False), "torch_fused", 1.10),
        ("Adam fp32, 10,000 tensors of 4,096, vs fused", ("adam", "fp32", "10000x4096", False), "torch_fused", 2.0),
        ("clip + Adam, 256M, vs clip_grad_norm_ + fused Adam", ("adam", "fp32", "256M", True), "torch_fused", 1.25),
        ("bf16 grads + fp32 masters, Adam 256M, vs PyTorch's equivalent", ("adam", "bf16+fp32master", "256M", False), "torch_fused", 1.3),
        ("RMSProp fp32, 256M, vs foreach", ("rmsprop", "fp32", "256M", False), "torch_foreach", 2.0),
    ],
}
gpu = ours["driver"] != "none"

print(f"# Benchmark: fusedopt and PyTorch on {ours['device']}\n")
print(f"- fusedopt commit {ours['git_commit']}; PyTorch {torch.get('torch', '?')} on {torch['device']}")
print(f"- same-run copy bandwidth: fusedopt run {ours['copy_gbps']:.1f} GB/s, PyTorch run {torch['copy_gbps']:.1f} GB/s")
print("- commands: `scripts/bench-report.sh " + ("cuda" if gpu else "cpu") + " PYTHON` (benches/microbench.rs, benches/torch_baseline.py)")
print(f"- {ours.get('rounds', 1)} rounds, PyTorch and fusedopt alternating profile by profile; each time is the median over rounds")
print("- speedup = PyTorch step time ÷ fusedopt step time, same device, same session\n")
print("## Aims\n")
print("| aim | fusedopt ms | PyTorch ms | speedup | target | met |")
print("|---|---|---|---|---|---|")
for label, k, impl, target in AIMS["gpu" if gpu else "cpu"]:
    t = next((r for r in torch["results"] if key(r) == k and r["impl"] == impl), None)
    o = best.get(k)
    if t and o:
        s = t["step_ms"] / o["step_ms"]
        print(f"| {label} | {o['step_ms']:.3f} | {t['step_ms']:.3f} | {s:.2f}× | ≥ {target}× | {'yes' if s >= target else 'no'} |")
    else:
        print(f"| {label} | — | — | — | ≥ {target}× | not measured |")
print("\nWhere an aim is missed, the analysis is in the `-analysis.md` file beside this report.")
print("\n## Every configuration\n")
print("| rule | dtypes | profile | clip | PyTorch impl | PyTorch ms | fusedopt ms | speedup | fusedopt GB/s | ÷ copy |")
print("|---|---|---|---|---|---|---|---|---|---|")
for t in torch["results"]:
    o = best.get(key(t))
    if o:
        print(f"| {t['rule']} | {t['dtypes']} | {t['profile']} | {t['clip']} | {t['impl']} | "
              f"{t['step_ms']:.3f} | {o['step_ms']:.3f} | {t['step_ms'] / o['step_ms']:.2f}× | "
              f"{o['gbps']:.1f} | {o['frac_of_copy']:.2f} |")

# A custom rule against the built-in rule it rewrites, both fusedopt's, same run.
custom = [r for k, r in best.items() if k[0] == "adam_custom"]
if custom:
    print("\n## Adam written as a custom rule, against the built-in Adam\n")
    print("| dtypes | profile | clip | built-in ms | custom ms | custom ÷ built-in |")
    print("|---|---|---|---|---|---|")
    for c in sorted(custom, key=key):
        b = best.get(("adam",) + key(c)[1:])
        if b:
            print(f"| {c['dtypes']} | {c['profile']} | {c['clip']} | {b['step_ms']:.3f} | "
                  f"{c['step_ms']:.3f} | {c['step_ms'] / b['step_ms']:.3f} |")

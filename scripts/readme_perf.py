#!/usr/bin/env python3
"""Prints the README's performance section from benches/results/*-fusedopt.json and the
matching *-torch.json (the newest pair per device); scripts/readme.py puts it in the README.

Usage: python3 scripts/readme_perf.py
"""
import glob
import json
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benches", "results")

ROWS = [  # (label, rule, dtypes, profile, clip, PyTorch implementation)
    ("Adam fp32, 10M params in 100 tensors", "adam", "fp32", "10Mx100", False, "torch_fused"),
    ("Adam fp32, 10M params in 5,000 tensors", "adam", "fp32", "10Mx5000", False, "torch_fused"),
    ("Adam fp32, 10,000 tensors of 4,096", "adam", "fp32", "10000x4096", False, "torch_fused"),
    ("clip + Adam fp32, 10M in 100 tensors", "adam", "fp32", "10Mx100", True, "torch_fused"),
    ("Adam, bf16 grads + fp32 masters, 10M in 100", "adam", "bf16+fp32master", "10Mx100", False, "torch_fused"),
    ("SGD momentum fp32, 10M in 100 tensors", "sgd_momentum", "fp32", "10Mx100", False, "torch_fused"),
    ("RMSProp fp32, 10M in 100 tensors", "rmsprop", "fp32", "10Mx100", False, "torch_foreach"),
    ("RMSProp fp32, 10M in 5,000 tensors", "rmsprop", "fp32", "10Mx5000", False, "torch_foreach"),
    ("Adagrad fp32, 10M in 100 tensors", "adagrad", "fp32", "10Mx100", False, "torch_foreach"),
    ("NAdam fp32, 10M in 100 tensors", "nadam", "fp32", "10Mx100", False, "torch_foreach"),
    ("RAdam fp32, 10M in 100 tensors", "radam", "fp32", "10Mx100", False, "torch_foreach"),
    ("Adamax fp32, 10M in 100 tensors", "adamax", "fp32", "10Mx100", False, "torch_foreach"),
    ("Adadelta fp32, 10M in 100 tensors", "adadelta", "fp32", "10Mx100", False, "torch_foreach"),
    ("Lion fp32, 10M in 100 tensors (vs lion-pytorch)", "lion", "fp32", "10Mx100", False,
     "torch_foreach"),
    ("Adam fp32, 256M params", "adam", "fp32", "256M", False, "torch_fused"),
    ("Adam fp32, GPT-2-medium shapes", "adam", "fp32", "gpt2-medium", False, "torch_fused"),
]


def section():
    lines = []
    newest = {}  # device -> its newest (fusedopt, torch) pair; file names start with the date
    for ours_path in sorted(glob.glob(os.path.join(RESULTS, "*-fusedopt.json"))):
        torch_path = ours_path.replace("-fusedopt.json", "-torch.json")
        if os.path.exists(torch_path):
            newest[json.load(open(ours_path))["device"]] = (ours_path, torch_path)
    for ours_path, torch_path in sorted(newest.values()):
        ours, torch = json.load(open(ours_path)), json.load(open(torch_path))
        name = os.path.basename(ours_path).replace("-fusedopt.json", "")
        lines.append(f"**{ours['device']}** — `benches/results/{name}.md`, commit {ours['git_commit']}, "
                     f"PyTorch {torch.get('torch', '?')}; same-run copy {ours['copy_gbps']:.0f} GB/s.\n")
        lines.append("| step | fusedopt | ÷ copy | PyTorch | speedup |")
        lines.append("|---|---|---|---|---|")
        for label, rule, dt, prof, clip, impl in ROWS:
            o = [r for r in ours["results"] if (r["rule"], r["dtypes"], r["profile"], r["clip"]) == (rule, dt, prof, clip)]
            t = [r for r in torch["results"] if (r["rule"], r["dtypes"], r["profile"], r["clip"], r["impl"]) == (rule, dt, prof, clip, impl)]
            if o and t:
                best = min(o, key=lambda r: r["step_ms"])
                lines.append(f"| {label} | {best['step_ms']:.2f} ms ({best['gbps']:.0f} GB/s) | "
                             f"{best['frac_of_copy']:.2f} | {t[0]['step_ms']:.2f} ms ({impl.replace('torch_', '')}) | "
                             f"{t[0]['step_ms'] / best['step_ms']:.2f}× |")
        lines.append("")
    return "\n".join(lines) if lines else "No benchmark results are committed yet.\n"


print(section())

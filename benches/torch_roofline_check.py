#!/usr/bin/env python3
"""How close PyTorch's fused CPU Adam runs to this machine's memory bandwidth: an in-place
read-modify-write pass over 256 MB (PyTorch's own `mul_`) beside one `Adam(fused=True)` step over a
16M-element tensor, counted at 28 B/param. Median of 10 after a warm-up.

Usage: python3 benches/torch_roofline_check.py
"""
import time

import torch


def median_time(f, reps=10):
    f()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        f()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


x = torch.ones(64 << 20)
t = median_time(lambda: x.mul_(1.0000001))
print(f"in-place mul_ over 256 MB: {2 * x.numel() * 4 / t / 1e9:.1f} GB/s (read + written)")
n = 16 << 20
p = torch.nn.Parameter(torch.randn(n))
p.grad = torch.randn(n) * 1e-3
opt = torch.optim.Adam([p], lr=1e-3, fused=True)
t = median_time(opt.step)
print(f"Adam(fused=True), 16M params: {t * 1e3:.2f} ms = {28 * n / t / 1e9:.1f} GB/s at 28 B/param")

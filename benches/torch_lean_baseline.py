"""Step time of PyTorch's fused AdamW (fp32 state) and torchao's AdamW8bit / AdamW4bit on the CPU,
for scripts/lean-cpu-bench.sh: one tensor of the given size, fixed gradients, median ms per step
over several batches after warm-up (torchao's step is compiled by torch.compile on first use).
Usage: torch_lean_baseline.py ELEMENTS"""
import statistics
import sys
import time

import torch
from torchao.optim import AdamW4bit, AdamW8bit

n = int(sys.argv[1])
torch.manual_seed(0)
for name, make in [
    ("torch_fused_adamw_f32", lambda p: torch.optim.AdamW(p, lr=1e-3, fused=True)),
    ("torchao_adamw8bit", lambda p: AdamW8bit(p, lr=1e-3)),
    ("torchao_adamw4bit", lambda p: AdamW4bit(p, lr=1e-3)),
]:
    p = torch.nn.Parameter(torch.randn(n) * 0.1)
    p.grad = torch.randn(n) * 1e-3
    opt = make([p])
    for _ in range(3):
        opt.step()
    times = []
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(3):
            opt.step()
        times.append((time.perf_counter() - t) / 3)
    print(f"{name} {n} {1e3 * statistics.median(times):.3f}")

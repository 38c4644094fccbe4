"""Records torchao's AdamW8bit and AdamW4bit stepping a small model on the CPU, for
tests/lean_step.rs: the parameters, and every state tensor as torchao stores it (codes and block
scales, or f32 for tensors it keeps in 32 bits), after the first and the last step. Gradients come
from an integer hash that tests/lean_step.rs computes bit for bit too. Run by scripts/record-lean.sh.
Usage: record_lean_trajectory.py OUT_DIR"""
import sys

import numpy as np
import torch
import torchao
from safetensors.torch import save_file
from torchao.optim import AdamW4bit, AdamW8bit

out_dir = sys.argv[1]
# name, elements: quantized, not a whole number of blocks, crossing a 32 Ki-element chunk, small.
TENSORS = [("w", 8192), ("odd", 4160), ("wide", 33024), ("bias", 100)]
STEPS = 10
HYPER = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2)


def hash32(x):
    """A 32-bit integer hash (lowbias32), elementwise over uint32."""
    x = x.astype(np.uint32)
    x ^= x >> np.uint32(16)
    x *= np.uint32(0x7FEB352D)
    x ^= x >> np.uint32(15)
    x *= np.uint32(0x846CA68B)
    x ^= x >> np.uint32(16)
    return x


def uniform(seed, n):
    """n values in [-1, 1), exact in f32: the hash's top 24 bits."""
    h = hash32(np.arange(n, dtype=np.uint32) + np.uint32(seed))
    return ((h >> np.uint32(8)).astype(np.float32) * np.float32(2.0**-23)) - np.float32(1.0)


def init(t, n):
    return uniform(1_000_003 * (t + 1), n) * np.float32(0.5)


def grad(t, step, n):
    # Magnitudes that vary by tensor and step (powers of two: exact).
    scale = np.float32(2.0 ** (-(t + step % 4)))
    return uniform(7_919 * (t + 1) + 104_729 * step, n) * scale


def record(cls, path):
    params = [torch.nn.Parameter(torch.from_numpy(init(t, n))) for t, (_, n) in enumerate(TENSORS)]
    opt = cls(params, **HYPER)
    out = {}
    for step in range(1, STEPS + 1):
        for t, ((_, n), p) in enumerate(zip(TENSORS, params)):
            p.grad = torch.from_numpy(grad(t, step, n))
        opt.step()
        if step in (1, STEPS):
            for (name, _), p in zip(TENSORS, params):
                out[f"step{step}/param/{name}"] = p.detach().clone()
                for buf in ("exp_avg", "exp_avg_sq"):
                    s = opt.state[p][buf]
                    if hasattr(s, "codes"):
                        out[f"step{step}/codes/{buf}/{name}"] = s.codes.clone()
                        out[f"step{step}/scale/{buf}/{name}"] = s.scale.clone()
                    else:
                        out[f"step{step}/state/{buf}/{name}"] = s.clone()
    meta = {"source": f"torchao {torchao.__version__}, torch {torch.__version__}",
            "command": "scripts/record-lean.sh", "optimizer": cls.__name__,
            "hyperparameters": str(HYPER), "steps": str(STEPS)}
    save_file(out, path, metadata=meta)
    print(f"{cls.__name__}: {len(out)} tensors in {path}")


record(AdamW8bit, f"{out_dir}/torchao-adamw8bit.safetensors")
record(AdamW4bit, f"{out_dir}/torchao-adamw4bit.safetensors")

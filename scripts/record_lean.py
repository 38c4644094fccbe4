"""Records torchao's low-bit state quantization for tests/lean.rs: its code tables as it builds
them, and the codes and scales it gives blocks of awkward values (random magnitudes, exact table
entries and midpoints, zeros, NaN-free extremes). Run by scripts/record-lean.sh.
Usage: record_lean.py OUT.json"""
import json
import sys

import numpy as np
import torch
import torchao
from torchao.optim.quant_utils import (create_dynamic_map, quantize_4bit_with_qmap,
                                       quantize_8bit_with_qmap, scale_tensor)

out_path = sys.argv[1]
maps = {
    "DynamicSigned8": create_dynamic_map(True, 7, 8),
    "DynamicUnsigned8": create_dynamic_map(False, 7, 8),
    "DynamicSigned4": create_dynamic_map(True, 3, 4),
    "LinearUnsigned4": torch.linspace(0, 1, 17)[1:].tolist(),
}
maps = {k: torch.tensor(v, dtype=torch.float32) for k, v in maps.items()}


def bits(t):
    return [int(x) for x in t.contiguous().view(torch.int32).numpy().astype(np.uint32)]


def blocks(rng, size, signed, qmap):
    """Blocks of `size` values: random at several scales, table entries and midpoints times a
    scale, all zeros, one large value among tiny ones."""
    out = []
    for magnitude in [1e-30, 1e-8, 1e-3, 1.0, 3e4, 1e30]:
        x = rng.standard_normal(size).astype(np.float32) * np.float32(magnitude)
        out.append(x if signed else np.abs(x))
    q = qmap.numpy()
    mids = ((q[:-1] + q[1:]) * np.float32(0.5)).astype(np.float32)
    exact = np.resize(np.concatenate([q, mids]), size).astype(np.float32)
    exact[0] = 1.0  # scale 1: the entries and midpoints are coded as they are
    out.append(exact)
    out.append(np.zeros(size, dtype=np.float32))
    spike = (rng.standard_normal(size) * 1e-6).astype(np.float32)
    spike[size // 3] = 7.0 if signed else 49.0
    out.append(spike if signed else np.abs(spike))
    return out


rng = np.random.default_rng(20261202)
cases = []
for name, block, quantize in [
    ("DynamicSigned8", 256, quantize_8bit_with_qmap),
    ("DynamicUnsigned8", 256, quantize_8bit_with_qmap),
    ("DynamicSigned4", 128, quantize_4bit_with_qmap),
    ("LinearUnsigned4", 128, quantize_4bit_with_qmap),
]:
    qmap = maps[name]
    for x in blocks(rng, block, "Signed" in name, qmap):
        t = torch.from_numpy(x)
        scaled, scale = scale_tensor(t, block)
        codes = quantize(scaled, qmap)
        cases.append({"map": name, "values": bits(t), "scale": bits(scale)[0],
                      "codes": [int(c) for c in codes.numpy()]})

json.dump({
    "source": f"torchao {torchao.__version__}, torch {torch.__version__}",
    "command": "scripts/record-lean.sh",
    "maps": {k: bits(v) for k, v in maps.items()},
    "cases": cases,
}, open(out_path, "w"), indent=None, separators=(",", ":"))
print(f"{len(cases)} blocks recorded in {out_path}")

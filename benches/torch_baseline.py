#!/usr/bin/env python3
"""PyTorch baseline for benches/microbench.rs: the same profiles, rules and JSON schema.

Usage: python3 benches/torch_baseline.py [--device cpu|cuda] [--json FILE] [--quick] [--profiles a,b]

Implementations: `torch_fused` (Adam/AdamW/SGD with fused=True, on CPU and CUDA) and
`torch_foreach` (every rule with foreach=True; RMSProp, Adagrad and the rules after them have no
fused version; Lion, which PyTorch lacks, is the reference lion-pytorch's foreach version).
Clipping is `clip_grad_norm_(foreach=True)` before the step. The bf16 mix is PyTorch's closest
equivalent of bf16 training with fp32 master weights: bf16 model weights and gradients, fp32
masters; a step copies the bf16 gradients into the masters' .grad, steps the masters and copies
them back into the bf16 weights.
"""

import argparse
import json
import math
import statistics
import subprocess
import time

import torch


def gpt2_medium():
    d, layers, vocab, ctx = 1024, 24, 50257, 1024
    t = [vocab * d, ctx * d]
    for _ in range(layers):
        t += [d, d, 3 * d * d, 3 * d, d * d, d, d, d, 4 * d * d, 4 * d, 4 * d * d, d]
    return t + [d, d]


PROFILES = {
    "1M": [1 << 20],
    "16M": [16 << 20],
    "256M": [256 << 20],
    "10000x4096": [4096] * 10000,
    "10Mx100": [100_000] * 100,
    "10Mx5000": [2_000] * 5000,
    "gpt2-medium": gpt2_medium(),
}

STATE_BUFFERS = {"sgd_momentum": 1, "adam": 2, "adamw": 2, "rmsprop": 1, "rmsprop_centered": 2,
                 "adagrad": 1, "nadam": 2, "radam": 2, "adamax": 2, "adadelta": 2, "lion": 1}


def make_optimizer(rule, params, impl):
    kw = {"fused": True} if impl == "torch_fused" else {"foreach": True}
    if rule == "sgd_momentum":
        return torch.optim.SGD(params, lr=1e-3, momentum=0.9, **kw)
    if rule == "adam":
        return torch.optim.Adam(params, lr=1e-3, **kw)
    if rule == "adamw":
        return torch.optim.AdamW(params, lr=1e-3, **kw)
    if rule == "rmsprop":
        return torch.optim.RMSprop(params, lr=1e-2, **kw)
    if rule == "rmsprop_centered":
        return torch.optim.RMSprop(params, lr=1e-2, centered=True, **kw)
    if rule == "nadam":
        return torch.optim.NAdam(params, lr=2e-3, **kw)
    if rule == "radam":
        return torch.optim.RAdam(params, lr=1e-3, **kw)
    if rule == "adamax":
        return torch.optim.Adamax(params, lr=2e-3, **kw)
    if rule == "adadelta":
        return torch.optim.Adadelta(params, lr=1.0, **kw)
    if rule == "lion":
        # PyTorch has no Lion: the reference implementation's foreach version (lion-pytorch).
        from lion_pytorch.foreach import Lion
        return Lion(params, lr=1e-4)
    return torch.optim.Adagrad(params, lr=1e-2, **kw)


def bytes_per_param(rule, mix, clip):
    g = 2 if mix == "bf16+fp32master" else 4
    model = 2 if mix == "bf16+fp32master" else 0
    return 8 + g * (2 if clip else 1) + STATE_BUFFERS[rule] * 8 + model


class Setup:
    """One parameter set with its optimizer and a step function."""

    def __init__(self, device, sizes, rule, impl, mix, clip):
        self.clip = clip
        masters = [torch.nn.Parameter(((torch.arange(n, device=device) % 251) - 125.0) * 1e-3)
                   for n in sizes]
        grads = [((torch.arange(n, device=device) % 241) - 120.0) * 1e-4 for n in sizes]
        self.mix = mix
        if mix == "bf16+fp32master":
            self.model = [m.detach().to(torch.bfloat16) for m in masters]
            self.model_grads = [g.to(torch.bfloat16) for g in grads]
            for m in masters:
                m.grad = torch.zeros_like(m)
        else:
            for m, g in zip(masters, grads):
                m.grad = g
        self.masters = masters
        self.opt = make_optimizer(rule, masters, impl)

    def step(self):
        if self.mix == "bf16+fp32master":
            torch._foreach_copy_([m.grad for m in self.masters], self.model_grads)
        if self.clip:
            torch.nn.utils.clip_grad_norm_(self.masters, 1.0, foreach=True)
        self.opt.step()
        if self.mix == "bf16+fp32master":
            torch._foreach_copy_(self.model, [m.detach() for m in self.masters])


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def measure(setups, device, quick):
    warm, batches, per_batch = (2, 3, 3) if quick else (5, 7, 10)
    for _ in range(warm):
        for s in setups:
            s.step()
    sync(device)
    steps, hosts = [], []
    for _ in range(batches):
        start = time.perf_counter()
        calls = 0.0
        for _ in range(per_batch):
            for s in setups:
                t = time.perf_counter()
                s.step()
                calls += time.perf_counter() - t
        sync(device)
        n = per_batch * len(setups)
        steps.append((time.perf_counter() - start) / n)
        hosts.append(calls / n)
    return statistics.median(steps) * 1e3, statistics.median(hosts) * 1e6


def copy_gbps(device, nbytes):
    n = nbytes // 8
    src = torch.ones(n, device=device)
    dst = torch.empty_like(src)
    times = []
    for _ in range(7):
        sync(device)
        t = time.perf_counter()
        dst.copy_(src)
        sync(device)
        times.append(time.perf_counter() - t)
    return 2 * n * 4 / statistics.median(times[2:]) / 1e9


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--json")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--profiles")
    ap.add_argument("--rules", help="only these rules, comma-separated")
    a = ap.parse_args()
    gpu = a.device == "cuda"
    default = {(True, False): ["1M", "16M", "256M", "10000x4096", "gpt2-medium"],
               (True, True): ["1M", "16M", "10000x4096"],
               (False, False): ["1M", "16M", "10Mx100", "10Mx5000", "10000x4096"],
               (False, True): ["1M", "10Mx100", "10Mx5000"]}[(gpu, a.quick)]
    profiles = a.profiles.split(",") if a.profiles else default
    copy = copy_gbps(a.device, 512 << 20)
    name = torch.cuda.get_device_name() if gpu else f"cpu ({torch.get_num_threads()} threads)"
    print(f"device: {name}; torch {torch.__version__}; same-run copy: {copy:.1f} GB/s")
    results = []
    for pname in profiles:
        sizes = PROFILES[pname]
        params = sum(sizes)
        for rule in (a.rules.split(",") if a.rules else STATE_BUFFERS):
            impls = ["torch_fused", "torch_foreach"] if rule in ("sgd_momentum", "adam", "adamw") \
                else ["torch_foreach"]
            for impl in impls:
                for mix in ["fp32", "bf16+fp32master"]:
                    for clip in [False, True]:
                        nbytes = params * bytes_per_param(rule, mix, clip)
                        sets = max(1, min(8, math.ceil((256 << 20) / nbytes)))
                        try:
                            setups = [Setup(a.device, sizes, rule, impl, mix, clip)
                                      for _ in range(sets)]
                            step_ms, host_us = measure(setups, a.device, a.quick)
                        except (RuntimeError, NotImplementedError) as e:
                            print(f"{rule} {impl} {mix} {pname}: {e}")
                            continue
                        finally:
                            setups = None
                        gbps = nbytes / (step_ms / 1e3) / 1e9
                        print(f"{rule:<17} {impl:<14} {mix:<16} {pname:<12} clip={clip!s:<5} "
                              f"{step_ms:9.3f} ms {host_us:9.1f} us {gbps:7.1f} GB/s "
                              f"{gbps / copy:5.2f}")
                        results.append({"impl": impl, "rule": rule, "dtypes": mix,
                                        "profile": pname, "params": params,
                                        "tensors": len(sizes), "clip": clip, "graph": False,
                                        "step_ms": step_ms, "host_us": host_us, "gbps": gbps,
                                        "frac_of_copy": gbps / copy})
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    report = {"device": name, "driver": torch.version.cuda if gpu else "none",
              "git_commit": commit, "copy_gbps": copy, "torch": torch.__version__,
              "results": results}
    if a.json:
        with open(a.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()

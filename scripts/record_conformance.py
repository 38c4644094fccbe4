#!/usr/bin/env python3
"""Records conformance cases by running the real frameworks (see docs/FORMAT.md).

Every expected value in the output comes from PyTorch, Keras 3, Optax or TensorFlow 1 themselves;
nothing here computes an update by hand. Run through scripts/record-conformance.sh, which installs
pinned framework versions into a virtual environment first.

Usage: record_conformance.py OUT_DIR
"""

import json
import math
import os
import sys
import zlib

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402

SHAPES = [[3, 2], [7], [1]]
STEPS = 6
SCHEDULED_LRS = None  # set per case


def to_json_value(x):
    x = float(x)
    if math.isnan(x):
        return "NaN"
    if math.isinf(x):
        return "Infinity" if x > 0 else "-Infinity"
    return x


def flat(values):
    return [to_json_value(v) for v in np.asarray(values, dtype=np.float32).reshape(-1)]


def make_data(seed, nonfinite=False, zeros=False, tiny=False):
    rng = np.random.default_rng(seed)
    params0 = [rng.normal(0, 1, size=s).astype(np.float32) for s in SHAPES]
    # Tiny gradients (around 1e-7) are where each framework's ε placement shows.
    scale = 1.5e-7 if tiny else 1.5
    grads = [
        [rng.normal(0, scale, size=s).astype(np.float32) for s in SHAPES] for _ in range(STEPS)
    ]
    if nonfinite:
        grads[1][0].reshape(-1)[2] = np.nan
        grads[3][1].reshape(-1)[0] = np.inf
    if zeros:
        # Elements that never see a gradient: the accumulator stays at its initial value.
        for step in grads:
            step[0].reshape(-1)[0] = 0.0
    return params0, grads


# ----------------------------------------------------------------------------- PyTorch


def run_torch(kind, args, clip, lrs, params0, grads, scheduler=None):
    import torch

    params = [torch.nn.Parameter(torch.tensor(p)) for p in params0]
    if kind == "lion":
        # PyTorch has no Lion: the reference implementation, lion-pytorch.
        from lion_pytorch import Lion
    if kind.startswith("schedule_free"):
        # Nor schedule-free: the reference implementation, schedulefree.
        import schedulefree
    cls = {
        "sgd": torch.optim.SGD,
        "adam": torch.optim.Adam,
        "adamw": torch.optim.AdamW,
        "rmsprop": torch.optim.RMSprop,
        "adagrad": torch.optim.Adagrad,
        "adamax": torch.optim.Adamax,
        "radam": torch.optim.RAdam,
        "adadelta": torch.optim.Adadelta,
        "nadam": torch.optim.NAdam,
        "lion": Lion if kind == "lion" else None,
        "schedule_free_sgd": kind == "schedule_free_sgd" and schedulefree.SGDScheduleFree,
        "schedule_free_adamw": kind == "schedule_free_adamw" and schedulefree.AdamWScheduleFree,
    }[kind]
    opt = cls(params, **{k: (tuple(v) if isinstance(v, list) else v) for k, v in args.items()})
    averaged = kind.startswith("schedule_free")
    if averaged:
        opt.train()
    sched = None
    if scheduler is not None:
        sargs = {k: v for k, v in scheduler.items() if k != "kind"}
        sched = getattr(torch.optim.lr_scheduler, scheduler["kind"])(opt, **sargs)
    out, norms, evals = [], [], []
    for t, step_grads in enumerate(grads):
        if lrs is not None:
            for g in opt.param_groups:
                g["lr"] = lrs[t]
        for p, g in zip(params, step_grads):
            p.grad = torch.tensor(g)
        if clip is not None:
            norms.append(float(torch.nn.utils.clip_grad_norm_(params, clip)))
        else:
            norms.append(float(torch.nn.utils.get_total_norm([p.grad for p in params])))
        opt.step()
        if sched is not None:
            sched.step()
        out.append([p.detach().numpy().copy() for p in params])
        if averaged:
            # What the reference's eval() sets the parameters to, on copies.
            group = opt.param_groups[0]
            beta1 = group["betas"][0] if "betas" in group else group["momentum"]
            evals.append([p.detach().clone().lerp_(opt.state[p]["z"], 1 - 1 / beta1).numpy()
                          for p in params])
    return out, norms, (evals if averaged else None)


# ----------------------------------------------------------------------------- Keras 3


def run_keras(kind, args, clip, lrs, params0, grads):
    import keras
    import tensorflow as tf

    variables = [keras.Variable(p) for p in params0]
    cls = {
        "sgd": keras.optimizers.SGD,
        "adam": keras.optimizers.Adam,
        "adamw": keras.optimizers.AdamW,
        "rmsprop": keras.optimizers.RMSprop,
        "adagrad": keras.optimizers.Adagrad,
        "adamax": keras.optimizers.Adamax,
        "adadelta": keras.optimizers.Adadelta,
        "nadam": keras.optimizers.Nadam,
        "lion": keras.optimizers.Lion,
    }[kind]
    kw = dict(args)
    if clip is not None:
        kw["global_clipnorm"] = clip
    opt = cls(**kw)
    out, norms = [], []
    for t, step_grads in enumerate(grads):
        if lrs is not None:
            opt.learning_rate = lrs[t]
        gs = [tf.constant(g) for g in step_grads]
        norms.append(float(tf.linalg.global_norm(gs)))
        opt.apply_gradients(zip(gs, variables))
        out.append([np.array(v.numpy()) for v in variables])
    return out, norms


# ----------------------------------------------------------------------------- Optax


def run_optax(kind, args, clip, lrs, params0, grads, decayed_weights):
    import jax.numpy as jnp
    import optax

    fn = {
        "sgd": optax.sgd,
        "adam": optax.adam,
        "adamw": optax.adamw,
        "amsgrad": optax.amsgrad,
        "rmsprop": optax.rmsprop,
        "adagrad": optax.adagrad,
        "nadam": optax.nadam,
        "nadamw": optax.nadamw,
        "adamax": optax.adamax,
        "adamaxw": optax.adamaxw,
        "lion": optax.lion,
        "radam": optax.radam,
        "adadelta": optax.adadelta,
        "adopt": optax.contrib.adopt,
        "ademamix": optax.contrib.ademamix,
        "schedule_free_sgd": optax.contrib.schedule_free_sgd,
        "schedule_free_adamw": optax.contrib.schedule_free_adamw,
    }[kind]
    # Callable defaults stay callables (inject_hyperparams would call them as schedules);
    # schedule-free's other arguments stay Python numbers, as a direct call passes them.
    schedule_free = ("warmup_steps", "b1", "weight_decay", "weight_lr_power", "state_dtype")
    static = {"adopt": ("clip_value_fn",), "ademamix": ("b3", "alpha"),
              "schedule_free_sgd": schedule_free,
              "schedule_free_adamw": schedule_free + ("b2", "eps")}.get(kind, ())
    averaged = kind.startswith("schedule_free")
    parts = []
    if clip is not None:
        parts.append(optax.clip_by_global_norm(clip))
    if decayed_weights is not None:
        parts.append(optax.add_decayed_weights(decayed_weights))
    parts.append(optax.inject_hyperparams(fn, static_args=static)(**args))
    tx = optax.chain(*parts)
    params = [jnp.asarray(p) for p in params0]
    state = tx.init(params)
    out, norms, evals = [], [], []
    for t, step_grads in enumerate(grads):
        if lrs is not None:
            state[-1].hyperparams["learning_rate"] = jnp.asarray(lrs[t], dtype=jnp.float32)
        gs = [jnp.asarray(g) for g in step_grads]
        norms.append(float(optax.global_norm(gs)))
        updates, state = tx.update(gs, state, params)
        params = optax.apply_updates(params, updates)
        out.append([np.array(p) for p in params])
        if averaged:
            x = optax.contrib.schedule_free_eval_params(state[-1].inner_state, params)
            evals.append([np.array(p) for p in x])
    return out, norms, (evals if averaged else None)


# ----------------------------------------------------------------------------- TensorFlow 1


def run_tf1(kind, args, clip, lrs, params0, grads):
    import tensorflow as tf

    v1 = tf.compat.v1.train
    variables = [tf.Variable(p) for p in params0]
    lr_var = tf.Variable(float(args.get("learning_rate", 0.001)), dtype=tf.float32)
    kw = {k: v for k, v in args.items() if k != "learning_rate"}
    kw["learning_rate"] = lambda: lr_var
    if kind == "sgd":
        cls = v1.MomentumOptimizer if "momentum" in kw else v1.GradientDescentOptimizer
    else:
        cls = {"adam": v1.AdamOptimizer, "rmsprop": v1.RMSPropOptimizer,
               "adagrad": v1.AdagradOptimizer}[kind]
    opt = cls(**kw)
    out, norms = [], []
    for t, step_grads in enumerate(grads):
        if lrs is not None:
            lr_var.assign(lrs[t])
        gs = [tf.constant(g) for g in step_grads]
        if clip is not None:
            gs, n = tf.clip_by_global_norm(gs, clip)
        else:
            n = tf.linalg.global_norm(gs)
        norms.append(float(n))
        opt.apply_gradients(list(zip(gs, variables)))
        out.append([np.array(v.numpy()) for v in variables])
    return out, norms


# ----------------------------------------------------------------------------- the grid

# (kind, constructor args) per flavor. Every option of every rule appears at least once.
GRID = {
    "pytorch": [
        ("sgd", {"lr": 0.1}),
        ("sgd", {"lr": 0.05, "momentum": 0.9}),
        ("sgd", {"lr": 0.05, "momentum": 0.9, "dampening": 0.3}),
        ("sgd", {"lr": 0.05, "momentum": 0.9, "nesterov": True}),
        ("sgd", {"lr": 0.05, "momentum": 0.8, "weight_decay": 0.05, "nesterov": True}),
        ("sgd", {"lr": 0.1, "weight_decay": 0.1, "maximize": True}),
        ("sgd", {}),
        ("adam", {"lr": 0.01}),
        ("adam", {}),
        ("adam", {"lr": 0.01, "amsgrad": True}),
        ("adam", {"lr": 0.01, "weight_decay": 0.1}),
        ("adam", {"lr": 0.01, "weight_decay": 0.1, "decoupled_weight_decay": True}),
        ("adam", {"lr": 0.01, "maximize": True}),
        ("adam", {"lr": 0.02, "betas": [0.8, 0.99], "eps": 1e-6}),
        ("adamw", {"lr": 0.01}),
        ("adamw", {"lr": 0.01, "weight_decay": 0.2, "amsgrad": True}),
        ("rmsprop", {}),
        ("rmsprop", {"lr": 0.01, "centered": True}),
        ("rmsprop", {"lr": 0.01, "momentum": 0.9}),
        ("rmsprop", {"lr": 0.01, "centered": True, "momentum": 0.5}),
        ("rmsprop", {"lr": 0.01, "alpha": 0.9, "eps": 1e-6, "weight_decay": 0.1}),
        ("rmsprop", {"lr": 0.01, "maximize": True}),
        ("adagrad", {}),
        ("adagrad", {"lr": 0.1, "lr_decay": 0.1}),
        ("adagrad", {"lr": 0.1, "initial_accumulator_value": 0.5, "eps": 1e-6}),
        ("adagrad", {"lr": 0.1, "weight_decay": 0.1, "maximize": True}),
    ],
    "keras": [
        ("sgd", {"learning_rate": 0.1}),
        ("sgd", {}),
        ("sgd", {"learning_rate": 0.05, "momentum": 0.9}),
        ("sgd", {"learning_rate": 0.05, "momentum": 0.9, "nesterov": True}),
        ("sgd", {"learning_rate": 0.05, "momentum": 0.5, "weight_decay": 0.1}),
        ("adam", {"learning_rate": 0.01}),
        ("adam", {}),
        ("adam", {"learning_rate": 0.01, "amsgrad": True}),
        ("adam", {"learning_rate": 0.02, "beta_1": 0.8, "beta_2": 0.99, "epsilon": 1e-5}),
        ("adam", {"learning_rate": 0.01, "weight_decay": 0.1}),
        ("adamw", {"learning_rate": 0.01}),
        ("adamw", {"learning_rate": 0.01, "weight_decay": 0.2, "amsgrad": True}),
        ("rmsprop", {}),
        ("rmsprop", {"learning_rate": 0.01, "centered": True}),
        ("rmsprop", {"learning_rate": 0.01, "momentum": 0.9}),
        ("rmsprop", {"learning_rate": 0.01, "centered": True, "momentum": 0.5}),
        ("rmsprop", {"learning_rate": 0.01, "rho": 0.8, "epsilon": 1e-5, "weight_decay": 0.1}),
        ("adagrad", {}),
        ("adagrad", {"learning_rate": 0.1, "initial_accumulator_value": 0.5, "epsilon": 1e-3}),
        ("adagrad", {"learning_rate": 0.1, "weight_decay": 0.1}),
    ],
    "optax": [
        ("sgd", {"learning_rate": 0.1}),
        ("sgd", {"learning_rate": 0.05, "momentum": 0.9}),
        ("sgd", {"learning_rate": 0.05, "momentum": 0.9, "nesterov": True}),
        ("adam", {"learning_rate": 0.01}),
        ("adam", {"learning_rate": 0.02, "b1": 0.8, "b2": 0.99, "eps": 1e-6, "eps_root": 1e-8}),
        ("amsgrad", {"learning_rate": 0.01}),
        ("adamw", {"learning_rate": 0.01}),
        ("adamw", {"learning_rate": 0.01, "weight_decay": 0.2}),
        ("rmsprop", {"learning_rate": 0.01}),
        ("rmsprop", {"learning_rate": 0.01, "centered": True}),
        ("rmsprop", {"learning_rate": 0.01, "momentum": 0.9}),
        ("rmsprop", {"learning_rate": 0.01, "momentum": 0.9, "nesterov": True}),
        ("rmsprop", {"learning_rate": 0.01, "centered": True, "momentum": 0.5}),
        ("rmsprop", {"learning_rate": 0.01, "eps_in_sqrt": False, "decay": 0.8}),
        ("rmsprop", {"learning_rate": 0.01, "initial_scale": 0.5, "bias_correction": True}),
        ("adagrad", {"learning_rate": 0.1}),
        ("adagrad", {"learning_rate": 0.1, "initial_accumulator_value": 0.0, "eps": 0.0}),
    ],
    "tf1": [
        ("sgd", {"learning_rate": 0.1}),
        ("sgd", {"learning_rate": 0.05, "momentum": 0.9}),
        ("sgd", {"learning_rate": 0.05, "momentum": 0.9, "use_nesterov": True}),
        ("adam", {"learning_rate": 0.01}),
        ("adam", {"learning_rate": 0.02, "beta1": 0.8, "beta2": 0.99, "epsilon": 1e-5}),
        ("rmsprop", {"learning_rate": 0.01}),
        ("rmsprop", {"learning_rate": 0.01, "centered": True}),
        ("rmsprop", {"learning_rate": 0.01, "momentum": 0.9}),
        ("rmsprop", {"learning_rate": 0.01, "decay": 0.8, "epsilon": 1e-6, "centered": True,
                     "momentum": 0.5}),
        ("adagrad", {"learning_rate": 0.1}),
        ("adagrad", {"learning_rate": 0.1, "initial_accumulator_value": 0.5}),
    ],
}

# The rules added after the first recording, appended so that the earlier cases keep their seeds.
# Each gets every variant: clipping, a schedule, NaN/∞ and tiny gradients.
GRID_ADDED = {
    "pytorch": [
        ("adamax", {}),
        ("adamax", {"lr": 0.01, "betas": [0.8, 0.99], "eps": 1e-6, "weight_decay": 0.1}),
        ("adamax", {"lr": 0.01, "maximize": True}),
        ("radam", {}),
        ("radam", {"lr": 0.01, "betas": [0.9, 0.9]}),
        ("radam", {"lr": 0.01, "betas": [0.8, 0.95], "eps": 1e-6, "weight_decay": 0.1}),
        ("radam", {"lr": 0.01, "betas": [0.9, 0.9], "weight_decay": 0.1,
                   "decoupled_weight_decay": True}),
        ("adadelta", {}),
        ("adadelta", {"lr": 0.5, "rho": 0.8, "eps": 1e-5, "weight_decay": 0.1}),
        ("adadelta", {"lr": 0.5, "maximize": True}),
        ("lion", {}),
        ("lion", {"lr": 0.003, "betas": [0.8, 0.9], "weight_decay": 0.1}),
        ("lion", {"lr": 0.003, "weight_decay": 0.1, "decoupled_weight_decay": True}),
        ("nadam", {}),
        ("nadam", {"lr": 0.01, "betas": [0.8, 0.99], "eps": 1e-6, "momentum_decay": 0.3}),
        ("nadam", {"lr": 0.01, "weight_decay": 0.1}),
        ("nadam", {"lr": 0.01, "weight_decay": 0.1, "decoupled_weight_decay": True,
                   "maximize": True}),
        ("schedule_free_sgd", {}),
        ("schedule_free_sgd", {"lr": 0.1, "momentum": 0.8, "weight_decay": 0.05,
                               "warmup_steps": 3}),
        ("schedule_free_sgd", {"lr": 0.1, "r": 0.5, "weight_lr_power": 1.0}),
        ("schedule_free_adamw", {}),
        ("schedule_free_adamw", {"lr": 0.01, "betas": [0.8, 0.99], "eps": 1e-6,
                                 "weight_decay": 0.1, "warmup_steps": 4}),
        ("schedule_free_adamw", {"lr": 0.01, "r": 1.0, "weight_lr_power": 0.0}),
    ],
    "keras": [
        ("adamax", {}),
        ("adamax", {"learning_rate": 0.01, "beta_1": 0.8, "beta_2": 0.99, "epsilon": 1e-5,
                    "weight_decay": 0.1}),
        ("adadelta", {}),
        ("adadelta", {"learning_rate": 0.5, "rho": 0.8, "epsilon": 1e-5, "weight_decay": 0.1}),
        ("lion", {}),
        ("lion", {"learning_rate": 0.003, "beta_1": 0.8, "beta_2": 0.9, "weight_decay": 0.1}),
        ("lion", {"learning_rate": 0.003, "beta_1": 1.0}),
        ("nadam", {}),
        ("nadam", {"learning_rate": 0.01, "beta_1": 0.8, "beta_2": 0.99, "epsilon": 1e-5,
                   "weight_decay": 0.1}),
    ],
    "optax": [
        ("adam", {"learning_rate": 0.01, "nesterov": False}),
        ("adam", {"learning_rate": 0.01, "nesterov": True}),
        ("nadam", {"learning_rate": 0.01}),
        ("nadam", {"learning_rate": 0.02, "b1": 0.8, "b2": 0.99, "eps": 1e-6, "eps_root": 1e-8}),
        ("nadamw", {"learning_rate": 0.01, "weight_decay": 0.1}),
        ("adamw", {"learning_rate": 0.01, "weight_decay": 0.1, "nesterov": True}),
        ("adamax", {"learning_rate": 0.01}),
        ("adamax", {"learning_rate": 0.01, "b1": 0.8, "b2": 0.99, "eps": 1e-6}),
        ("adamaxw", {"learning_rate": 0.01, "weight_decay": 0.1}),
        ("lion", {"learning_rate": 0.003}),
        ("lion", {"learning_rate": 0.003, "b1": 0.8, "b2": 0.9, "weight_decay": 0.1}),
        ("radam", {"learning_rate": 0.01}),
        ("radam", {"learning_rate": 0.01, "b2": 0.9}),
        ("radam", {"learning_rate": 0.01, "b1": 0.8, "b2": 0.95, "eps": 1e-6, "eps_root": 1e-8,
                   "threshold": 4.5}),
        ("radam", {"learning_rate": 0.01, "b2": 0.9, "nesterov": True}),
        ("adadelta", {"learning_rate": 0.5}),
        ("adadelta", {"learning_rate": 0.5, "rho": 0.8, "eps": 1e-5, "weight_decay": 0.1}),
        ("adadelta", {}),
        ("adopt", {"learning_rate": 0.01}),
        ("adopt", {"learning_rate": 0.01, "b1": 0.8, "b2": 0.99, "eps": 1e-4, "nesterov": True}),
        ("adopt", {"learning_rate": 0.01, "use_clipping": False}),
        ("ademamix", {"learning_rate": 0.01}),
        ("ademamix", {"learning_rate": 0.01, "b1": 0.8, "b2": 0.99, "b3": 0.99, "alpha": 2.0,
                      "eps": 1e-6, "eps_root": 1e-8, "weight_decay": 0.1}),
        ("schedule_free_sgd", {"learning_rate": 0.1}),
        ("schedule_free_sgd", {"learning_rate": 0.1, "b1": 0.8, "weight_decay": 0.05,
                               "warmup_steps": 3}),
        ("schedule_free_adamw", {"learning_rate": 0.01}),
        ("schedule_free_adamw", {"learning_rate": 0.01, "b1": 0.8, "b2": 0.99, "eps": 1e-6,
                                 "weight_decay": 0.1, "warmup_steps": 4,
                                 "weight_lr_power": 1.0}),
        ("schedule_free_adamw", {}),
    ],
}

# PyTorch optimizers driven by a scheduler stepped after every step, which also cycles momentum
# (or Adam's β1) where `cycle_momentum` is on (its default).
SCHEDULED = [
    ("sgd", {"lr": 0.05, "momentum": 0.9}, {"kind": "OneCycleLR", "max_lr": 0.5, "total_steps": 6}),
    ("sgd", {"lr": 0.05, "momentum": 0.9}, {"kind": "OneCycleLR", "max_lr": 0.5, "total_steps": 6,
                                            "cycle_momentum": False}),
    ("adam", {"lr": 0.01}, {"kind": "OneCycleLR", "max_lr": 0.05, "total_steps": 6,
                            "three_phase": True, "anneal_strategy": "linear"}),
    ("adamw", {"lr": 0.01, "amsgrad": True},
     {"kind": "CyclicLR", "base_lr": 0.001, "max_lr": 0.01, "step_size_up": 2,
      "mode": "triangular2"}),
    ("sgd", {"lr": 0.05, "momentum": 0.8, "nesterov": True},
     {"kind": "CyclicLR", "base_lr": 0.01, "max_lr": 0.1, "step_size_up": 2, "step_size_down": 1,
      "mode": "exp_range", "gamma": 0.9}),
    ("rmsprop", {"lr": 0.01, "momentum": 0.5},
     {"kind": "CyclicLR", "base_lr": 0.001, "max_lr": 0.01, "step_size_up": 3,
      "base_momentum": 0.4, "max_momentum": 0.7}),
    ("radam", {"lr": 0.01, "betas": [0.9, 0.9]},
     {"kind": "OneCycleLR", "max_lr": 0.02, "total_steps": 6, "base_momentum": 0.8,
      "max_momentum": 0.9}),
    ("adamax", {}, {"kind": "CyclicLR", "base_lr": 0.001, "max_lr": 0.01, "step_size_up": 2}),
]

# Optax has no weight decay in sgd/adam: chain add_decayed_weights first (coupled L2).
OPTAX_DECAYED = [("sgd", {"learning_rate": 0.05, "momentum": 0.9}, 0.05),
                 ("adam", {"learning_rate": 0.01}, 0.1)]

LR_KEY = {"pytorch": "lr", "keras": "learning_rate", "optax": "learning_rate",
          "tf1": "learning_rate"}
DEFAULT_LR = {"pytorch": 0.01, "keras": 0.01, "optax": 0.01, "tf1": 0.01}


def scheduled_lrs(base):
    """A step-decay sequence, as a schedule would feed the optimizer."""
    return [base, base, base * 0.5, base * 0.5, base * 0.25, base * 0.1]


def run_case(flavor, kind, args, clip, lrs, params0, grads, decayed):
    """(params after each step, global norms, evaluation params after each step or None)."""
    if flavor == "pytorch":
        return run_torch(kind, args, clip, lrs, params0, grads)
    if flavor == "keras":
        return (*run_keras(kind, args, clip, lrs, params0, grads), None)
    if flavor == "optax":
        return run_optax(kind, args, clip, lrs, params0, grads, decayed)
    return (*run_tf1(kind, args, clip, lrs, params0, grads), None)


def grid_entries():
    """(flavor, index, kind, args, decayed, variants, seeded): the first grid, whose cases take
    seeds in order, then the added rules, whose cases are seeded by their names (so that adding
    one never changes another)."""
    for flavor, grid in GRID.items():
        entries = [(k, a, None) for k, a in grid]
        if flavor == "optax":
            entries += OPTAX_DECAYED
        for index, (kind, args, decayed) in enumerate(entries):
            variants = [("", None, False, False, False), ("_clip", 1.5, False, False, False)]
            if index % 3 == 0:
                variants.append(("_sched", None, True, False, False))
                variants.append(("_clip_sched", 0.8, True, False, False))
            if index % 4 == 1:
                variants.append(("_nonfinite", None, False, True, False))
                variants.append(("_clip_nonfinite", 1.5, False, True, False))
            yield flavor, index, kind, args, decayed, variants, False
    for flavor, grid in GRID_ADDED.items():
        first = len(GRID[flavor]) + (len(OPTAX_DECAYED) if flavor == "optax" else 0)
        for index, (kind, args) in enumerate(grid, start=first):
            variants = [("", None, False, False, False), ("_clip", 1.5, False, False, False),
                        ("_nonfinite", None, False, True, False),
                        ("_tiny", None, False, False, True)]
            # Optax's learning_rate None leaves no lr to schedule.
            if flavor != "optax" or "learning_rate" in args:
                variants.append(("_clip_sched", 0.8, True, False, False))
            yield flavor, index, kind, args, None, variants, True


def optimizer_cases():
    seed = 0
    for flavor, index, kind, args, decayed, variants, by_name in grid_entries():
        for suffix, clip, sched, nonfinite, tiny in variants:
            seed += 1
            name = f"{flavor}_{kind}_{index:02d}{suffix}"
            if by_name:
                seed = zlib.crc32(name.encode())
            zeros = "initial_accumulator_value" in args and args.get("eps") == 0.0
            params0, grads = make_data(seed, nonfinite=nonfinite, zeros=zeros, tiny=tiny)
            lrs = None
            if sched:
                lrs = scheduled_lrs(args.get(LR_KEY[flavor]) or DEFAULT_LR[flavor])
            out, norms, evals = run_case(flavor, kind, args, clip, lrs, params0, grads, decayed)
            case = {
                "name": name,
                "flavor": flavor,
                "optimizer": {"kind": kind, **args},
                "add_decayed_weights": decayed,
                "clip_global_norm": clip,
                "lrs": lrs,
                "params0": [{"shape": list(p.shape), "values": flat(p)} for p in params0],
                "grads": [[flat(g) for g in step] for step in grads],
                "expected_params": [[flat(p) for p in step] for step in out],
                "expected_global_norm": [to_json_value(n) for n in norms],
            }
            if evals is not None:
                case["expected_eval_params"] = [[flat(p) for p in step] for step in evals]
            yield name, case


def scheduled_cases():
    """PyTorch trajectories under a stepped scheduler (SCHEDULED), seeded by name."""
    for index, (kind, args, scheduler) in enumerate(SCHEDULED):
        for suffix, clip in [("", None), ("_clip", 1.5)]:
            name = f"pytorch_{kind}_{scheduler['kind']}_{index:02d}{suffix}"
            params0, grads = make_data(zlib.crc32(name.encode()))
            out, norms, _ = run_torch(kind, args, clip, None, params0, grads, scheduler)
            yield name, {
                "name": name,
                "flavor": "pytorch",
                "optimizer": {"kind": kind, **args},
                "lr_scheduler": scheduler,
                "add_decayed_weights": None,
                "clip_global_norm": clip,
                "lrs": None,
                "params0": [{"shape": list(p.shape), "values": flat(p)} for p in params0],
                "grads": [[flat(g) for g in step] for step in grads],
                "expected_params": [[flat(p) for p in step] for step in out],
                "expected_global_norm": [to_json_value(n) for n in norms],
            }


# ----------------------------------------------------------------------------- schedules


def torch_schedule_lrs(spec, steps):
    import torch

    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=spec["base_lr"], momentum=0.9)

    def build(s):
        args = {k: v for k, v in s.items() if k not in ("kind", "base_lr")}
        if s["kind"] == "SequentialLR":
            subs = [build(c) for c in args.pop("schedulers")]
            return torch.optim.lr_scheduler.SequentialLR(opt, subs, **args)
        return getattr(torch.optim.lr_scheduler, s["kind"])(opt, **args)

    sched = build(spec)
    lrs = []
    for _ in range(steps):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


def torch_plateau_lrs(spec, metrics):
    import torch

    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=spec["base_lr"])
    args = {k: v for k, v in spec.items() if k not in ("kind", "base_lr")}
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, **args)
    lrs = []
    for m in metrics:
        sched.step(m)
        lrs.append(opt.param_groups[0]["lr"])
    return lrs


def keras_schedule_lrs(spec, steps):
    import keras

    args = {k: v for k, v in spec.items() if k != "kind"}
    sched = getattr(keras.optimizers.schedules, spec["kind"])(**args)
    return [float(sched(t)) for t in range(steps)]


def keras_plateau_lrs(spec, metrics):
    import keras

    model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=spec["base_lr"]), loss="mse")
    args = {k: v for k, v in spec.items() if k not in ("kind", "base_lr")}
    cb = keras.callbacks.ReduceLROnPlateau(monitor="val_loss", **args)
    cb.set_model(model)
    cb.on_train_begin()
    lrs = []
    for epoch, m in enumerate(metrics):
        cb.on_epoch_end(epoch, {"val_loss": m})
        lrs.append(float(model.optimizer.learning_rate.numpy()))
    return lrs


def optax_schedule_lrs(spec, steps):
    import optax

    args = {k: v for k, v in spec.items() if k != "kind"}
    if spec["kind"] == "piecewise_constant_schedule":
        args["boundaries_and_scales"] = {int(k): v for k, v in args["boundaries_and_scales"].items()}
    sched = getattr(optax, spec["kind"])(**args)
    return [float(sched(t)) for t in range(steps)]


TORCH_SCHEDULES = [
    {"kind": "StepLR", "base_lr": 0.1, "step_size": 7, "gamma": 0.5},
    {"kind": "MultiStepLR", "base_lr": 0.1, "milestones": [5, 12, 12, 20], "gamma": 0.3},
    {"kind": "ExponentialLR", "base_lr": 0.1, "gamma": 0.93},
    {"kind": "LinearLR", "base_lr": 0.1},
    {"kind": "LinearLR", "base_lr": 0.1, "start_factor": 0.1, "end_factor": 0.8,
     "total_iters": 9},
    {"kind": "CosineAnnealingLR", "base_lr": 0.1, "T_max": 10, "eta_min": 0.01},
    {"kind": "CosineAnnealingWarmRestarts", "base_lr": 0.1, "T_0": 4, "T_mult": 2,
     "eta_min": 0.001},
    {"kind": "CosineAnnealingWarmRestarts", "base_lr": 0.1, "T_0": 5},
    {"kind": "OneCycleLR", "base_lr": 0.1, "max_lr": 0.5, "total_steps": 30},
    {"kind": "OneCycleLR", "base_lr": 0.1, "max_lr": 0.5, "total_steps": 30,
     "anneal_strategy": "linear", "pct_start": 0.25, "three_phase": True},
    {"kind": "PolynomialLR", "base_lr": 0.1, "total_iters": 12, "power": 2.0},
    {"kind": "PolynomialLR", "base_lr": 0.1},
    {"kind": "SequentialLR", "base_lr": 0.1, "milestones": [5],
     "schedulers": [{"kind": "LinearLR", "start_factor": 0.2, "total_iters": 5},
                    {"kind": "CosineAnnealingLR", "T_max": 20}]},
    {"kind": "SequentialLR", "base_lr": 0.1, "milestones": [3, 10],
     "schedulers": [{"kind": "ConstantLR", "factor": 0.5, "total_iters": 3},
                    {"kind": "ExponentialLR", "gamma": 0.9},
                    {"kind": "StepLR", "step_size": 4, "gamma": 0.5}]},
]

KERAS_SCHEDULES = [
    {"kind": "ExponentialDecay", "initial_learning_rate": 0.1, "decay_steps": 5,
     "decay_rate": 0.7},
    {"kind": "ExponentialDecay", "initial_learning_rate": 0.1, "decay_steps": 5,
     "decay_rate": 0.7, "staircase": True},
    {"kind": "PiecewiseConstantDecay", "boundaries": [5, 12], "values": [0.1, 0.05, 0.01]},
    {"kind": "CosineDecay", "initial_learning_rate": 0.1, "decay_steps": 20, "alpha": 0.1},
    {"kind": "CosineDecay", "initial_learning_rate": 0.0, "decay_steps": 20,
     "warmup_target": 0.1, "warmup_steps": 5},
    {"kind": "CosineDecayRestarts", "initial_learning_rate": 0.1, "first_decay_steps": 4},
    {"kind": "CosineDecayRestarts", "initial_learning_rate": 0.1, "first_decay_steps": 5,
     "t_mul": 1.0, "m_mul": 0.8, "alpha": 0.05},
    {"kind": "PolynomialDecay", "initial_learning_rate": 0.1, "decay_steps": 10,
     "end_learning_rate": 0.01, "power": 2.0},
    {"kind": "PolynomialDecay", "initial_learning_rate": 0.1, "decay_steps": 7,
     "end_learning_rate": 0.01, "cycle": True},
    {"kind": "InverseTimeDecay", "initial_learning_rate": 0.1, "decay_steps": 3,
     "decay_rate": 0.5},
    {"kind": "InverseTimeDecay", "initial_learning_rate": 0.1, "decay_steps": 3,
     "decay_rate": 0.5, "staircase": True},
]

OPTAX_SCHEDULES = [
    {"kind": "exponential_decay", "init_value": 0.1, "transition_steps": 4, "decay_rate": 0.6},
    {"kind": "exponential_decay", "init_value": 0.1, "transition_steps": 4, "decay_rate": 0.6,
     "transition_begin": 3, "staircase": True, "end_value": 0.02},
    {"kind": "piecewise_constant_schedule", "init_value": 0.1,
     "boundaries_and_scales": {"5": 0.5, "12": 0.1}},
    {"kind": "linear_schedule", "init_value": 0.1, "end_value": 0.01, "transition_steps": 10,
     "transition_begin": 4},
    {"kind": "polynomial_schedule", "init_value": 0.1, "end_value": 0.01, "power": 3.0,
     "transition_steps": 12},
    {"kind": "cosine_decay_schedule", "init_value": 0.1, "decay_steps": 15, "alpha": 0.1,
     "exponent": 2.0},
    {"kind": "warmup_cosine_decay_schedule", "init_value": 0.0, "peak_value": 0.1,
     "warmup_steps": 5, "decay_steps": 20, "end_value": 0.001},
    {"kind": "cosine_onecycle_schedule", "transition_steps": 25, "peak_value": 0.1},
]

PLATEAU_METRICS = [1.0, 0.9, 0.9, 0.91, 0.9, 0.95, 0.89995, 0.9, 0.92, 0.85, 0.86, 0.86, 0.87,
                   0.86, 0.90, 0.91, 0.84, 0.84, 0.85, 0.85]

PLATEAU_CASES = [
    ("pytorch", {"kind": "ReduceLROnPlateau", "base_lr": 0.1, "patience": 2}),
    ("pytorch", {"kind": "ReduceLROnPlateau", "base_lr": 0.1, "mode": "max", "factor": 0.5,
                 "patience": 1, "threshold": 0.01, "threshold_mode": "abs", "cooldown": 2,
                 "min_lr": 0.02}),
    ("pytorch", {"kind": "ReduceLROnPlateau", "base_lr": 0.1, "patience": 0, "cooldown": 1,
                 "factor": 0.5}),
    ("keras", {"kind": "ReduceLROnPlateau", "base_lr": 0.1, "patience": 2}),
    ("keras", {"kind": "ReduceLROnPlateau", "base_lr": 0.1, "factor": 0.5, "patience": 1,
               "min_delta": 0.01, "cooldown": 2, "min_lr": 0.02}),
    ("keras", {"kind": "ReduceLROnPlateau", "base_lr": 0.1, "mode": "max", "patience": 2,
               "factor": 0.5}),
]


def schedule_cases():
    steps = 40
    for i, spec in enumerate(TORCH_SCHEDULES):
        n = spec.get("total_steps", steps)
        yield f"pytorch_{spec['kind']}_{i:02d}", "pytorch", spec, n, torch_schedule_lrs(spec, n), None
    for i, spec in enumerate(KERAS_SCHEDULES):
        yield f"keras_{spec['kind']}_{i:02d}", "keras", spec, steps, keras_schedule_lrs(spec, steps), None
    for i, spec in enumerate(OPTAX_SCHEDULES):
        yield f"optax_{spec['kind']}_{i:02d}", "optax", spec, steps, optax_schedule_lrs(spec, steps), None
    for i, (flavor, spec) in enumerate(PLATEAU_CASES):
        run = torch_plateau_lrs if flavor == "pytorch" else keras_plateau_lrs
        yield (f"{flavor}_ReduceLROnPlateau_{i:02d}", flavor, spec, len(PLATEAU_METRICS),
               run(spec, PLATEAU_METRICS), PLATEAU_METRICS)


def main():
    out_dir = sys.argv[1]
    os.makedirs(os.path.join(out_dir, "optimizers"), exist_ok=True)
    os.makedirs(os.path.join(out_dir, "schedules"), exist_ok=True)
    counts = {}
    for name, case in list(optimizer_cases()) + list(scheduled_cases()):
        with open(os.path.join(out_dir, "optimizers", name + ".json"), "w") as f:
            json.dump(case, f, separators=(",", ":"))
        counts[case["flavor"]] = counts.get(case["flavor"], 0) + 1
    for name, flavor, spec, steps, lrs, metrics in schedule_cases():
        case = {"name": name, "flavor": flavor, "schedule": spec, "steps": steps,
                "lrs": [to_json_value(x) for x in lrs], "metrics": metrics}
        with open(os.path.join(out_dir, "schedules", name + ".json"), "w") as f:
            json.dump(case, f, separators=(",", ":"))
        counts[flavor + " schedules"] = counts.get(flavor + " schedules", 0) + 1
    import keras, optax, tensorflow, torch, jax  # noqa: E401
    from importlib.metadata import version
    versions = {"torch": torch.__version__, "keras": keras.__version__,
                "tensorflow": tensorflow.__version__, "optax": optax.__version__,
                "jax": jax.__version__, "lion-pytorch": version("lion-pytorch"),
                "schedulefree": version("schedulefree")}
    with open(os.path.join(out_dir, "VERSIONS.json"), "w") as f:
        json.dump({"versions": versions, "counts": counts}, f, indent=1, sort_keys=True)
    print(json.dumps(counts, sort_keys=True))


if __name__ == "__main__":
    main()

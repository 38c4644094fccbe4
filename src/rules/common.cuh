// What every rule's CUDA half shares (mod.rs beside it): a parameter group's device config,
// weight decay, and the bias-correction power. The element arithmetic is fp32 with no fast-math,
// as in the frameworks; coefficients are computed once per step and group, in f64.
#pragma once
#include "abi.cuh"

enum : unsigned int { DECAY_NONE = 0, DECAY_L2 = 1, DECAY_L1 = 2, DECAY_DECOUPLED = 3 };

// A parameter group's rule and hyperparameters, uploaded once (mod.rs::GroupConfig). What
// `flags` and `params` hold is each rule's own (its mod.rs: device_config; its .cuh reads them).
struct GroupConfig {
    double lr_scale;
    double decay;  // λ
    double sign;   // −1 for maximize
    double params[8];
    unsigned int decay_kind;
    unsigned int flags;
};
static_assert(sizeof(GroupConfig) == 96, "GroupConfig");
ABI_FIELD(GroupConfig, lr_scale, 0); ABI_FIELD(GroupConfig, decay, 8);
ABI_FIELD(GroupConfig, sign, 16); ABI_FIELD(GroupConfig, params, 24);
ABI_FIELD(GroupConfig, decay_kind, 88); ABI_FIELD(GroupConfig, flags, 92);

// One step's lr, the momentum a schedule cycles (NaN: the rule's own) and the rule's
// host-computed scalars (cuda/abi.rs: StepEntry), in the ring the update indexes by the step's
// applied-step count.
struct StepEntry {
    double lr;
    double momentum;
    double scalars[3];
};
static_assert(sizeof(StepEntry) == 40, "StepEntry");
ABI_FIELD(StepEntry, lr, 0); ABI_FIELD(StepEntry, momentum, 8); ABI_FIELD(StepEntry, scalars, 16);

// The step's momentum (or β1): the schedule's when it cycles one, else the rule's own.
__device__ __forceinline__ double momentum_or(const StepEntry& e, double own) {
    return e.momentum == e.momentum ? e.momentum : own;
}

struct Decay {
    float l2, l1, keep;
};

__device__ __forceinline__ Decay make_decay(const GroupConfig& c, double lr) {
    Decay d{0.0f, 0.0f, 1.0f};
    if (c.decay_kind == DECAY_L2) d.l2 = (float)c.decay;
    if (c.decay_kind == DECAY_L1) d.l1 = (float)c.decay;
    if (c.decay_kind == DECAY_DECOUPLED) d.keep = (float)(1.0 - lr * c.decay);
    return d;
}

// g += l2·θ + l1·sign θ; θ *= keep.
__device__ __forceinline__ void apply_decay(const Decay& d, float& p, float& g) {
    const float sign = p > 0.0f ? 1.0f : (p < 0.0f ? -1.0f : 0.0f);
    if (d.l2 != 0.0f) g = g + d.l2 * p;
    if (d.l1 != 0.0f) g = g + d.l1 * sign;
    if (d.keep != 1.0f) p = p * d.keep;
}

// base^exp by binary exponentiation: the multiplications of powu in mod.rs, in the same order,
// so bias corrections have the same bits on both engines.
__host__ __device__ __forceinline__ double powu(double base, unsigned long long exp) {
    double result = 1.0, b = base;
    while (exp > 0) {
        if (exp & 1ull) result *= b;
        b *= b;
        exp >>= 1;
    }
    return result;
}

// max that propagates NaN from either side (torch.maximum, jnp.maximum).
__device__ __forceinline__ float max_nan(float a, float b) {
    return (a > b || a != a) ? a : b;
}

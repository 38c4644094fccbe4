// Per-element maths of every rule: the CUDA twin of src/optim/rules.rs, function for function.
// Coefficients are computed once per step and group (see the Rust side for their meaning); the
// element arithmetic is fp32 with no fast-math, as in the frameworks.
#pragma once
#include "multi_tensor.cuh"

// A parameter group's rule and hyperparameters, uploaded once (src/cuda/abi.rs::GroupConfig).
enum : unsigned int {
    NESTEROV = 1u << 0,
    COPY_FIRST = 1u << 1,       // SGD: the first buffer is a copy of g (PyTorch)
    LR_INSIDE = 1u << 2,        // lr inside the momentum buffer (Keras, Optax/TF1 RMSProp)
    EPS_RAW = 1u << 3,          // Adam: ε on the raw scale (Keras, TF1)
    AMS_CORRECTED = 1u << 4,    // AMSGrad maxes v̂ (Optax)
    EPS_INSIDE = 1u << 5,       // √(v + ε)
    CENTERED = 1u << 6,
    BIAS_CORRECTION = 1u << 7,  // RMSProp averages ÷ (1 − αᵗ) (Optax)
    ZERO_WHERE_EMPTY = 1u << 8, // Adagrad: no update where s ≤ 0 (Optax)
};
enum : unsigned int { DECAY_NONE = 0, DECAY_L2 = 1, DECAY_L1 = 2, DECAY_DECOUPLED = 3 };

struct GroupConfig {
    double lr_scale;
    double decay;  // λ
    double sign;   // −1 for maximize
    double momentum, dampening, beta1, beta2, eps, eps_root, alpha, lr_decay;
    unsigned int decay_kind;
    unsigned int flags;
};
static_assert(sizeof(GroupConfig) == 96, "GroupConfig");
ABI_FIELD(GroupConfig, lr_scale, 0); ABI_FIELD(GroupConfig, decay, 8);
ABI_FIELD(GroupConfig, sign, 16); ABI_FIELD(GroupConfig, momentum, 24);
ABI_FIELD(GroupConfig, dampening, 32); ABI_FIELD(GroupConfig, beta1, 40);
ABI_FIELD(GroupConfig, beta2, 48); ABI_FIELD(GroupConfig, eps, 56);
ABI_FIELD(GroupConfig, eps_root, 64); ABI_FIELD(GroupConfig, alpha, 72);
ABI_FIELD(GroupConfig, lr_decay, 80); ABI_FIELD(GroupConfig, decay_kind, 88);
ABI_FIELD(GroupConfig, flags, 92);

struct Decay {
    float l2, l1, keep;
};

struct SgdStep {
    float gscale;
    Decay decay;
    float lr, momentum, keep, gin, ng, outer;
    int nesterov;
};

struct AdamStep {
    float gscale;
    Decay decay;
    float one_minus_beta1, beta2, one_minus_beta2, step_size, v_scale, eps, eps_root, max_scale;
};

struct RmsPropStep {
    float gscale;
    Decay decay;
    float alpha, one_minus_alpha, avg_scale, eps;
    int eps_inside, centered;
    float momentum;
    int nesterov;
    float gin, outer;
};

struct AdagradStep {
    float gscale;
    Decay decay;
    float clr, eps;
    int eps_inside, zero_where_empty;
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

// base^exp by binary exponentiation: the multiplications of powu in src/optim/rules.rs, in the
// same order, so bias corrections have the same bits on both engines.
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

// ---------------------------------------------------------------- SGD

__device__ __forceinline__ SgdStep make_sgd_step(const GroupConfig& c, double lr,
                                                 unsigned long long t, float gscale) {
    const bool first_copy = t == 1 && (c.flags & COPY_FIRST);
    const bool inside = c.flags & LR_INSIDE;
    const double lr_in = inside ? lr : 1.0;
    SgdStep s;
    s.gscale = gscale;
    s.decay = make_decay(c, lr);
    s.lr = (float)lr;
    s.momentum = (float)c.momentum;
    s.keep = first_copy ? 0.0f : (float)c.momentum;
    s.gin = (float)((first_copy ? 1.0 : 1.0 - c.dampening) * lr_in);
    s.ng = (float)lr_in;
    s.outer = inside ? 1.0f : (float)lr;
    s.nesterov = (c.flags & NESTEROV) != 0;
    return s;
}

__device__ __forceinline__ void sgd_plain(const SgdStep& c, float& p, float g) {
    g = g * c.gscale;
    apply_decay(c.decay, p, g);
    p = p - c.lr * g;
}

__device__ __forceinline__ void sgd_momentum(const SgdStep& c, float& p, float g, float& b) {
    g = g * c.gscale;
    apply_decay(c.decay, p, g);
    b = c.keep * b + c.gin * g;
    const float d = c.nesterov ? c.ng * g + c.momentum * b : b;
    p = p - c.outer * d;
}

// ---------------------------------------------------------------- Adam

__device__ __forceinline__ AdamStep make_adam_step(const GroupConfig& c, double lr,
                                                   unsigned long long t, float gscale) {
    const double bc1 = 1.0 - powu(c.beta1, t);
    const double bc2 = 1.0 - powu(c.beta2, t);
    const bool corrected = !(c.flags & EPS_RAW);
    const bool max_corrected = c.flags & AMS_CORRECTED;
    AdamStep s;
    s.gscale = gscale;
    s.decay = make_decay(c, lr);
    s.one_minus_beta1 = (float)(1.0 - c.beta1);
    s.beta2 = (float)c.beta2;
    s.one_minus_beta2 = (float)(1.0 - c.beta2);
    s.step_size = (float)(corrected ? lr / bc1 : lr * sqrt(bc2) / bc1);
    s.v_scale = (float)(corrected && !max_corrected ? 1.0 / bc2 : (!corrected && max_corrected ? bc2 : 1.0));
    s.eps = (float)c.eps;
    s.eps_root = (float)c.eps_root;
    s.max_scale = (float)(max_corrected ? 1.0 / bc2 : 1.0);
    return s;
}

template <bool AMSGRAD>
__device__ __forceinline__ void adam(const AdamStep& c, float& p, float g, float& m, float& v,
                                     float& vmax) {
    g = g * c.gscale;
    apply_decay(c.decay, p, g);
    m = m + c.one_minus_beta1 * (g - m);
    v = c.beta2 * v + c.one_minus_beta2 * g * g;
    float u = v;
    if (AMSGRAD) {
        vmax = max_nan(vmax, v * c.max_scale);
        u = vmax;
    }
    const float denom = sqrtf(u * c.v_scale + c.eps_root) + c.eps;
    p = p - c.step_size * m / denom;
}

// ---------------------------------------------------------------- RMSProp

__device__ __forceinline__ RmsPropStep make_rmsprop_step(const GroupConfig& c, double lr,
                                                         unsigned long long t, float gscale) {
    const bool inside = (c.flags & LR_INSIDE) || c.momentum == 0.0;
    RmsPropStep s;
    s.gscale = gscale;
    s.decay = make_decay(c, lr);
    s.alpha = (float)c.alpha;
    s.one_minus_alpha = (float)(1.0 - c.alpha);
    s.avg_scale = (float)((c.flags & BIAS_CORRECTION) ? 1.0 / (1.0 - powu(c.alpha, t)) : 1.0);
    s.eps = (float)c.eps;
    s.eps_inside = (c.flags & EPS_INSIDE) != 0;
    s.centered = (c.flags & CENTERED) != 0;
    s.momentum = (float)c.momentum;
    s.nesterov = (c.flags & NESTEROV) != 0;
    s.gin = (float)(inside ? lr : 1.0);
    s.outer = (float)(inside ? 1.0 : lr);
    return s;
}

template <bool CENTERED>
__device__ __forceinline__ float rmsprop_normalised(const RmsPropStep& c, float g, float& v,
                                                    float& gavg) {
    v = c.alpha * v + c.one_minus_alpha * g * g;
    float var = v * c.avg_scale;
    if (CENTERED) {
        gavg = gavg + c.one_minus_alpha * (g - gavg);
        const float mean = gavg * c.avg_scale;
        var = var - mean * mean;
    }
    const float d = c.eps_inside ? sqrtf(var + c.eps) : sqrtf(var) + c.eps;
    return g / d;
}

template <bool CENTERED>
__device__ __forceinline__ void rmsprop(const RmsPropStep& c, float& p, float g, float& v,
                                        float& gavg) {
    g = g * c.gscale;
    apply_decay(c.decay, p, g);
    p = p - c.gin * rmsprop_normalised<CENTERED>(c, g, v, gavg);
}

template <bool CENTERED>
__device__ __forceinline__ void rmsprop_momentum(const RmsPropStep& c, float& p, float g, float& v,
                                                 float& gavg, float& b) {
    g = g * c.gscale;
    apply_decay(c.decay, p, g);
    const float step = c.gin * rmsprop_normalised<CENTERED>(c, g, v, gavg);
    b = c.momentum * b + step;
    const float d = c.nesterov ? step + c.momentum * b : b;
    p = p - c.outer * d;
}

// ---------------------------------------------------------------- Adagrad

__device__ __forceinline__ AdagradStep make_adagrad_step(const GroupConfig& c, double lr,
                                                         unsigned long long t, float gscale) {
    AdagradStep s;
    s.gscale = gscale;
    s.decay = make_decay(c, lr);
    s.clr = (float)(lr / (1.0 + (double)(t > 0 ? t - 1 : 0) * c.lr_decay));
    s.eps = (float)c.eps;
    s.eps_inside = (c.flags & EPS_INSIDE) != 0;
    s.zero_where_empty = (c.flags & ZERO_WHERE_EMPTY) != 0;
    return s;
}

__device__ __forceinline__ void adagrad(const AdagradStep& c, float& p, float g, float& s) {
    g = g * c.gscale;
    apply_decay(c.decay, p, g);
    s = s + g * g;
    const float d = c.eps_inside ? sqrtf(s + c.eps) : sqrtf(s) + c.eps;
    const float delta = c.clr * g / d;
    // Optax's where(s > 0, …, 0) is false for NaN too.
    const bool skip = c.zero_where_empty && !(s > 0.0f);
    p = skip ? p : p - delta;
}

// Per-element maths of every rule: the CUDA twin of src/optim/rules.rs, function for function.
// Coefficients are computed once per step and group (see the Rust side for their meaning); the
// element arithmetic is fp32 with no fast-math, as in the frameworks.
#pragma once

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

// g += l2·θ + l1·sign θ; θ *= keep.
__device__ __forceinline__ void apply_decay(const Decay& d, float& p, float& g) {
    const float sign = p > 0.0f ? 1.0f : (p < 0.0f ? -1.0f : 0.0f);
    if (d.l2 != 0.0f) g = g + d.l2 * p;
    if (d.l1 != 0.0f) g = g + d.l1 * sign;
    if (d.keep != 1.0f) p = p * d.keep;
}

// max that propagates NaN from either side (torch.maximum, jnp.maximum).
__device__ __forceinline__ float max_nan(float a, float b) {
    return (a > b || a != a) ? a : b;
}

// ---------------------------------------------------------------- SGD

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

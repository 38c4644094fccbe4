// RMSProp on the GPU: math.rs beside it, line for line; mod.rs packs its GroupConfig.
#pragma once
#include "rules/common.cuh"

// GroupConfig::flags of an RMSProp group (mod.rs: the same); params[0..3] = α, ε, μ.
enum : unsigned int {
    RMSPROP_NESTEROV = 1u << 0,
    RMSPROP_LR_INSIDE = 1u << 1,       // lr inside the momentum buffer (Keras, Optax, TF1)
    RMSPROP_EPS_INSIDE = 1u << 2,      // √(v + ε)
    RMSPROP_CENTERED = 1u << 3,
    RMSPROP_BIAS_CORRECTION = 1u << 4, // averages ÷ (1 − αᵗ) (Optax)
};

struct RmsPropCoefficients {
    float gscale;
    Decay decay;
    float alpha, one_minus_alpha, avg_scale, eps;
    int eps_inside, centered;
    float momentum;
    int nesterov;
    float gin, outer;
};

__device__ __forceinline__ RmsPropCoefficients make_rmsprop(const GroupConfig& c, double lr,
                                                            unsigned long long t, float gscale,
                                                            const StepEntry& e) {
    const double alpha = c.params[0], eps = c.params[1], momentum = momentum_or(e, c.params[2]);
    // Where the lr sits follows the momentum the rule was built with (it decides the buffer).
    const bool inside = (c.flags & RMSPROP_LR_INSIDE) || c.params[2] == 0.0;
    RmsPropCoefficients s;
    s.gscale = gscale;
    s.decay = make_decay(c, lr);
    s.alpha = (float)alpha;
    s.one_minus_alpha = (float)(1.0 - alpha);
    s.avg_scale = (float)((c.flags & RMSPROP_BIAS_CORRECTION) ? 1.0 / (1.0 - powu(alpha, t)) : 1.0);
    s.eps = (float)eps;
    s.eps_inside = (c.flags & RMSPROP_EPS_INSIDE) != 0;
    s.centered = (c.flags & RMSPROP_CENTERED) != 0;
    s.momentum = (float)momentum;
    s.nesterov = (c.flags & RMSPROP_NESTEROV) != 0;
    s.gin = (float)(inside ? lr : 1.0);
    s.outer = (float)(inside ? 1.0 : lr);
    return s;
}

template <bool CENTERED>
__device__ __forceinline__ float rmsprop_normalised(const RmsPropCoefficients& c, float g, float& v,
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
__device__ __forceinline__ void rmsprop(const RmsPropCoefficients& c, float& p, float g, float& v,
                                        float& gavg) {
    g = g * c.gscale;
    apply_decay(c.decay, p, g);
    p = p - c.gin * rmsprop_normalised<CENTERED>(c, g, v, gavg);
}

template <bool CENTERED>
__device__ __forceinline__ void rmsprop_momentum(const RmsPropCoefficients& c, float& p, float g,
                                                 float& v, float& gavg, float& b) {
    g = g * c.gscale;
    apply_decay(c.decay, p, g);
    const float step = c.gin * rmsprop_normalised<CENTERED>(c, g, v, gavg);
    b = c.momentum * b + step;
    const float d = c.nesterov ? step + c.momentum * b : b;
    p = p - c.outer * d;
}

// The kernel families (mod.rs: family()). Slots follow state_names: square_avg, then grad_avg
// when centered, then momentum_buffer when there is momentum.
template <bool CENTERED, bool MOMENTUM> struct RmsPropFamily {
    static constexpr int slots = 1 + (CENTERED ? 1 : 0) + (MOMENTUM ? 1 : 0);
    using Coefficients = RmsPropCoefficients;
    static __device__ __forceinline__ Coefficients make(const GroupConfig& c, double lr,
                                                        unsigned long long t, float gscale,
                                                        const StepEntry& e) {
        return make_rmsprop(c, lr, t, gscale, e);
    }
    static __device__ __forceinline__ void apply(const Coefficients& k, float& p, float g, float* s) {
        // s[2] is scratch where a slot is unused.
        float& gavg = CENTERED ? s[1] : s[2];
        float& b = CENTERED ? s[2] : s[1];
        if (MOMENTUM) rmsprop_momentum<CENTERED>(k, p, g, s[0], gavg, b);
        else rmsprop<CENTERED>(k, p, g, s[0], gavg);
    }
};

#ifdef FUSEDOPT_FAMILY
FUSEDOPT_FAMILY(rmsprop, RmsPropFamily<false, false>)
FUSEDOPT_FAMILY(rmsprop_centered, RmsPropFamily<true, false>)
FUSEDOPT_FAMILY(rmsprop_momentum, RmsPropFamily<false, true>)
FUSEDOPT_FAMILY(rmsprop_centered_momentum, RmsPropFamily<true, true>)
#endif

// Adamax on the GPU: math.rs beside it, line for line; mod.rs packs its GroupConfig.
#pragma once
#include "rules/common.cuh"

// GroupConfig::flags of an Adamax group (mod.rs: the same); params[0..3] = β1, β2, ε.
enum : unsigned int { ADAMAX_EPS_DENOMINATOR = 1u << 0 };

struct AdamaxCoefficients {
    float gscale;
    Decay decay;
    float one_minus_beta1, beta2, step_size, eps_max, eps_div;
};

__device__ __forceinline__ AdamaxCoefficients make_adamax(const GroupConfig& c, double lr,
                                                          unsigned long long t, float gscale, const StepEntry& e) {
    const double beta1 = momentum_or(e, c.params[0]), beta2 = c.params[1], eps = c.params[2];
    const bool inside = !(c.flags & ADAMAX_EPS_DENOMINATOR);
    AdamaxCoefficients s;
    s.gscale = gscale;
    s.decay = make_decay(c, lr);
    s.one_minus_beta1 = (float)(1.0 - beta1);
    s.beta2 = (float)beta2;
    s.step_size = (float)(lr / (1.0 - powu(beta1, t)));
    s.eps_max = inside ? (float)eps : 0.0f;
    s.eps_div = inside ? 0.0f : (float)eps;
    return s;
}

__device__ __forceinline__ void adamax(const AdamaxCoefficients& c, float& p, float g, float& m,
                                       float& u) {
    g = g * c.gscale;
    apply_decay(c.decay, p, g);
    m = m + c.one_minus_beta1 * (g - m);
    u = max_nan(c.beta2 * u, fabsf(g) + c.eps_max);
    p = p - c.step_size * (m / (u + c.eps_div));
}

// The kernel family (mod.rs: family()).
struct AdamaxFamily {
    static constexpr int slots = 2;
    using Coefficients = AdamaxCoefficients;
    static __device__ __forceinline__ Coefficients make(const GroupConfig& c, double lr,
                                                        unsigned long long t, float gscale,
                                                        const StepEntry& e) {
        return make_adamax(c, lr, t, gscale, e);
    }
    static __device__ __forceinline__ void apply(const Coefficients& k, float& p, float g, float* s) {
        adamax(k, p, g, s[0], s[1]);
    }
};

#ifdef FUSEDOPT_FAMILY
FUSEDOPT_FAMILY(adamax, AdamaxFamily)
#endif

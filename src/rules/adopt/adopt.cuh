// ADOPT on the GPU: math.rs beside it, line for line; mod.rs packs its GroupConfig.
#pragma once
#include "rules/common.cuh"

// GroupConfig::flags of an ADOPT group (mod.rs: the same); params[0..3] = β1, β2, ε.
enum : unsigned int { ADOPT_CLIPPING = 1u << 0, ADOPT_NESTEROV = 1u << 1 };

struct AdoptCoefficients {
    float gscale;
    Decay decay;
    float lr, beta1, one_minus_beta1, beta2, one_minus_beta2, eps, clip;
    int clipping, nesterov;
};

__device__ __forceinline__ AdoptCoefficients make_adopt(const GroupConfig& c, double lr,
                                                        unsigned long long t, float gscale) {
    const bool first = t <= 1;
    const double beta1 = first ? 1.0 : c.params[0], beta2 = first ? 0.0 : c.params[1];
    const double count = (double)(t > 0 ? t - 1 : 0);
    AdoptCoefficients s;
    s.gscale = gscale;
    s.decay = make_decay(c, lr);
    s.lr = (float)lr;
    s.beta1 = (float)beta1;
    // Optax's β are f32 arrays here (jnp.where), so 1 − β is taken in f32.
    s.one_minus_beta1 = 1.0f - (float)beta1;
    s.beta2 = (float)beta2;
    s.one_minus_beta2 = 1.0f - (float)beta2;
    s.eps = (float)c.params[2];
    s.clipping = (c.flags & ADOPT_CLIPPING) != 0;
    s.clip = (float)sqrt(sqrt(count));
    s.nesterov = (c.flags & ADOPT_NESTEROV) != 0;
    return s;
}

__device__ __forceinline__ void adopt(const AdoptCoefficients& c, float& p, float g, float& m,
                                      float& v) {
    g = g * c.gscale;
    apply_decay(c.decay, p, g);
    const float x = g / max_nan(sqrtf(v), c.eps);
    // jnp.clip keeps a NaN.
    const float u = !c.clipping ? x : (x > c.clip ? c.clip : (x < -c.clip ? -c.clip : x));
    v = c.one_minus_beta2 * (g * g) + c.beta2 * v;
    m = c.one_minus_beta1 * u + c.beta1 * m;
    const float n = c.nesterov ? c.one_minus_beta1 * u + c.beta1 * m : m;
    p = p - c.lr * n;
}

// The kernel family (mod.rs: family()).
struct AdoptFamily {
    static constexpr int slots = 2;
    using Coefficients = AdoptCoefficients;
    static __device__ __forceinline__ Coefficients make(const GroupConfig& c, double lr,
                                                        unsigned long long t, float gscale,
                                                        const StepEntry& e) {
        return make_adopt(c, lr, t, gscale);
    }
    static __device__ __forceinline__ void apply(const Coefficients& k, float& p, float g, float* s) {
        adopt(k, p, g, s[0], s[1]);
    }
};

#ifdef FUSEDOPT_FAMILY
FUSEDOPT_FAMILY(adopt, AdoptFamily)
#endif

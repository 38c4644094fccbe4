// Adagrad on the GPU: math.rs beside it, line for line; mod.rs packs its GroupConfig.
#pragma once
#include "rules/common.cuh"

// GroupConfig::flags of an Adagrad group (mod.rs: the same); params[0..2] = ε, lr_decay.
enum : unsigned int {
    ADAGRAD_EPS_INSIDE = 1u << 0,       // √(s + ε)
    ADAGRAD_ZERO_WHERE_EMPTY = 1u << 1, // no update where s ≤ 0 (Optax)
};

struct AdagradCoefficients {
    float gscale;
    Decay decay;
    float clr, eps;
    int eps_inside, zero_where_empty;
};

__device__ __forceinline__ AdagradCoefficients make_adagrad(const GroupConfig& c, double lr,
                                                            unsigned long long t, float gscale) {
    const double eps = c.params[0], lr_decay = c.params[1];
    AdagradCoefficients s;
    s.gscale = gscale;
    s.decay = make_decay(c, lr);
    s.clr = (float)(lr / (1.0 + (double)(t > 0 ? t - 1 : 0) * lr_decay));
    s.eps = (float)eps;
    s.eps_inside = (c.flags & ADAGRAD_EPS_INSIDE) != 0;
    s.zero_where_empty = (c.flags & ADAGRAD_ZERO_WHERE_EMPTY) != 0;
    return s;
}

__device__ __forceinline__ void adagrad(const AdagradCoefficients& c, float& p, float g, float& s) {
    g = g * c.gscale;
    apply_decay(c.decay, p, g);
    s = s + g * g;
    const float d = c.eps_inside ? sqrtf(s + c.eps) : sqrtf(s) + c.eps;
    const float delta = c.clr * g / d;
    // Optax's where(s > 0, …, 0) is false for NaN too.
    const bool skip = c.zero_where_empty && !(s > 0.0f);
    p = skip ? p : p - delta;
}

// The kernel family (mod.rs: family()).
struct AdagradFamily {
    static constexpr int slots = 1;
    using Coefficients = AdagradCoefficients;
    static __device__ __forceinline__ Coefficients make(const GroupConfig& c, double lr,
                                                        unsigned long long t, float gscale,
                                                        const StepEntry& e) {
        return make_adagrad(c, lr, t, gscale);
    }
    static __device__ __forceinline__ void apply(const Coefficients& k, float& p, float g, float* s) {
        adagrad(k, p, g, s[0]);
    }
};

#ifdef FUSEDOPT_FAMILY
FUSEDOPT_FAMILY(adagrad, AdagradFamily)
#endif

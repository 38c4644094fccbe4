// Lion on the GPU: math.rs beside it, line for line; mod.rs packs its GroupConfig.
#pragma once
#include "rules/common.cuh"

// GroupConfig::flags of a Lion group (mod.rs: the same); params[0..2] = β1, β2.
enum : unsigned int { LION_NAN_SIGN_ZERO = 1u << 0 };

struct LionCoefficients {
    float gscale;
    Decay decay;
    float lr, beta1, one_minus_beta1, beta2, one_minus_beta2;
    int nan_sign_zero;
};

__device__ __forceinline__ LionCoefficients make_lion(const GroupConfig& c, double lr,
                                                      unsigned long long t, float gscale, const StepEntry& e) {
    const double beta1 = momentum_or(e, c.params[0]), beta2 = c.params[1];
    LionCoefficients s;
    s.gscale = gscale;
    s.decay = make_decay(c, lr);
    s.lr = (float)lr;
    s.beta1 = (float)beta1;
    s.one_minus_beta1 = (float)(1.0 - beta1);
    s.beta2 = (float)beta2;
    s.one_minus_beta2 = (float)(1.0 - beta2);
    s.nan_sign_zero = (c.flags & LION_NAN_SIGN_ZERO) != 0;
    return s;
}

__device__ __forceinline__ void lion(const LionCoefficients& c, float& p, float g, float& m) {
    g = g * c.gscale;
    apply_decay(c.decay, p, g);
    const float x = c.beta1 * m + c.one_minus_beta1 * g;
    const float sign = x > 0.0f ? 1.0f : (x < 0.0f ? -1.0f : (x != x && !c.nan_sign_zero ? x : 0.0f));
    p = p - c.lr * sign;
    m = c.beta2 * m + c.one_minus_beta2 * g;
}

// The kernel family (mod.rs: family()).
struct LionFamily {
    static constexpr int slots = 1;
    using Coefficients = LionCoefficients;
    static __device__ __forceinline__ Coefficients make(const GroupConfig& c, double lr,
                                                        unsigned long long t, float gscale,
                                                        const StepEntry& e) {
        return make_lion(c, lr, t, gscale, e);
    }
    static __device__ __forceinline__ void apply(const Coefficients& k, float& p, float g, float* s) {
        lion(k, p, g, s[0]);
    }
};

#ifdef FUSEDOPT_FAMILY
FUSEDOPT_FAMILY(lion, LionFamily)
#endif

// Adadelta on the GPU: math.rs beside it, line for line; mod.rs packs its GroupConfig.
#pragma once
#include "rules/common.cuh"

// params[0..2] = ρ, ε.
struct AdadeltaCoefficients {
    float gscale;
    Decay decay;
    float lr, rho, one_minus_rho, eps;
};

__device__ __forceinline__ AdadeltaCoefficients make_adadelta(const GroupConfig& c, double lr,
                                                              unsigned long long t, float gscale) {
    const double rho = c.params[0], eps = c.params[1];
    AdadeltaCoefficients s;
    s.gscale = gscale;
    s.decay = make_decay(c, lr);
    s.lr = (float)lr;
    s.rho = (float)rho;
    s.one_minus_rho = (float)(1.0 - rho);
    s.eps = (float)eps;
    return s;
}

__device__ __forceinline__ void adadelta(const AdadeltaCoefficients& c, float& p, float g,
                                         float& a, float& b) {
    g = g * c.gscale;
    apply_decay(c.decay, p, g);
    a = c.rho * a + c.one_minus_rho * (g * g);
    const float delta = sqrtf(b + c.eps) / sqrtf(a + c.eps) * g;
    b = c.rho * b + c.one_minus_rho * (delta * delta);
    p = p - c.lr * delta;
}

// The kernel family (mod.rs: family()).
struct AdadeltaFamily {
    static constexpr int slots = 2;
    using Coefficients = AdadeltaCoefficients;
    static __device__ __forceinline__ Coefficients make(const GroupConfig& c, double lr,
                                                        unsigned long long t, float gscale,
                                                        const StepEntry& e) {
        return make_adadelta(c, lr, t, gscale);
    }
    static __device__ __forceinline__ void apply(const Coefficients& k, float& p, float g, float* s) {
        adadelta(k, p, g, s[0], s[1]);
    }
};

#ifdef FUSEDOPT_FAMILY
FUSEDOPT_FAMILY(adadelta, AdadeltaFamily)
#endif

// NAdam (PyTorch, Keras) on the GPU: math.rs beside it, line for line; mod.rs packs its
// GroupConfig and computes the per-step scalars μ_t, μ_{t+1}, Π_t that arrive in the step's entry.
#pragma once
#include "rules/common.cuh"

// params[0..3] = β1, β2, ε.
struct NadamCoefficients {
    float gscale;
    Decay decay;
    float one_minus_beta1, beta2, one_minus_beta2, bc2, eps, grad_size, momentum_size;
};

__device__ __forceinline__ NadamCoefficients make_nadam(const GroupConfig& c, double lr,
                                                        unsigned long long t, float gscale,
                                                        const StepEntry& e) {
    const double beta1 = c.params[0], beta2 = c.params[1], eps = c.params[2];
    const double mu = e.scalars[0], mu_next = e.scalars[1], product = e.scalars[2];
    NadamCoefficients s;
    s.gscale = gscale;
    s.decay = make_decay(c, lr);
    s.one_minus_beta1 = (float)(1.0 - beta1);
    s.beta2 = (float)beta2;
    s.one_minus_beta2 = (float)(1.0 - beta2);
    s.bc2 = (float)(1.0 - powu(beta2, t));
    s.eps = (float)eps;
    s.grad_size = (float)(lr * (1.0 - mu) / (1.0 - product));
    s.momentum_size = (float)(lr * mu_next / (1.0 - product * mu_next));
    return s;
}

__device__ __forceinline__ void nadam(const NadamCoefficients& c, float& p, float g, float& m,
                                      float& v) {
    g = g * c.gscale;
    apply_decay(c.decay, p, g);
    m = m + c.one_minus_beta1 * (g - m);
    v = c.beta2 * v + c.one_minus_beta2 * (g * g);
    const float d = sqrtf(v / c.bc2) + c.eps;
    p = p - c.grad_size * (g / d);
    p = p - c.momentum_size * (m / d);
}

// The kernel family (mod.rs: family()).
struct NadamFamily {
    static constexpr int slots = 2;
    using Coefficients = NadamCoefficients;
    static __device__ __forceinline__ Coefficients make(const GroupConfig& c, double lr,
                                                        unsigned long long t, float gscale,
                                                        const StepEntry& e) {
        return make_nadam(c, lr, t, gscale, e);
    }
    static __device__ __forceinline__ void apply(const Coefficients& k, float& p, float g, float* s) {
        nadam(k, p, g, s[0], s[1]);
    }
};

#ifdef FUSEDOPT_FAMILY
FUSEDOPT_FAMILY(nadam, NadamFamily)
#endif

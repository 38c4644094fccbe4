// AdEMAMix on the GPU: math.rs beside it, line for line; mod.rs packs its GroupConfig.
#pragma once
#include "rules/common.cuh"

// params[0..6] = β1, β2, β3, α, ε, eps_root.
struct AdemamixCoefficients {
    float gscale;
    Decay decay;
    float lr, beta1, one_minus_beta1, beta2, one_minus_beta2, beta3, one_minus_beta3, alpha, bc1,
        bc2, eps, eps_root;
};

__device__ __forceinline__ AdemamixCoefficients make_ademamix(const GroupConfig& c, double lr,
                                                              unsigned long long t, float gscale) {
    const double beta1 = c.params[0], beta2 = c.params[1], beta3 = c.params[2];
    AdemamixCoefficients s;
    s.gscale = gscale;
    s.decay = make_decay(c, lr);
    s.lr = (float)lr;
    s.beta1 = (float)beta1;
    s.one_minus_beta1 = (float)(1.0 - beta1);
    s.beta2 = (float)beta2;
    s.one_minus_beta2 = (float)(1.0 - beta2);
    s.beta3 = (float)beta3;
    s.one_minus_beta3 = (float)(1.0 - beta3);
    s.alpha = (float)c.params[3];
    s.bc1 = (float)(1.0 - powu(beta1, t));
    s.bc2 = (float)(1.0 - powu(beta2, t));
    s.eps = (float)c.params[4];
    s.eps_root = (float)c.params[5];
    return s;
}

__device__ __forceinline__ void ademamix(const AdemamixCoefficients& c, float& p, float g,
                                         float& fast, float& slow, float& v) {
    g = g * c.gscale;
    apply_decay(c.decay, p, g);
    fast = c.one_minus_beta1 * g + c.beta1 * fast;
    slow = c.one_minus_beta3 * g + c.beta3 * slow;
    v = c.one_minus_beta2 * (g * g) + c.beta2 * v;
    const float d = sqrtf(v / c.bc2 + c.eps_root) + c.eps;
    p = p - c.lr * ((fast / c.bc1 + c.alpha * slow) / d);
}

// The kernel family (mod.rs: family()).
struct AdemamixFamily {
    static constexpr int slots = 3;
    using Coefficients = AdemamixCoefficients;
    static __device__ __forceinline__ Coefficients make(const GroupConfig& c, double lr,
                                                        unsigned long long t, float gscale,
                                                        const StepEntry& e) {
        return make_ademamix(c, lr, t, gscale);
    }
    static __device__ __forceinline__ void apply(const Coefficients& k, float& p, float g, float* s) {
        ademamix(k, p, g, s[0], s[1], s[2]);
    }
};

#ifdef FUSEDOPT_FAMILY
FUSEDOPT_FAMILY(ademamix, AdemamixFamily)
#endif

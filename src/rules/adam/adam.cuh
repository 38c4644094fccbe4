// Adam on the GPU: math.rs beside it, line for line; mod.rs packs its GroupConfig.
#pragma once
#include "rules/common.cuh"

// GroupConfig::flags of an Adam group (mod.rs: the same); params[0..4] = β1, β2, ε, eps_root.
enum : unsigned int { ADAM_EPS_RAW = 1u << 0, ADAM_AMS_CORRECTED = 1u << 1, ADAM_NESTEROV = 1u << 2 };

struct AdamCoefficients {
    float gscale;
    Decay decay;
    float one_minus_beta1, beta2, one_minus_beta2, step_size, v_scale, eps, eps_root, max_scale;
    float nm, ng;  // Nesterov: the step is lr·(nm·m + ng·g)/denom
};

__device__ __forceinline__ AdamCoefficients make_adam(const GroupConfig& c, double lr,
                                                      unsigned long long t, float gscale, const StepEntry& e) {
    const double beta1 = momentum_or(e, c.params[0]), beta2 = c.params[1], eps = c.params[2],
                 eps_root = c.params[3];
    const double bc1 = 1.0 - powu(beta1, t);
    const double bc2 = 1.0 - powu(beta2, t);
    const bool corrected = !(c.flags & ADAM_EPS_RAW);
    const bool max_corrected = c.flags & ADAM_AMS_CORRECTED;
    const bool nesterov = (c.flags & ADAM_NESTEROV) != 0;
    // Nesterov's m̂ is corrected already: the step leaves bc1 out.
    const double bc1_step = nesterov ? 1.0 : bc1;
    AdamCoefficients s;
    s.gscale = gscale;
    s.decay = make_decay(c, lr);
    s.one_minus_beta1 = (float)(1.0 - beta1);
    s.beta2 = (float)beta2;
    s.one_minus_beta2 = (float)(1.0 - beta2);
    s.step_size = (float)(corrected ? lr / bc1_step : lr * sqrt(bc2) / bc1_step);
    s.v_scale = (float)(corrected && !max_corrected ? 1.0 / bc2 : (!corrected && max_corrected ? bc2 : 1.0));
    s.eps = (float)eps;
    s.eps_root = (float)eps_root;
    s.max_scale = (float)(max_corrected ? 1.0 / bc2 : 1.0);
    s.nm = (float)(beta1 / (1.0 - powu(beta1, t + 1)));
    s.ng = (float)((1.0 - beta1) / bc1);
    return s;
}

template <bool AMSGRAD, bool NESTEROV>
__device__ __forceinline__ void adam(const AdamCoefficients& c, float& p, float g, float& m,
                                     float& v, float& vmax) {
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
    const float n = NESTEROV ? c.nm * m + c.ng * g : m;
    p = p - c.step_size * n / denom;
}

// The kernel families (mod.rs: family()): state slots, coefficients, the element update.
template <bool AMSGRAD, bool NESTEROV> struct AdamFamily {
    static constexpr int slots = AMSGRAD ? 3 : 2;
    using Coefficients = AdamCoefficients;
    static __device__ __forceinline__ Coefficients make(const GroupConfig& c, double lr,
                                                        unsigned long long t, float gscale,
                                                        const StepEntry& e) {
        return make_adam(c, lr, t, gscale, e);
    }
    static __device__ __forceinline__ void apply(const Coefficients& k, float& p, float g, float* s) {
        adam<AMSGRAD, NESTEROV>(k, p, g, s[0], s[1], s[2]);
    }
};

#ifdef FUSEDOPT_FAMILY
FUSEDOPT_FAMILY(adam, AdamFamily<false, false>)
FUSEDOPT_FAMILY(adam_amsgrad, AdamFamily<true, false>)
FUSEDOPT_FAMILY(adam_nesterov, AdamFamily<false, true>)
#endif

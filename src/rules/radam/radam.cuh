// RAdam on the GPU: math.rs beside it, line for line; mod.rs packs its GroupConfig.
#pragma once
#include "rules/common.cuh"

// GroupConfig::flags of a RAdam group (mod.rs: the same); params[0..5] = β1, β2, ε, eps_root,
// threshold.
enum : unsigned int {
    RADAM_EPS_RAW = 1u << 0,   // ε on the raw scale (PyTorch)
    RADAM_INCLUSIVE = 1u << 1, // ρ_t >= threshold (Optax)
    RADAM_NESTEROV = 1u << 2,  // Nesterov's m̂ (Optax)
    RADAM_AVERAGE = 1u << 3,   // m = β1·m + (1−β1)·g (Optax), not m + (1−β1)(g − m)
};

struct RadamCoefficients {
    float gscale;
    Decay decay;
    float beta1, one_minus_beta1, beta2, one_minus_beta2, nm, ng, step_size, plain_size, v_scale, eps,
        eps_root;
    int nesterov, rectified, average;
};

__device__ __forceinline__ RadamCoefficients make_radam(const GroupConfig& c, double lr,
                                                        unsigned long long t, float gscale, const StepEntry& e) {
    const double beta1 = momentum_or(e, c.params[0]), beta2 = c.params[1], eps = c.params[2],
                 eps_root = c.params[3], threshold = c.params[4];
    const double bc1 = 1.0 - powu(beta1, t);
    const double bc2 = 1.0 - powu(beta2, t);
    // ρ_t and the rectification (math.rs: rectification).
    const double rho_inf = 2.0 / (1.0 - beta2) - 1.0;
    const double b2t = powu(beta2, t);
    const double rho = rho_inf - 2.0 * (double)t * b2t / (1.0 - b2t);
    const bool on = (c.flags & RADAM_INCLUSIVE) ? rho >= threshold : rho > threshold;
    const double rect =
        sqrt((rho - 4.0) * (rho - 2.0) * rho_inf / ((rho_inf - 4.0) * (rho_inf - 2.0) * rho));
    const bool corrected = !(c.flags & RADAM_EPS_RAW);
    const bool nesterov = (c.flags & RADAM_NESTEROV) != 0;
    const double bc1_step = nesterov ? 1.0 : bc1;  // Nesterov's m̂ is corrected already
    RadamCoefficients s;
    s.gscale = gscale;
    s.decay = make_decay(c, lr);
    s.beta1 = (float)beta1;
    s.one_minus_beta1 = (float)(1.0 - beta1);
    s.beta2 = (float)beta2;
    s.one_minus_beta2 = (float)(1.0 - beta2);
    s.nesterov = nesterov;
    s.average = (c.flags & RADAM_AVERAGE) != 0;
    s.nm = (float)(beta1 / (1.0 - powu(beta1, t + 1)));
    s.ng = (float)((1.0 - beta1) / bc1);
    s.rectified = on;
    s.step_size = (float)(corrected ? lr * rect / bc1_step : lr * rect * sqrt(bc2) / bc1_step);
    s.plain_size = (float)(lr / bc1_step);
    s.v_scale = (float)(corrected ? 1.0 / bc2 : 1.0);
    s.eps = (float)eps;
    s.eps_root = (float)eps_root;
    return s;
}

__device__ __forceinline__ void radam(const RadamCoefficients& c, float& p, float g, float& m,
                                      float& v) {
    g = g * c.gscale;
    apply_decay(c.decay, p, g);
    m = c.average ? c.beta1 * m + c.one_minus_beta1 * g : m + c.one_minus_beta1 * (g - m);
    v = c.beta2 * v + c.one_minus_beta2 * (g * g);
    const float n = c.nesterov ? c.nm * m + c.ng * g : m;
    if (c.rectified) {
        const float denom = sqrtf(v * c.v_scale + c.eps_root) + c.eps;
        p = p - c.step_size * n / denom;
    } else {
        p = p - c.plain_size * n;
    }
}

// The kernel family (mod.rs: family()).
struct RadamFamily {
    static constexpr int slots = 2;
    using Coefficients = RadamCoefficients;
    static __device__ __forceinline__ Coefficients make(const GroupConfig& c, double lr,
                                                        unsigned long long t, float gscale,
                                                        const StepEntry& e) {
        return make_radam(c, lr, t, gscale, e);
    }
    static __device__ __forceinline__ void apply(const Coefficients& k, float& p, float g, float* s) {
        radam(k, p, g, s[0], s[1]);
    }
};

#ifdef FUSEDOPT_FAMILY
FUSEDOPT_FAMILY(radam, RadamFamily)
#endif

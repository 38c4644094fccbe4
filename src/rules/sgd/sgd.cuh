// SGD on the GPU: math.rs beside it, line for line; mod.rs packs its GroupConfig.
#pragma once
#include "rules/common.cuh"

// GroupConfig::flags of an SGD group (mod.rs: the same); params[0] = μ, params[1] = τ.
enum : unsigned int { SGD_NESTEROV = 1u << 0, SGD_COPY_FIRST = 1u << 1, SGD_LR_INSIDE = 1u << 2 };

struct SgdCoefficients {
    float gscale;
    Decay decay;
    float lr, momentum, keep, gin, ng, outer;
    int nesterov;
};

__device__ __forceinline__ SgdCoefficients make_sgd(const GroupConfig& c, double lr,
                                                    unsigned long long t, float gscale, const StepEntry& e) {
    const double momentum = momentum_or(e, c.params[0]), dampening = c.params[1];
    const bool first_copy = t == 1 && (c.flags & SGD_COPY_FIRST);
    const bool inside = c.flags & SGD_LR_INSIDE;
    const double lr_in = inside ? lr : 1.0;
    SgdCoefficients s;
    s.gscale = gscale;
    s.decay = make_decay(c, lr);
    s.lr = (float)lr;
    s.momentum = (float)momentum;
    s.keep = first_copy ? 0.0f : (float)momentum;
    s.gin = (float)((first_copy ? 1.0 : 1.0 - dampening) * lr_in);
    s.ng = (float)lr_in;
    s.outer = inside ? 1.0f : (float)lr;
    s.nesterov = (c.flags & SGD_NESTEROV) != 0;
    return s;
}

__device__ __forceinline__ void sgd_plain(const SgdCoefficients& c, float& p, float g) {
    g = g * c.gscale;
    apply_decay(c.decay, p, g);
    p = p - c.lr * g;
}

__device__ __forceinline__ void sgd_momentum(const SgdCoefficients& c, float& p, float g, float& b) {
    g = g * c.gscale;
    apply_decay(c.decay, p, g);
    b = c.keep * b + c.gin * g;
    const float d = c.nesterov ? c.ng * g + c.momentum * b : b;
    p = p - c.outer * d;
}

// The kernel families (mod.rs: family()): state slots, coefficients, the element update.
template <bool MOMENTUM> struct SgdFamily {
    static constexpr int slots = MOMENTUM ? 1 : 0;
    using Coefficients = SgdCoefficients;
    static __device__ __forceinline__ Coefficients make(const GroupConfig& c, double lr,
                                                        unsigned long long t, float gscale,
                                                        const StepEntry& e) {
        return make_sgd(c, lr, t, gscale, e);
    }
    static __device__ __forceinline__ void apply(const Coefficients& k, float& p, float g, float* s) {
        if (MOMENTUM) sgd_momentum(k, p, g, s[0]);
        else sgd_plain(k, p, g);
    }
};

#ifdef FUSEDOPT_FAMILY
FUSEDOPT_FAMILY(sgd_plain, SgdFamily<false>)
FUSEDOPT_FAMILY(sgd_momentum, SgdFamily<true>)
#endif

// Schedule-free SGD and AdamW on the GPU: math.rs beside it, line for line; mod.rs packs its
// GroupConfig and computes each step's averaging weight c, which arrives in the step's entry.
#pragma once
#include "rules/common.cuh"

// GroupConfig::flags of a schedule-free group (mod.rs: the same); params[0..4] = β1, β2, ε,
// warmup steps.
enum : unsigned int { SCHEDULE_FREE_EXPLICIT = 1u << 0 };

// torch.lerp(s, e, w) as PyTorch evaluates it: from the nearer end.
__device__ __forceinline__ float torch_lerp(float s, float e, float w) {
    return fabsf(w) < 0.5f ? s + w * (e - s) : e - (e - s) * (1.0f - w);
}

// Optax's warmup_constant_schedule(0, peak, steps) at step count `count`, in its f32 steps.
__device__ __forceinline__ float optax_warmup(double peak, unsigned long long count,
                                              unsigned long long steps) {
    const float p = (float)peak;
    if (count >= steps) return p;
    const float frac = 1.0f - (float)count / (float)steps;
    return -p * frac + p;
}

struct ScheduleFreeCoefficients {
    float gscale;
    Decay decay;  // coupled decay only: decoupled decay joins the direction
    float direction_decay;
    int explicit_form;
    float beta2, one_minus_beta2, bc2, eps;
    float lr, y_step;                                         // in place
    float neg_lr, beta1, one_minus_beta1, ck, one_minus_ck;   // explicit (and ck: in place)
    int first;  // the first applied step: z starts as the parameters then
};

__device__ __forceinline__ ScheduleFreeCoefficients make_schedule_free(
    const GroupConfig& c, double lr, unsigned long long t, float gscale, const StepEntry& e) {
    const double beta1 = c.params[0], beta2 = c.params[1], eps = c.params[2];
    const unsigned long long warmup = (unsigned long long)c.params[3];
    const double ck = e.scalars[0];
    ScheduleFreeCoefficients s;
    s.gscale = gscale;
    s.decay = make_decay(c, lr);
    s.direction_decay = 0.0f;
    if (c.decay_kind == DECAY_DECOUPLED) {
        s.decay.keep = 1.0f;
        s.direction_decay = (float)c.decay;
    }
    s.explicit_form = (c.flags & SCHEDULE_FREE_EXPLICIT) != 0;
    // Optax's base optimizer counts from 0, so its step t runs at the warmup's count t − 1.
    const double step_lr = s.explicit_form
                               ? (double)optax_warmup(lr, t - 1, warmup)
                               : lr * (t <= warmup ? (double)t / (double)warmup : 1.0);
    s.beta2 = (float)beta2;
    s.one_minus_beta2 = (float)(1.0 - beta2);
    s.bc2 = (float)(1.0 - powu(beta2, t));
    s.eps = (float)eps;
    s.lr = (float)step_lr;
    s.y_step = (float)(step_lr * (beta1 * (1.0 - ck) - 1.0));
    s.neg_lr = (float)(-step_lr);
    s.beta1 = (float)beta1;
    s.one_minus_beta1 = (float)(1.0 - beta1);
    s.ck = (float)ck;
    s.one_minus_ck = (float)(1.0 - ck);
    s.first = t == 1;
    return s;
}

// AdamW's direction at y for gradient g (second moment v updated).
__device__ __forceinline__ float schedule_free_adamw_direction(const ScheduleFreeCoefficients& c,
                                                               float y, float g, float& v) {
    float d;
    if (c.explicit_form) {
        v = c.one_minus_beta2 * (g * g) + c.beta2 * v;
        d = (1.0f / (sqrtf(v / c.bc2) + c.eps)) * g;
    } else {
        v = c.beta2 * v + c.one_minus_beta2 * g * g;
        d = g / (sqrtf(v / c.bc2) + c.eps);
    }
    return c.direction_decay != 0.0f ? d + c.direction_decay * y : d;
}

// Moves y and z along direction d.
__device__ __forceinline__ void schedule_free_step(const ScheduleFreeCoefficients& c, float& y,
                                                   float& z, float d) {
    if (c.explicit_form) {
        const float z1 = z + c.neg_lr * d;
        const float x0 = (y - c.one_minus_beta1 * z) / c.beta1;
        const float x = c.one_minus_ck * x0 + c.ck * z1;
        const float y1 = c.beta1 * x + c.one_minus_beta1 * z1;
        y = y + (y1 - y);
        z = z1;
    } else {
        y = torch_lerp(y, z, c.ck);
        y = y + c.y_step * d;
        z = z - c.lr * d;
    }
}

__device__ __forceinline__ void schedule_free_sgd(const ScheduleFreeCoefficients& c, float& y,
                                                  float g, float& z) {
    if (c.first) z = y;
    g = g * c.gscale;
    float y0 = y;
    apply_decay(c.decay, y0, g);
    schedule_free_step(c, y, z, g);
}

__device__ __forceinline__ void schedule_free_adamw(const ScheduleFreeCoefficients& c, float& y,
                                                    float g, float& z, float& v) {
    if (c.first) z = y;
    g = g * c.gscale;
    float y0 = y;
    apply_decay(c.decay, y0, g);
    const float d = schedule_free_adamw_direction(c, y, g, v);
    schedule_free_step(c, y, z, d);
}

// The kernel families (mod.rs: family()).
struct ScheduleFreeSgdFamily {
    static constexpr int slots = 1;
    using Coefficients = ScheduleFreeCoefficients;
    static __device__ __forceinline__ Coefficients make(const GroupConfig& c, double lr,
                                                        unsigned long long t, float gscale,
                                                        const StepEntry& e) {
        return make_schedule_free(c, lr, t, gscale, e);
    }
    static __device__ __forceinline__ void apply(const Coefficients& k, float& p, float g, float* s) {
        schedule_free_sgd(k, p, g, s[0]);
    }
};

struct ScheduleFreeAdamwFamily {
    static constexpr int slots = 2;
    using Coefficients = ScheduleFreeCoefficients;
    static __device__ __forceinline__ Coefficients make(const GroupConfig& c, double lr,
                                                        unsigned long long t, float gscale,
                                                        const StepEntry& e) {
        return make_schedule_free(c, lr, t, gscale, e);
    }
    static __device__ __forceinline__ void apply(const Coefficients& k, float& p, float g, float* s) {
        schedule_free_adamw(k, p, g, s[0], s[1]);
    }
};

#ifdef FUSEDOPT_FAMILY
FUSEDOPT_FAMILY(schedule_free_sgd, ScheduleFreeSgdFamily)
FUSEDOPT_FAMILY(schedule_free_adamw, ScheduleFreeAdamwFamily)
#endif

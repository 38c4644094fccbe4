// The step decision on the device: decide.rs beside it, line for line (see mod.rs). The norm
// pass's last block calls decide_step with Σg², so a step never waits for the host and a
// captured CUDA graph replays with new values.
#pragma once
#include "abi.cuh"

// Everything that changes from step to step (step/mod.rs::StepState), in device memory. The host
// writes `lr` (stream ordered, before the step) into a scalar of its own.
struct StepState {
    unsigned long long step;       // applied steps, including the one in flight once decided
    double loss_scale;             // gradients arrive multiplied by this
    unsigned long long good_steps; // applied steps since the loss scale last changed
    double norm;                   // pre-clip global L2 norm of the unscaled gradients
    double grad_scale;             // clip factor / loss scale: what every gradient is multiplied by
    double clip_factor;
    double step_loss_scale;        // the scale this step's gradients were divided by
    unsigned int skip;             // non-zero: this step leaves params and state untouched
    unsigned int done;             // norm-pass block counter (reset by its last block)
    unsigned int have_norm;        // non-zero: `norm` was computed by this step (it may be NaN)
    unsigned int pad;
};
static_assert(sizeof(StepState) == 72, "StepState");
ABI_FIELD(StepState, step, 0); ABI_FIELD(StepState, loss_scale, 8);
ABI_FIELD(StepState, good_steps, 16); ABI_FIELD(StepState, norm, 24);
ABI_FIELD(StepState, grad_scale, 32); ABI_FIELD(StepState, clip_factor, 40);
ABI_FIELD(StepState, step_loss_scale, 48); ABI_FIELD(StepState, skip, 56);
ABI_FIELD(StepState, done, 60); ABI_FIELD(StepState, have_norm, 64); ABI_FIELD(StepState, pad, 68);

// The codes of StepParams' fields (step/mod.rs: the same).
enum : int { CLIP_NONE = 0, CLIP_PYTORCH = 1, CLIP_KERAS = 2, CLIP_OPTAX = 3 };
enum : int { POLICY_SKIP = 0, POLICY_PROPAGATE = 1, POLICY_ERROR = 2 };

// The step-wide options (step/mod.rs::StepParams), passed by value to every launch.
struct StepParams {
    double max_norm;
    double growth_factor;
    double backoff_factor;
    unsigned long long growth_interval;
    int clip;          // CLIP_*
    int policy;        // POLICY_* (with POLICY_ERROR the host reads the skip back)
    int dynamic_scale; // 1: dynamic loss scaling
    int pad;
};
static_assert(sizeof(StepParams) == 48, "StepParams");
ABI_FIELD(StepParams, max_norm, 0); ABI_FIELD(StepParams, growth_factor, 8);
ABI_FIELD(StepParams, backoff_factor, 16); ABI_FIELD(StepParams, growth_interval, 24);
ABI_FIELD(StepParams, clip, 32); ABI_FIELD(StepParams, policy, 36);
ABI_FIELD(StepParams, dynamic_scale, 40); ABI_FIELD(StepParams, pad, 44);

// The clip factor of norm `n` under `q`'s formula.
__device__ inline double clip_factor(const StepParams& q, double n) {
    const double max = q.max_norm;
    switch (q.clip) {
        case CLIP_PYTORCH: {
            const double c = max / (n + 1e-6);
            return c != c ? c : fmin(c, 1.0);
        }
        // TensorFlow adds (n − n), which is NaN when n is not finite.
        case CLIP_KERAS: return max * fmin(1.0 / n, 1.0 / max) + (isfinite(n) ? 0.0 : nan(""));
        case CLIP_OPTAX: return n < max ? 1.0 : max / n;
        default: return 1.0;
    }
}

// Whether the step can divide by `s`: finite and positive, with a finite reciprocal, in f32.
__device__ inline bool usable_loss_scale(double s) {
    return s > 0.0 && isfinite((float)s) && isfinite((float)(1.0 / s)) && (float)s > 0.0f;
}

// Decides the step from Σg² of the (scaled) gradients; `have_norm` is false when no norm was
// needed (no clipping, non-finite values propagate, no dynamic scaling).
__device__ inline void decide_step(StepState* st, const StepParams& q, double sum_sq, bool have_norm) {
    st->step_loss_scale = st->loss_scale;
    const double inv_scale = 1.0 / st->loss_scale;
    const double n = have_norm ? sqrt(sum_sq) * inv_scale : 0.0;
    st->norm = n;
    st->have_norm = have_norm;
    const bool finite = !have_norm || isfinite(n);
    if (!finite && (q.dynamic_scale != 0 || q.policy != POLICY_PROPAGATE)) {
        st->skip = 1;
        st->clip_factor = 1.0;
        if (q.dynamic_scale != 0) {
            // Back off only while the scale stays usable.
            const double backed = st->loss_scale * q.backoff_factor;
            if (usable_loss_scale(backed)) st->loss_scale = backed;
            st->good_steps = 0;
        }
        return;
    }
    st->skip = 0;
    st->clip_factor = have_norm ? clip_factor(q, n) : 1.0;
    st->grad_scale = st->clip_factor * inv_scale;
    st->step += 1;
    if (q.dynamic_scale != 0) {
        st->good_steps += 1;
        if (st->good_steps >= q.growth_interval) {
            // As GradScaler: grow only while the scale stays finite in f32 (and usable).
            const double grown = st->loss_scale * q.growth_factor;
            if (usable_loss_scale(grown)) st->loss_scale = grown;
            st->good_steps = 0;
        }
    }
}

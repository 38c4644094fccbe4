// Global norm and non-finite detection in one deterministic pass. Each block writes the f64 sum of
// squares of its chunk; the last block to finish adds the partials, every thread a fixed strided
// share and then a fixed tree (the same bits every run), and decides the step in device memory:
// the norm, whether to skip, the clip factor, the loss scaler's update and the step count. No host
// synchronisation.
#include "multi_tensor.cuh"

// Step-wide options (src/cuda/abi.rs::NormParams), passed by value to every launch.
struct NormParams {
    double max_norm;
    double growth_factor;
    double backoff_factor;
    unsigned long long growth_interval;
    int clip_formula;  // 0 none, 1 PyTorch, 2 Keras/TF, 3 Optax (src/clip.rs)
    int policy;        // 0 skip, 1 propagate, 2 error (the host reads the skip back)
    int dynamic_scale; // 1: dynamic loss scaling
    int pad;
};
static_assert(sizeof(NormParams) == 48, "NormParams");
ABI_FIELD(NormParams, max_norm, 0); ABI_FIELD(NormParams, growth_factor, 8);
ABI_FIELD(NormParams, backoff_factor, 16); ABI_FIELD(NormParams, growth_interval, 24);
ABI_FIELD(NormParams, clip_formula, 32); ABI_FIELD(NormParams, policy, 36);
ABI_FIELD(NormParams, dynamic_scale, 40); ABI_FIELD(NormParams, pad, 44);

__device__ double clip_factor(const NormParams& q, double n) {
    switch (q.clip_formula) {
        case 1: {
            const double c = q.max_norm / (n + 1e-6);
            return c != c ? c : fmin(c, 1.0);
        }
        case 2: return q.max_norm * fmin(1.0 / n, 1.0 / q.max_norm) + (isfinite(n) ? 0.0 : nan(""));
        case 3: return n < q.max_norm ? 1.0 : q.max_norm / n;
        default: return 1.0;
    }
}

// Whether the step can divide by `s`: finite and positive, with a finite reciprocal, in f32.
__device__ __forceinline__ bool usable_loss_scale(double s) {
    return s > 0.0 && isfinite((float)s) && isfinite((float)(1.0 / s)) && (float)s > 0.0f;
}

// Decides the step from Σg² (of the scaled gradients); `have_norm` is false when no norm was
// needed (no clipping, non-finite values propagate, no dynamic scaling).
__device__ void decide_step(StepState* st, const NormParams& q, double sum_sq, bool have_norm) {
    st->step_loss_scale = st->loss_scale;
    const double inv_scale = 1.0 / st->loss_scale;
    const double n = have_norm ? sqrt(sum_sq) * inv_scale : 0.0;
    st->norm = n;
    st->have_norm = have_norm;
    const bool finite = !have_norm || isfinite(n);
    if (!finite && (q.dynamic_scale || q.policy != 1)) {
        st->skip = 1;
        st->clip_factor = 1.0;
        if (q.dynamic_scale) {
            // Back off only while the scale stays usable (usable_loss_scale in src/optim).
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
    if (q.dynamic_scale && ++st->good_steps >= q.growth_interval) {
        // As GradScaler: grow only while the scale stays finite in f32 (and usable).
        const double grown = st->loss_scale * q.growth_factor;
        if (usable_loss_scale(grown)) st->loss_scale = grown;
        st->good_steps = 0;
    }
}

// The block's sum of every thread's `v`, in a fixed order (valid on thread 0). Every thread of
// the block calls it; blockDim.x is a multiple of 32.
__device__ double block_sum(double v, double* warp_sums) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
    if ((threadIdx.x & 31) == 0) warp_sums[threadIdx.x >> 5] = v;
    __syncthreads();
    double sum = 0.0;
    if (threadIdx.x == 0)
        for (unsigned int w = 0; w < blockDim.x / 32; ++w) sum += warp_sums[w];
    return sum;
}

template <typename G>
__device__ void sum_of_squares(const G* g, unsigned long long len, unsigned int chunk_elems,
                               double* partials, StepState* st, NormParams q) {
    __shared__ double warp_sums[32];
    __shared__ bool last;
    const unsigned long long lo = (unsigned long long)blockIdx.x * chunk_elems;
    const unsigned long long hi = min(lo + chunk_elems, len);
    double acc = 0.0;
    for (unsigned long long i = lo + threadIdx.x; i < hi; i += blockDim.x) {
        const double x = to_f32(g[i]);
        acc += x * x;
    }
    const double sum = block_sum(acc, warp_sums);
    if (threadIdx.x == 0) {
        partials[blockIdx.x] = sum;
        __threadfence();
        last = atomicAdd(&st->done, 1u) == gridDim.x - 1;
    }
    __syncthreads();
    if (!last) return;  // the same for every thread of the block
    // The last block: every partial is visible (each block fenced before counting itself).
    __threadfence();
    double share = 0.0;
    for (unsigned int c = threadIdx.x; c < gridDim.x; c += blockDim.x) share += partials[c];
    const double total = block_sum(share, warp_sums);
    if (threadIdx.x == 0) {
        decide_step(st, q, total, true);
        st->done = 0;  // ready for the next step and for graph replay
    }
}

#define NORM_ENTRY(G, GN)                                                                        \
    extern "C" __global__ void __launch_bounds__(256) norm_##GN(                                 \
        const G* g, unsigned long long len, unsigned int chunk_elems, double* partials,          \
        StepState* st, NormParams q) {                                                           \
        sum_of_squares<G>(g, len, chunk_elems, partials, st, q);                                 \
    }
NORM_ENTRY(float, f32)
NORM_ENTRY(__nv_bfloat16, bf16)
NORM_ENTRY(__half, f16)

// For steps that need no norm: one thread decides the step.
extern "C" __global__ void advance_step(StepState* st, NormParams q) {
    if (threadIdx.x == 0 && blockIdx.x == 0) decide_step(st, q, 0.0, false);
}

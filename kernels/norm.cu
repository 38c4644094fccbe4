// Global norm and non-finite detection in one deterministic pass. Each block writes the f64 sum of
// squares of its chunk; the last block to finish adds the partials, every thread a fixed strided
// share and then a fixed tree (the same bits every run), and decides the step in device memory:
// the norm, whether to skip, the clip factor, the loss scaler's update and the step count. No host
// synchronisation. The decision itself is src/step/decide.cuh.
#include "multi_tensor.cuh"

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

// The sum of squares of block `blockIdx.x`'s chunk of `g`, written to `partials[blockIdx.x]`.
template <typename G>
__device__ void chunk_sum_of_squares(const G* g, unsigned long long len, unsigned int chunk_elems,
                                     double* partials, double* warp_sums) {
    const unsigned long long lo = (unsigned long long)blockIdx.x * chunk_elems;
    const unsigned long long hi = min(lo + chunk_elems, len);
    double acc = 0.0;
    for (unsigned long long i = lo + threadIdx.x; i < hi; i += blockDim.x) {
        const double x = to_f32(g[i]);
        acc += x * x;
    }
    const double sum = block_sum(acc, warp_sums);
    if (threadIdx.x == 0) partials[blockIdx.x] = sum;
}

// One block adds `n` partials, every thread a fixed strided share and then a fixed tree, and
// decides the step. Trailing zero partials change no bit: a sharded group gathers its shards'
// partials (padding included) and gets the unsharded step's total.
__device__ void decide_from_partials(const double* partials, unsigned int n, StepState* st,
                                     StepParams q, double* warp_sums) {
    double share = 0.0;
    for (unsigned int c = threadIdx.x; c < n; c += blockDim.x) share += partials[c];
    const double total = block_sum(share, warp_sums);
    if (threadIdx.x == 0) {
        decide_step(st, q, total, true);
        st->done = 0;  // ready for the next step and for graph replay
    }
}

template <typename G>
__device__ void sum_of_squares(const G* g, unsigned long long len, unsigned int chunk_elems,
                               double* partials, StepState* st, StepParams q) {
    __shared__ double warp_sums[32];
    __shared__ bool last;
    chunk_sum_of_squares<G>(g, len, chunk_elems, partials, warp_sums);
    if (threadIdx.x == 0) {
        __threadfence();
        last = atomicAdd(&st->done, 1u) == gridDim.x - 1;
    }
    __syncthreads();
    if (!last) return;  // the same for every thread of the block
    // The last block: every partial is visible (each block fenced before counting itself).
    __threadfence();
    decide_from_partials(partials, gridDim.x, st, q, warp_sums);
}

#define NORM_ENTRY(G, GN)                                                                        \
    extern "C" __global__ void __launch_bounds__(256) norm_##GN(                                 \
        const G* g, unsigned long long len, unsigned int chunk_elems, double* partials,          \
        StepState* st, StepParams q) {                                                           \
        sum_of_squares<G>(g, len, chunk_elems, partials, st, q);                                 \
    }                                                                                            \
    extern "C" __global__ void __launch_bounds__(256) partials_##GN(                             \
        const G* g, unsigned long long len, unsigned int chunk_elems, double* partials) {        \
        __shared__ double warp_sums[32];                                                         \
        chunk_sum_of_squares<G>(g, len, chunk_elems, partials, warp_sums);                       \
    }
NORM_ENTRY(float, f32)
NORM_ENTRY(__nv_bfloat16, bf16)
NORM_ENTRY(__half, f16)

// A sharded group's norm: the partials of every shard's chunks, gathered in arena order, added
// as the unsharded norm pass adds its own (one block of the norm pass's width).
extern "C" __global__ void __launch_bounds__(256) norm_of_partials(const double* partials,
                                                                  unsigned int n, StepState* st,
                                                                  StepParams q) {
    __shared__ double warp_sums[32];
    decide_from_partials(partials, n, st, q, warp_sums);
}

// For steps that need no norm: one thread decides the step.
extern "C" __global__ void advance_step(StepState* st, StepParams q) {
    if (threadIdx.x == 0 && blockIdx.x == 0) decide_step(st, q, 0.0, false);
}

// For the tests that compare the two deciders (tests/step_decision.rs): thread i decides case i.
extern "C" __global__ void decide_cases(StepState* states, const StepParams* params,
                                        const double* sums, const int* have_norm, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) decide_step(&states[i], params[i], sums[i], have_norm[i] != 0);
}

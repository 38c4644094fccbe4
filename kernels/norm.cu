// Global norm and non-finite detection in one deterministic pass: each block writes the f64 sum of
// squares of its chunk; the last block to finish adds the partials in chunk order (same bits every
// run), then computes the clip factor and the skip decision into device memory.
#include "multi_tensor.cuh"

// Clip formulas, as src/clip.rs: 0 none, 1 PyTorch, 2 Keras/TF, 3 Optax.
// Non-finite policy: 0 skip, 1 propagate, 2 error (reported as skip plus a non-finite norm).
struct NormParams {
    int clip_formula;
    double max_norm;
    float sign;  // -1 for maximize
    int policy;
};

__device__ double clip_factor(const NormParams& q, double n) {
    switch (q.clip_formula) {
        case 1: {
            const double c = q.max_norm / (n + 1e-6);
            return c != c ? c : fmin(c, 1.0);
        }
        case 2: return q.max_norm * fmin(1.0 / n, 1.0 / q.max_norm) + (n - n);
        case 3: return n < q.max_norm ? 1.0 : q.max_norm / n;
        default: return 1.0;
    }
}

extern "C" __global__ void chunk_sum_of_squares(const float* g, unsigned long long len,
                                                unsigned int chunk_elems, double* partials,
                                                unsigned int* done, NormParams q,
                                                StepScalars* out) {
    __shared__ double warp_sums[32];
    __shared__ bool last;
    const unsigned long long lo = (unsigned long long)blockIdx.x * chunk_elems;
    const unsigned long long hi = min(lo + chunk_elems, len);
    double acc = 0.0;
    for (unsigned long long i = lo + threadIdx.x; i < hi; i += blockDim.x) {
        const double x = g[i];
        acc += x * x;
    }
    for (int o = 16; o > 0; o >>= 1) acc += __shfl_down_sync(0xffffffffu, acc, o);
    if ((threadIdx.x & 31) == 0) warp_sums[threadIdx.x >> 5] = acc;
    __syncthreads();
    if (threadIdx.x == 0) {
        double sum = 0.0;
        for (unsigned int w = 0; w < (blockDim.x + 31) / 32; ++w) sum += warp_sums[w];
        partials[blockIdx.x] = sum;
        __threadfence();
        last = atomicAdd(done, 1u) == gridDim.x - 1;
    }
    __syncthreads();
    if (last && threadIdx.x == 0) {
        double total = 0.0;
        for (unsigned int c = 0; c < gridDim.x; ++c) total += partials[c];
        const double n = sqrt(total);
        const bool finite = isfinite(n);
        out->norm = n;
        out->skip = (!finite && q.policy != 1) ? 1 : 0;
        out->grad_scale = (float)(clip_factor(q, n) * q.sign);
        *done = 0;  // ready for the next step (and for graph replay)
    }
}

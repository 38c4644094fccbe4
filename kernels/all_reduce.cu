// Collectives among replicas that share one device (src/comm/single_device.rs): every rank's
// buffer is read in rank order and the combination written back, rounding exactly as the CPU
// communicator does (each contribution × scale in f32, summed from 0 in rank order, rounded to
// the buffer's dtype once), so the two agree bit for bit.
#include "multi_tensor.cuh"

#define MAX_RANKS 16

struct RankBuffers {
    unsigned long long input[MAX_RANKS];
    unsigned long long output[MAX_RANKS];
};

// shard_len == 0: every rank's output receives all `len` results (all-reduce).
// shard_len > 0: rank r's output receives results [r * shard_len, (r + 1) * shard_len)
// (reduce-scatter).
template <typename T>
__device__ __forceinline__ void reduce_ranks(const RankBuffers& b, unsigned int ranks,
                                             unsigned long long len, float scale,
                                             unsigned long long shard_len) {
    const unsigned long long stride = (unsigned long long)gridDim.x * blockDim.x;
    for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; i < len;
         i += stride) {
        float acc = 0.0f;
        for (unsigned int r = 0; r < ranks; ++r) {
            acc += to_f32(reinterpret_cast<const T*>(b.input[r])[i]) * scale;
        }
        const T out = from_f32<T>(acc);
        if (shard_len == 0) {
            for (unsigned int r = 0; r < ranks; ++r) reinterpret_cast<T*>(b.output[r])[i] = out;
        } else {
            const unsigned long long r = i / shard_len;
            reinterpret_cast<T*>(b.output[r])[i - r * shard_len] = out;
        }
    }
}

#define REDUCE_RANKS_ENTRY(NAME, T)                                                              \
    extern "C" __global__ void __launch_bounds__(256)                                            \
        NAME(RankBuffers b, unsigned int ranks, unsigned long long len, float scale,             \
             unsigned long long shard_len) {                                                     \
        reduce_ranks<T>(b, ranks, len, scale, shard_len);                                        \
    }

REDUCE_RANKS_ENTRY(reduce_ranks_f32, float)
REDUCE_RANKS_ENTRY(reduce_ranks_bf16, __nv_bfloat16)
REDUCE_RANKS_ENTRY(reduce_ranks_f16, __half)

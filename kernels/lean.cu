// Lean state on the device, element and block by block (src/lean/lean.cuh): quantizing state into
// blocks of codes and scales and back (so moments can be read out on the device), fp32 masters
// split into bf16 weights and remainders and joined back, stochastic rounding to bf16. The tests
// compare each with the CPU's (src/lean/*.rs) bit for bit.
#include "lean/lean.cuh"

// One CUDA block per quantization block of `block` elements (at most 256, a multiple of 32): its
// scale from the largest magnitude, reduced over warps, then each element's code.
extern "C" __global__ void __launch_bounds__(256) lean_quantize_blocks(
    const float* x, unsigned long long n, unsigned int block, const float* table,
    unsigned int table_len, unsigned char* codes, float* scales) {
    __shared__ float warp_max[8];
    __shared__ float scale;
    const unsigned long long i = (unsigned long long)blockIdx.x * block + threadIdx.x;
    const float v = (threadIdx.x < block && i < n) ? x[i] : 0.0f;
    float m = lean_max_abs(0.0f, v);
    for (int o = 16; o > 0; o >>= 1) m = lean_max_abs(m, __shfl_down_sync(0xffffffffu, m, o));
    if ((threadIdx.x & 31) == 0) warp_max[threadIdx.x >> 5] = m;
    __syncthreads();
    if (threadIdx.x == 0) {
        float all = 0.0f;
        for (unsigned int w = 0; w < blockDim.x / 32; ++w) all = lean_max_abs(all, warp_max[w]);
        scale = lean_scale(all);
        scales[blockIdx.x] = scale;
    }
    __syncthreads();
    if (threadIdx.x < block && i < n) codes[i] = (unsigned char)lean_code_of(table, table_len, v / scale);
}

extern "C" __global__ void lean_dequantize_blocks(const unsigned char* codes, const float* scales,
                                                  unsigned long long n, unsigned int block,
                                                  const float* table, unsigned int table_len,
                                                  float* out) {
    for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (unsigned long long)gridDim.x * blockDim.x)
        out[i] = table[codes[i] & (table_len - 1)] * scales[i / block];
}

extern "C" __global__ void lean_split_masters(const float* masters, unsigned long long n,
                                              unsigned short* weights, short* remainders) {
    for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (unsigned long long)gridDim.x * blockDim.x)
        lean_split_master(masters[i], &weights[i], &remainders[i]);
}

extern "C" __global__ void lean_join_masters(const unsigned short* weights, const short* remainders,
                                             unsigned long long n, float* masters) {
    for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (unsigned long long)gridDim.x * blockDim.x)
        masters[i] = lean_join_master(weights[i], remainders[i]);
}

extern "C" __global__ void lean_stochastic_round(const float* x, unsigned long long n,
                                                 unsigned long long seed, unsigned long long step,
                                                 unsigned short* out) {
    for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (unsigned long long)gridDim.x * blockDim.x)
        out[i] = lean_round_bf16(x[i], lean_draw(seed, step, i));
}

// The multi-tensor launch plan on the device: one block per segment of the plan (a run of arena
// elements inside one chunk and one parameter group), built once per parameter set and kept in
// device memory, so a step is one launch whatever the number of tensors.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include "abi.cuh"
#include "step/decide.cuh"

struct Segment {
    unsigned long long start;  // 64-bit: arenas may pass 2^31 elements
    unsigned int len;
    unsigned int group;
};
static_assert(sizeof(Segment) == 16, "Segment");
ABI_FIELD(Segment, start, 0); ABI_FIELD(Segment, len, 8); ABI_FIELD(Segment, group, 12);

// Widening loads and narrowing stores (round to nearest even) for every storage dtype.
__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_f32(__half x) { return __half2float(x); }
template <typename T> __device__ __forceinline__ T from_f32(float x);
template <> __device__ __forceinline__ float from_f32<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float x) {
    return __float2bfloat16_rn(x);
}
template <> __device__ __forceinline__ __half from_f32<__half>(float x) { return __float2half_rn(x); }

// Four consecutive elements as fp32: one 16-byte load for f32, one 8-byte load for 2-byte types.
template <typename T> struct Quad;
template <> struct Quad<float> {
    static __device__ __forceinline__ float4 load(const float* p) {
        return *reinterpret_cast<const float4*>(p);
    }
    static __device__ __forceinline__ void store(float* p, float4 v) {
        *reinterpret_cast<float4*>(p) = v;
    }
};
template <typename H> struct QuadHalf {
    static __device__ __forceinline__ float4 load(const H* p) {
        const uint2 raw = *reinterpret_cast<const uint2*>(p);
        const H* h = reinterpret_cast<const H*>(&raw);
        return make_float4(to_f32(h[0]), to_f32(h[1]), to_f32(h[2]), to_f32(h[3]));
    }
    static __device__ __forceinline__ void store(H* p, float4 v) {
        uint2 raw;
        H* h = reinterpret_cast<H*>(&raw);
        h[0] = from_f32<H>(v.x); h[1] = from_f32<H>(v.y);
        h[2] = from_f32<H>(v.z); h[3] = from_f32<H>(v.w);
        *reinterpret_cast<uint2*>(p) = raw;
    }
};
template <> struct Quad<__nv_bfloat16> : QuadHalf<__nv_bfloat16> {};
template <> struct Quad<__half> : QuadHalf<__half> {};

__device__ __forceinline__ float& lane(float4& v, int k) { return (&v.x)[k]; }

// Applies `f(i)` to every element of a segment: 4-wide for the aligned body (every tensor starts
// on a 64-byte boundary), scalar for the tail.
template <typename F4, typename F1>
__device__ __forceinline__ void for_each_element(const Segment& s, F4 f4, F1 f1) {
    const unsigned int vec = s.len / 4;
    for (unsigned int v = threadIdx.x; v < vec; v += blockDim.x) f4(s.start + 4ull * v);
    for (unsigned int i = 4 * vec + threadIdx.x; i < s.len; i += blockDim.x) f1(s.start + i);
}

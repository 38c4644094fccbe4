// Stand-in for CUDA's <cuda_fp16.h> on the emulated GPU: the storage type with CUDA's size and
// alignment, its conversions (round to nearest even, as on the GPU) and its warp shuffles.
#pragma once

#include "cuda_emu_device.h"
#include "emu_half_bits.h"

struct alignas(2) __half {
    unsigned short __x;
    __half() = default;
    __half(float f) : __x(emu::f32_to_f16_rn(f)) {}
    operator float() const { return emu::f16_to_f32(__x); }
};
typedef __half half;

static inline __half __float2half_rn(float f) {
    __half h;
    h.__x = emu::f32_to_f16_rn(f);
    return h;
}
static inline __half __float2half(float f) { return __float2half_rn(f); }
static inline float __half2float(__half h) { return emu::f16_to_f32(h.__x); }

#define EMU_F16_SHUFFLES                                                                            \
    static inline __half emu_shfl_sync(const char* f, int l, unsigned int m, __half v, \
                                              int s, int w = 32) {                                   \
        return ::emu::shuffle(::emu::WarpOp::ShflIdx, m, v, s, w, f, l);                             \
    }                                                                                                \
    static inline __half emu_shfl_down_sync(const char* f, int l, unsigned int m,             \
                                                   __half v, unsigned int d, int w = 32) {    \
        return ::emu::shuffle(::emu::WarpOp::ShflDown, m, v, (int)d, w, f, l);                       \
    }                                                                                                \
    static inline __half emu_shfl_up_sync(const char* f, int l, unsigned int m,               \
                                                 __half v, unsigned int d, int w = 32) {      \
        return ::emu::shuffle(::emu::WarpOp::ShflUp, m, v, (int)d, w, f, l);                         \
    }                                                                                                \
    static inline __half emu_shfl_xor_sync(const char* f, int l, unsigned int m,              \
                                                  __half v, int x, int w = 32) {              \
        return ::emu::shuffle(::emu::WarpOp::ShflXor, m, v, x, w, f, l);                             \
    }
EMU_F16_SHUFFLES
#undef EMU_F16_SHUFFLES

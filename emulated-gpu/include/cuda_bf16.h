// Stand-in for CUDA's <cuda_bf16.h> on the emulated GPU: the storage type with CUDA's size and
// alignment, its conversions (round to nearest even, as on the GPU) and its warp shuffles.
#pragma once

#include "cuda_emu_device.h"
#include "emu_half_bits.h"

struct alignas(2) __nv_bfloat16 {
    unsigned short __x;
    __nv_bfloat16() = default;
    __nv_bfloat16(float f) : __x(emu::f32_to_bf16_rn(f)) {}
    operator float() const { return emu::bf16_to_f32(__x); }
};
typedef __nv_bfloat16 nv_bfloat16;

static inline __nv_bfloat16 __float2bfloat16_rn(float f) {
    __nv_bfloat16 h;
    h.__x = emu::f32_to_bf16_rn(f);
    return h;
}
static inline __nv_bfloat16 __float2bfloat16(float f) { return __float2bfloat16_rn(f); }
static inline float __bfloat162float(__nv_bfloat16 h) { return emu::bf16_to_f32(h.__x); }

#define EMU_BF16_SHUFFLES                                                                            \
    static inline __nv_bfloat16 emu_shfl_sync(const char* f, int l, unsigned int m, __nv_bfloat16 v, \
                                              int s, int w = 32) {                                   \
        return ::emu::shuffle(::emu::WarpOp::ShflIdx, m, v, s, w, f, l);                             \
    }                                                                                                \
    static inline __nv_bfloat16 emu_shfl_down_sync(const char* f, int l, unsigned int m,             \
                                                   __nv_bfloat16 v, unsigned int d, int w = 32) {    \
        return ::emu::shuffle(::emu::WarpOp::ShflDown, m, v, (int)d, w, f, l);                       \
    }                                                                                                \
    static inline __nv_bfloat16 emu_shfl_up_sync(const char* f, int l, unsigned int m,               \
                                                 __nv_bfloat16 v, unsigned int d, int w = 32) {      \
        return ::emu::shuffle(::emu::WarpOp::ShflUp, m, v, (int)d, w, f, l);                         \
    }                                                                                                \
    static inline __nv_bfloat16 emu_shfl_xor_sync(const char* f, int l, unsigned int m,              \
                                                  __nv_bfloat16 v, int x, int w = 32) {              \
        return ::emu::shuffle(::emu::WarpOp::ShflXor, m, v, x, w, f, l);                             \
    }
EMU_BF16_SHUFFLES
#undef EMU_BF16_SHUFFLES

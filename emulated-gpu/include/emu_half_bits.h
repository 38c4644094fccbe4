// Bit-exact conversions between f32 and the 16-bit storage types, as CUDA's intrinsics round them:
// round to nearest even, overflow to infinity, NaN to the canonical 0x7FFF.
#pragma once

#include <string.h>

namespace emu {
static inline unsigned int f32_bits(float f) {
    unsigned int x;
    memcpy(&x, &f, 4);
    return x;
}
static inline float f32_from_bits(unsigned int x) {
    float f;
    memcpy(&f, &x, 4);
    return f;
}

static inline unsigned short f32_to_bf16_rn(float f) {
    const unsigned int x = f32_bits(f);
    if ((x & 0x7fffffffu) > 0x7f800000u) return 0x7fffu;
    return (unsigned short)((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}
static inline float bf16_to_f32(unsigned short h) { return f32_from_bits((unsigned int)h << 16); }

static inline unsigned short f32_to_f16_rn(float f) {
    const unsigned int x = f32_bits(f);
    const unsigned int sign = (x >> 16) & 0x8000u;
    const unsigned int ax = x & 0x7fffffffu;
    if (ax > 0x7f800000u) return 0x7fffu;                       // NaN
    if (ax >= 0x477ff000u) return (unsigned short)(sign | 0x7c00u);  // rounds past 65504
    if (ax <= 0x33000000u) return (unsigned short)sign;         // at most 2^-25: rounds to zero
    unsigned int h, rem, half;
    if (ax < 0x38800000u) {  // below 2^-14: a subnormal half
        const unsigned int e = ax >> 23, m = (ax & 0x7fffffu) | 0x800000u, shift = 126 - e;
        h = m >> shift;
        rem = m & ((1u << shift) - 1);
        half = 1u << (shift - 1);
    } else {
        h = (ax >> 13) - (112u << 10);
        rem = ax & 0x1fffu;
        half = 0x1000u;
    }
    if (rem > half || (rem == half && (h & 1u))) h += 1;  // a carry into the exponent is right
    return (unsigned short)(sign | h);
}
static inline float f16_to_f32(unsigned short h) {
    const unsigned int sign = (unsigned int)(h & 0x8000u) << 16;
    const unsigned int e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
    if (e == 0x1f) return f32_from_bits(sign | 0x7f800000u | (m << 13));
    if (e != 0) return f32_from_bits(sign | ((e + 112u) << 23) | (m << 13));
    // zero or subnormal: m × 2^-24, exact in f32
    const float v = (float)m * 5.9604644775390625e-08f;
    return sign ? -v : v;
}
}  // namespace emu

// Lean state's building blocks on the GPU: quantize.rs, remainder.rs and stochastic.rs beside it,
// line for line (the code tables come from the host: qmap.rs is their one copy).
#pragma once

// The code of `x` (already divided by its block's scale) in the ascending `table` of `len`
// entries (a power of two): the nearest entry, the upper one exactly halfway, by f32 comparisons
// in torchao's order. The search finds the largest k with table[k] <= x (0 below the table).
__device__ __forceinline__ unsigned int lean_code_of(const float* table, unsigned int len, float x) {
    unsigned int k = 0;
    for (unsigned int step = len / 2; step > 0; step /= 2)
        if (x >= table[k + step]) k += step;
    if (k + 1 >= len) return k;
    const bool up = x - table[k] >= (table[k + 1] - table[k]) * 0.5f;
    return k + (up ? 1u : 0u);
}

// The block scale from its largest magnitude `absmax` (NaN propagated): at least 1e-12.
__device__ __forceinline__ float lean_scale(float absmax) {
    return absmax != absmax ? absmax : fmaxf(absmax, 1e-12f);
}

// max of magnitudes that keeps a NaN (as amax does).
__device__ __forceinline__ float lean_max_abs(float m, float v) {
    const float a = fabsf(v);
    return (a > m || a != a) ? a : m;
}

// An fp32 master as its bf16 weight (high 16 bits, plus one when the remainder's top bit is set)
// and its remainder (the low 16 bits); joined back exactly.
__device__ __forceinline__ void lean_split_master(float master, unsigned short* weight, short* remainder) {
    const unsigned int bits = __float_as_uint(master);
    const short r = (short)(bits & 0xFFFFu);
    *remainder = r;
    *weight = (unsigned short)((bits >> 16) + (r < 0 ? 1u : 0u));
}

__device__ __forceinline__ float lean_join_master(unsigned short weight, short remainder) {
    const unsigned short high = (unsigned short)(weight - (remainder < 0 ? 1u : 0u));
    return __uint_as_float(((unsigned int)high << 16) | (unsigned short)remainder);
}

// Philox4x32-10 of `c` under key (k0, k1), in place.
__device__ __forceinline__ void lean_philox4x32_10(unsigned int c[4], unsigned int k0, unsigned int k1) {
    for (int round = 0; round < 10; ++round) {
        if (round > 0) {
            k0 += 0x9E3779B9u;
            k1 += 0xBB67AE85u;
        }
        const unsigned long long p0 = 0xD2511F53ull * c[0];
        const unsigned long long p1 = 0xCD9E8D57ull * c[2];
        const unsigned int n0 = (unsigned int)(p1 >> 32) ^ c[1] ^ k0;
        const unsigned int n2 = (unsigned int)(p0 >> 32) ^ c[3] ^ k1;
        c[0] = n0;
        c[1] = (unsigned int)p1;
        c[2] = n2;
        c[3] = (unsigned int)p0;
    }
}

// The Philox output for elements 8 * group .. 8 * group + 7 at step `step` of stream `seed`: the
// draw of element 8 * group + l is its 16-bit half l % 2 of word l / 2.
__device__ __forceinline__ void lean_draws(unsigned long long seed, unsigned long long step,
                                           unsigned long long group, unsigned int c[4]) {
    c[0] = (unsigned int)group;
    c[1] = (unsigned int)(group >> 32);
    c[2] = (unsigned int)step;
    c[3] = (unsigned int)(step >> 32);
    lean_philox4x32_10(c, (unsigned int)seed, (unsigned int)(seed >> 32));
}

// Lane `lane` (0..7) of a Philox output: its 16-bit draw.
__device__ __forceinline__ unsigned int lean_draw_of(const unsigned int c[4], unsigned int lane) {
    return (c[lane / 2] >> (16 * (lane % 2))) & 0xFFFFu;
}

// The 16-bit draw of element `index` at step `step` of the stream `seed`: lane index % 8 of the
// Philox output for counter (index / 8, step).
__device__ __forceinline__ unsigned int lean_draw(unsigned long long seed, unsigned long long step,
                                                  unsigned long long index) {
    unsigned int c[4];
    lean_draws(seed, step, index / 8, c);
    return lean_draw_of(c, (unsigned int)(index % 8));
}

// `x` rounded to bf16 bits by the draw `r`: up in magnitude when `r` is below its low 16 bits.
__device__ __forceinline__ unsigned short lean_round_bf16(float x, unsigned int r) {
    if (x != x) return 0x7FC0u;  // bf16's canonical NaN
    const unsigned int bits = __float_as_uint(x);
    const unsigned int truncated = bits & 0xFFFF0000u;
    const unsigned int rounded = r < (bits & 0xFFFFu) ? truncated + 0x10000u : truncated;
    return (unsigned short)(rounded >> 16);
}

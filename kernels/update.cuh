// The fused update template: one launch walks every segment of the launch plan and applies its
// group's rule to parameters, gradients and state in one pass, writing the optional bf16/f16
// model copy in the same pass. Coefficients are built per block from the group's config and the
// step state in device memory (so a captured graph replays with the current lr and step). The lr
// (and a rule's host-computed scalars) come from a ring the host fills ahead, indexed by the
// step's own applied-step count, so a schedule follows applied steps without the host knowing
// which applied. A rule's kernel family (src/rules/*/*.cuh, or a custom rule's generated one) and
// the gradient and state dtypes are template parameters; every entry point has the same signature.
#pragma once
#include "lean/lean.cuh"
#include "multi_tensor.cuh"
#include "rules/common.cuh"

// One element's stochastic rounding, out of line: the quantized update stores its elements one
// by one in unrolled loops, and Philox inlined at each would multiply the kernels' code.
__device__ __noinline__ unsigned short round_stochastic(float v, unsigned long long seed,
                                                         unsigned long long step,
                                                         unsigned long long i) {
    return lean_round_bf16(v, lean_draw(seed, step, i));
}

// Where the parameters are (src/host/weights.rs, the CPU's; `WeightArgs` in src/cuda/masters.rs
// passes the same kinds): the fp32 masters `p` alone, or with a bf16 or f16 model copy in `model`;
// bf16 weights in `model` and int16 remainders `rem`, joined into the exact fp32 master and split
// again; bf16 weights alone, rounded back stochastically from the stream `seed` at the step's
// count `step`, element i drawing as arena element `first + i` of the whole set (a shard's
// window starts at `first`, a multiple of 8). The rule's maths always sees fp32 masters.
enum WeightsKind : int {
    WEIGHTS_MASTERS = 0,
    WEIGHTS_MASTERS_BF16_COPY = 1,
    WEIGHTS_MASTERS_F16_COPY = 2,
    WEIGHTS_REMAINDERS = 3,
    WEIGHTS_STOCHASTIC = 4,
};

struct Weights {
    float* p;
    void* model;
    short* rem;
    unsigned long long seed, first, step;
    int kind;

    // The bf16 weights as raw bits (what the remainder scheme and the rounding work on).
    __device__ __forceinline__ unsigned short* bits() const {
        return static_cast<unsigned short*>(model);
    }
    __device__ __forceinline__ float load1(unsigned long long i) const {
        if (kind == WEIGHTS_REMAINDERS) return lean_join_master(bits()[i], rem[i]);
        if (kind == WEIGHTS_STOCHASTIC) return __uint_as_float((unsigned int)bits()[i] << 16);
        return p[i];
    }
    __device__ __forceinline__ void store1(unsigned long long i, float v) const {
        if (kind == WEIGHTS_REMAINDERS) {
            lean_split_master(v, &bits()[i], &rem[i]);
        } else if (kind == WEIGHTS_STOCHASTIC) {
            bits()[i] = round_stochastic(v, seed, step, first + i);
        } else {
            p[i] = v;
            if (kind == WEIGHTS_MASTERS_BF16_COPY)
                static_cast<__nv_bfloat16*>(model)[i] = __float2bfloat16_rn(v);
            else if (kind == WEIGHTS_MASTERS_F16_COPY)
                static_cast<__half*>(model)[i] = __float2half_rn(v);
        }
    }
    // Four elements from `i`, a multiple of 4: one 8-byte access to the weights and one to the
    // remainders; the four draws come from one Philox output (lanes i % 8 .. i % 8 + 3).
    __device__ __forceinline__ float4 load4(unsigned long long i) const {
        if (kind < WEIGHTS_REMAINDERS) return Quad<float>::load(p + i);
        const uint2 w = *reinterpret_cast<const uint2*>(bits() + i);
        const unsigned short h[4] = {(unsigned short)w.x, (unsigned short)(w.x >> 16),
                                     (unsigned short)w.y, (unsigned short)(w.y >> 16)};
        float4 v;
        if (kind == WEIGHTS_STOCHASTIC) {
#pragma unroll
            for (int j = 0; j < 4; ++j) lane(v, j) = __uint_as_float((unsigned int)h[j] << 16);
            return v;
        }
        const uint2 r = *reinterpret_cast<const uint2*>(rem + i);
        const short l[4] = {(short)r.x, (short)(r.x >> 16), (short)r.y, (short)(r.y >> 16)};
#pragma unroll
        for (int j = 0; j < 4; ++j) lane(v, j) = lean_join_master(h[j], l[j]);
        return v;
    }
    __device__ __forceinline__ void store4(unsigned long long i, float4 v) const {
        if (kind < WEIGHTS_REMAINDERS) {
            Quad<float>::store(p + i, v);
            if (kind == WEIGHTS_MASTERS_BF16_COPY)
                Quad<__nv_bfloat16>::store(static_cast<__nv_bfloat16*>(model) + i, v);
            else if (kind == WEIGHTS_MASTERS_F16_COPY)
                Quad<__half>::store(static_cast<__half*>(model) + i, v);
            return;
        }
        unsigned short w[4];
        if (kind == WEIGHTS_REMAINDERS) {
            short r[4];
#pragma unroll
            for (int j = 0; j < 4; ++j) lean_split_master(lane(v, j), &w[j], &r[j]);
            *reinterpret_cast<uint2*>(rem + i) =
                make_uint2((unsigned short)r[0] | ((unsigned int)(unsigned short)r[1] << 16),
                           (unsigned short)r[2] | ((unsigned int)(unsigned short)r[3] << 16));
        } else {
            unsigned int c[4];
            lean_draws(seed, step, (first + i) / 8, c);
            const unsigned int at = (unsigned int)(i % 8);
#pragma unroll
            for (int j = 0; j < 4; ++j) w[j] = lean_round_bf16(lane(v, j), lean_draw_of(c, at + j));
        }
        *reinterpret_cast<uint2*>(bits() + i) =
            make_uint2(w[0] | ((unsigned int)w[1] << 16), w[2] | ((unsigned int)w[3] << 16));
    }
};

// F is a kernel family: F::slots state buffers (s0, s1, s2 in slot order; the rest null and never
// touched), F::make builds the group's coefficients, F::apply updates one element.
template <typename F, typename G, typename S>
__device__ void update(const Segment* segs, const GroupConfig* cfgs, const StepState* st,
                       const StepEntry* ring, unsigned int ring_len, const Weights& w,
                       const G* g, S* s0, S* s1, S* s2) {
    if (st->skip) return;
    const Segment seg = segs[blockIdx.x];
    const GroupConfig cfg = cfgs[seg.group];
    // An applied step has counted itself: its count is step - 1.
    const StepEntry& e = ring[(st->step - 1) % ring_len];
    const typename F::Coefficients k = F::make(cfg, e.lr * cfg.lr_scale, st->step,
                                               (float)(st->grad_scale * cfg.sign), e);
    constexpr int n = F::slots;
    for_each_element(
        seg,
        [&](unsigned long long i) {
            float4 pv = w.load4(i);
            float4 gv = Quad<G>::load(g + i);
            float4 av = n > 0 ? Quad<S>::load(s0 + i) : make_float4(0.f, 0.f, 0.f, 0.f);
            float4 bv = n > 1 ? Quad<S>::load(s1 + i) : make_float4(0.f, 0.f, 0.f, 0.f);
            float4 xv = n > 2 ? Quad<S>::load(s2 + i) : make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                float s[3] = {lane(av, j), lane(bv, j), lane(xv, j)};
                F::apply(k, lane(pv, j), lane(gv, j), s);
                lane(av, j) = s[0];
                lane(bv, j) = s[1];
                lane(xv, j) = s[2];
            }
            w.store4(i, pv);
            if (n > 0) Quad<S>::store(s0 + i, av);
            if (n > 1) Quad<S>::store(s1 + i, bv);
            if (n > 2) Quad<S>::store(s2 + i, xv);
        },
        [&](unsigned long long i) {
            float pe = w.load1(i);
            float s[3] = {n > 0 ? to_f32(s0[i]) : 0.f, n > 1 ? to_f32(s1[i]) : 0.f,
                          n > 2 ? to_f32(s2[i]) : 0.f};
            F::apply(k, pe, to_f32(g[i]), s);
            w.store1(i, pe);
            if (n > 0) s0[i] = from_f32<S>(s[0]);
            if (n > 1) s1[i] = from_f32<S>(s[1]);
            if (n > 2) s2[i] = from_f32<S>(s[2]);
        });
}

// A run of one chunk's elements in one group, all coded or all f32 (`Piece` in
// host/quantized_state.rs); `full` is where an f32 run's state starts in every buffer's f32 part.
struct Piece {
    unsigned long long start;
    unsigned long long full;
    unsigned int len;
    unsigned int group;
    unsigned int coded;
    unsigned int unused;
};
static_assert(sizeof(Piece) == 32, "Piece");
ABI_FIELD(Piece, start, 0); ABI_FIELD(Piece, full, 8); ABI_FIELD(Piece, len, 16);
ABI_FIELD(Piece, group, 20); ABI_FIELD(Piece, coded, 24);

// The fused update over quantized state (host/quantized.rs, the CPU's): each buffer `q` is codes
// `c[q]` (BITS 8: one byte per element in blocks of 256; BITS 4: two per byte, the even element in
// the high nibble, in blocks of 128), one scale per block `sc[q]`, the f32 part `f[q]` and its code
// table `t[q]`. One warp per block: each lane decodes its consecutive elements, updates them with
// the rule's own maths, and the warp's largest magnitude is the block's new scale.
template <typename F, typename G, int BITS>
__device__ void update_quantized(const Piece* pieces, const GroupConfig* cfgs, const StepState* st,
                                 const StepEntry* ring, unsigned int ring_len, const Weights& w,
                                 const G* g, unsigned char* const* c, float* const* sc,
                                 float* const* f, const float* const* t) {
    if (st->skip) return;
    const Piece piece = pieces[blockIdx.x];
    const GroupConfig cfg = cfgs[piece.group];
    const StepEntry& e = ring[(st->step - 1) % ring_len];
    const typename F::Coefficients k = F::make(cfg, e.lr * cfg.lr_scale, st->step,
                                               (float)(st->grad_scale * cfg.sign), e);
    constexpr int n = F::slots;
    if (!piece.coded) {
        for (unsigned int j = threadIdx.x; j < piece.len; j += blockDim.x) {
            const unsigned long long i = piece.start + j, at = piece.full + j;
            float pe = w.load1(i);
            float s[3] = {n > 0 ? f[0][at] : 0.f, n > 1 ? f[1][at] : 0.f, n > 2 ? f[2][at] : 0.f};
            F::apply(k, pe, to_f32(g[i]), s);
            w.store1(i, pe);
#pragma unroll
            for (int q = 0; q < n; ++q) f[q][at] = s[q];
        }
        return;
    }
    constexpr unsigned int B = BITS == 8 ? 256 : 128, E = B / 32, LEN = 1u << BITS;
    const unsigned int lane = threadIdx.x % 32, warps = blockDim.x / 32;
    for (unsigned int b = threadIdx.x / 32; b * B < piece.len; b += warps) {
        const unsigned long long first = piece.start + (unsigned long long)b * B;
        const unsigned long long block = first / B, at = first + lane * E;
        float v[3][E];
#pragma unroll
        for (int q = 0; q < n; ++q) {
            const float scale = sc[q][block];
#pragma unroll
            for (unsigned int j = 0; j < E; ++j) {
                const unsigned long long i = at + j;
                const unsigned int code = BITS == 8 ? c[q][i] : (c[q][i / 2] >> (i % 2 ? 0 : 4)) & 15u;
                v[q][j] = t[q][code] * scale;
            }
        }
#pragma unroll
        for (unsigned int j = 0; j < E; ++j) {
            float pe = w.load1(at + j);
            float s[3] = {n > 0 ? v[0][j] : 0.f, n > 1 ? v[1][j] : 0.f, n > 2 ? v[2][j] : 0.f};
            F::apply(k, pe, to_f32(g[at + j]), s);
            w.store1(at + j, pe);
#pragma unroll
            for (int q = 0; q < n; ++q) v[q][j] = s[q];
        }
#pragma unroll
        for (int q = 0; q < n; ++q) {
            float m = 0.0f;
#pragma unroll
            for (unsigned int j = 0; j < E; ++j) m = lean_max_abs(m, v[q][j]);
            for (int o = 16; o > 0; o >>= 1) m = lean_max_abs(m, __shfl_xor_sync(0xffffffffu, m, o));
            const float scale = lean_scale(m);
            if (lane == 0) sc[q][block] = scale;
#pragma unroll
            for (unsigned int j = 0; j < E; j += (BITS == 8 ? 1 : 2)) {
                const unsigned int hi = lean_code_of(t[q], LEN, v[q][j] / scale);
                if (BITS == 8) {
                    c[q][at + j] = (unsigned char)hi;
                } else {
                    const unsigned int lo = lean_code_of(t[q], LEN, v[q][j + 1] / scale);
                    c[q][(at + j) / 2] = (unsigned char)((hi << 4) | lo);
                }
            }
        }
    }
}

#define ENTRY_QUANTIZED(NAME, BITS, G, GN, ...)                                                   \
    extern "C" __global__ void __launch_bounds__(256) update_q##BITS##_##NAME##_##GN(             \
        const Piece* pieces, const GroupConfig* cfgs, const StepState* st,                       \
        const StepEntry* ring, unsigned int ring_len, float* p, const G* g, unsigned char* c0,   \
        float* sc0, float* f0, const float* t0, unsigned char* c1, float* sc1, float* f1,        \
        const float* t1, unsigned char* c2, float* sc2, float* f2, const float* t2, void* model, \
        short* rem, unsigned long long seed, unsigned long long first, int weights_kind) {       \
        unsigned char* const c[3] = {c0, c1, c2};                                                \
        float* const sc[3] = {sc0, sc1, sc2};                                                    \
        float* const f[3] = {f0, f1, f2};                                                        \
        const float* const t[3] = {t0, t1, t2};                                                  \
        const Weights w{p, model, rem, seed, first, st->step, weights_kind};                     \
        update_quantized<__VA_ARGS__, G, BITS>(pieces, cfgs, st, ring, ring_len, w, g, c, sc, f, \
                                               t);                                               \
    }

#define ENTRY(NAME, G, GN, S, SN, ...)                                                           \
    extern "C" __global__ void __launch_bounds__(256) update_##NAME##_##GN##_##SN(                \
        const Segment* segs, const GroupConfig* cfgs, const StepState* st,                       \
        const StepEntry* ring, unsigned int ring_len, float* p, const G* g, S* s0, S* s1,        \
        S* s2, void* model, short* rem, unsigned long long seed, unsigned long long first,       \
        int weights_kind) {                                                                      \
        const Weights w{p, model, rem, seed, first, st->step, weights_kind};                     \
        update<__VA_ARGS__, G, S>(segs, cfgs, st, ring, ring_len, w, g, s0, s1, s2);             \
    }
// The entry points of one kernel family, for every gradient × state dtype and, over quantized
// state, every gradient dtype × code width; each rule's .cuh declares its families with it.
#define FUSEDOPT_FAMILY(NAME, ...)                                  \
    ENTRY(NAME, float, f32, float, f32, __VA_ARGS__)                \
    ENTRY(NAME, __nv_bfloat16, bf16, float, f32, __VA_ARGS__)       \
    ENTRY(NAME, __half, f16, float, f32, __VA_ARGS__)               \
    ENTRY(NAME, float, f32, __nv_bfloat16, bf16, __VA_ARGS__)       \
    ENTRY(NAME, __nv_bfloat16, bf16, __nv_bfloat16, bf16, __VA_ARGS__) \
    ENTRY(NAME, __half, f16, __nv_bfloat16, bf16, __VA_ARGS__)       \
    ENTRY_QUANTIZED(NAME, 8, float, f32, __VA_ARGS__)               \
    ENTRY_QUANTIZED(NAME, 8, __nv_bfloat16, bf16, __VA_ARGS__)      \
    ENTRY_QUANTIZED(NAME, 8, __half, f16, __VA_ARGS__)              \
    ENTRY_QUANTIZED(NAME, 4, float, f32, __VA_ARGS__)               \
    ENTRY_QUANTIZED(NAME, 4, __nv_bfloat16, bf16, __VA_ARGS__)      \
    ENTRY_QUANTIZED(NAME, 4, __half, f16, __VA_ARGS__)

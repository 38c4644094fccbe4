// The fused update template: one launch walks every segment of the launch plan and applies its
// group's rule to parameters, gradients and state in one pass, writing the optional bf16/f16
// model copy in the same pass. Coefficients are built per block from the group's config and the
// step state in device memory (so a captured graph replays with the current lr and step). The lr
// (and a rule's host-computed scalars) come from a ring the host fills ahead, indexed by the
// step's own applied-step count, so a schedule follows applied steps without the host knowing
// which applied. A rule's kernel family (src/rules/*/*.cuh, or a custom rule's generated one) and
// the gradient and state dtypes are template parameters; every entry point has the same signature.
#pragma once
#include "multi_tensor.cuh"
#include "rules/common.cuh"

// model_kind: 0 none, 1 bf16, 2 f16.
__device__ __forceinline__ void store_model4(void* model, int kind, unsigned long long i, float4 v) {
    if (kind == 1) Quad<__nv_bfloat16>::store(static_cast<__nv_bfloat16*>(model) + i, v);
    else if (kind == 2) Quad<__half>::store(static_cast<__half*>(model) + i, v);
}
__device__ __forceinline__ void store_model1(void* model, int kind, unsigned long long i, float v) {
    if (kind == 1) static_cast<__nv_bfloat16*>(model)[i] = __float2bfloat16_rn(v);
    else if (kind == 2) static_cast<__half*>(model)[i] = __float2half_rn(v);
}

// F is a kernel family: F::slots state buffers (s0, s1, s2 in slot order; the rest null and never
// touched), F::make builds the group's coefficients, F::apply updates one element.
template <typename F, typename G, typename S>
__device__ void update(const Segment* segs, const GroupConfig* cfgs, const StepState* st,
                       const StepEntry* ring, unsigned int ring_len, float* p, const G* g,
                       S* s0, S* s1, S* s2, void* model, int model_kind) {
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
            float4 pv = Quad<float>::load(p + i);
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
            Quad<float>::store(p + i, pv);
            if (n > 0) Quad<S>::store(s0 + i, av);
            if (n > 1) Quad<S>::store(s1 + i, bv);
            if (n > 2) Quad<S>::store(s2 + i, xv);
            store_model4(model, model_kind, i, pv);
        },
        [&](unsigned long long i) {
            float pe = p[i];
            float s[3] = {n > 0 ? to_f32(s0[i]) : 0.f, n > 1 ? to_f32(s1[i]) : 0.f,
                          n > 2 ? to_f32(s2[i]) : 0.f};
            F::apply(k, pe, to_f32(g[i]), s);
            p[i] = pe;
            if (n > 0) s0[i] = from_f32<S>(s[0]);
            if (n > 1) s1[i] = from_f32<S>(s[1]);
            if (n > 2) s2[i] = from_f32<S>(s[2]);
            store_model1(model, model_kind, i, pe);
        });
}

#define ENTRY(NAME, G, GN, S, SN, ...)                                                           \
    extern "C" __global__ void __launch_bounds__(256) update_##NAME##_##GN##_##SN(                \
        const Segment* segs, const GroupConfig* cfgs, const StepState* st,                       \
        const StepEntry* ring, unsigned int ring_len, float* p, const G* g, S* s0, S* s1,        \
        S* s2, void* model, int model_kind) {                                                    \
        update<__VA_ARGS__, G, S>(segs, cfgs, st, ring, ring_len, p, g, s0, s1, s2, model,        \
                                  model_kind);                                                   \
    }
// The entry points of one kernel family, for every gradient × state dtype; each rule's .cuh
// declares its families with it.
#define FUSEDOPT_FAMILY(NAME, ...)                                  \
    ENTRY(NAME, float, f32, float, f32, __VA_ARGS__)                \
    ENTRY(NAME, __nv_bfloat16, bf16, float, f32, __VA_ARGS__)       \
    ENTRY(NAME, __half, f16, float, f32, __VA_ARGS__)               \
    ENTRY(NAME, float, f32, __nv_bfloat16, bf16, __VA_ARGS__)       \
    ENTRY(NAME, __nv_bfloat16, bf16, __nv_bfloat16, bf16, __VA_ARGS__) \
    ENTRY(NAME, __half, f16, __nv_bfloat16, bf16, __VA_ARGS__)

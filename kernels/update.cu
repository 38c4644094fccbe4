// The fused update: one launch walks every segment of the launch plan and applies its group's
// rule to parameters, gradients and state in one pass, writing the optional bf16/f16 model copy
// in the same pass. Coefficients are built per block from the group's config and the step state
// in device memory (so a captured graph replays with the current lr and step). The rule and the
// gradient and state dtypes are template parameters; every entry point has the same signature.
#include "multi_tensor.cuh"
#include "rules.cuh"

enum Rule {
    SGD_PLAIN, SGD_MOMENTUM, ADAM, ADAM_AMSGRAD, RMSPROP, RMSPROP_CENTERED, RMSPROP_MOMENTUM,
    RMSPROP_CENTERED_MOMENTUM, ADAGRAD
};

// State buffers each rule keeps, in the slot order of Rule::state_names on the host.
template <int RULE> __host__ __device__ constexpr int state_count() {
    return RULE == SGD_PLAIN ? 0
         : (RULE == SGD_MOMENTUM || RULE == RMSPROP || RULE == ADAGRAD) ? 1
         : (RULE == ADAM_AMSGRAD || RULE == RMSPROP_CENTERED_MOMENTUM) ? 3
         : 2;
}

struct Coeffs {
    SgdStep sgd;
    AdamStep adam;
    RmsPropStep rms;
    AdagradStep ada;
};

template <int RULE>
__device__ __forceinline__ void make_coeffs(Coeffs& k, const GroupConfig& c, double lr,
                                            unsigned long long t, float gscale) {
    if constexpr (RULE == SGD_PLAIN || RULE == SGD_MOMENTUM) k.sgd = make_sgd_step(c, lr, t, gscale);
    else if constexpr (RULE == ADAM || RULE == ADAM_AMSGRAD) k.adam = make_adam_step(c, lr, t, gscale);
    else if constexpr (RULE == ADAGRAD) k.ada = make_adagrad_step(c, lr, t, gscale);
    else k.rms = make_rmsprop_step(c, lr, t, gscale);
}

// One element: `a`, `b`, `x` are the state slots 0, 1, 2 (unused ones are scratch).
template <int RULE>
__device__ __forceinline__ void apply(const Coeffs& k, float& p, float g, float& a, float& b,
                                      float& x) {
    if constexpr (RULE == SGD_PLAIN) sgd_plain(k.sgd, p, g);
    else if constexpr (RULE == SGD_MOMENTUM) sgd_momentum(k.sgd, p, g, a);
    else if constexpr (RULE == ADAM) adam<false>(k.adam, p, g, a, b, x);
    else if constexpr (RULE == ADAM_AMSGRAD) adam<true>(k.adam, p, g, a, b, x);
    else if constexpr (RULE == RMSPROP) rmsprop<false>(k.rms, p, g, a, x);
    else if constexpr (RULE == RMSPROP_CENTERED) rmsprop<true>(k.rms, p, g, a, b);
    else if constexpr (RULE == RMSPROP_MOMENTUM) rmsprop_momentum<false>(k.rms, p, g, a, x, b);
    else if constexpr (RULE == RMSPROP_CENTERED_MOMENTUM) rmsprop_momentum<true>(k.rms, p, g, a, b, x);
    else adagrad(k.ada, p, g, a);
}

// model_kind: 0 none, 1 bf16, 2 f16.
__device__ __forceinline__ void store_model4(void* model, int kind, unsigned long long i, float4 v) {
    if (kind == 1) Quad<__nv_bfloat16>::store(static_cast<__nv_bfloat16*>(model) + i, v);
    else if (kind == 2) Quad<__half>::store(static_cast<__half*>(model) + i, v);
}
__device__ __forceinline__ void store_model1(void* model, int kind, unsigned long long i, float v) {
    if (kind == 1) static_cast<__nv_bfloat16*>(model)[i] = __float2bfloat16_rn(v);
    else if (kind == 2) static_cast<__half*>(model)[i] = __float2half_rn(v);
}

template <int RULE, typename G, typename S>
__device__ void update(const Segment* segs, const GroupConfig* cfgs, const StepState* st,
                       const double* lr, float* p, const G* g, S* s0, S* s1, S* s2, void* model,
                       int model_kind) {
    if (st->skip) return;
    const Segment seg = segs[blockIdx.x];
    const GroupConfig cfg = cfgs[seg.group];
    Coeffs k;
    make_coeffs<RULE>(k, cfg, *lr * cfg.lr_scale, st->step, (float)(st->grad_scale * cfg.sign));
    constexpr int n = state_count<RULE>();
    for_each_element(
        seg,
        [&](unsigned long long i) {
            float4 pv = Quad<float>::load(p + i);
            float4 gv = Quad<G>::load(g + i);
            float4 av = n > 0 ? Quad<S>::load(s0 + i) : make_float4(0.f, 0.f, 0.f, 0.f);
            float4 bv = n > 1 ? Quad<S>::load(s1 + i) : make_float4(0.f, 0.f, 0.f, 0.f);
            float4 xv = n > 2 ? Quad<S>::load(s2 + i) : make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
            for (int j = 0; j < 4; ++j)
                apply<RULE>(k, lane(pv, j), lane(gv, j), lane(av, j), lane(bv, j), lane(xv, j));
            Quad<float>::store(p + i, pv);
            if (n > 0) Quad<S>::store(s0 + i, av);
            if (n > 1) Quad<S>::store(s1 + i, bv);
            if (n > 2) Quad<S>::store(s2 + i, xv);
            store_model4(model, model_kind, i, pv);
        },
        [&](unsigned long long i) {
            float pe = p[i];
            float a = n > 0 ? to_f32(s0[i]) : 0.f, b = n > 1 ? to_f32(s1[i]) : 0.f;
            float x = n > 2 ? to_f32(s2[i]) : 0.f;
            apply<RULE>(k, pe, to_f32(g[i]), a, b, x);
            p[i] = pe;
            if (n > 0) s0[i] = from_f32<S>(a);
            if (n > 1) s1[i] = from_f32<S>(b);
            if (n > 2) s2[i] = from_f32<S>(x);
            store_model1(model, model_kind, i, pe);
        });
}

#define ENTRY(NAME, RULE, G, GN, S, SN)                                                          \
    extern "C" __global__ void __launch_bounds__(256) update_##NAME##_##GN##_##SN(                \
        const Segment* segs, const GroupConfig* cfgs, const StepState* st, const double* lr,     \
        float* p, const G* g, S* s0, S* s1, S* s2, void* model, int model_kind) {                \
        update<RULE, G, S>(segs, cfgs, st, lr, p, g, s0, s1, s2, model, model_kind);             \
    }
#define ENTRIES(NAME, RULE)                                     \
    ENTRY(NAME, RULE, float, f32, float, f32)                   \
    ENTRY(NAME, RULE, __nv_bfloat16, bf16, float, f32)          \
    ENTRY(NAME, RULE, __half, f16, float, f32)                  \
    ENTRY(NAME, RULE, float, f32, __nv_bfloat16, bf16)          \
    ENTRY(NAME, RULE, __nv_bfloat16, bf16, __nv_bfloat16, bf16) \
    ENTRY(NAME, RULE, __half, f16, __nv_bfloat16, bf16)

ENTRIES(sgd_plain, SGD_PLAIN)
ENTRIES(sgd_momentum, SGD_MOMENTUM)
ENTRIES(adam, ADAM)
ENTRIES(adam_amsgrad, ADAM_AMSGRAD)
ENTRIES(rmsprop, RMSPROP)
ENTRIES(rmsprop_centered, RMSPROP_CENTERED)
ENTRIES(rmsprop_momentum, RMSPROP_MOMENTUM)
ENTRIES(rmsprop_centered_momentum, RMSPROP_CENTERED_MOMENTUM)
ENTRIES(adagrad, ADAGRAD)

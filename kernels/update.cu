// Fused update kernels: one launch walks every segment of the plan and applies the group's
// per-step coefficients to parameters, gradients and state in one pass. Modes are template
// parameters so inner loops carry no runtime mode branches.
#include "multi_tensor.cuh"
#include "rules.cuh"

#define LOAD4(ptr, i) (*reinterpret_cast<float4*>((ptr) + (i)))
#define CLOAD4(ptr, i) (*reinterpret_cast<const float4*>((ptr) + (i)))

template <typename C>
__device__ __forceinline__ C with_scale(const C* coeffs, unsigned int group, const StepScalars* s) {
    C c = coeffs[group];
    c.gscale = c.gscale * s->grad_scale;
    return c;
}

extern "C" __global__ void sgd_plain_f32(const Segment* segs, const SgdStep* coeffs,
                                         const StepScalars* scalars, float* p, const float* g) {
    if (scalars->skip) return;
    const Segment s = segs[blockIdx.x];
    const SgdStep c = with_scale(coeffs, s.group, scalars);
    for_each_element(
        s,
        [&](unsigned long long i) {
            float4 pv = LOAD4(p, i);
            const float4 gv = CLOAD4(g, i);
            sgd_plain(c, pv.x, gv.x); sgd_plain(c, pv.y, gv.y);
            sgd_plain(c, pv.z, gv.z); sgd_plain(c, pv.w, gv.w);
            LOAD4(p, i) = pv;
        },
        [&](unsigned long long i) { sgd_plain(c, p[i], g[i]); });
}

extern "C" __global__ void sgd_momentum_f32(const Segment* segs, const SgdStep* coeffs,
                                            const StepScalars* scalars, float* p, const float* g,
                                            float* b) {
    if (scalars->skip) return;
    const Segment s = segs[blockIdx.x];
    const SgdStep c = with_scale(coeffs, s.group, scalars);
    for_each_element(
        s,
        [&](unsigned long long i) {
            float4 pv = LOAD4(p, i), bv = LOAD4(b, i);
            const float4 gv = CLOAD4(g, i);
            sgd_momentum(c, pv.x, gv.x, bv.x); sgd_momentum(c, pv.y, gv.y, bv.y);
            sgd_momentum(c, pv.z, gv.z, bv.z); sgd_momentum(c, pv.w, gv.w, bv.w);
            LOAD4(p, i) = pv; LOAD4(b, i) = bv;
        },
        [&](unsigned long long i) { sgd_momentum(c, p[i], g[i], b[i]); });
}

template <bool AMSGRAD>
__device__ void adam_kernel(const Segment* segs, const AdamStep* coeffs, const StepScalars* scalars,
                            float* p, const float* g, float* m, float* v, float* vmax) {
    if (scalars->skip) return;
    const Segment s = segs[blockIdx.x];
    const AdamStep c = with_scale(coeffs, s.group, scalars);
    float unused = 0.0f;
    for_each_element(
        s,
        [&](unsigned long long i) {
            float4 pv = LOAD4(p, i), mv = LOAD4(m, i), vv = LOAD4(v, i);
            float4 xv = AMSGRAD ? LOAD4(vmax, i) : make_float4(0.f, 0.f, 0.f, 0.f);
            const float4 gv = CLOAD4(g, i);
            adam<AMSGRAD>(c, pv.x, gv.x, mv.x, vv.x, xv.x);
            adam<AMSGRAD>(c, pv.y, gv.y, mv.y, vv.y, xv.y);
            adam<AMSGRAD>(c, pv.z, gv.z, mv.z, vv.z, xv.z);
            adam<AMSGRAD>(c, pv.w, gv.w, mv.w, vv.w, xv.w);
            LOAD4(p, i) = pv; LOAD4(m, i) = mv; LOAD4(v, i) = vv;
            if (AMSGRAD) LOAD4(vmax, i) = xv;
        },
        [&](unsigned long long i) {
            adam<AMSGRAD>(c, p[i], g[i], m[i], v[i], AMSGRAD ? vmax[i] : unused);
        });
}

extern "C" __global__ void adam_f32(const Segment* segs, const AdamStep* coeffs,
                                    const StepScalars* scalars, float* p, const float* g, float* m,
                                    float* v) {
    adam_kernel<false>(segs, coeffs, scalars, p, g, m, v, nullptr);
}

extern "C" __global__ void adam_amsgrad_f32(const Segment* segs, const AdamStep* coeffs,
                                            const StepScalars* scalars, float* p, const float* g,
                                            float* m, float* v, float* vmax) {
    adam_kernel<true>(segs, coeffs, scalars, p, g, m, v, vmax);
}

template <bool CENTERED, bool MOMENTUM>
__device__ void rmsprop_kernel(const Segment* segs, const RmsPropStep* coeffs,
                               const StepScalars* scalars, float* p, const float* g, float* v,
                               float* gavg, float* b) {
    if (scalars->skip) return;
    const Segment s = segs[blockIdx.x];
    const RmsPropStep c = with_scale(coeffs, s.group, scalars);
    float ua = 0.0f, ub = 0.0f;
    for_each_element(s, [&](unsigned long long i) {
        for (int k = 0; k < 4; ++k) {
            float& a = CENTERED ? gavg[i + k] : ua;
            if (MOMENTUM) rmsprop_momentum<CENTERED>(c, p[i + k], g[i + k], v[i + k], a, b[i + k]);
            else rmsprop<CENTERED>(c, p[i + k], g[i + k], v[i + k], a);
        }
    }, [&](unsigned long long i) {
        float& a = CENTERED ? gavg[i] : ua;
        if (MOMENTUM) rmsprop_momentum<CENTERED>(c, p[i], g[i], v[i], a, MOMENTUM ? b[i] : ub);
        else rmsprop<CENTERED>(c, p[i], g[i], v[i], a);
    });
}

#define RMSPROP_ENTRY(NAME, CENTERED, MOMENTUM)                                                   \
    extern "C" __global__ void NAME(const Segment* segs, const RmsPropStep* coeffs,              \
                                    const StepScalars* scalars, float* p, const float* g,        \
                                    float* v, float* gavg, float* b) {                           \
        rmsprop_kernel<CENTERED, MOMENTUM>(segs, coeffs, scalars, p, g, v, gavg, b);            \
    }
RMSPROP_ENTRY(rmsprop_f32, false, false)
RMSPROP_ENTRY(rmsprop_centered_f32, true, false)
RMSPROP_ENTRY(rmsprop_momentum_f32, false, true)
RMSPROP_ENTRY(rmsprop_centered_momentum_f32, true, true)

extern "C" __global__ void adagrad_f32(const Segment* segs, const AdagradStep* coeffs,
                                       const StepScalars* scalars, float* p, const float* g,
                                       float* sum) {
    if (scalars->skip) return;
    const Segment s = segs[blockIdx.x];
    const AdagradStep c = with_scale(coeffs, s.group, scalars);
    for_each_element(
        s,
        [&](unsigned long long i) {
            float4 pv = LOAD4(p, i), sv = LOAD4(sum, i);
            const float4 gv = CLOAD4(g, i);
            adagrad(c, pv.x, gv.x, sv.x); adagrad(c, pv.y, gv.y, sv.y);
            adagrad(c, pv.z, gv.z, sv.z); adagrad(c, pv.w, gv.w, sv.w);
            LOAD4(p, i) = pv; LOAD4(sum, i) = sv;
        },
        [&](unsigned long long i) { adagrad(c, p[i], g[i], sum[i]); });
}

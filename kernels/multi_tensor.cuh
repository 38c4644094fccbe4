// The multi-tensor launch plan on the device: one block per segment of the plan (a run of arena
// elements inside one chunk and one parameter group), built once per parameter set and kept in
// device memory, so a step is one launch whatever the number of tensors.
#pragma once
#include <cstdint>

struct Segment {
    unsigned long long start;  // 64-bit: arenas may pass 2^31 elements
    unsigned int len;
    unsigned int group;
};

// The step-wide scalars the norm pass leaves in device memory for the update to read: nothing is
// synchronised with the host during a step.
struct StepScalars {
    double norm;        // pre-clip global L2 norm
    float grad_scale;   // clip factor × loss-scale inverse × ±1 (maximize)
    int skip;           // non-zero: leave params and state untouched
};

// Applies `f(i)` to every element of a segment: 4-wide for the aligned body (every tensor starts
// on a 64-byte boundary), scalar for the tail.
template <typename F4, typename F1>
__device__ __forceinline__ void for_each_element(const Segment& s, F4 f4, F1 f1) {
    const unsigned int vec = s.len / 4;
    for (unsigned int v = threadIdx.x; v < vec; v += blockDim.x) f4(s.start + 4ull * v);
    for (unsigned int i = 4 * vec + threadIdx.x; i < s.len; i += blockDim.x) f1(s.start + i);
}

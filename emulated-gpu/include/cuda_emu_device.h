// The device side of the emulated GPU: what nvcc provides to a .cu file, for g++.
//
// Force-included (g++ -include) before every kernels/*.cu so that the kernels compile *unmodified*
// as host C++. Each CUDA thread of a block runs on a fiber of its own (src/block.cpp); barriers and
// warp collectives switch fibers. Only what CUDA itself declares is declared here, with CUDA's
// overloads and no others, so a kernel that would not compile with nvcc does not compile here
// either (nvcc builds the same sources in every CI run besides).
//
// Test infrastructure only: nothing that runs here says anything about GPU speed, register
// pressure, nvcc's code generation or the GPU's weak memory ordering.
#pragma once

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <type_traits>

// ------------------------------------------------------------------ qualifiers

#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __noinline__ __attribute__((noinline))
#define __restrict__ __restrict
// A kernel: extern "C" linkage comes from the source; `used` keeps it for the registry.
#ifdef EMU_LIST_KERNELS
// Only when listing kernel names (emulated-gpu/build.sh preprocesses each unit once).
#define __global__ __emu_kernel__
#define __launch_bounds__(...) __emu_launch_bounds__(__VA_ARGS__)
#else
#define __global__ __attribute__((used))
#define __launch_bounds__(...)
#endif
// One copy per block: every thread of a block runs on one OS thread, and blocks that run at the
// same time (the TSan build) run on different OS threads.
#define __shared__ static EMU_SHARED_STORAGE
#ifdef EMU_PARALLEL_BLOCKS
#define EMU_SHARED_STORAGE thread_local
#else
#define EMU_SHARED_STORAGE
#endif
#define __constant__ static

// ------------------------------------------------------------------ vector types

struct uint3 {
    unsigned int x, y, z;
};
struct dim3 {
    unsigned int x, y, z;
    constexpr dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct alignas(8) float2 { float x, y; };
struct alignas(16) float4 { float x, y, z, w; };
struct alignas(16) double2 { double x, y; };
struct alignas(8) int2 { int x, y; };
struct alignas(16) int4 { int x, y, z, w; };
struct alignas(8) uint2 { unsigned int x, y; };
struct alignas(16) uint4 { unsigned int x, y, z, w; };
struct alignas(16) ulonglong2 { unsigned long long x, y; };

static inline float2 make_float2(float x, float y) { return float2{x, y}; }
static inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }
static inline double2 make_double2(double x, double y) { return double2{x, y}; }
static inline int2 make_int2(int x, int y) { return int2{x, y}; }
static inline int4 make_int4(int x, int y, int z, int w) { return int4{x, y, z, w}; }
static inline uint2 make_uint2(unsigned int x, unsigned int y) { return uint2{x, y}; }
static inline uint4 make_uint4(unsigned int x, unsigned int y, unsigned int z, unsigned int w) {
    return uint4{x, y, z, w};
}

// ------------------------------------------------------------------ the emulator's entry points

namespace emu {
// The built-in variables of the CUDA thread that is running now.
struct Builtins {
    uint3 thread;
    uint3 block;
    dim3 block_dim;
    dim3 grid_dim;
};
#ifdef EMU_PARALLEL_BLOCKS
extern thread_local Builtins* current;
#else
extern Builtins* current;  // one CUDA thread runs at a time in the whole process
#endif

enum class WarpOp : int { ShflIdx, ShflUp, ShflDown, ShflXor, Ballot, Any, All, Sync };

void syncthreads(const char* file, int line);
// Every lane of `mask` arrives with `value`; returns what the operation gives this lane.
unsigned long long warp_collective(WarpOp op, unsigned int mask, unsigned long long value,
                                   int param, int width, const char* file, int line);

template <typename T>
inline T shuffle(WarpOp op, unsigned int mask, T var, int param, int width, const char* file,
                 int line) {
    static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "shuffle of a 32/64-bit value");
    unsigned long long bits = 0;
    memcpy(&bits, &var, sizeof(T));
    bits = warp_collective(op, mask, bits, param, width, file, line);
    T out;
    memcpy(&out, &bits, sizeof(T));
    return out;
}
}  // namespace emu

#define threadIdx (::emu::current->thread)
#define blockIdx (::emu::current->block)
#define blockDim (::emu::current->block_dim)
#define gridDim (::emu::current->grid_dim)
static constexpr int warpSize = 32;

#define __syncthreads() ::emu::syncthreads(__FILE__, __LINE__)
static inline void emu_syncwarp(const char* f, int l, unsigned int mask = 0xffffffffu) {
    ::emu::warp_collective(::emu::WarpOp::Sync, mask, 0, 0, 32, f, l);
}
#define __syncwarp(...) emu_syncwarp(__FILE__, __LINE__, ##__VA_ARGS__)

// Warp shuffles for exactly the types CUDA overloads them for (the half types add their own).
#define EMU_SHUFFLES(T)                                                                           \
    static inline T emu_shfl_sync(const char* f, int l, unsigned int m, T v, int s, int w = 32) { \
        return ::emu::shuffle<T>(::emu::WarpOp::ShflIdx, m, v, s, w, f, l);                       \
    }                                                                                             \
    static inline T emu_shfl_up_sync(const char* f, int l, unsigned int m, T v, unsigned int d,   \
                                     int w = 32) {                                                \
        return ::emu::shuffle<T>(::emu::WarpOp::ShflUp, m, v, (int)d, w, f, l);                   \
    }                                                                                             \
    static inline T emu_shfl_down_sync(const char* f, int l, unsigned int m, T v, unsigned int d, \
                                       int w = 32) {                                              \
        return ::emu::shuffle<T>(::emu::WarpOp::ShflDown, m, v, (int)d, w, f, l);                 \
    }                                                                                             \
    static inline T emu_shfl_xor_sync(const char* f, int l, unsigned int m, T v, int x,           \
                                      int w = 32) {                                               \
        return ::emu::shuffle<T>(::emu::WarpOp::ShflXor, m, v, x, w, f, l);                       \
    }
EMU_SHUFFLES(int)
EMU_SHUFFLES(unsigned int)
EMU_SHUFFLES(long)
EMU_SHUFFLES(unsigned long)
EMU_SHUFFLES(long long)
EMU_SHUFFLES(unsigned long long)
EMU_SHUFFLES(float)
EMU_SHUFFLES(double)
#undef EMU_SHUFFLES
#define __shfl_sync(...) emu_shfl_sync(__FILE__, __LINE__, __VA_ARGS__)
#define __shfl_up_sync(...) emu_shfl_up_sync(__FILE__, __LINE__, __VA_ARGS__)
#define __shfl_down_sync(...) emu_shfl_down_sync(__FILE__, __LINE__, __VA_ARGS__)
#define __shfl_xor_sync(...) emu_shfl_xor_sync(__FILE__, __LINE__, __VA_ARGS__)
#define __ballot_sync(m, p) \
    ((unsigned int)::emu::warp_collective(::emu::WarpOp::Ballot, m, (p) != 0, 0, 32, __FILE__, __LINE__))
#define __any_sync(m, p) \
    ((int)::emu::warp_collective(::emu::WarpOp::Any, m, (p) != 0, 0, 32, __FILE__, __LINE__))
#define __all_sync(m, p) \
    ((int)::emu::warp_collective(::emu::WarpOp::All, m, (p) != 0, 0, 32, __FILE__, __LINE__))

// ------------------------------------------------------------------ memory ordering and atomics
// Sequentially consistent: stronger than the GPU, whose weak ordering the emulator cannot show.

static inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
static inline void __threadfence_block() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
static inline void __threadfence_system() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }

#define EMU_INT_ATOMICS(T)                                                                       \
    static inline T atomicAdd(T* a, T v) { return __atomic_fetch_add(a, v, __ATOMIC_SEQ_CST); }  \
    static inline T atomicSub(T* a, T v) { return __atomic_fetch_sub(a, v, __ATOMIC_SEQ_CST); }  \
    static inline T atomicExch(T* a, T v) { return __atomic_exchange_n(a, v, __ATOMIC_SEQ_CST); } \
    static inline T atomicAnd(T* a, T v) { return __atomic_fetch_and(a, v, __ATOMIC_SEQ_CST); }  \
    static inline T atomicOr(T* a, T v) { return __atomic_fetch_or(a, v, __ATOMIC_SEQ_CST); }    \
    static inline T atomicXor(T* a, T v) { return __atomic_fetch_xor(a, v, __ATOMIC_SEQ_CST); }  \
    static inline T atomicCAS(T* a, T expected, T v) {                                           \
        __atomic_compare_exchange_n(a, &expected, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST); \
        return expected;                                                                          \
    }                                                                                             \
    static inline T atomicMax(T* a, T v) {                                                       \
        T old = __atomic_load_n(a, __ATOMIC_SEQ_CST);                                             \
        while (old < v && !__atomic_compare_exchange_n(a, &old, v, false, __ATOMIC_SEQ_CST,       \
                                                       __ATOMIC_SEQ_CST)) {                       \
        }                                                                                         \
        return old;                                                                               \
    }                                                                                             \
    static inline T atomicMin(T* a, T v) {                                                       \
        T old = __atomic_load_n(a, __ATOMIC_SEQ_CST);                                             \
        while (v < old && !__atomic_compare_exchange_n(a, &old, v, false, __ATOMIC_SEQ_CST,       \
                                                       __ATOMIC_SEQ_CST)) {                       \
        }                                                                                         \
        return old;                                                                               \
    }
EMU_INT_ATOMICS(int)
EMU_INT_ATOMICS(unsigned int)
EMU_INT_ATOMICS(unsigned long long)
#undef EMU_INT_ATOMICS

#define EMU_FLOAT_ATOMIC_ADD(T, B)                                                               \
    static inline T atomicAdd(T* a, T v) {                                                       \
        B* bits = reinterpret_cast<B*>(a);                                                        \
        B old = __atomic_load_n(bits, __ATOMIC_SEQ_CST), next;                                    \
        T x;                                                                                      \
        do {                                                                                      \
            memcpy(&x, &old, sizeof x);                                                           \
            x = x + v;                                                                            \
            memcpy(&next, &x, sizeof x);                                                          \
        } while (!__atomic_compare_exchange_n(bits, &old, next, false, __ATOMIC_SEQ_CST,          \
                                              __ATOMIC_SEQ_CST));                                 \
        memcpy(&x, &old, sizeof x);                                                               \
        return x;                                                                                 \
    }
EMU_FLOAT_ATOMIC_ADD(float, unsigned int)
EMU_FLOAT_ATOMIC_ADD(double, unsigned long long)
#undef EMU_FLOAT_ATOMIC_ADD

// ------------------------------------------------------------------ integer min / max
// CUDA declares these for its integer types; the floating-point ones are fmin / fmax.

#define EMU_MIN_MAX(T)                                                    \
    static inline T min(T a, T b) { return b < a ? b : a; }              \
    static inline T max(T a, T b) { return a < b ? b : a; }
EMU_MIN_MAX(int)
EMU_MIN_MAX(unsigned int)
EMU_MIN_MAX(long)
EMU_MIN_MAX(unsigned long)
EMU_MIN_MAX(long long)
EMU_MIN_MAX(unsigned long long)
EMU_MIN_MAX(float)
EMU_MIN_MAX(double)
#undef EMU_MIN_MAX

// ------------------------------------------------------------------ bit casts
// CUDA's reinterpretations between float and 32-bit integers.

static inline unsigned int __float_as_uint(float x) {
    unsigned int u;
    memcpy(&u, &x, sizeof u);
    return u;
}
static inline int __float_as_int(float x) { return (int)__float_as_uint(x); }
static inline float __uint_as_float(unsigned int u) {
    float x;
    memcpy(&x, &u, sizeof x);
    return x;
}
static inline float __int_as_float(int i) { return __uint_as_float((unsigned int)i); }

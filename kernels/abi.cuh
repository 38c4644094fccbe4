// Layout checks shared by every header that declares a struct the host mirrors: a field added on
// one side only fails both builds (the Rust side asserts the same numbers).
#pragma once
// (NVRTC has no offsetof: there the sizes are checked, and nvcc and the emulator check offsets.)
#ifdef __CUDACC_RTC__
#define ABI_FIELD(T, f, offset) static_assert(true, "")
#else
#define ABI_FIELD(T, f, offset) static_assert(__builtin_offsetof(T, f) == offset, #T "." #f)
#endif

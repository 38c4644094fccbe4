// A stand-in libcuda.so: the CUDA driver API functions fusedopt's use of cudarc calls, over host
// memory and the kernels compiled as host C++ (block.cpp). cudarc loads it unmodified (it dlopens
// libcuda.so and resolves each symbol on first call).
//
// Strict where the GPU is strict, so that what passes here has a chance on a GPU:
// - a context must be current on the calling thread, and a stream must belong to it;
// - every device allocation is tracked, poisoned with 0xFF bytes (NaN) when made, followed by a
//   guard checked after every kernel, and every copy and memset is bounds-checked;
// - allocations beyond the device's memory (FUSEDOPT_EMU_MEMORY_MB) fail with out-of-memory;
// - streams run asynchronously, in order, on a worker thread each; events order streams;
// - stream capture records launches with their parameters copied by value; a synchronisation,
//   an allocation or a copy from pageable memory during capture is refused and invalidates it;
// - a module exposes a kernel only if it is in the host registry and named in the module image;
// - launch dimensions and __launch_bounds__ are checked.
// The device calls itself an emulation, so no output can be mistaken for a GPU's.

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdarg>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "kernel.h"

typedef int CUresult;
typedef int CUdevice;
typedef unsigned long long CUdeviceptr;

enum : int {
    CUDA_SUCCESS = 0,
    CUDA_ERROR_INVALID_VALUE = 1,
    CUDA_ERROR_OUT_OF_MEMORY = 2,
    CUDA_ERROR_NOT_INITIALIZED = 3,
    CUDA_ERROR_NO_DEVICE = 100,
    CUDA_ERROR_INVALID_DEVICE = 101,
    CUDA_ERROR_INVALID_IMAGE = 200,
    CUDA_ERROR_INVALID_CONTEXT = 201,
    CUDA_ERROR_INVALID_HANDLE = 400,
    CUDA_ERROR_ILLEGAL_STATE = 401,
    CUDA_ERROR_NOT_FOUND = 500,
    CUDA_ERROR_NOT_READY = 600,
    CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES = 701,
    CUDA_ERROR_LAUNCH_FAILED = 719,
    CUDA_ERROR_NOT_SUPPORTED = 801,
    CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED = 900,
    CUDA_ERROR_STREAM_CAPTURE_INVALIDATED = 901,
    CUDA_ERROR_CAPTURED_EVENT = 907,
    CUDA_ERROR_UNKNOWN = 999,
};

namespace {

using emu::fatal;

// ------------------------------------------------------------------ configuration

long long env_int(const char* name, long long fallback) {
    const char* v = getenv(name);
    return v && *v ? strtoll(v, nullptr, 10) : fallback;
}

struct Config {
    int devices = (int)env_int("FUSEDOPT_EMU_DEVICES", 4);
    size_t memory = (size_t)env_int("FUSEDOPT_EMU_MEMORY_MB", 4096) << 20;
    int sms = (int)env_int("FUSEDOPT_EMU_SMS", 132);  // an H100's: plans are sized as on one
};
const Config& config() {
    static Config c;
    return c;
}

constexpr size_t GUARD = 256;  // bytes after each allocation, checked after every kernel
constexpr unsigned char GUARD_BYTE = 0xA5;

// ------------------------------------------------------------------ objects

struct Context;

// Work a stream runs, in order, on its worker thread.
using Op = std::function<void()>;

struct Graph {
    std::vector<Op> ops;
};

struct Stream {
    Context* ctx = nullptr;
    std::mutex m;
    std::condition_variable cv;
    std::deque<Op> queue;
    unsigned long long submitted = 0, completed = 0;
    bool destroyed = false;
    // Capture.
    bool capturing = false, invalidated = false;
    int capture_mode = 0;  // 0 global, 1 thread-local, 2 relaxed
    std::thread::id capture_thread;
    std::shared_ptr<Graph> graph;
};

struct Context {
    int device = 0;
    int retained = 0;
    std::shared_ptr<Stream> default_stream;
};

struct Event {
    unsigned flags = 0;
    std::mutex m;
    std::condition_variable cv;
    unsigned long long recorded = 0, reached = 0;  // records enqueued / records the stream reached
    std::chrono::steady_clock::time_point time;
    bool captured = false;
};

struct Module {
    Context* ctx;
    std::vector<char> image;
};

struct Function {
    const emu::Kernel* kernel;
    Module* module;
};

struct Allocation {
    size_t bytes;
    int device;
};

struct Driver {
    std::mutex m;
    bool initialised = false;
    std::vector<Context> contexts;                 // one primary context per device
    std::map<CUdeviceptr, Allocation> allocations;  // by start address
    std::vector<size_t> used;                      // bytes per device
    std::map<uintptr_t, size_t> pinned;            // page-locked host allocations
    std::set<Stream*> capturing;                   // streams being captured
    std::map<Stream*, std::shared_ptr<Stream>> streams;
    std::map<Event*, std::shared_ptr<Event>> events;
    // Fault injection (fusedopt_emu_inject) and counters (fusedopt_emu_counter).
    long long oom_after = -1;
    std::string fail_launch;  // kernel-name prefix
    long long fail_launch_after = -1;
    std::atomic<long long> launches{0}, stream_syncs{0}, allocations_made{0};
};

Driver& driver() {
    static auto* d = new Driver();  // never destroyed: stream workers may outlive main
    return *d;
}

thread_local Context* tls_current = nullptr;

// ------------------------------------------------------------------ streams

void worker(std::shared_ptr<Stream> s) {
    std::unique_lock<std::mutex> lock(s->m);
    for (;;) {
        s->cv.wait(lock, [&] { return !s->queue.empty() || s->destroyed; });
        if (s->queue.empty()) return;
        Op op = std::move(s->queue.front());
        s->queue.pop_front();
        lock.unlock();
        op();
        lock.lock();
        s->completed += 1;
        s->cv.notify_all();
    }
}

std::shared_ptr<Stream> make_stream(Context* ctx) {
    auto s = std::make_shared<Stream>();
    s->ctx = ctx;
    std::thread(worker, s).detach();
    return s;
}

void enqueue(Stream& s, Op op) {
    std::lock_guard<std::mutex> lock(s.m);
    s.queue.push_back(std::move(op));
    s.submitted += 1;
    s.cv.notify_all();
}

void wait_idle(Stream& s) {
    std::unique_lock<std::mutex> lock(s.m);
    const unsigned long long target = s.submitted;
    s.cv.wait(lock, [&] { return s.completed >= target; });
}

bool idle(Stream& s) {
    std::lock_guard<std::mutex> lock(s.m);
    return s.completed >= s.submitted;
}

// ------------------------------------------------------------------ checks

#define CHECK(cond, code)                \
    do {                                 \
        if (!(cond)) return (code);      \
    } while (0)

void warn(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
void warn(const char* fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "fusedopt emulated GPU: ");
    vfprintf(stderr, fmt, ap);
    fprintf(stderr, "\n");
    va_end(ap);
}

CUresult need_context() {
    if (!driver().initialised) return CUDA_ERROR_NOT_INITIALIZED;
    return tls_current ? CUDA_SUCCESS : CUDA_ERROR_INVALID_CONTEXT;
}

// The stream a handle names, which must belong to the current context.
CUresult stream_of(void* handle, Stream** out, const char* api = __builtin_FUNCTION()) {
    if (CUresult r = need_context()) return r;
    if (handle == nullptr || handle == (void*)0x1 || handle == (void*)0x2) {
        *out = tls_current->default_stream.get();
        return CUDA_SUCCESS;
    }
    Driver& d = driver();
    std::lock_guard<std::mutex> lock(d.m);
    auto it = d.streams.find((Stream*)handle);
    if (it == d.streams.end()) return CUDA_ERROR_INVALID_HANDLE;
    if (it->second->ctx != tls_current) {
        warn("%s: a stream of device %d used while the context of device %d is current", api,
             it->second->ctx->device, tls_current->device);
        return CUDA_ERROR_INVALID_CONTEXT;
    }
    *out = it->second.get();
    return CUDA_SUCCESS;
}

// A device range [p, p + n) inside one live allocation of the current device.
bool device_range(CUdeviceptr p, size_t n, const char* what) {
    Driver& d = driver();
    std::lock_guard<std::mutex> lock(d.m);
    auto it = d.allocations.upper_bound(p);
    if (it == d.allocations.begin()) {
        warn("%s: address 0x%llx is not in any device allocation", what, p);
        return false;
    }
    --it;
    const CUdeviceptr start = it->first;
    const size_t bytes = it->second.bytes;
    if (p + n > start + bytes || p + n < p) {
        warn("%s: [0x%llx, +%zu) runs %llu bytes past the end of a %zu-byte allocation", what, p, n,
             (unsigned long long)(p + n - (start + bytes)), bytes);
        return false;
    }
    if (tls_current && it->second.device != tls_current->device) {
        warn("%s: memory of device %d used from the context of device %d", what,
             it->second.device, tls_current->device);
        return false;
    }
    return true;
}

bool is_pinned(const void* p, size_t n) {
    Driver& d = driver();
    std::lock_guard<std::mutex> lock(d.m);
    auto it = d.pinned.upper_bound((uintptr_t)p);
    if (it == d.pinned.begin()) return false;
    --it;
    return (uintptr_t)p + n <= it->first + it->second;
}

void check_guards(const char* kernel) {
#if defined(__SANITIZE_ADDRESS__)
    (void)kernel;  // no guards: ASan reports an access past an allocation where it happens
    return;
#endif
    Driver& d = driver();
    std::lock_guard<std::mutex> lock(d.m);
    for (auto& [start, a] : d.allocations) {
        const unsigned char* g = (const unsigned char*)(start + a.bytes);
        for (size_t i = 0; i < GUARD; ++i)
            if (g[i] != GUARD_BYTE)
                fatal("kernel '%s' wrote %zu bytes past the end of a %zu-byte device allocation",
                      kernel, i + 1, a.bytes);
    }
}

// Capture: an unsafe call (allocation, synchronous copy or synchronisation) while a capture that
// forbids it is active invalidates that capture and is refused.
bool refused_by_capture(const char* what) {
    Driver& d = driver();
    std::lock_guard<std::mutex> lock(d.m);
    bool refused = false;
    for (Stream* s : d.capturing) {
        const bool applies = s->capture_mode == 0 ||
                             (s->capture_mode == 1 && s->capture_thread == std::this_thread::get_id());
        if (applies) {
            s->invalidated = true;
            refused = true;
        }
    }
    if (refused) warn("%s during stream capture: refused, the capture is invalidated", what);
    return refused;
}

// Enqueues work on a stream, or records it into the stream's capture.
CUresult submit(Stream& s, Op op) {
    {
        std::lock_guard<std::mutex> lock(s.m);
        if (s.capturing) {
            if (s.invalidated) return CUDA_ERROR_STREAM_CAPTURE_INVALIDATED;
            s.graph->ops.push_back(std::move(op));
            return CUDA_SUCCESS;
        }
    }
    enqueue(s, std::move(op));
    return CUDA_SUCCESS;
}

bool stream_is_capturing(Stream& s) {
    std::lock_guard<std::mutex> lock(s.m);
    return s.capturing;
}

void invalidate_capture(Stream& s, const char* what) {
    std::lock_guard<std::mutex> lock(s.m);
    if (s.capturing) {
        s.invalidated = true;
        warn("%s on a capturing stream: refused, the capture is invalidated", what);
    }
}

// ------------------------------------------------------------------ memory

CUresult allocate(CUdeviceptr* out, size_t bytes) {
    if (CUresult r = need_context()) return r;
    CHECK(out, CUDA_ERROR_INVALID_VALUE);
    CHECK(bytes > 0, CUDA_ERROR_INVALID_VALUE);
    Driver& d = driver();
    const int dev = tls_current->device;
    {
        std::lock_guard<std::mutex> lock(d.m);
        if (d.oom_after == 0) {
            d.oom_after = -1;
            return CUDA_ERROR_OUT_OF_MEMORY;
        }
        if (d.oom_after > 0) d.oom_after -= 1;
        if (bytes > config().memory || d.used[dev] + bytes > config().memory)
            return CUDA_ERROR_OUT_OF_MEMORY;
    }
    void* p = nullptr;
#if defined(__SANITIZE_ADDRESS__)
    // Exactly `bytes`: ASan's redzone starts where the allocation ends, so any access past it is
    // reported where it happens (no guard needed).
    if (posix_memalign(&p, 256, bytes) != 0) return CUDA_ERROR_OUT_OF_MEMORY;
    memset(p, 0xFF, bytes);
#else
    if (posix_memalign(&p, 256, bytes + GUARD) != 0) return CUDA_ERROR_OUT_OF_MEMORY;
    memset(p, 0xFF, bytes);  // poison: NaN in every float type
    memset((char*)p + bytes, GUARD_BYTE, GUARD);
#endif
    std::lock_guard<std::mutex> lock(d.m);
    d.allocations[(CUdeviceptr)p] = Allocation{bytes, dev};
    d.used[dev] += bytes;
    d.allocations_made += 1;
    *out = (CUdeviceptr)p;
    return CUDA_SUCCESS;
}

CUresult release(CUdeviceptr p) {
    Driver& d = driver();
    size_t bytes;
    {
        std::lock_guard<std::mutex> lock(d.m);
        auto it = d.allocations.find(p);
        if (it == d.allocations.end()) {
            warn("free of 0x%llx, which is not a device allocation", p);
            return CUDA_ERROR_INVALID_VALUE;
        }
        bytes = it->second.bytes;
        d.used[it->second.device] -= bytes;
        d.allocations.erase(it);
    }
#if !defined(__SANITIZE_ADDRESS__)
    const unsigned char* g = (const unsigned char*)(p + bytes);
    for (size_t i = 0; i < GUARD; ++i)
        if (g[i] != GUARD_BYTE)
            fatal("something wrote past the end of a %zu-byte device allocation (found at free)",
                  bytes);
#endif
    free((void*)p);
    return CUDA_SUCCESS;
}

// ------------------------------------------------------------------ modules

// The size of a module image: a fatbin, an ELF cubin, or NUL-terminated PTX.
size_t image_size(const unsigned char* p) {
    uint32_t magic;
    memcpy(&magic, p, 4);
    if (magic == 0xBA55ED50u) {  // fatbin: u32 magic, u16 version, u16 header size, u64 body size
        uint16_t header;
        uint64_t body;
        memcpy(&header, p + 6, 2);
        memcpy(&body, p + 8, 8);
        return header + body;
    }
    if (memcmp(p, "\x7f" "ELF", 4) == 0 && p[4] == 2) {  // 64-bit ELF: up to its section headers
        uint64_t shoff;
        uint16_t shentsize, shnum;
        memcpy(&shoff, p + 0x28, 8);
        memcpy(&shentsize, p + 0x3A, 2);
        memcpy(&shnum, p + 0x3C, 2);
        return shoff + (uint64_t)shentsize * shnum;
    }
    return strlen((const char*)p) + 1;
}

// Whether the image names `name` as a whole word (a kernel symbol or a PTX .entry).
bool image_names(const std::vector<char>& image, const std::string& name) {
    auto ident = [](char c) { return isalnum((unsigned char)c) || c == '_' || c == '$'; };
    auto it = image.begin();
    while ((it = std::search(it, image.end(), name.begin(), name.end())) != image.end()) {
        const bool before = it == image.begin() || !ident(*(it - 1));
        const bool after = it + name.size() == image.end() || !ident(*(it + name.size()));
        if (before && after) return true;
        ++it;
    }
    return false;
}

// nvcc compresses the device code of a large fatbin, and such an image names no kernel readably: it
// is taken to hold every registered kernel (an uncompressed one holds an ELF image per
// architecture, and must name the kernel).
bool compressed_fatbin(const std::vector<char>& image) {
    static const char magic[4] = {'\x50', '\xed', '\x55', '\xba'};
    static const char elf[4] = {'\x7f', 'E', 'L', 'F'};
    return image.size() >= 4 && std::equal(magic, magic + 4, image.begin()) &&
           std::search(image.begin(), image.end(), elf, elf + 4) == image.end();
}

const char* error_name(CUresult r) {
    switch (r) {
        case CUDA_SUCCESS: return "CUDA_SUCCESS";
        case CUDA_ERROR_INVALID_VALUE: return "CUDA_ERROR_INVALID_VALUE";
        case CUDA_ERROR_OUT_OF_MEMORY: return "CUDA_ERROR_OUT_OF_MEMORY";
        case CUDA_ERROR_NOT_INITIALIZED: return "CUDA_ERROR_NOT_INITIALIZED";
        case CUDA_ERROR_NO_DEVICE: return "CUDA_ERROR_NO_DEVICE";
        case CUDA_ERROR_INVALID_DEVICE: return "CUDA_ERROR_INVALID_DEVICE";
        case CUDA_ERROR_INVALID_IMAGE: return "CUDA_ERROR_INVALID_IMAGE";
        case CUDA_ERROR_INVALID_CONTEXT: return "CUDA_ERROR_INVALID_CONTEXT";
        case CUDA_ERROR_INVALID_HANDLE: return "CUDA_ERROR_INVALID_HANDLE";
        case CUDA_ERROR_NOT_FOUND: return "CUDA_ERROR_NOT_FOUND";
        case CUDA_ERROR_NOT_READY: return "CUDA_ERROR_NOT_READY";
        case CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES: return "CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES";
        case CUDA_ERROR_LAUNCH_FAILED: return "CUDA_ERROR_LAUNCH_FAILED";
        case CUDA_ERROR_NOT_SUPPORTED: return "CUDA_ERROR_NOT_SUPPORTED";
        case CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED: return "CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED";
        case CUDA_ERROR_STREAM_CAPTURE_INVALIDATED: return "CUDA_ERROR_STREAM_CAPTURE_INVALIDATED";
        case CUDA_ERROR_CAPTURED_EVENT: return "CUDA_ERROR_CAPTURED_EVENT";
        default: return "CUDA_ERROR_UNKNOWN";
    }
}

CUresult record_event(Event* e, Stream& s) {
    Driver& d = driver();
    std::shared_ptr<Event> ev;
    {
        std::lock_guard<std::mutex> lock(d.m);
        auto it = d.events.find(e);
        if (it == d.events.end()) return CUDA_ERROR_INVALID_HANDLE;
        ev = it->second;
    }
    if (stream_is_capturing(s)) {
        std::lock_guard<std::mutex> lock(ev->m);
        ev->captured = true;
        return submit(s, [ev] {
            std::lock_guard<std::mutex> l(ev->m);
            ev->time = std::chrono::steady_clock::now();
        });
    }
    unsigned long long ticket;
    {
        std::lock_guard<std::mutex> lock(ev->m);
        ev->captured = false;
        ticket = ++ev->recorded;
    }
    return submit(s, [ev, ticket] {
        std::lock_guard<std::mutex> l(ev->m);
        ev->time = std::chrono::steady_clock::now();
        ev->reached = std::max(ev->reached, ticket);
        ev->cv.notify_all();
    });
}

std::shared_ptr<Event> event_of(void* handle) {
    Driver& d = driver();
    std::lock_guard<std::mutex> lock(d.m);
    auto it = d.events.find((Event*)handle);
    return it == d.events.end() ? nullptr : it->second;
}

}  // namespace

// ==================================================================== the driver API

extern "C" {

CUresult cuInit(unsigned int flags) {
    CHECK(flags == 0, CUDA_ERROR_INVALID_VALUE);
    Driver& d = driver();
    std::lock_guard<std::mutex> lock(d.m);
    if (!d.initialised) {
        d.contexts.resize(config().devices);
        d.used.assign(config().devices, 0);
        for (int i = 0; i < config().devices; ++i) d.contexts[i].device = i;
        d.initialised = true;
    }
    return config().devices > 0 ? CUDA_SUCCESS : CUDA_ERROR_NO_DEVICE;
}

// The driver's private interfaces: none here. NVRTC asks for them (it dlopens libcuda.so.1) and
// does without when refused.
CUresult cuGetExportTable(const void** table, const void* id) {
    (void)id;
    if (table) *table = nullptr;
    return CUDA_ERROR_NOT_SUPPORTED;
}

CUresult cuDriverGetVersion(int* v) {
    CHECK(v, CUDA_ERROR_INVALID_VALUE);
    *v = 13000;
    return CUDA_SUCCESS;
}

CUresult cuDeviceGetCount(int* n) {
    CHECK(driver().initialised, CUDA_ERROR_NOT_INITIALIZED);
    CHECK(n, CUDA_ERROR_INVALID_VALUE);
    *n = config().devices;
    return CUDA_SUCCESS;
}

CUresult cuDeviceGet(CUdevice* dev, int ordinal) {
    CHECK(driver().initialised, CUDA_ERROR_NOT_INITIALIZED);
    CHECK(dev, CUDA_ERROR_INVALID_VALUE);
    CHECK(ordinal >= 0 && ordinal < config().devices, CUDA_ERROR_INVALID_DEVICE);
    *dev = ordinal;
    return CUDA_SUCCESS;
}

CUresult cuDeviceGetName(char* name, int len, CUdevice dev) {
    CHECK(dev >= 0 && dev < config().devices, CUDA_ERROR_INVALID_DEVICE);
    CHECK(name && len > 0, CUDA_ERROR_INVALID_VALUE);
    snprintf(name, len, "fusedopt emulated GPU %d (host C++, not a GPU)", dev);
    return CUDA_SUCCESS;
}

CUresult cuDeviceGetUuid(unsigned char* uuid, CUdevice dev) {
    CHECK(dev >= 0 && dev < config().devices, CUDA_ERROR_INVALID_DEVICE);
    memset(uuid, 0, 16);
    memcpy(uuid, "fusedopt-emu", 12);
    uuid[15] = (unsigned char)dev;
    return CUDA_SUCCESS;
}
CUresult cuDeviceGetUuid_v2(unsigned char* uuid, CUdevice dev) { return cuDeviceGetUuid(uuid, dev); }

CUresult cuDeviceTotalMem_v2(size_t* bytes, CUdevice dev) {
    CHECK(dev >= 0 && dev < config().devices, CUDA_ERROR_INVALID_DEVICE);
    *bytes = config().memory;
    return CUDA_SUCCESS;
}

CUresult cuDeviceGetAttribute(int* v, int attribute, CUdevice dev) {
    CHECK(driver().initialised, CUDA_ERROR_NOT_INITIALIZED);
    CHECK(dev >= 0 && dev < config().devices, CUDA_ERROR_INVALID_DEVICE);
    switch (attribute) {
        case 1: *v = 1024; break;                 // max threads per block
        case 2: case 3: *v = 1024; break;         // max block dim x, y
        case 4: *v = 64; break;                   // max block dim z
        case 5: *v = 0x7fffffff; break;           // max grid dim x
        case 6: case 7: *v = 65535; break;        // max grid dim y, z
        case 8: *v = 48 * 1024; break;            // shared memory per block
        case 10: *v = 32; break;                  // warp size
        case 16: *v = config().sms; break;        // multiprocessors
        case 75: *v = 9; break;                   // compute capability 9.0
        case 76: *v = 0; break;
        case 115: *v = 1; break;                  // memory pools (stream-ordered allocation)
        default: *v = 0;
    }
    return CUDA_SUCCESS;
}

CUresult cuDevicePrimaryCtxRetain(void** ctx, CUdevice dev) {
    Driver& d = driver();
    CHECK(d.initialised, CUDA_ERROR_NOT_INITIALIZED);
    CHECK(dev >= 0 && dev < config().devices, CUDA_ERROR_INVALID_DEVICE);
    std::lock_guard<std::mutex> lock(d.m);
    Context& c = d.contexts[dev];
    if (!c.default_stream) {
        c.default_stream = make_stream(&c);
        d.streams[c.default_stream.get()] = c.default_stream;
    }
    c.retained += 1;
    *ctx = &c;
    return CUDA_SUCCESS;
}

CUresult cuDevicePrimaryCtxRelease_v2(CUdevice dev) {
    Driver& d = driver();
    CHECK(dev >= 0 && dev < config().devices, CUDA_ERROR_INVALID_DEVICE);
    std::lock_guard<std::mutex> lock(d.m);
    CHECK(d.contexts[dev].retained > 0, CUDA_ERROR_INVALID_CONTEXT);
    d.contexts[dev].retained -= 1;
    return CUDA_SUCCESS;
}

CUresult cuCtxSetCurrent(void* ctx) {
    Driver& d = driver();
    CHECK(d.initialised, CUDA_ERROR_NOT_INITIALIZED);
    if (ctx == nullptr) {
        tls_current = nullptr;
        return CUDA_SUCCESS;
    }
    for (Context& c : d.contexts)
        if (&c == ctx) {
            tls_current = &c;
            return CUDA_SUCCESS;
        }
    return CUDA_ERROR_INVALID_CONTEXT;
}

CUresult cuCtxGetCurrent(void** ctx) {
    CHECK(driver().initialised, CUDA_ERROR_NOT_INITIALIZED);
    *ctx = tls_current;
    return CUDA_SUCCESS;
}

CUresult cuCtxGetDevice(CUdevice* dev) {
    if (CUresult r = need_context()) return r;
    *dev = tls_current->device;
    return CUDA_SUCCESS;
}

CUresult cuCtxSynchronize(void) {
    if (CUresult r = need_context()) return r;
    if (refused_by_capture("cuCtxSynchronize")) return CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED;
    std::vector<std::shared_ptr<Stream>> mine;
    {
        Driver& d = driver();
        std::lock_guard<std::mutex> lock(d.m);
        for (auto& [_, s] : d.streams)
            if (s->ctx == tls_current) mine.push_back(s);
    }
    for (auto& s : mine) wait_idle(*s);
    driver().stream_syncs += 1;
    return CUDA_SUCCESS;
}

// ------------------------------------------------------------------ streams

CUresult cuStreamCreate(void** out, unsigned int flags) {
    (void)flags;
    if (CUresult r = need_context()) return r;
    CHECK(out, CUDA_ERROR_INVALID_VALUE);
    auto s = make_stream(tls_current);
    Driver& d = driver();
    std::lock_guard<std::mutex> lock(d.m);
    d.streams[s.get()] = s;
    *out = s.get();
    return CUDA_SUCCESS;
}

CUresult cuStreamCreateWithPriority(void** out, unsigned int flags, int priority) {
    (void)priority;
    return cuStreamCreate(out, flags);
}

CUresult cuStreamDestroy_v2(void* handle) {
    Stream* s;
    if (CUresult r = stream_of(handle, &s)) return r;
    CHECK(s != tls_current->default_stream.get(), CUDA_ERROR_INVALID_HANDLE);
    Driver& d = driver();
    std::shared_ptr<Stream> keep;
    {
        std::lock_guard<std::mutex> lock(d.m);
        keep = d.streams[s];
        d.streams.erase(s);
        d.capturing.erase(s);
    }
    // As on the GPU: destroying a stream does not wait; its worker ends once the queue drains.
    std::lock_guard<std::mutex> lock(keep->m);
    keep->destroyed = true;
    keep->cv.notify_all();
    return CUDA_SUCCESS;
}

CUresult cuStreamSynchronize(void* handle) {
    Stream* s;
    if (CUresult r = stream_of(handle, &s)) return r;
    if (stream_is_capturing(*s)) {
        invalidate_capture(*s, "cuStreamSynchronize");
        return CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED;
    }
    wait_idle(*s);
    driver().stream_syncs += 1;
    return CUDA_SUCCESS;
}

CUresult cuStreamQuery(void* handle) {
    Stream* s;
    if (CUresult r = stream_of(handle, &s)) return r;
    if (stream_is_capturing(*s)) {
        invalidate_capture(*s, "cuStreamQuery");
        return CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED;
    }
    return idle(*s) ? CUDA_SUCCESS : CUDA_ERROR_NOT_READY;
}

CUresult cuStreamWaitEvent(void* handle, void* event, unsigned int flags) {
    (void)flags;
    Stream* s;
    if (CUresult r = stream_of(handle, &s)) return r;
    auto ev = event_of(event);
    CHECK(ev, CUDA_ERROR_INVALID_HANDLE);
    unsigned long long ticket;
    {
        std::lock_guard<std::mutex> lock(ev->m);
        if (ev->captured) {
            warn("a stream waits on an event recorded during capture: joining captures across "
                 "streams is not emulated");
            return CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED;
        }
        ticket = ev->recorded;
    }
    if (ticket == 0) return CUDA_SUCCESS;  // never recorded: nothing to wait for
    return submit(*s, [ev, ticket] {
        std::unique_lock<std::mutex> l(ev->m);
        ev->cv.wait(l, [&] { return ev->reached >= ticket; });
    });
}

CUresult cuLaunchHostFunc(void* handle, void (*fn)(void*), void* data) {
    Stream* s;
    if (CUresult r = stream_of(handle, &s)) return r;
    CHECK(fn, CUDA_ERROR_INVALID_VALUE);
    return submit(*s, [fn, data] { fn(data); });
}

CUresult cuStreamBeginCapture_v2(void* handle, int mode) {
    Stream* s;
    if (CUresult r = stream_of(handle, &s)) return r;
    CHECK(mode >= 0 && mode <= 2, CUDA_ERROR_INVALID_VALUE);
    CHECK(s != tls_current->default_stream.get(), CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED);
    {
        std::lock_guard<std::mutex> lock(s->m);
        CHECK(!s->capturing, CUDA_ERROR_ILLEGAL_STATE);
        s->capturing = true;
        s->invalidated = false;
        s->capture_mode = mode;
        s->capture_thread = std::this_thread::get_id();
        s->graph = std::make_shared<Graph>();
    }
    Driver& d = driver();
    std::lock_guard<std::mutex> lock(d.m);
    d.capturing.insert(s);
    return CUDA_SUCCESS;
}

CUresult cuStreamEndCapture(void* handle, void** graph) {
    Stream* s;
    if (CUresult r = stream_of(handle, &s)) return r;
    CHECK(graph, CUDA_ERROR_INVALID_VALUE);
    {
        Driver& d = driver();
        std::lock_guard<std::mutex> lock(d.m);
        d.capturing.erase(s);
    }
    std::lock_guard<std::mutex> lock(s->m);
    CHECK(s->capturing, CUDA_ERROR_ILLEGAL_STATE);
    s->capturing = false;
    auto g = std::move(s->graph);
    *graph = nullptr;
    if (s->invalidated) return CUDA_ERROR_STREAM_CAPTURE_INVALIDATED;
    *graph = new Graph(*g);
    return CUDA_SUCCESS;
}

CUresult cuStreamIsCapturing(void* handle, int* status) {
    Stream* s;
    if (CUresult r = stream_of(handle, &s)) return r;
    std::lock_guard<std::mutex> lock(s->m);
    *status = !s->capturing ? 0 : (s->invalidated ? 2 : 1);
    return CUDA_SUCCESS;
}

// ------------------------------------------------------------------ graphs

CUresult cuGraphInstantiateWithFlags(void** exec, void* graph, unsigned long long flags) {
    (void)flags;
    if (CUresult r = need_context()) return r;
    CHECK(exec && graph, CUDA_ERROR_INVALID_VALUE);
    *exec = new Graph(*(Graph*)graph);
    return CUDA_SUCCESS;
}

CUresult cuGraphLaunch(void* exec, void* handle) {
    Stream* s;
    if (CUresult r = stream_of(handle, &s)) return r;
    CHECK(exec, CUDA_ERROR_INVALID_VALUE);
    CHECK(!stream_is_capturing(*s), CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED);
    for (const Op& op : ((Graph*)exec)->ops) enqueue(*s, op);
    return CUDA_SUCCESS;
}

CUresult cuGraphUpload(void* exec, void* handle) {
    Stream* s;
    if (CUresult r = stream_of(handle, &s)) return r;
    return exec ? CUDA_SUCCESS : CUDA_ERROR_INVALID_VALUE;
}

CUresult cuGraphDestroy(void* graph) {
    delete (Graph*)graph;
    return CUDA_SUCCESS;
}

CUresult cuGraphExecDestroy(void* exec) {
    delete (Graph*)exec;
    return CUDA_SUCCESS;
}

// ------------------------------------------------------------------ events

CUresult cuEventCreate(void** out, unsigned int flags) {
    if (CUresult r = need_context()) return r;
    CHECK(out, CUDA_ERROR_INVALID_VALUE);
    auto e = std::make_shared<Event>();
    e->flags = flags;
    Driver& d = driver();
    std::lock_guard<std::mutex> lock(d.m);
    d.events[e.get()] = e;
    *out = e.get();
    return CUDA_SUCCESS;
}

CUresult cuEventDestroy_v2(void* event) {
    Driver& d = driver();
    std::lock_guard<std::mutex> lock(d.m);
    CHECK(d.events.erase((Event*)event) == 1, CUDA_ERROR_INVALID_HANDLE);
    return CUDA_SUCCESS;
}

CUresult cuEventRecord(void* event, void* handle) {
    Stream* s;
    if (CUresult r = stream_of(handle, &s)) return r;
    return record_event((Event*)event, *s);
}

CUresult cuEventRecordWithFlags(void* event, void* handle, unsigned int flags) {
    (void)flags;
    return cuEventRecord(event, handle);
}

CUresult cuEventQuery(void* event) {
    auto ev = event_of(event);
    CHECK(ev, CUDA_ERROR_INVALID_HANDLE);
    std::lock_guard<std::mutex> lock(ev->m);
    CHECK(!ev->captured, CUDA_ERROR_CAPTURED_EVENT);
    return ev->reached >= ev->recorded ? CUDA_SUCCESS : CUDA_ERROR_NOT_READY;
}

CUresult cuEventSynchronize(void* event) {
    auto ev = event_of(event);
    CHECK(ev, CUDA_ERROR_INVALID_HANDLE);
    std::unique_lock<std::mutex> lock(ev->m);
    CHECK(!ev->captured, CUDA_ERROR_CAPTURED_EVENT);
    const unsigned long long target = ev->recorded;
    ev->cv.wait(lock, [&] { return ev->reached >= target; });
    driver().stream_syncs += 1;
    return CUDA_SUCCESS;
}

CUresult cuEventElapsedTime(float* ms, void* start, void* end) {
    auto a = event_of(start), b = event_of(end);
    CHECK(a && b && ms, CUDA_ERROR_INVALID_HANDLE);
    // CU_EVENT_DISABLE_TIMING (2): such events cannot be timed, as on the GPU.
    CHECK(!(a->flags & 2) && !(b->flags & 2), CUDA_ERROR_INVALID_HANDLE);
    std::scoped_lock lock(a->m, b->m);
    CHECK(a->recorded > 0 && b->recorded > 0, CUDA_ERROR_INVALID_HANDLE);
    CHECK(a->reached >= a->recorded && b->reached >= b->recorded, CUDA_ERROR_NOT_READY);
    *ms = std::chrono::duration<float, std::milli>(b->time - a->time).count();
    return CUDA_SUCCESS;
}
CUresult cuEventElapsedTime_v2(float* ms, void* start, void* end) {
    return cuEventElapsedTime(ms, start, end);
}

// ------------------------------------------------------------------ memory

CUresult cuMemAlloc_v2(CUdeviceptr* out, size_t bytes) {
    if (CUresult r = need_context()) return r;
    if (refused_by_capture("cuMemAlloc")) return CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED;
    return allocate(out, bytes);
}

CUresult cuMemFree_v2(CUdeviceptr p) {
    if (CUresult r = need_context()) return r;
    if (refused_by_capture("cuMemFree")) return CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED;
    return release(p);
}

CUresult cuMemAllocAsync(CUdeviceptr* out, size_t bytes, void* handle) {
    Stream* s;
    if (CUresult r = stream_of(handle, &s)) return r;
    return allocate(out, bytes);  // usable at once: stream order adds nothing to check here
}

CUresult cuMemFreeAsync(CUdeviceptr p, void* handle) {
    Stream* s;
    if (CUresult r = stream_of(handle, &s)) return r;
    {
        Driver& d = driver();
        std::lock_guard<std::mutex> lock(d.m);
        CHECK(d.allocations.count(p), CUDA_ERROR_INVALID_VALUE);
    }
    if (stream_is_capturing(*s)) {
        invalidate_capture(*s, "cuMemFreeAsync");
        return CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED;
    }
    enqueue(*s, [p] { release(p); });  // once the work before it on the stream is done
    return CUDA_SUCCESS;
}

CUresult cuMemGetInfo_v2(size_t* free_bytes, size_t* total) {
    if (CUresult r = need_context()) return r;
    Driver& d = driver();
    std::lock_guard<std::mutex> lock(d.m);
    *total = config().memory;
    *free_bytes = config().memory - d.used[tls_current->device];
    return CUDA_SUCCESS;
}

CUresult cuMemHostAlloc(void** out, size_t bytes, unsigned int flags) {
    (void)flags;
    if (CUresult r = need_context()) return r;
    if (refused_by_capture("cuMemHostAlloc")) return CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED;
    CHECK(out && bytes > 0, CUDA_ERROR_INVALID_VALUE);
    void* p = aligned_alloc(4096, (bytes + 4095) / 4096 * 4096);
    if (!p) return CUDA_ERROR_OUT_OF_MEMORY;
    Driver& d = driver();
    std::lock_guard<std::mutex> lock(d.m);
    d.pinned[(uintptr_t)p] = bytes;
    *out = p;
    return CUDA_SUCCESS;
}
CUresult cuMemAllocHost_v2(void** out, size_t bytes) { return cuMemHostAlloc(out, bytes, 0); }

CUresult cuMemFreeHost(void* p) {
    Driver& d = driver();
    {
        std::lock_guard<std::mutex> lock(d.m);
        CHECK(d.pinned.erase((uintptr_t)p) == 1, CUDA_ERROR_INVALID_VALUE);
    }
    free(p);
    return CUDA_SUCCESS;
}

CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr dst, const void* src, size_t n, void* handle) {
    Stream* s;
    if (CUresult r = stream_of(handle, &s)) return r;
    if (n == 0) return CUDA_SUCCESS;
    CHECK(src && device_range(dst, n, "cuMemcpyHtoDAsync"), CUDA_ERROR_INVALID_VALUE);
    if (is_pinned(src, n)) {  // truly asynchronous: the source is read when the stream gets there
        return submit(*s, [dst, src, n] { memcpy((void*)dst, src, n); });
    }
    if (stream_is_capturing(*s)) {
        invalidate_capture(*s, "a copy from pageable host memory");
        return CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED;
    }
    // Pageable: staged now, so the caller may reuse its buffer when this returns.
    auto staged = std::make_shared<std::vector<char>>((const char*)src, (const char*)src + n);
    enqueue(*s, [dst, staged] { memcpy((void*)dst, staged->data(), staged->size()); });
    return CUDA_SUCCESS;
}

CUresult cuMemcpyDtoHAsync_v2(void* dst, CUdeviceptr src, size_t n, void* handle) {
    Stream* s;
    if (CUresult r = stream_of(handle, &s)) return r;
    if (n == 0) return CUDA_SUCCESS;
    CHECK(dst && device_range(src, n, "cuMemcpyDtoHAsync"), CUDA_ERROR_INVALID_VALUE);
    if (is_pinned(dst, n)) return submit(*s, [dst, src, n] { memcpy(dst, (const void*)src, n); });
    if (stream_is_capturing(*s)) {
        invalidate_capture(*s, "a copy to pageable host memory");
        return CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED;
    }
    // Pageable: returns once the copy is done.
    enqueue(*s, [dst, src, n] { memcpy(dst, (const void*)src, n); });
    wait_idle(*s);
    return CUDA_SUCCESS;
}

CUresult cuMemcpyDtoDAsync_v2(CUdeviceptr dst, CUdeviceptr src, size_t n, void* handle) {
    Stream* s;
    if (CUresult r = stream_of(handle, &s)) return r;
    if (n == 0) return CUDA_SUCCESS;
    CHECK(device_range(dst, n, "cuMemcpyDtoDAsync (destination)") &&
              device_range(src, n, "cuMemcpyDtoDAsync (source)"),
          CUDA_ERROR_INVALID_VALUE);
    return submit(*s, [dst, src, n] { memmove((void*)dst, (const void*)src, n); });
}

CUresult cuMemcpyPeerAsync(CUdeviceptr dst, void* dst_ctx, CUdeviceptr src, void* src_ctx, size_t n,
                           void* handle) {
    (void)dst_ctx;
    (void)src_ctx;
    Stream* s;
    if (CUresult r = stream_of(handle, &s)) return r;
    return submit(*s, [dst, src, n] { memmove((void*)dst, (const void*)src, n); });
}

CUresult cuMemsetD8Async(CUdeviceptr dst, unsigned char value, size_t n, void* handle) {
    Stream* s;
    if (CUresult r = stream_of(handle, &s)) return r;
    if (n == 0) return CUDA_SUCCESS;
    CHECK(device_range(dst, n, "cuMemsetD8Async"), CUDA_ERROR_INVALID_VALUE);
    return submit(*s, [dst, value, n] { memset((void*)dst, value, n); });
}

CUresult cuMemsetD32Async(CUdeviceptr dst, unsigned int value, size_t n, void* handle) {
    Stream* s;
    if (CUresult r = stream_of(handle, &s)) return r;
    if (n == 0) return CUDA_SUCCESS;
    CHECK(dst % 4 == 0 && device_range(dst, n * 4, "cuMemsetD32Async"), CUDA_ERROR_INVALID_VALUE);
    return submit(*s, [dst, value, n] {
        for (size_t i = 0; i < n; ++i) memcpy((char*)dst + 4 * i, &value, 4);
    });
}

// Synchronous variants: they wait for the device, so they are refused during capture.
CUresult cuMemcpyHtoD_v2(CUdeviceptr dst, const void* src, size_t n) {
    if (CUresult r = need_context()) return r;
    if (refused_by_capture("cuMemcpyHtoD")) return CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED;
    CHECK(device_range(dst, n, "cuMemcpyHtoD"), CUDA_ERROR_INVALID_VALUE);
    cuCtxSynchronize();
    memcpy((void*)dst, src, n);
    return CUDA_SUCCESS;
}

CUresult cuMemcpyDtoH_v2(void* dst, CUdeviceptr src, size_t n) {
    if (CUresult r = need_context()) return r;
    if (refused_by_capture("cuMemcpyDtoH")) return CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED;
    CHECK(device_range(src, n, "cuMemcpyDtoH"), CUDA_ERROR_INVALID_VALUE);
    cuCtxSynchronize();
    memcpy(dst, (const void*)src, n);
    return CUDA_SUCCESS;
}

CUresult cuMemcpyDtoD_v2(CUdeviceptr dst, CUdeviceptr src, size_t n) {
    if (CUresult r = need_context()) return r;
    if (refused_by_capture("cuMemcpyDtoD")) return CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED;
    CHECK(device_range(dst, n, "cuMemcpyDtoD") && device_range(src, n, "cuMemcpyDtoD"),
          CUDA_ERROR_INVALID_VALUE);
    cuCtxSynchronize();
    memmove((void*)dst, (const void*)src, n);
    return CUDA_SUCCESS;
}

CUresult cuMemsetD8_v2(CUdeviceptr dst, unsigned char value, size_t n) {
    if (CUresult r = need_context()) return r;
    if (refused_by_capture("cuMemsetD8")) return CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED;
    CHECK(device_range(dst, n, "cuMemsetD8"), CUDA_ERROR_INVALID_VALUE);
    cuCtxSynchronize();
    memset((void*)dst, value, n);
    return CUDA_SUCCESS;
}

// ------------------------------------------------------------------ modules and launches

CUresult cuModuleLoadData(void** out, const void* image) {
    if (CUresult r = need_context()) return r;
    CHECK(out && image, CUDA_ERROR_INVALID_VALUE);
    const size_t n = image_size((const unsigned char*)image);
    CHECK(n > 4, CUDA_ERROR_INVALID_IMAGE);
    // Copied: the caller may free its buffer as soon as this returns (cudarc does).
    auto* m = new Module{tls_current, std::vector<char>((const char*)image, (const char*)image + n)};
    *out = m;
    return CUDA_SUCCESS;
}

CUresult cuModuleUnload(void* module) {
    delete (Module*)module;
    return CUDA_SUCCESS;
}

CUresult cuModuleGetFunction(void** out, void* module, const char* name) {
    if (CUresult r = need_context()) return r;
    CHECK(out && module && name, CUDA_ERROR_INVALID_VALUE);
    Module* m = (Module*)module;
    const emu::Kernel* k = emu::find_kernel(name);
    if (!k || !(image_names(m->image, name) || compressed_fatbin(m->image))) return CUDA_ERROR_NOT_FOUND;
    *out = new Function{k, m};  // lives as long as the process, like the module's functions
    return CUDA_SUCCESS;
}

CUresult cuFuncGetAttribute(int* v, int attribute, void* f) {
    CHECK(v && f, CUDA_ERROR_INVALID_VALUE);
    *v = attribute == 0 ? (int)((Function*)f)->kernel->max_threads : 0;
    return CUDA_SUCCESS;
}

CUresult cuFuncSetAttribute(void* f, int attribute, int value) {
    (void)attribute;
    (void)value;
    return f ? CUDA_SUCCESS : CUDA_ERROR_INVALID_HANDLE;
}

CUresult cuLaunchKernel(void* f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by,
                        unsigned bz, unsigned shared_bytes, void* handle, void** params,
                        void** extra) {
    Stream* s;
    if (CUresult r = stream_of(handle, &s)) return r;
    CHECK(f, CUDA_ERROR_INVALID_HANDLE);
    const emu::Kernel& k = *((Function*)f)->kernel;
    CHECK(((Function*)f)->module->ctx == tls_current, CUDA_ERROR_INVALID_HANDLE);
    if (extra != nullptr || shared_bytes != 0) {
        warn("kernel '%s': launch extras and dynamic shared memory are not emulated", k.name.c_str());
        return CUDA_ERROR_NOT_SUPPORTED;
    }
    const unsigned long long threads = (unsigned long long)bx * by * bz;
    if (gx == 0 || gy == 0 || gz == 0 || bx == 0 || by == 0 || bz == 0 || gy > 65535 ||
        gz > 65535 || gx > 0x7fffffffu || bx > 1024 || by > 1024 || bz > 64 || threads > 1024) {
        warn("kernel '%s': invalid launch grid (%u,%u,%u) block (%u,%u,%u)", k.name.c_str(), gx, gy,
             gz, bx, by, bz);
        return CUDA_ERROR_INVALID_VALUE;
    }
    if (threads > k.max_threads) {
        warn("kernel '%s': %llu threads per block exceed its __launch_bounds__(%u)", k.name.c_str(),
             threads, k.max_threads);
        return CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES;
    }
    CHECK(params != nullptr || k.param_sizes.empty(), CUDA_ERROR_INVALID_VALUE);
    {
        Driver& d = driver();
        std::lock_guard<std::mutex> lock(d.m);
        if (!d.fail_launch.empty() && k.name.rfind(d.fail_launch, 0) == 0) {
            if (d.fail_launch_after == 0) {
                d.fail_launch.clear();
                return CUDA_ERROR_LAUNCH_FAILED;
            }
            d.fail_launch_after -= 1;
        }
    }
    // Parameters are copied now, by value, as CUDA does (a captured graph keeps these copies).
    size_t total = 0;
    std::vector<size_t> offsets;
    for (size_t size : k.param_sizes) {
        offsets.push_back(total);
        total += (size + 15) / 16 * 16;
    }
    auto storage = std::make_shared<std::vector<unsigned char>>(total + 16);
    for (size_t i = 0; i < k.param_sizes.size(); ++i) {
        CHECK(params[i] != nullptr, CUDA_ERROR_INVALID_VALUE);
        memcpy(storage->data() + offsets[i], params[i], k.param_sizes[i]);
    }
    driver().launches += 1;
    const emu::Kernel* kernel = &k;
    return submit(*s, [kernel, storage, offsets, gx, gy, gz, bx, by, bz] {
        std::vector<void*> args;
        for (size_t off : offsets) args.push_back(storage->data() + off);
        emu::run_grid(*kernel, dim3(gx, gy, gz), dim3(bx, by, bz), args.data());
        check_guards(kernel->name.c_str());
    });
}

// ------------------------------------------------------------------ errors

CUresult cuGetErrorName(CUresult r, const char** s) {
    CHECK(s, CUDA_ERROR_INVALID_VALUE);
    *s = error_name(r);
    return CUDA_SUCCESS;
}

CUresult cuGetErrorString(CUresult r, const char** s) {
    CHECK(s, CUDA_ERROR_INVALID_VALUE);
    *s = error_name(r);
    return CUDA_SUCCESS;
}

// ------------------------------------------------------------------ test controls
// Not CUDA: tests reach these with dlsym on the same library, to drive error paths.

// what: "oom" (the allocation after `after` more fails), "launch:<kernel-name prefix>" (the
// launch after `after` more such launches fails). after < 0 turns the fault off.
int fusedopt_emu_inject(const char* what, long long after) {
    Driver& d = driver();
    std::lock_guard<std::mutex> lock(d.m);
    const std::string w = what ? what : "";
    if (w == "oom") {
        d.oom_after = after;
        return 0;
    }
    if (w.rfind("launch:", 0) == 0) {
        d.fail_launch = after < 0 ? "" : w.substr(7);
        d.fail_launch_after = after;
        return 0;
    }
    return -1;
}

// "launches", "stream_syncs" (stream, event and context synchronisations), "allocations",
// "live_bytes" (device 0).
long long fusedopt_emu_counter(const char* name) {
    Driver& d = driver();
    const std::string n = name ? name : "";
    if (n == "launches") return d.launches;
    if (n == "stream_syncs") return d.stream_syncs;
    if (n == "allocations") return d.allocations_made;
    if (n == "live_bytes") {
        std::lock_guard<std::mutex> lock(d.m);
        return d.used.empty() ? 0 : (long long)d.used[0];
    }
    return -1;
}

}  // extern "C"

// Runs a grid: blocks one after the other (or on several OS threads in the TSan build), the CUDA
// threads of a block each on a fiber of its own. A fiber runs until it reaches a barrier or a warp
// collective, or returns; when no fiber can run, the scheduler resolves what they wait for:
// a warp collective once every lane of its mask has arrived at the same operation, a barrier
// once every thread of the block has. Anything else (a barrier some threads exited before, two
// different barriers, a lane that never arrives) is a bug the GPU would hang on or hide, and the
// emulator aborts with the kernel's name, the block and the source lines.

#include <ucontext.h>

#include <atomic>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "kernel.h"

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/common_interface_defs.h>
#endif
#if defined(__SANITIZE_THREAD__)
#include <sanitizer/tsan_interface.h>
// The scheduler's own bookkeeping (which fiber runs, what it waits for, the built-in indices) is
// handed between fibers by the switches; TSan is told only what orders the *kernel's* accesses
// (barriers, warp collectives), so these functions are not instrumented.
#define EMU_SCHEDULER __attribute__((no_sanitize("thread")))
#else
#define EMU_SCHEDULER
#endif

namespace emu {

#ifdef EMU_PARALLEL_BLOCKS
thread_local Builtins* current = nullptr;
#else
Builtins* current = nullptr;
#endif

void fatal(const char* fmt, ...) {
    char msg[4096];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    fprintf(stderr, "\nfusedopt emulated GPU: %s\n", msg);
    fflush(stderr);
    abort();
}

// ------------------------------------------------------------------ registry

// Kernels register when a library defining them loads: the stand-in libcuda's own at start, a
// unit the stand-in NVRTC compiled while other threads may be launching. Entries are never
// replaced (a name stands for one source), so a found kernel stays valid until exit.
static std::map<std::string, Kernel>& registry() {
    static auto* r = new std::map<std::string, Kernel>();  // never destroyed: used until exit
    return *r;
}
static std::mutex& registry_mutex() {
    static auto* m = new std::mutex();
    return *m;
}

void register_kernel(Kernel k) {
    std::lock_guard<std::mutex> lock(registry_mutex());
    registry().emplace(k.name, std::move(k));
}

const Kernel* find_kernel(const std::string& name) {
    std::lock_guard<std::mutex> lock(registry_mutex());
    auto it = registry().find(name);
    return it == registry().end() ? nullptr : &it->second;
}

// ------------------------------------------------------------------ one block

namespace {

enum class State { Runnable, AtBarrier, AtWarp, Done };

struct Fiber {
    ucontext_t context;
    void* stack = nullptr;
    Builtins builtins;
    unsigned linear = 0;  // x + y·bx + z·bx·by: lane = linear % 32, warp = linear / 32
    State state = State::Runnable;
    const char* file = "";
    int line = 0;
    // The warp collective this thread waits in.
    WarpOp op = WarpOp::Sync;
    unsigned mask = 0;
    unsigned long long value = 0, result = 0;
    int param = 0, width = 32;
#if defined(__SANITIZE_THREAD__)
    void* tsan_fiber = nullptr;
    bool started = false;
#endif
};

size_t stack_bytes() {
    static const size_t bytes = [] {
        const char* kb = getenv("FUSEDOPT_EMU_STACK_KB");
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
        size_t d = 512;
#else
        size_t d = 64;
#endif
        return (kb ? strtoull(kb, nullptr, 10) : d) * 1024;
    }();
    return bytes;
}

struct Block {
    const Kernel* kernel = nullptr;
    void** params = nullptr;
    std::vector<Fiber> fibers;
    ucontext_t scheduler;
    Fiber* running = nullptr;
    unsigned done = 0;
    // Barrier objects for TSan: a barrier orders what every thread did before it.
    char barrier_token = 0;
    char warp_tokens[32] = {};
#if defined(__SANITIZE_THREAD__)
    void* tsan_scheduler = nullptr;
#endif
#if defined(__SANITIZE_ADDRESS__)
    void* asan_fake_stack = nullptr;
    const void* scheduler_stack_bottom = nullptr;
    size_t scheduler_stack_size = 0;
#endif

    std::string where(const Fiber& f) const {
        char s[160];
        snprintf(s, sizeof s, "thread (%u,%u,%u)", f.builtins.thread.x, f.builtins.thread.y,
                 f.builtins.thread.z);
        return s;
    }
    std::string block_name() const {
        const Builtins& b = fibers[0].builtins;
        char s[200];
        snprintf(s, sizeof s, "kernel '%s' (%s.cu), block (%u,%u,%u)", kernel->name.c_str(),
                 kernel->unit.c_str(), b.block.x, b.block.y, b.block.z);
        return s;
    }
};

thread_local Block* tls_block = nullptr;
#if defined(__SANITIZE_THREAD__)
// A block that ended on this OS thread happens before the next one starts here (as on a GPU, where
// the next block on a multiprocessor finds the previous one's shared memory done with).
thread_local char tls_blocks_done = 0;
#endif

// Switches from the scheduler to fiber `f` and back.
EMU_SCHEDULER void resume(Block& b, Fiber& f) {
    b.running = &f;
    current = &f.builtins;
#if defined(__SANITIZE_ADDRESS__)
    __sanitizer_start_switch_fiber(&b.asan_fake_stack, f.stack, stack_bytes());
#endif
#if defined(__SANITIZE_THREAD__)
    // The first switch orders what came before the block (its set-up, the blocks that ran here
    // earlier: shared memory is reused) before the thread; later ones order nothing.
    __tsan_switch_to_fiber(f.tsan_fiber, f.started ? __tsan_switch_to_fiber_no_sync : 0);
    f.started = true;
#endif
    swapcontext(&b.scheduler, &f.context);
#if defined(__SANITIZE_ADDRESS__)
    __sanitizer_finish_switch_fiber(b.asan_fake_stack, nullptr, nullptr);
#endif
    b.running = nullptr;
    current = nullptr;
}

// Called on a fiber: back to the scheduler.
EMU_SCHEDULER void yield(Block& b, Fiber& f) {
#if defined(__SANITIZE_ADDRESS__)
    void* fake = nullptr;
    __sanitizer_start_switch_fiber(f.state == State::Done ? nullptr : &fake, b.scheduler_stack_bottom,
                                   b.scheduler_stack_size);
#endif
#if defined(__SANITIZE_THREAD__)
    __tsan_switch_to_fiber(b.tsan_scheduler, __tsan_switch_to_fiber_no_sync);
#endif
    swapcontext(&f.context, &b.scheduler);
#if defined(__SANITIZE_ADDRESS__)
    __sanitizer_finish_switch_fiber(fake, &b.scheduler_stack_bottom, &b.scheduler_stack_size);
#endif
    current = &f.builtins;
}

EMU_SCHEDULER void fiber_main() {
    Block& b = *tls_block;
    Fiber& f = *b.running;
#if defined(__SANITIZE_ADDRESS__)
    __sanitizer_finish_switch_fiber(nullptr, &b.scheduler_stack_bottom, &b.scheduler_stack_size);
#endif
    b.kernel->thread_entry(b.params);
#if defined(__SANITIZE_THREAD__)
    __tsan_release(&tls_blocks_done);
#endif
    f.state = State::Done;
    b.done += 1;
    yield(b, f);
    fatal("a finished CUDA thread was resumed");
}

// Stacks are reused from block to block (per OS thread).
struct StackPool {
    std::vector<void*> free;
    ~StackPool() {
        for (void* s : free) ::free(s);
    }
    void* take() {
        if (free.empty()) {
            void* s = aligned_alloc(64, stack_bytes());
            if (!s) fatal("out of host memory for a fiber stack");
            return s;
        }
        void* s = free.back();
        free.pop_back();
        return s;
    }
};
thread_local StackPool tls_stacks;

EMU_SCHEDULER Fiber& self() {
    Block* b = tls_block;
    if (!b || !b->running) fatal("a device function was called outside a kernel");
    return *b->running;
}

// Every lane of a warp collective's mask waits at the same operation: compute what each gets.
EMU_SCHEDULER bool resolve_warp(Block& b, Fiber& first) {
    const unsigned warp = first.linear / 32, base = warp * 32;
    const unsigned mask = first.mask;
    std::vector<Fiber*> lanes(32, nullptr);
    for (unsigned l = 0; l < 32; ++l) {
        if (!(mask >> l & 1u)) continue;
        if (base + l >= b.fibers.size())
            fatal("%s: %s at %s:%d names lane %u in mask 0x%08x, which this block does not have",
                  b.block_name().c_str(), b.where(first).c_str(), first.file, first.line, l, mask);
        Fiber& f = b.fibers[base + l];
        if (f.state == State::Done)
            fatal("%s: a warp collective at %s:%d waits for lane %u (mask 0x%08x), which has exited",
                  b.block_name().c_str(), first.file, first.line, l, mask);
        if (f.state != State::AtWarp) return false;  // arrives later (or deadlock, found below)
        if (f.op != first.op || f.mask != first.mask)
            fatal("%s: warp divergence: lane %u is at a different warp collective (%s:%d) than lane "
                  "%u (%s:%d), or with another mask (0x%08x vs 0x%08x)",
                  b.block_name().c_str(), l, f.file, f.line, first.linear % 32, first.file,
                  first.line, f.mask, mask);
        lanes[l] = &f;
    }
    unsigned ballot = 0;
    for (unsigned l = 0; l < 32; ++l)
        if (lanes[l] && lanes[l]->value) ballot |= 1u << l;
    for (unsigned l = 0; l < 32; ++l) {
        Fiber* f = lanes[l];
        if (!f) continue;
        const int w = f->width;
        if (w < 1 || w > 32 || (w & (w - 1)))
            fatal("%s: shuffle width %d at %s:%d is not a power of two up to 32",
                  b.block_name().c_str(), w, f->file, f->line);
        const unsigned seg = l / w * w, in = l % w;
        unsigned src = l;
        switch (f->op) {
            case WarpOp::ShflIdx: src = seg + ((unsigned)f->param % w); break;
            case WarpOp::ShflUp: src = in >= (unsigned)f->param ? l - f->param : l; break;
            case WarpOp::ShflDown: src = in + (unsigned)f->param < (unsigned)w ? l + f->param : l; break;
            case WarpOp::ShflXor: {
                const unsigned x = l ^ (unsigned)f->param;
                src = (x < 32 && x / w <= l / w) ? x : l;
                break;
            }
            default: break;
        }
        switch (f->op) {
            case WarpOp::Ballot: f->result = ballot; break;
            case WarpOp::Any: f->result = ballot != 0; break;
            case WarpOp::All: f->result = (ballot & mask) == mask; break;
            case WarpOp::Sync: f->result = 0; break;
            default:
                if (!lanes[src])
                    fatal("%s: lane %u reads lane %u at %s:%d, which is not in the mask 0x%08x "
                          "(undefined on the GPU)",
                          b.block_name().c_str(), l, src, f->file, f->line, mask);
                f->result = lanes[src]->value;
        }
    }
#if defined(__SANITIZE_THREAD__)
    for (Fiber* f : lanes)
        if (f) __tsan_release(&b.warp_tokens[warp % 32]);
#endif
    for (Fiber* f : lanes)
        if (f) f->state = State::Runnable;
    return true;
}

EMU_SCHEDULER bool resolve_barrier(Block& b) {
    Fiber* first = nullptr;
    for (Fiber& f : b.fibers) {
        if (f.state == State::AtBarrier) {
            if (!first) first = &f;
        } else if (f.state != State::Done) {
            return false;
        }
    }
    if (!first) return false;
    if (b.done > 0) {
        const Fiber* gone = nullptr;
        for (const Fiber& f : b.fibers)
            if (f.state == State::Done) gone = &f;
        fatal("%s: __syncthreads() at %s:%d is reached after %u of %zu threads exited (e.g. %s): "
              "the GPU may hang or run on",
              b.block_name().c_str(), first->file, first->line, b.done, b.fibers.size(),
              b.where(*gone).c_str());
    }
    for (const Fiber& f : b.fibers)
        if (f.file != first->file || f.line != first->line)
            fatal("%s: barrier divergence: %s waits at __syncthreads() %s:%d, %s at %s:%d",
                  b.block_name().c_str(), b.where(*first).c_str(), first->file, first->line,
                  b.where(f).c_str(), f.file, f.line);
#if defined(__SANITIZE_THREAD__)
    __tsan_release(&b.barrier_token);
#endif
    for (Fiber& f : b.fibers) f.state = State::Runnable;
    return true;
}

EMU_SCHEDULER [[noreturn]] void deadlock(Block& b) {
    std::string waits;
    for (const Fiber& f : b.fibers) {
        if (f.state == State::Done) continue;
        char s[256];
        snprintf(s, sizeof s, "\n  %s waits at %s %s:%d", b.where(f).c_str(),
                 f.state == State::AtBarrier ? "__syncthreads()" : "a warp collective", f.file,
                 f.line);
        waits += s;
        if (waits.size() > 2000) {
            waits += "\n  ...";
            break;
        }
    }
    fatal("%s: deadlock (%u of %zu threads exited):%s", b.block_name().c_str(), b.done,
          b.fibers.size(), waits.c_str());
}

EMU_SCHEDULER void run_block(const Kernel& k, void** params, dim3 grid, dim3 block, uint3 block_idx) {
    Block b;
    b.kernel = &k;
    b.params = params;
    const unsigned n = block.x * block.y * block.z;
    b.fibers.resize(n);
    Block* outer = tls_block;
    tls_block = &b;
#if defined(__SANITIZE_THREAD__)
    b.tsan_scheduler = __tsan_get_current_fiber();
    __tsan_acquire(&tls_blocks_done);
#endif
    for (unsigned i = 0; i < n; ++i) {
        Fiber& f = b.fibers[i];
        f.linear = i;
        f.builtins.thread = uint3{i % block.x, i / block.x % block.y, i / (block.x * block.y)};
        f.builtins.block = block_idx;
        f.builtins.block_dim = block;
        f.builtins.grid_dim = grid;
        f.stack = tls_stacks.take();
        getcontext(&f.context);
        f.context.uc_stack.ss_sp = f.stack;
        f.context.uc_stack.ss_size = stack_bytes();
        f.context.uc_link = nullptr;
        makecontext(&f.context, fiber_main, 0);
#if defined(__SANITIZE_THREAD__)
        f.tsan_fiber = __tsan_create_fiber(0);
#endif
    }
    while (b.done < n) {
        bool ran = false;
        for (Fiber& f : b.fibers) {
            if (f.state == State::Runnable) {
                resume(b, f);
                ran = true;
            }
        }
        if (ran) continue;
        bool released = false;
        for (Fiber& f : b.fibers)
            if (f.state == State::AtWarp && resolve_warp(b, f)) released = true;
        if (released || resolve_barrier(b)) continue;
        deadlock(b);
    }
#if defined(__SANITIZE_THREAD__)
    __tsan_acquire(&tls_blocks_done);  // the block's work is done: later launches come after it
#endif
    for (Fiber& f : b.fibers) {
        tls_stacks.free.push_back(f.stack);
#if defined(__SANITIZE_THREAD__)
        __tsan_destroy_fiber(f.tsan_fiber);
#endif
    }
    tls_block = outer;
}

std::mutex& kernel_lock() {
    static auto* m = new std::mutex();
    return *m;
}

}  // namespace

// ------------------------------------------------------------------ device functions

EMU_SCHEDULER void syncthreads(const char* file, int line) {
    Block& b = *tls_block;
    Fiber& f = self();
#if defined(__SANITIZE_THREAD__)
    __tsan_release(&b.barrier_token);
#endif
    f.state = State::AtBarrier;
    f.file = file;
    f.line = line;
    yield(b, f);
#if defined(__SANITIZE_THREAD__)
    __tsan_acquire(&b.barrier_token);
#endif
}

EMU_SCHEDULER unsigned long long warp_collective(WarpOp op, unsigned int mask, unsigned long long value, int param,
                                   int width, const char* file, int line) {
    Block& b = *tls_block;
    Fiber& f = self();
    const unsigned lane = f.linear % 32;
    if (!(mask >> lane & 1u))
        fatal("%s: lane %u calls a warp collective at %s:%d with mask 0x%08x, which leaves it out",
              b.block_name().c_str(), lane, file, line, mask);
#if defined(__SANITIZE_THREAD__)
    __tsan_release(&b.warp_tokens[f.linear / 32 % 32]);
#endif
    f.state = State::AtWarp;
    f.op = op;
    f.mask = mask;
    f.value = value;
    f.param = param;
    f.width = width;
    f.file = file;
    f.line = line;
    yield(b, f);
#if defined(__SANITIZE_THREAD__)
    __tsan_acquire(&b.warp_tokens[f.linear / 32 % 32]);
#endif
    return f.result;
}

// ------------------------------------------------------------------ a grid

EMU_SCHEDULER void run_grid(const Kernel& k, dim3 grid, dim3 block, void** params) {
    const unsigned long long blocks = (unsigned long long)grid.x * grid.y * grid.z;
    auto index = [&](unsigned long long i) {
        return uint3{(unsigned)(i % grid.x), (unsigned)(i / grid.x % grid.y),
                     (unsigned)(i / ((unsigned long long)grid.x * grid.y))};
    };
#ifdef EMU_PARALLEL_BLOCKS
    // Blocks run at the same time on several OS threads, so TSan sees inter-block races.
    std::atomic<unsigned long long> next{0};
    unsigned workers = std::thread::hardware_concurrency();
    workers = workers < 2 ? 2 : (workers > 8 ? 8 : workers);
    std::vector<std::thread> pool;
    for (unsigned w = 0; w < workers; ++w)
        pool.emplace_back([&] {
            for (unsigned long long i; (i = next.fetch_add(1)) < blocks;)
                run_block(k, params, grid, block, index(i));
        });
    for (auto& t : pool) t.join();
#else
    // One CUDA thread runs at a time in the whole process: `__shared__` is a plain static.
    std::lock_guard<std::mutex> lock(kernel_lock());
    for (unsigned long long i = 0; i < blocks; ++i) run_block(k, params, grid, block, index(i));
#endif
}

}  // namespace emu

// A stand-in libnccl.so.2 for the emulated GPU: ranks one per emulated device, in one process or
// in several, so multi-rank NCCL code runs on a machine without GPUs (a real single GPU cannot:
// NCCL refuses two ranks on one device, and so does this).
//
// Ranks of one process meet in memory. Ranks of several processes (joined through a rendezvous,
// as torchrun-style launchers do) meet in a directory named by the unique id: each rank writes a
// join file, and each collective's contribution as a file of its own (written whole, then
// renamed into place); every rank reads all contributions and computes the result itself, in
// rank order, so every rank gets the bits the in-memory path gives. A broken file (an abort, an
// injected fault) fails the others; a rank that dies leaves the others waiting until they abort.
//
// A collective is enqueued on the caller's stream (cuLaunchHostFunc of the stand-in driver) and
// returns at once; on the stream it waits for every rank's matching call, then the last rank to
// arrive computes the result for all, in rank order (each contribution × 1/N first for ncclAvg,
// as PyTorch DDP rounds). Mismatched calls fail every rank. ncclCommAbort or a rank's failure
// wakes the others with ncclRemoteError in their asynchronous error state.
//
// Fault injection (fusedopt_emu_nccl_fault, or FUSEDOPT_EMU_NCCL_FAULT=RANK:AFTER:KIND): after
// AFTER more collectives of rank RANK have run normally, its next one
//   error  that rank fails (ncclSystemError) and its peers see ncclRemoteError;
//   stall  that rank never arrives (its peers wait until somebody aborts);
//   die    that rank disappears: its peers see ncclRemoteError, it itself reports nothing.

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include <dirent.h>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include "emu_half_bits.h"

typedef int ncclResult_t;
enum : int {
    ncclSuccess = 0,
    ncclUnhandledCudaError = 1,
    ncclSystemError = 2,
    ncclInternalError = 3,
    ncclInvalidArgument = 4,
    ncclInvalidUsage = 5,
    ncclRemoteError = 6,
};
enum : int { ncclSum = 0, ncclProd = 1, ncclMax = 2, ncclMin = 3, ncclAvg = 4 };
enum : int { ncclFloat16 = 6, ncclFloat32 = 7, ncclFloat64 = 8, ncclBfloat16 = 9 };

struct ncclUniqueId {
    char internal[128];
};

extern "C" int cuLaunchHostFunc(void* stream, void (*fn)(void*), void* data);
extern "C" int cuCtxGetDevice(int* device);

namespace {

thread_local std::string last_error;
thread_local int group_depth = 0;

ncclResult_t fail(ncclResult_t r, const std::string& why) {
    last_error = why;
    return r;
}

enum class Kind { AllReduce, Broadcast, AllGather, ReduceScatter };
enum class Fault { None, Error, Stall, Die };

struct Call {
    Kind kind;
    const void* send;
    void* recv;
    size_t count;
    int dtype, op, root;
};

struct Clique;

struct Comm {
    Clique* clique;
    int rank, device;
    unsigned long long calls = 0;  // collectives issued by this rank
    int async_error = ncclSuccess;
    std::string async_message;
    std::atomic<bool> aborted{false};
    // Ranks in several processes: the directory they meet in (empty for ranks of one process,
    // which meet in `clique`; a rank of several has a clique of its own, for its error state).
    std::string dir;
    int nranks = 1;
};

struct Pending {
    std::vector<Call> calls;
    std::vector<bool> arrived;
    int count = 0, left = 0;
    bool done = false;
    ncclResult_t result = ncclSuccess;
    std::string why;
};

struct Clique {
    std::mutex m;
    std::condition_variable cv;
    int nranks = 0;
    std::vector<Comm*> ranks;
    int joined = 0;
    std::string broken;  // why the clique can no longer run collectives
    std::map<unsigned long long, Pending> pending;
};

struct FaultSpec {
    int rank = -1;
    unsigned long long after = 0;  // collectives of `rank` still to run normally
    Fault kind = Fault::None;
};

std::mutex registry_mutex;
std::map<std::string, Clique*>& cliques() {
    static auto* c = new std::map<std::string, Clique*>();  // never freed: streams may outlive main
    return *c;
}
std::mutex fault_mutex;
FaultSpec& fault_spec() {
    static FaultSpec f = [] {
        FaultSpec s;
        if (const char* v = getenv("FUSEDOPT_EMU_NCCL_FAULT")) {
            char kind[16] = {};
            if (sscanf(v, "%d:%llu:%15s", &s.rank, &s.after, kind) == 3)
                s.kind = !strcmp(kind, "error") ? Fault::Error
                         : !strcmp(kind, "stall") ? Fault::Stall
                         : !strcmp(kind, "die")   ? Fault::Die
                                                  : Fault::None;
        }
        return s;
    }();
    return f;
}
// Whether rank `rank`'s collective that runs now is the faulty one, and how.
Fault fault_now(int rank) {
    std::lock_guard<std::mutex> lock(fault_mutex);
    FaultSpec& f = fault_spec();
    if (f.kind == Fault::None || f.rank != rank) return Fault::None;
    if (f.after > 0) {
        f.after -= 1;
        return Fault::None;
    }
    const Fault k = f.kind;
    f.kind = Fault::None;
    return k;
}

size_t dtype_size(int dtype) {
    switch (dtype) {
        case ncclFloat16: case ncclBfloat16: return 2;
        case ncclFloat32: return 4;
        case ncclFloat64: return 8;
        default: return 0;
    }
}

double load(const void* base, size_t i, int dtype) {
    switch (dtype) {
        case ncclFloat16: return emu::f16_to_f32(((const unsigned short*)base)[i]);
        case ncclBfloat16: return emu::bf16_to_f32(((const unsigned short*)base)[i]);
        case ncclFloat32: return ((const float*)base)[i];
        default: return ((const double*)base)[i];
    }
}

void store(void* base, size_t i, int dtype, double v) {
    switch (dtype) {
        case ncclFloat16: ((unsigned short*)base)[i] = emu::f32_to_f16_rn((float)v); break;
        case ncclBfloat16: ((unsigned short*)base)[i] = emu::f32_to_bf16_rn((float)v); break;
        case ncclFloat32: ((float*)base)[i] = (float)v; break;
        default: ((double*)base)[i] = v;
    }
}

// Reduces element `i` of every rank's send buffer in rank order, in the buffer's precision
// (f32 for the 16-bit types, rounded once).
double reduce_at(const std::vector<Call>& calls, size_t i) {
    const Call& c0 = calls[0];
    const bool f64 = c0.dtype == ncclFloat64;
    const double scale = c0.op == ncclAvg ? 1.0 / calls.size() : 1.0;
    auto round = [&](double x) { return f64 ? x : (double)(float)x; };
    double acc = 0.0;
    for (size_t r = 0; r < calls.size(); ++r) {
        double x = load(calls[r].send, i, c0.dtype);
        if (c0.op == ncclAvg) x = round(x * (f64 ? scale : (double)(float)scale));
        if (r == 0) {
            acc = x;
            continue;
        }
        switch (c0.op) {
            case ncclProd: acc = round(acc * x); break;
            case ncclMax: acc = std::max(acc, x); break;
            case ncclMin: acc = std::min(acc, x); break;
            default: acc = round(acc + x);
        }
    }
    return acc;
}

// Runs a collective whose calls have all arrived (every buffer is host memory).
void run(const std::vector<Call>& calls) {
    const Call& c0 = calls[0];
    const size_t n = c0.count;
    const size_t ranks = calls.size();
    switch (c0.kind) {
        case Kind::AllReduce: {
            std::vector<double> out(n);
            for (size_t i = 0; i < n; ++i) out[i] = reduce_at(calls, i);
            for (const Call& c : calls)
                for (size_t i = 0; i < n; ++i) store(c.recv, i, c0.dtype, out[i]);
            break;
        }
        case Kind::ReduceScatter: {  // count is the per-rank share
            std::vector<double> out(n * ranks);
            for (size_t i = 0; i < n * ranks; ++i) out[i] = reduce_at(calls, i);
            for (size_t r = 0; r < ranks; ++r)
                for (size_t i = 0; i < n; ++i) store(calls[r].recv, i, c0.dtype, out[r * n + i]);
            break;
        }
        case Kind::AllGather: {
            const size_t bytes = n * dtype_size(c0.dtype);
            std::vector<char> out(bytes * ranks);
            for (size_t r = 0; r < ranks; ++r) memcpy(out.data() + r * bytes, calls[r].send, bytes);
            for (const Call& c : calls) memcpy(c.recv, out.data(), out.size());
            break;
        }
        case Kind::Broadcast: {
            const size_t bytes = n * dtype_size(c0.dtype);
            std::vector<char> out((const char*)calls[c0.root].send,
                                  (const char*)calls[c0.root].send + bytes);
            for (const Call& c : calls) memcpy(c.recv, out.data(), bytes);
            break;
        }
    }
}

bool same_shape(const Call& a, const Call& b) {
    return a.kind == b.kind && a.count == b.count && a.dtype == b.dtype && a.op == b.op &&
           a.root == b.root;
}

void set_async(Comm* c, ncclResult_t r, const std::string& why) {
    if (c->async_error == ncclSuccess) {
        c->async_error = r;
        c->async_message = why;
    }
}

// Breaks the clique: every rank still waiting, and every later call, fails with ncclRemoteError.
void break_clique(Clique& q, Comm* culprit, const std::string& why) {
    if (q.broken.empty()) q.broken = why;
    for (Comm* c : q.ranks)
        if (c && c != culprit) set_async(c, ncclRemoteError, why);
    q.cv.notify_all();
}

void run_file_task(Comm* c, unsigned long long seq, const Call& call);

struct Task {
    Comm* comm;
    unsigned long long seq;
    Call call;
};

// On the rank's stream: arrive, wait for the others, and finish.
void run_task(void* p) {
    std::unique_ptr<Task> t((Task*)p);
    Comm* c = t->comm;
    if (!c->dir.empty()) return run_file_task(c, t->seq, t->call);
    Clique& q = *c->clique;
    std::unique_lock<std::mutex> lock(q.m);
    const Fault f = fault_now(c->rank);
    if (f != Fault::None) {
        char why[160];
        snprintf(why, sizeof why, "rank %d %s at collective %llu (injected)", c->rank,
                 f == Fault::Error ? "failed" : f == Fault::Die ? "died" : "stalled", t->seq);
        if (f == Fault::Stall) {
            q.cv.wait(lock, [&] { return c->aborted.load(); });
            return;
        }
        if (f == Fault::Error) set_async(c, ncclSystemError, why);
        break_clique(q, c, why);
        return;
    }
    if (c->aborted || !q.broken.empty()) {
        set_async(c, ncclRemoteError, q.broken.empty() ? "the communicator was aborted" : q.broken);
        return;
    }
    Pending& pend = q.pending[t->seq];
    if (pend.calls.empty()) {
        pend.calls.resize(q.nranks);
        pend.arrived.assign(q.nranks, false);
        pend.left = q.nranks;
    }
    pend.calls[c->rank] = t->call;
    pend.arrived[c->rank] = true;
    pend.count += 1;
    if (pend.count == q.nranks) {
        bool same = true;
        for (const Call& other : pend.calls) same = same && same_shape(other, pend.calls[0]);
        if (same) {
            run(pend.calls);
        } else {
            pend.result = ncclInvalidUsage;
            pend.why = "ranks called different collectives (or counts, types, ops, roots) at the "
                       "same point";
        }
        pend.done = true;
        q.cv.notify_all();
    } else {
        q.cv.wait(lock, [&] { return pend.done || !q.broken.empty() || c->aborted.load(); });
    }
    if (!pend.done) {
        set_async(c, ncclRemoteError, q.broken.empty() ? "the communicator was aborted" : q.broken);
        return;
    }
    if (pend.result != ncclSuccess) set_async(c, pend.result, pend.why);
    if (--pend.left == 0) q.pending.erase(t->seq);
}

// ---- Ranks in several processes: a directory of files ----

std::string path_in(const Comm* c, const std::string& name) { return c->dir + "/" + name; }

bool exists(const std::string& path) {
    struct stat st;
    return stat(path.c_str(), &st) == 0;
}

// Writes `bytes` to `path` whole: to a name private to this thread first, then moved into place
// (replacing what is there, or, with `first_wins`, only if nothing is).
bool write_whole(const std::string& path, const std::string& bytes, bool first_wins = false) {
    static std::atomic<unsigned long long> serial{0};
    const std::string tmp =
        path + ".tmp" + std::to_string(getpid()) + "." + std::to_string(++serial);
    FILE* f = fopen(tmp.c_str(), "wb");
    if (!f) return false;
    const bool ok = fwrite(bytes.data(), 1, bytes.size(), f) == bytes.size();
    if (fclose(f) != 0 || !ok) {
        unlink(tmp.c_str());
        return false;
    }
    if (!first_wins) return rename(tmp.c_str(), path.c_str()) == 0;
    const bool placed = link(tmp.c_str(), path.c_str()) == 0;
    unlink(tmp.c_str());
    return placed;
}

bool read_whole(const std::string& path, std::string* out) {
    FILE* f = fopen(path.c_str(), "rb");
    if (!f) return false;
    out->clear();
    char buf[1 << 16];
    size_t n;
    while ((n = fread(buf, 1, sizeof buf, f)) > 0) out->append(buf, n);
    fclose(f);
    return true;
}

// Marks the group broken (the first reason stays) so every rank fails with ncclRemoteError.
void break_dir(const std::string& dir, const std::string& why) {
    if (exists(dir)) write_whole(dir + "/broken", why, true);
}

void break_files(Comm* c, const std::string& why) { break_dir(c->dir, why); }

std::string broken_reason(Comm* c) {
    std::string why;
    return read_whole(path_in(c, "broken"), &why) ? why : std::string();
}

// Polls until `ready` holds (true), or the group is broken or this rank aborted (false).
template <typename Ready>
bool poll_until(Comm* c, Ready ready) {
    auto nap = std::chrono::microseconds(20);
    for (;;) {
        if (ready()) return true;
        if (c->aborted || exists(path_in(c, "broken"))) return false;
        std::this_thread::sleep_for(nap);
        nap = std::min(nap * 2, std::chrono::microseconds(2000));
    }
}

struct Header {
    int kind, dtype, op, root;
    unsigned long long count;
};

std::string contribution(int rank, unsigned long long seq) {
    return "c" + std::to_string(seq) + ".r" + std::to_string(rank);
}

void fail_async(Comm* c, ncclResult_t r, const std::string& why) {
    std::lock_guard<std::mutex> lock(c->clique->m);
    set_async(c, r, why);
}

// On the rank's stream: publish this rank's contribution, wait for every rank's, and compute the
// result from them as the in-memory path does.
void run_file_task(Comm* c, unsigned long long seq, const Call& call) {
    const Fault f = fault_now(c->rank);
    if (f != Fault::None) {
        char why[160];
        snprintf(why, sizeof why, "rank %d %s at collective %llu (injected)", c->rank,
                 f == Fault::Error ? "failed" : f == Fault::Die ? "died" : "stalled", seq);
        if (f == Fault::Stall) {
            while (!c->aborted) std::this_thread::sleep_for(std::chrono::milliseconds(1));
            return;
        }
        if (f == Fault::Error) fail_async(c, ncclSystemError, why);
        break_files(c, why);
        return;
    }
    const std::string broken = broken_reason(c);
    if (c->aborted || !broken.empty()) {
        fail_async(c, ncclRemoteError, broken.empty() ? "the communicator was aborted" : broken);
        return;
    }
    const size_t size = dtype_size(call.dtype);
    const size_t send_elems = call.kind == Kind::ReduceScatter ? call.count * c->nranks : call.count;
    const size_t recv_elems = call.kind == Kind::AllGather ? call.count * c->nranks
                              : call.kind == Kind::ReduceScatter ? call.count
                                                                 : call.count;
    Header h{(int)call.kind, call.dtype, call.op, call.root, (unsigned long long)call.count};
    std::string mine((const char*)&h, sizeof h);
    // A broadcast's non-root ranks contribute nothing but the header.
    if (call.kind != Kind::Broadcast || c->rank == call.root)
        mine.append((const char*)call.send, send_elems * size);
    if (!write_whole(path_in(c, contribution(c->rank, seq)), mine)) {
        const std::string why = "rank " + std::to_string(c->rank) + " cannot write to " + c->dir;
        fail_async(c, ncclSystemError, why);
        break_files(c, why);
        return;
    }
    // Every rank has read collective seq - 2 before writing seq - 1, which this rank has seen.
    if (seq > 2) unlink(path_in(c, contribution(c->rank, seq - 2)).c_str());
    std::vector<std::string> all(c->nranks);
    const bool arrived = poll_until(c, [&] {
        for (int r = 0; r < c->nranks; ++r)
            if (all[r].empty() && !read_whole(path_in(c, contribution(r, seq)), &all[r])) return false;
        return true;
    });
    if (!arrived) {
        const std::string why = broken_reason(c);
        fail_async(c, ncclRemoteError, why.empty() ? "the communicator was aborted" : why);
        return;
    }
    std::vector<Call> calls(c->nranks);
    std::vector<std::vector<char>> scratch(c->nranks);
    for (int r = 0; r < c->nranks; ++r) {
        Header theirs;
        const bool carries = call.kind != Kind::Broadcast || r == call.root;
        if (all[r].size() >= sizeof theirs) memcpy(&theirs, all[r].data(), sizeof theirs);
        if (all[r].size() < sizeof theirs || memcmp(&theirs, &h, sizeof h) != 0 ||
            all[r].size() - sizeof theirs != (carries ? send_elems * size : 0)) {
            fail_async(c, ncclInvalidUsage,
                       "ranks called different collectives (or counts, types, ops, roots) at the "
                       "same point");
            return;
        }
        scratch[r].resize(std::max<size_t>(recv_elems * size, 1));
        calls[r] = call;
        calls[r].send = all[r].data() + sizeof theirs;
        calls[r].recv = scratch[r].data();
    }
    run(calls);
    // An aborted rank's caller may have freed its buffers: the result is delivered only if not.
    if (c->aborted) {
        fail_async(c, ncclRemoteError, "the communicator was aborted");
        return;
    }
    memcpy(call.recv, scratch[c->rank].data(), recv_elems * size);
}


ncclResult_t enqueue(Comm* c, Call call, void* stream) {
    if (!c) return fail(ncclInvalidArgument, "null communicator");
    const size_t size = dtype_size(call.dtype);
    if (size == 0) return fail(ncclInvalidArgument, "unsupported data type (the emulated NCCL has "
                                                    "f16, bf16, f32 and f64)");
    if (call.op < ncclSum || call.op > ncclAvg) return fail(ncclInvalidArgument, "invalid reduction");
    if (call.count > 0 && (!call.send || !call.recv))
        return fail(ncclInvalidArgument, "null buffer");
    Clique& q = *c->clique;
    if (call.kind == Kind::Broadcast && (call.root < 0 || call.root >= q.nranks))
        return fail(ncclInvalidArgument, "broadcast root out of range");
    {
        std::lock_guard<std::mutex> lock(q.m);
        if (c->aborted) return fail(ncclInvalidUsage, "the communicator was aborted");
    }
    auto* t = new Task{c, ++c->calls, call};
    if (cuLaunchHostFunc(stream, run_task, t) != 0) {
        delete t;
        return fail(ncclUnhandledCudaError, "cuLaunchHostFunc failed on the given stream");
    }
    return ncclSuccess;
}

// The directory ranks of several processes meet in, named by the unique id.
std::string meeting_dir(const ncclUniqueId& id) {
    int pid = 0;
    unsigned long long n = 0, nonce = 0;
    sscanf(id.internal, "fusedopt-emulated-nccl pid %d id %llu nonce %llx", &pid, &n, &nonce);
    const char* tmp = getenv("TMPDIR");
    char name[128];
    snprintf(name, sizeof name, "/fusedopt-emu-nccl-%d-%llu-%llx", pid, n, nonce);
    return std::string(tmp && *tmp ? tmp : "/tmp") + name;
}

// Whether process `pid` still runs (a zombie, exited but not yet reaped, does not).
bool alive(int pid) {
    if (kill(pid, 0) != 0 && errno != EPERM) return false;
    std::string stat;
    if (!read_whole("/proc/" + std::to_string(pid) + "/stat", &stat)) return true;
    const size_t paren = stat.rfind(')');
    return paren == std::string::npos || paren + 2 >= stat.size() || stat[paren + 2] != 'Z';
}

// Removes the meeting directory once no live rank's join file is left in it (a rank whose
// process died leaves its join file behind).
void leave_dir(const std::string& dir, int rank) {
    unlink((dir + "/join." + std::to_string(rank)).c_str());
    for (int attempt = 0; attempt < 10; ++attempt) {
        DIR* d = opendir(dir.c_str());
        if (!d) return;
        std::vector<std::string> names;
        bool live = false;
        while (dirent* e = readdir(d)) {
            const std::string name = e->d_name;
            if (name == "." || name == "..") continue;
            names.push_back(name);
            std::string join;
            int pid = 0;
            if (name.rfind("join.", 0) == 0 && read_whole(dir + "/" + name, &join) &&
                sscanf(join.c_str(), "%d", &pid) == 1)
                live = live || alive(pid);
        }
        closedir(d);
        if (live) return;
        for (const std::string& name : names) unlink((dir + "/" + name).c_str());
        // A peer's last file may land meanwhile; look again.
        if (rmdir(dir.c_str()) == 0 || errno == ENOENT) return;
    }
}

ncclResult_t join_in_memory(void** out, int nranks, const ncclUniqueId& id, int rank, int device) {
    Clique* q;
    {
        std::lock_guard<std::mutex> lock(registry_mutex);
        Clique*& slot = cliques()[std::string(id.internal, sizeof id.internal)];
        if (!slot) {
            slot = new Clique();
            slot->nranks = nranks;
            slot->ranks.assign(nranks, nullptr);
        }
        q = slot;
    }
    std::unique_lock<std::mutex> lock(q->m);
    if (q->nranks != nranks) return fail(ncclInvalidUsage, "ranks disagree on the number of ranks");
    if (q->ranks[rank]) return fail(ncclInvalidUsage, "rank joined twice");
    for (Comm* other : q->ranks)
        if (other && other->device == device) {
            char why[160];
            snprintf(why, sizeof why, "Duplicate GPU detected: rank %d and rank %d both on CUDA device %d",
                     rank, other->rank, device);
            return fail(ncclInvalidUsage, why);
        }
    Comm* c = new Comm{q, rank, device};  // freed never: a stream task may still hold it
    c->nranks = nranks;
    q->ranks[rank] = c;
    q->joined += 1;
    q->cv.notify_all();
    *out = c;
    if (group_depth > 0) return ncclSuccess;  // the group's other ranks join from this thread
    const bool all = q->cv.wait_for(lock, std::chrono::seconds(120), [&] { return q->joined == q->nranks; });
    return all ? ncclSuccess : fail(ncclSystemError, "not every rank joined within 120 s");
}

}  // namespace

extern "C" {

ncclResult_t ncclGetVersion(int* version) {
    if (!version) return ncclInvalidArgument;
#ifdef EMU_NCCL_2_12
    *version = 21203;
#else
    *version = 22703;
#endif
    return ncclSuccess;
}

const char* ncclGetErrorString(ncclResult_t r) {
    switch (r) {
        case ncclSuccess: return "no error";
        case ncclUnhandledCudaError: return "unhandled cuda error";
        case ncclSystemError: return "unhandled system error";
        case ncclInternalError: return "internal error";
        case ncclInvalidArgument: return "invalid argument";
        case ncclInvalidUsage: return "invalid usage";
        case ncclRemoteError: return "remote process exited or there was a network error";
        default: return "unknown result code";
    }
}

#ifndef EMU_NCCL_2_12  // ncclGetLastError exists from NCCL 2.13 on
const char* ncclGetLastError(void* comm) {
    (void)comm;
    return last_error.c_str();
}
#endif

ncclResult_t ncclGetUniqueId(ncclUniqueId* id) {
    if (!id) return ncclInvalidArgument;
    static std::atomic<unsigned long long> counter{0};
    const unsigned long long nonce =
        (unsigned long long)std::chrono::steady_clock::now().time_since_epoch().count();
    memset(id->internal, 0, sizeof id->internal);
    snprintf(id->internal, sizeof id->internal, "fusedopt-emulated-nccl pid %d id %llu nonce %llx",
             (int)getpid(), ++counter, nonce);
    return ncclSuccess;
}

ncclResult_t ncclGroupStart(void) {
    group_depth += 1;
    return ncclSuccess;
}

ncclResult_t ncclGroupEnd(void) {
    if (group_depth == 0) return fail(ncclInvalidUsage, "ncclGroupEnd without ncclGroupStart");
    group_depth -= 1;
    return ncclSuccess;
}

ncclResult_t ncclCommInitRank(void** out, int nranks, ncclUniqueId id, int rank) {
    if (!out || nranks < 1 || rank < 0 || rank >= nranks)
        return fail(ncclInvalidArgument, "invalid rank or number of ranks");
    int pid = -1;
    if (sscanf(id.internal, "fusedopt-emulated-nccl pid %d", &pid) != 1)
        return fail(ncclInvalidArgument, "not a unique id of the emulated NCCL");
    int device = 0;
    if (cuCtxGetDevice(&device) != 0)
        return fail(ncclUnhandledCudaError, "no CUDA context is current on the calling thread");
    // Ranks initialised together from one thread, or a group of one, are all here.
    if (group_depth > 0 || nranks == 1) return join_in_memory(out, nranks, id, rank, device);
    // Otherwise the ranks may be in several processes: they meet in a directory first.
    const std::string dir = meeting_dir(id);
    if (mkdir(dir.c_str(), 0700) != 0 && errno != EEXIST)
        return fail(ncclSystemError, "cannot create " + dir);
    const std::string me = std::to_string(getpid()) + " " + std::to_string(device);
    if (!write_whole(dir + "/join." + std::to_string(rank), me))
        return fail(ncclSystemError, "cannot write to " + dir);
    std::vector<std::string> joins(nranks);
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(120);
    for (int r = 0; r < nranks;) {
        if (read_whole(dir + "/join." + std::to_string(r), &joins[r])) {
            ++r;
            continue;
        }
        if (std::chrono::steady_clock::now() > deadline) {
            leave_dir(dir, rank);
            return fail(ncclSystemError, "not every rank joined within 120 s");
        }
        std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
    bool one_process = true;
    for (int r = 0; r < nranks; ++r) {
        int their_pid = -1, their_device = -1;
        sscanf(joins[r].c_str(), "%d %d", &their_pid, &their_device);
        one_process = one_process && their_pid == (int)getpid();
        if (r != rank && their_device == device) {
            // One machine: a device ordinal names the same GPU in every process.
            char why[160];
            snprintf(why, sizeof why, "Duplicate GPU detected: rank %d and rank %d both on CUDA device %d",
                     rank, r, device);
            break_dir(dir, why);  // the others fail at their first collective, not their timeout
            leave_dir(dir, rank);
            return fail(ncclInvalidUsage, why);
        }
    }
    if (one_process) {
        // Every rank has read the join files before it joins in memory.
        const ncclResult_t r = join_in_memory(out, nranks, id, rank, device);
        leave_dir(dir, rank);
        return r;
    }
    auto* q = new Clique();  // this rank's error state alone; never freed, as in memory
    q->nranks = nranks;
    q->ranks.assign(1, nullptr);
    Comm* c = new Comm{q, rank, device};
    c->dir = dir;
    c->nranks = nranks;
    q->ranks[0] = c;
    *out = c;
    return ncclSuccess;
}

ncclResult_t ncclCommAbort(void* comm) {
    Comm* c = (Comm*)comm;
    if (!c) return ncclSuccess;
    Clique& q = *c->clique;
    std::lock_guard<std::mutex> lock(q.m);
    c->aborted = true;
    char why[96];
    snprintf(why, sizeof why, "rank %d aborted its communicator", c->rank);
    break_clique(q, c, why);
    if (!c->dir.empty()) {
        break_files(c, why);
        leave_dir(c->dir, c->rank);
    }
    return ncclSuccess;
}

ncclResult_t ncclCommDestroy(void* comm) { return ncclCommAbort(comm); }

ncclResult_t ncclCommGetAsyncError(void* comm, ncclResult_t* state) {
    Comm* c = (Comm*)comm;
    if (!c || !state) return ncclInvalidArgument;
    std::lock_guard<std::mutex> lock(c->clique->m);
    *state = c->async_error;
    if (c->async_error != ncclSuccess) last_error = c->async_message;
    return ncclSuccess;
}

ncclResult_t ncclCommCount(const void* comm, int* count) {
    if (!comm || !count) return ncclInvalidArgument;
    *count = ((const Comm*)comm)->clique->nranks;
    return ncclSuccess;
}

ncclResult_t ncclCommCuDevice(const void* comm, int* device) {
    if (!comm || !device) return ncclInvalidArgument;
    *device = ((const Comm*)comm)->device;
    return ncclSuccess;
}

ncclResult_t ncclCommUserRank(const void* comm, int* rank) {
    if (!comm || !rank) return ncclInvalidArgument;
    *rank = ((const Comm*)comm)->rank;
    return ncclSuccess;
}

ncclResult_t ncclAllReduce(const void* send, void* recv, size_t count, int dtype, int op, void* comm,
                           void* stream) {
    return enqueue((Comm*)comm, Call{Kind::AllReduce, send, recv, count, dtype, op, 0}, stream);
}

ncclResult_t ncclBroadcast(const void* send, void* recv, size_t count, int dtype, int root,
                           void* comm, void* stream) {
    return enqueue((Comm*)comm, Call{Kind::Broadcast, send, recv, count, dtype, ncclSum, root}, stream);
}

ncclResult_t ncclAllGather(const void* send, void* recv, size_t count, int dtype, void* comm,
                           void* stream) {
    return enqueue((Comm*)comm, Call{Kind::AllGather, send, recv, count, dtype, ncclSum, 0}, stream);
}

ncclResult_t ncclReduceScatter(const void* send, void* recv, size_t count, int dtype, int op,
                               void* comm, void* stream) {
    return enqueue((Comm*)comm, Call{Kind::ReduceScatter, send, recv, count, dtype, op, 0}, stream);
}

// Not NCCL: tests set a fault at run time (kind "error", "stall", "die", or "none").
int fusedopt_emu_nccl_fault(int rank, unsigned long long after, const char* kind) {
    std::lock_guard<std::mutex> lock(fault_mutex);
    FaultSpec& f = fault_spec();
    const std::string k = kind ? kind : "";
    f.rank = rank;
    f.after = after;
    f.kind = k == "error" ? Fault::Error : k == "stall" ? Fault::Stall : k == "die" ? Fault::Die : Fault::None;
    return 0;
}

}  // extern "C"

// A CPU emulation of the parts of the CUDA execution model that csrc/*.cu uses, so the
// kernels' logic (indexing, reductions, barriers, warp shuffles, shared memory) runs in CI on
// machines without a GPU (tests/kernels.rs compiles csrc/*.cu against this header with the
// system C++ compiler). It is not a GPU: no memory model, no timing, no concurrency between
// blocks. Every CUDA thread of a block is a fiber on one OS thread; blocks run one
// after the other; `__syncthreads` and the `__shfl_*_sync` functions switch fibers until all
// live threads of the block / warp have arrived. A block in which no fiber can make progress
// is reported as a deadlock (e.g. a shuffle inside divergent code) instead of hanging.
//
// Strict where a GPU is undefined rather than wrong, so that passing here means something:
// - Thread order: between two barriers the fibers of a block run in an order drawn afresh for
//   every block and every barrier interval from a seed (SG_EMU_SEED, else random; printed
//   with every failure; seed 0 is the plain ascending order). A missing barrier between a
//   write and another thread's read fails whichever thread index writes.
// - Shared memory: dynamic and static `__shared__` memory is NaN-poisoned (0xff bytes) before
//   every block, so a read before a write, or a value left by another block, shows.
// - Tensor-core products (mma_bf16_16816): every lane of a full warp takes part.
// - Shuffles: the lane must be in the mask, all lanes taking part must pass the same mask,
//   and the source lane must take part; `__syncwarp(mask)` must name its caller.
// - Launch limits: block size within the kernel's `__launch_bounds__` (else 1024); grid
//   within the hardware's; static plus dynamic shared memory within 48 KB, or within the
//   kernel's MAX_DYNAMIC_SHARED_SIZE_BYTES attribute (sg_emu_set_max_dynamic_smem) up to
//   sm_90's 227 KB.
// - A launch log per kernel (launches, blocks, threads) for launch-count figures, and counts
//   of the events kernels mark with SG_EMU_COUNT (e.g. sg_sample's passes over a row); in the
//   build with SG_EMU_COUNT_BYTES, the bytes each kernel reads and writes in device memory.
// A violation fails the launch (status -3) with its reason in sg_emu_last_error().
#pragma once

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>
#include <ucontext.h>

#define SG_EMULATION 1
// What a test or the CUDA backend calls in the library (everything else stays hidden, so two
// libraries loaded in one process share nothing).
#define SG_EMU_API extern "C" __attribute__((visibility("default")))
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
// Function-scope statics: one copy for all threads of a block (blocks run one at a time),
// gathered by the linker in one section so that they can be poisoned before every block.
#define __shared__ static __attribute__((section("sg_shared"), used))
extern "C" __attribute__((weak, visibility("hidden"))) char __start_sg_shared[];
extern "C" __attribute__((weak, visibility("hidden"))) char __stop_sg_shared[];
#define SG_DYN_SMEM(T, name) T* name = reinterpret_cast<T*>(sg_emu::dyn_smem.data())
#define SG_EMU_COUNT(what) sg_emu::count(what)

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};

// ---- bf16 (round to nearest even, as __float2bfloat16_rn) ----
struct __nv_bfloat16 {
    uint16_t bits;
};
inline float __bfloat162float(__nv_bfloat16 h) {
    uint32_t u = (uint32_t)h.bits << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 h) { return h.bits; }
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return {(uint16_t)((u >> 16) | 0x40)};  // quiet NaN
    u += 0x7fffu + ((u >> 16) & 1u);
    return {(uint16_t)(u >> 16)};
}

using std::max;
using std::min;
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline unsigned __float_as_uint(float f) {
    unsigned u;
    std::memcpy(&u, &f, 4);
    return u;
}
inline float __fdividef(float a, float b) { return a / b; }
inline float __uint_as_float(unsigned u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
struct alignas(16) uint4 {
    unsigned x, y, z, w;
};
struct alignas(8) uint2 {
    unsigned x, y;
};
struct alignas(16) float4 {
    float x, y, z, w;
};

namespace sg_emu {

constexpr int kWarp = 32;

struct Barrier {
    int live = 0, arrived = 0;
    unsigned gen = 0;
};

// Switching fibers: on x86-64 a few instructions (callee-saved registers and the stack
// pointer); elsewhere ucontext (which also saves the signal mask: a system call per switch).
#if defined(__x86_64__)
extern "C" void sg_emu_switch(void** save_sp, void* load_sp);
asm(R"(
.text
.globl sg_emu_switch
.hidden sg_emu_switch
.type sg_emu_switch,@function
sg_emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
.size sg_emu_switch, .-sg_emu_switch
)");
struct Context {
    void* sp = nullptr;
};
#else
struct Context {
    ucontext_t uc;
};
#endif

constexpr size_t kStack = 64 * 1024;

struct Fiber {
    Context ctx;
    std::unique_ptr<char[]> stack{new char[kStack]};  // not zeroed: reused across launches
    bool done = false;
};

struct Warp {
    Barrier bar;
    uint64_t slot[kWarp];
    unsigned mask[kWarp];      // the mask each lane passed to the shuffle in progress
    unsigned arrived[kWarp];   // the barrier generation at which the lane last arrived
    unsigned frag[kWarp][6];   // each lane's operands of the mma in progress (A, then B)
};

// The first violation of the running launch (empty: none).
inline std::string error;

inline void fail(const std::string& why) {
    if (error.empty()) error = why;
}

// The thread-order seed: SG_EMU_SEED, else random (never 0, which means ascending order).
inline uint64_t init_seed() {
    if (const char* e = std::getenv("SG_EMU_SEED")) return std::strtoull(e, nullptr, 0);
    std::random_device rd;
    const uint64_t s = ((uint64_t)rd() << 32) ^ rd();
    return s ? s : 1;
}
inline uint64_t seed = init_seed();

inline uint64_t mix(uint64_t z) {  // SplitMix64's finaliser
    z += 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

// Per kernel: the dynamic shared memory its attribute allows (0: the 48 KB default) and the
// launch log.
struct KernelInfo {
    size_t max_dynamic_smem = 0;
    unsigned long long launches = 0, blocks = 0, threads = 0;
    unsigned long long read = 0, written = 0;  // bytes of device memory (see below)
};
inline std::map<std::string, KernelInfo> kernels;
}  // namespace sg_emu

// ---- bytes moved per kernel ----
// Device memory is what the host registers (sg_emu_device_memory: the CUDA backend's
// emulated allocations); a kernel's reads and writes of it are counted per kernel
// (KernelInfo::read, ::written) in the library built with SG_EMU_COUNT_BYTES, whose unit is
// compiled with -fsanitize=thread but linked without its runtime: the compiler's
// __tsan_read*/__tsan_write* calls before every memory access land in the hooks below, which
// count the accesses falling in device memory while a kernel's threads run (shared memory,
// the threads' stacks and the emulator's own state are not device memory). Each thread's
// access counts (a value all lanes of a warp load counts once per lane, where a GPU
// broadcasts it): an upper bound on the memory traffic. Other builds count nothing.
namespace sg_emu {
constexpr int kMaxRanges = 1 << 16;
inline uint64_t range_lo[kMaxRanges], range_hi[kMaxRanges];  // sorted by address
inline int nranges = 0;
inline KernelInfo* counting = nullptr;  // the kernel whose threads run

inline void device_memory(uint64_t p, uint64_t len, bool add) {
    int i = 0;
    while (i < nranges && range_lo[i] < p) i++;
    if (add) {
        if (nranges == kMaxRanges) return;  // beyond: not counted
        for (int j = nranges; j > i; j--) {
            range_lo[j] = range_lo[j - 1];
            range_hi[j] = range_hi[j - 1];
        }
        range_lo[i] = p;
        range_hi[i] = p + len;
        nranges++;
    } else if (i < nranges && range_lo[i] == p) {
        for (int j = i; j + 1 < nranges; j++) {
            range_lo[j] = range_lo[j + 1];
            range_hi[j] = range_hi[j + 1];
        }
        nranges--;
    }
}
}  // namespace sg_emu

#ifdef SG_EMU_COUNT_BYTES
#define SG_EMU_NO_TSAN __attribute__((no_sanitize_thread, noinline))
namespace sg_emu {
SG_EMU_NO_TSAN inline void touch(const void* a, unsigned size, bool write) {
    KernelInfo* k = counting;
    if (!k) return;
    const uint64_t p = (uint64_t)a;
    int lo = 0, hi = nranges;  // the last range starting at or below p
    while (lo < hi) {
        const int mid = (lo + hi) / 2;
        if (range_lo[mid] <= p) lo = mid + 1;
        else hi = mid;
    }
    if (lo == 0 || p >= range_hi[lo - 1]) return;
    if (write) k->written += size;
    else k->read += size;
}
}  // namespace sg_emu
#define SG_EMU_HOOK(n)                                                                        \
    extern "C" SG_EMU_NO_TSAN void __tsan_read##n(void* p) { sg_emu::touch(p, n, false); }     \
    extern "C" SG_EMU_NO_TSAN void __tsan_write##n(void* p) { sg_emu::touch(p, n, true); }     \
    extern "C" SG_EMU_NO_TSAN void __tsan_unaligned_read##n(void* p) {                         \
        sg_emu::touch(p, n, false);                                                            \
    }                                                                                          \
    extern "C" SG_EMU_NO_TSAN void __tsan_unaligned_write##n(void* p) {                        \
        sg_emu::touch(p, n, true);                                                             \
    }                                                                                          \
    extern "C" SG_EMU_NO_TSAN void __tsan_volatile_read##n(void* p) {                          \
        sg_emu::touch(p, n, false);                                                            \
    }                                                                                          \
    extern "C" SG_EMU_NO_TSAN void __tsan_volatile_write##n(void* p) {                         \
        sg_emu::touch(p, n, true);                                                             \
    }
SG_EMU_HOOK(1)
SG_EMU_HOOK(2)
SG_EMU_HOOK(4)
SG_EMU_HOOK(8)
SG_EMU_HOOK(16)
extern "C" SG_EMU_NO_TSAN void __tsan_read_range(void* p, unsigned long n) {
    sg_emu::touch(p, (unsigned)n, false);
}
extern "C" SG_EMU_NO_TSAN void __tsan_write_range(void* p, unsigned long n) {
    sg_emu::touch(p, (unsigned)n, true);
}
extern "C" SG_EMU_NO_TSAN void __tsan_func_entry(void*) {}
extern "C" SG_EMU_NO_TSAN void __tsan_func_exit() {}
extern "C" SG_EMU_NO_TSAN void __tsan_init() {}
extern "C" SG_EMU_NO_TSAN void __tsan_vptr_update(void**, void*) {}
extern "C" SG_EMU_NO_TSAN void __tsan_vptr_read(void**) {}
#endif

namespace sg_emu {

// Events the kernels count with SG_EMU_COUNT (sg_emu_take_count reads and resets one).
inline std::map<std::string, unsigned long long> counts;
inline void count(const char* what) { counts[what]++; }

constexpr size_t kStaticSmemLimit = 48 * 1024;     // without the opt-in attribute
constexpr size_t kOptInSmemLimit = 227 * 1024;     // sm_90, per block, with it

inline dim3 gridDim_, blockDim_, blockIdx_, threadIdx_;
inline std::vector<char> dyn_smem;
inline std::vector<Fiber> fibers;
inline std::vector<Warp> warps;
inline Barrier block_bar;
inline Context scheduler;
inline int current = 0;
inline int nthreads = 0;  // threads per block of the running launch
inline unsigned long progress = 0;
inline void (*body)(void*) = nullptr;
inline void* body_arg = nullptr;

inline void switch_to(Context& save, Context& load) {
#if defined(__x86_64__)
    sg_emu_switch(&save.sp, load.sp);
#else
    swapcontext(&save.uc, &load.uc);
#endif
}

inline void yield() { switch_to(fibers[current].ctx, scheduler); }

inline void release(Barrier& b) {
    b.arrived = 0;
    b.gen++;
    progress++;
}

inline void wait(Barrier& b) {
    const unsigned gen = b.gen;
    progress++;
    if (++b.arrived == b.live) {
        release(b);
        return;
    }
    while (b.gen == gen) yield();
}

inline void leave(Barrier& b) {
    b.live--;
    if (b.arrived > 0 && b.arrived == b.live) release(b);
}

inline void fiber_main() {
    body(body_arg);
    fibers[current].done = true;
    progress++;
    leave(block_bar);
    leave(warps[current / kWarp].bar);
#if defined(__x86_64__)
    switch_to(fibers[current].ctx, scheduler);  // never resumed
    std::abort();
#endif
    // (ucontext) returning ends the fiber; uc_link brings control back to the scheduler
}

// A fresh fiber that starts in fiber_main on its own stack.
inline void start(Fiber& fb) {
#if defined(__x86_64__)
    uintptr_t top = (uintptr_t)(fb.stack.get() + kStack) & ~(uintptr_t)15;
    void** sp = (void**)(top - 64);  // 16-aligned: after 6 pops and ret, rsp % 16 == 8
    for (int i = 0; i < 6; i++) sp[i] = nullptr;  // r15 r14 r13 r12 rbx rbp
    sp[6] = (void*)&fiber_main;                    // `ret` goes here
    sp[7] = nullptr;                               // fiber_main's (unused) return address
    fb.ctx.sp = sp;
#else
    getcontext(&fb.ctx.uc);
    fb.ctx.uc.uc_stack.ss_sp = fb.stack.get();
    fb.ctx.uc.uc_stack.ss_size = kStack;
    fb.ctx.uc.uc_link = &scheduler.uc;
    makecontext(&fb.ctx.uc, fiber_main, 0);
#endif
}

inline std::string hex(unsigned m) {
    char b[16];
    std::snprintf(b, sizeof b, "%#010x", m);
    return b;
}

// A warp shuffle: every live lane of the warp arrives, then each reads `src_lane`'s value
// (its own when the source is outside the warp or the block, as shfl_down at the edge).
template <class T>
T shuffle(T v, int src_lane, unsigned mask, const char* what) {
    static_assert(sizeof(T) <= 8, "shuffle of a value up to 8 bytes");
    Warp& w = warps[current / kWarp];
    const int lane = current % kWarp;
    const int base = current - lane;
    std::memcpy(&w.slot[lane], &v, sizeof(T));
    w.mask[lane] = mask;
    const unsigned gen = w.bar.gen;
    w.arrived[lane] = gen;
    if (!(mask >> lane & 1u))
        fail(std::string(what) + ": lane " + std::to_string(lane) + " calls it with mask " +
             hex(mask) + ", which does not name it");
    wait(w.bar);
    for (int l = 0; l < kWarp && base + l < nthreads; l++)
        if (w.arrived[l] == gen && w.mask[l] != mask) {
            fail(std::string(what) + ": lanes " + std::to_string(lane) + " and " +
                 std::to_string(l) + " pass different masks (" + hex(mask) + ", " +
                 hex(w.mask[l]) + ")");
            break;
        }
    T r = v;
    if (src_lane >= 0 && src_lane < kWarp && base + src_lane < nthreads) {
        if (!(mask >> src_lane & 1u) || w.arrived[src_lane] != gen)
            fail(std::string(what) + ": lane " + std::to_string(lane) + " reads lane " +
                 std::to_string(src_lane) + ", which " +
                 (mask >> src_lane & 1u ? "has exited" : "the mask " + hex(mask) + " leaves out"));
        std::memcpy(&r, &w.slot[src_lane], sizeof(T));
    }
    wait(w.bar);
    return r;
}

// Bytes of all static `__shared__` variables of the library (every kernel's together: an
// upper bound on any one kernel's).
inline size_t static_smem_bytes() {
    const char *a = __start_sg_shared, *b = __stop_sg_shared;
    return a && b > a ? (size_t)(b - a) : 0;
}

inline void poison_static_smem() {
    if (const size_t n = static_smem_bytes()) std::memset(__start_sg_shared, 0xff, n);
}

// The launch limits a GPU enforces (or leaves undefined); "" when the launch is valid.
inline std::string check_launch(const char* name, dim3 grid, dim3 block, size_t shared,
                                unsigned max_threads) {
    const unsigned long long n = (unsigned long long)block.x * block.y * block.z;
    char b[256];
    if (n == 0 || grid.x == 0 || grid.y == 0 || grid.z == 0) {
        std::snprintf(b, sizeof b, "%s: empty launch (grid %u,%u,%u, block %llu)", name, grid.x,
                      grid.y, grid.z, n);
        return b;
    }
    if (grid.y > 65535 || grid.z > 65535 || grid.x > 0x7fffffffu) {
        std::snprintf(b, sizeof b, "%s: grid %u,%u,%u beyond the hardware's (2^31-1, 65535, 65535)",
                      name, grid.x, grid.y, grid.z);
        return b;
    }
    if (n > max_threads) {
        std::snprintf(b, sizeof b,
                      "%s: %llu threads per block, above its __launch_bounds__ / the 1024 limit "
                      "(%u)",
                      name, n, max_threads);
        return b;
    }
    const size_t st = static_smem_bytes(), allowed = kernels[name].max_dynamic_smem;
    if (allowed == 0 ? st + shared > kStaticSmemLimit
                     : shared > allowed || st + shared > kOptInSmemLimit) {
        std::snprintf(b, sizeof b,
                      "%s: %zu bytes of static + %zu of dynamic shared memory, above %s", name,
                      st, shared,
                      allowed == 0 ? "48 KB (set MAX_DYNAMIC_SHARED_SIZE_BYTES for more)"
                                   : "the kernel's MAX_DYNAMIC_SHARED_SIZE_BYTES or 227 KB");
        return b;
    }
    return "";
}

inline std::string where(const char* name, unsigned bx, unsigned by, unsigned bz) {
    char b[160];
    std::snprintf(b, sizeof b, " (kernel %s, block %u,%u,%u; SG_EMU_SEED=%llu)", name, bx, by, bz,
                  (unsigned long long)seed);
    return b;
}

// Runs `grid` blocks of `block` threads. Returns 0, or -1 on a deadlock, -3 on a violation
// (the reason in `error`).
inline int run(const char* name, dim3 grid, dim3 block, size_t shared, unsigned max_threads,
               void (*f)(void*), void* arg) {
    error.clear();
    error = check_launch(name, grid, block, shared, max_threads);
    if (!error.empty()) {
        error += where(name, 0, 0, 0);
        return -3;
    }
    const int n = (int)(block.x * block.y * block.z);
    KernelInfo& info = kernels[name];
    // its threads' accesses to device memory count for it until it returns
    struct Counting {
        explicit Counting(KernelInfo* k) { counting = k; }
        ~Counting() { counting = nullptr; }
    } counting_for(&info);
    info.launches++;
    info.blocks += (unsigned long long)grid.x * grid.y * grid.z;
    info.threads += (unsigned long long)grid.x * grid.y * grid.z * n;
    body = f;
    body_arg = arg;
    gridDim_ = grid;
    blockDim_ = block;
    nthreads = n;
    if ((int)fibers.size() < n) fibers.resize(n);  // stacks are kept from launch to launch
    warps.assign((n + kWarp - 1) / kWarp, Warp{});
    dyn_smem.assign(shared + 16, (char)0xff);  // NaN-poisoned: reads before writes show
    std::vector<int> order(n);
    uint64_t name_hash = 1469598103934665603ull;
    for (const char* c = name; *c; c++) name_hash = (name_hash ^ (unsigned char)*c) * 1099511628211ull;
    for (unsigned bz = 0; bz < grid.z; bz++)
        for (unsigned by = 0; by < grid.y; by++)
            for (unsigned bx = 0; bx < grid.x; bx++) {
                blockIdx_ = {bx, by, bz};
                block_bar = Barrier{};
                block_bar.live = n;
                for (size_t w = 0; w < warps.size(); w++) {
                    warps[w].bar = Barrier{};
                    warps[w].bar.live = std::min(kWarp, n - (int)w * kWarp);
                    std::fill(std::begin(warps[w].arrived), std::end(warps[w].arrived), ~0u);
                }
                std::fill(dyn_smem.begin(), dyn_smem.end(), (char)0xff);
                poison_static_smem();
                for (int t = 0; t < n; t++) {
                    fibers[t].done = false;
                    start(fibers[t]);
                    order[t] = t;
                }
                uint64_t rng = mix(seed ^ mix(name_hash ^ mix(((uint64_t)bz << 42) ^
                                                              ((uint64_t)by << 21) ^ bx)));
                int live = n;
                while (live > 0) {
                    const unsigned long before = progress;
                    if (seed != 0)  // a fresh order for every barrier interval
                        for (int i = n - 1; i > 0; i--) {
                            rng = mix(rng);
                            std::swap(order[i], order[rng % (uint64_t)(i + 1)]);
                        }
                    live = 0;
                    for (int t : order) {
                        if (fibers[t].done) continue;
                        current = t;
                        threadIdx_ = {(unsigned)t % block.x, ((unsigned)t / block.x) % block.y,
                                      (unsigned)t / (block.x * block.y)};
                        switch_to(scheduler, fibers[t].ctx);
                        live += !fibers[t].done;
                    }
                    if (live > 0 && progress == before) {
                        error = "deadlock: " + std::to_string(live) +
                                " threads wait on a barrier or shuffle that the others never "
                                "reach" + where(name, bx, by, bz);
                        std::fprintf(stderr, "emulator: %s\n", error.c_str());
                        return -1;
                    }
                }
                if (!error.empty()) {
                    error += where(name, bx, by, bz);
                    std::fprintf(stderr, "emulator: %s\n", error.c_str());
                    return -3;
                }
            }
    return 0;
}

// Kernel arguments as cuLaunchKernel takes them: one pointer per parameter.
template <class... A>
struct Call {
    void (*f)(A...);
    std::tuple<std::decay_t<A>...> args;
    static void invoke(void* p) { std::apply(static_cast<Call*>(p)->f, static_cast<Call*>(p)->args); }
};

template <class... A, size_t... I>
int launch_impl(const char* name, void (*f)(A...), dim3 grid, dim3 block, size_t shared,
                unsigned max_threads, void** args, std::index_sequence<I...>) {
    Call<A...> call{f, {*static_cast<std::decay_t<A>*>(args[I])...}};
    return run(name, grid, block, shared, max_threads, &Call<A...>::invoke, &call);
}

template <class... A>
int launch(const char* name, void (*f)(A...), dim3 grid, dim3 block, size_t shared,
           unsigned max_threads, void** args) {
    return launch_impl(name, f, grid, block, shared, max_threads, args,
                       std::index_sequence_for<A...>{});
}

}  // namespace sg_emu

#define gridDim (sg_emu::gridDim_)
#define blockDim (sg_emu::blockDim_)
#define blockIdx (sg_emu::blockIdx_)
#define threadIdx (sg_emu::threadIdx_)

inline void __syncthreads() { sg_emu::wait(sg_emu::block_bar); }
inline void __syncwarp(unsigned mask = 0xffffffffu) {
    if (!(mask >> (sg_emu::current % sg_emu::kWarp) & 1u))
        sg_emu::fail("__syncwarp: called by a lane its mask " + sg_emu::hex(mask) +
                     " does not name");
    sg_emu::wait(sg_emu::warps[sg_emu::current / sg_emu::kWarp].bar);
}
template <class T>
T __shfl_sync(unsigned mask, T v, int src) {
    return sg_emu::shuffle(v, src % sg_emu::kWarp, mask, "__shfl_sync");
}
template <class T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask) {
    return sg_emu::shuffle(v, (sg_emu::current % sg_emu::kWarp) ^ lane_mask, mask,
                           "__shfl_xor_sync");
}
template <class T>
T __shfl_down_sync(unsigned mask, T v, unsigned d) {
    const int lane = sg_emu::current % sg_emu::kWarp;
    return sg_emu::shuffle(v, lane + (int)d < sg_emu::kWarp ? lane + (int)d : lane, mask,
                           "__shfl_down_sync");
}
template <class T>
T __shfl_up_sync(unsigned mask, T v, unsigned d) {
    const int lane = sg_emu::current % sg_emu::kWarp;
    return sg_emu::shuffle(v, lane >= (int)d ? lane - (int)d : lane, mask, "__shfl_up_sync");
}

// mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 for one warp: d += A·B, A 16 x 16 and
// B 16 x 8 bf16, d 16 x 8 f32, each spread over the 32 lanes as the PTX ISA lays them out
// (lane = 4 g + t; A regs {(g, 2t), (g + 8, 2t), (g, 2t + 8), (g + 8, 2t + 8)}, two columns
// each; B regs {(2t, g), (2t + 8, g)}, two rows each; d {(g, 2t), (g, 2t + 1), (g + 8, 2t),
// (g + 8, 2t + 1)}). Every lane of a full warp must take part (else the launch fails); the
// products accumulate in f32 in k order.
inline void mma_bf16_16816(float d[4], const unsigned a[4], const unsigned b[2]) {
    using namespace sg_emu;
    Warp& w = warps[current / kWarp];
    const int lane = current % kWarp;
    const int base = current - lane;
    for (int i = 0; i < 4; i++) w.frag[lane][i] = a[i];
    for (int i = 0; i < 2; i++) w.frag[lane][4 + i] = b[i];
    const unsigned gen = w.bar.gen;
    w.arrived[lane] = gen;
    wait(w.bar);
    for (int l = 0; l < kWarp; l++)
        if (base + l >= nthreads || w.arrived[l] != gen) {
            fail("mma.sync: lane " + std::to_string(l) + " of the warp does not take part");
            break;
        }
    auto half = [](unsigned word, int hi) { return __uint_as_float(hi ? word & 0xffff0000u : word << 16); };
    // A(r, k) and B(k, n) from the lanes holding them
    auto A = [&](int r, int k) {
        const unsigned word = w.frag[(r % 8) * 4 + (k % 8) / 2][r / 8 + 2 * (k / 8)];
        return half(word, k % 2);
    };
    auto B = [&](int k, int n) {
        const unsigned word = w.frag[n * 4 + (k % 8) / 2][4 + k / 8];
        return half(word, k % 2);
    };
    const int g = lane / 4, t = lane % 4;
    for (int j = 0; j < 4; j++) {
        const int r = g + (j >> 1) * 8, n = 2 * t + (j & 1);
        float s = d[j];
        for (int k = 0; k < 16; k++) s += A(r, k) * B(k, n);
        d[j] = s;
    }
    wait(w.bar);  // no lane overwrites its fragments before every lane has read them
}

// Atomics: the fibers of a block never interleave within a call, so a plain read-modify-write
// is atomic here (blocks run one after the other).
inline unsigned atomicAdd(unsigned* a, unsigned v) {
    const unsigned old = *a;
    *a = old + v;
    return old;
}
inline unsigned long long atomicAdd(unsigned long long* a, unsigned long long v) {
    const unsigned long long old = *a;
    *a = old + v;
    return old;
}
inline unsigned atomicOr(unsigned* a, unsigned v) {
    const unsigned old = *a;
    *a = old | v;
    return old;
}

// A CPU emulation of the parts of the CUDA execution model that csrc/*.cu uses, so the
// kernels' logic (indexing, reductions, barriers, warp shuffles, shared memory) runs in CI on
// machines without a GPU (tests/kernels.rs compiles csrc/*.cu against this header with the
// system C++ compiler). It is not a GPU: no memory model, no timing, no concurrency between
// blocks. Every CUDA thread of a block is a fiber on one OS thread; blocks run one
// after the other; `__syncthreads` and the `__shfl_*_sync` functions switch fibers until all
// live threads of the block / warp have arrived. A block in which no fiber can make progress
// is reported as a deadlock (e.g. a shuffle inside divergent code) instead of hanging.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>
#include <ucontext.h>

#define SG_EMULATION 1
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
// Function-scope statics: one copy for all threads of a block (blocks run one at a time).
#define __shared__ static
#define SG_DYN_SMEM(T, name) T* name = reinterpret_cast<T*>(sg_emu::dyn_smem.data())

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
};

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

template <class T>
T shuffle(T v, int src_lane) {
    static_assert(sizeof(T) <= 8, "shuffle of a value up to 8 bytes");
    Warp& w = warps[current / kWarp];
    const int lane = current % kWarp;
    std::memcpy(&w.slot[lane], &v, sizeof(T));
    wait(w.bar);
    T r = v;
    const int base = current - lane;
    if (src_lane >= 0 && src_lane < kWarp && base + src_lane < nthreads)
        std::memcpy(&r, &w.slot[src_lane], sizeof(T));
    wait(w.bar);
    return r;
}

// Runs `grid` blocks of `block` threads. Returns 0, or -1 after printing why (deadlock).
inline int run(dim3 grid, dim3 block, size_t shared, void (*f)(void*), void* arg) {
    const int n = (int)(block.x * block.y * block.z);
    body = f;
    body_arg = arg;
    gridDim_ = grid;
    blockDim_ = block;
    nthreads = n;
    if ((int)fibers.size() < n) fibers.resize(n);  // stacks are kept from launch to launch
    warps.assign((n + kWarp - 1) / kWarp, Warp{});
    dyn_smem.assign(shared + 16, (char)0xff);  // NaN-poisoned: reads before writes show
    for (unsigned bz = 0; bz < grid.z; bz++)
        for (unsigned by = 0; by < grid.y; by++)
            for (unsigned bx = 0; bx < grid.x; bx++) {
                blockIdx_ = {bx, by, bz};
                block_bar = Barrier{};
                block_bar.live = n;
                for (size_t w = 0; w < warps.size(); w++) {
                    warps[w].bar = Barrier{};
                    warps[w].bar.live = std::min(kWarp, n - (int)w * kWarp);
                }
                std::fill(dyn_smem.begin(), dyn_smem.end(), (char)0xff);
                for (int t = 0; t < n; t++) {
                    fibers[t].done = false;
                    start(fibers[t]);
                }
                int live = n;
                while (live > 0) {
                    const unsigned long before = progress;
                    live = 0;
                    for (int t = 0; t < n; t++) {
                        if (fibers[t].done) continue;
                        current = t;
                        threadIdx_ = {(unsigned)t % block.x, ((unsigned)t / block.x) % block.y,
                                      (unsigned)t / (block.x * block.y)};
                        switch_to(scheduler, fibers[t].ctx);
                        live += !fibers[t].done;
                    }
                    if (live > 0 && progress == before) {
                        std::fprintf(stderr,
                                     "emulator: deadlock in block (%u,%u,%u): %d threads wait on "
                                     "a barrier or shuffle that the others never reach\n",
                                     bx, by, bz, live);
                        return -1;
                    }
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
int launch_impl(void (*f)(A...), dim3 grid, dim3 block, size_t shared, void** args,
                std::index_sequence<I...>) {
    Call<A...> call{f, {*static_cast<std::decay_t<A>*>(args[I])...}};
    return run(grid, block, shared, &Call<A...>::invoke, &call);
}

template <class... A>
int launch(void (*f)(A...), dim3 grid, dim3 block, size_t shared, void** args) {
    return launch_impl(f, grid, block, shared, args, std::index_sequence_for<A...>{});
}

}  // namespace sg_emu

#define gridDim (sg_emu::gridDim_)
#define blockDim (sg_emu::blockDim_)
#define blockIdx (sg_emu::blockIdx_)
#define threadIdx (sg_emu::threadIdx_)

inline void __syncthreads() { sg_emu::wait(sg_emu::block_bar); }
inline void __syncwarp(unsigned = 0xffffffffu) { sg_emu::wait(sg_emu::warps[sg_emu::current / sg_emu::kWarp].bar); }
template <class T>
T __shfl_sync(unsigned, T v, int src) {
    return sg_emu::shuffle(v, src);
}
template <class T>
T __shfl_xor_sync(unsigned, T v, int mask) {
    return sg_emu::shuffle(v, (sg_emu::current % sg_emu::kWarp) ^ mask);
}
template <class T>
T __shfl_down_sync(unsigned, T v, unsigned d) {
    const int lane = sg_emu::current % sg_emu::kWarp;
    return lane + (int)d < sg_emu::kWarp ? sg_emu::shuffle(v, lane + (int)d) : sg_emu::shuffle(v, lane);
}

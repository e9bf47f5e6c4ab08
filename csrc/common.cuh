// Helpers shared by the kernels of csrc/ (included by each .cu; build.rs and the emulator
// compile them as one unit).
#pragma once

#ifndef SG_EMULATION  // tests/kernel_emu/cuda_emu.h runs these kernels on the CPU in tests
#include <cuda_bf16.h>
#define SG_DYN_SMEM(T, name) extern __shared__ T name[]
// The emulator counts events a test asserts on (e.g. passes over a row); nothing on a GPU.
#define SG_EMU_COUNT(what)
#endif
#include <stdint.h>

typedef __nv_bfloat16 bf16;

#ifndef SG_EMULATION
// d += A·B on the tensor cores for one warp (every lane): A 16 x 16 bf16 (row-major
// fragments), B 16 x 8 bf16 (column-major), d 16 x 8 f32; sm_80 and later. The emulator
// (tests/kernel_emu/cuda_emu.h) implements the same lane layout.
__device__ __forceinline__ void mma_bf16_16816(float d[4], const unsigned a[4],
                                               const unsigned b[2]) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
#endif

#define WARP 32

// The bf16 pair in a 32-bit word (the lower address in the low half) as two floats.
__device__ __forceinline__ void bf16x2_to_float(unsigned w, float* lo, float* hi) {
    *lo = __uint_as_float(w << 16);
    *hi = __uint_as_float(w & 0xffff0000u);
}

template <class T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
    for (int o = WARP / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024); every thread gets it.
template <class T>
__device__ T block_sum(T v) {
    __shared__ T part[32];
    const int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP;
    v = warp_sum(v);
    if (lane == 0) part[warp] = v;
    __syncthreads();
    const int warps = blockDim.x / WARP;
    T s = lane < warps ? part[lane] : T(0);
    s = warp_sum(s);
    __syncthreads();  // `part` may be reused by the next call
    return s;
}

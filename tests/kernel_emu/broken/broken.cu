// Kernels broken on purpose: one per class of error that the emulator's strict rules catch
// and its former rules (threads in ascending order, static shared memory zeroed once, shuffle
// masks and launch limits ignored) let through. Each computes the right answer under those
// former rules. tests/kernel_emu_strict.rs launches them.
#include "../../../csrc/common.cuh"

// A race: thread 0 writes, the others read, with no barrier in between. In ascending order
// thread 0 always ran first, so every thread read the value written.
extern "C" __global__ void race_missing_barrier(float* out) {
    __shared__ float v;
    if (threadIdx.x == 0) v = 1.0f + blockIdx.x;
    // __syncthreads() missing here
    out[blockIdx.x * blockDim.x + threadIdx.x] = v;
}

// Static shared memory read before it is written (a GPU leaves it undefined): zeroed memory
// made the sum right.
extern "C" __global__ void reads_unwritten_shared(const float* x, float* out) {
    __shared__ float sum;
    // sum = 0 missing here
    __syncthreads();
    if (threadIdx.x == 0) sum += x[blockIdx.x];
    __syncthreads();
    if (threadIdx.x == 0) out[blockIdx.x] = sum;
}

// A shuffle whose mask leaves out half the lanes that call it and that are read from.
extern "C" __global__ void shuffle_outside_its_mask(const float* x, float* out) {
    float v = x[threadIdx.x];
    v += __shfl_xor_sync(0x0000ffffu, v, 16);
    out[threadIdx.x] = v;
}

// Compiled for at most 64 threads per block (the compiler may use registers that more
// threads would not have); launched with more it does not start on a GPU.
extern "C" __global__ void __launch_bounds__(64) bounded_to_64_threads(float* out) {
    out[blockIdx.x * blockDim.x + threadIdx.x] = (float)threadIdx.x;
}

// Dynamic shared memory: above 48 KB only with the kernel's attribute raised first.
extern "C" __global__ void dynamic_shared(float* out, int n) {
    SG_DYN_SMEM(float, s);
    for (int i = threadIdx.x; i < n; i += blockDim.x) s[i] = (float)i;
    __syncthreads();
    for (int i = threadIdx.x; i < n; i += blockDim.x) out[i] = s[n - 1 - i];
}

// A tensor-core product (mma.sync) in divergent code: half the warp calls it. The instruction
// is warp-wide (a GPU's result is undefined); the emulator fails the launch. Its twin below
// has every lane call it: all-ones operands give 16 in every element of d.
__device__ __forceinline__ void mma_ones(float* d) {
    const unsigned one2 = 0x3f803f80u;  // two bf16 ones
    const unsigned a[4] = {one2, one2, one2, one2};
    const unsigned b[2] = {one2, one2};
    mma_bf16_16816(d, a, b);
}
extern "C" __global__ void mma_in_divergent_code(float* out) {
    float d[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    if (threadIdx.x % WARP < 16) mma_ones(d);
    for (int j = 0; j < 4; j++) out[threadIdx.x * 4 + j] = d[j];
}
extern "C" __global__ void mma_whole_warp(float* out) {
    float d[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    mma_ones(d);
    for (int j = 0; j < 4; j++) out[threadIdx.x * 4 + j] = d[j];
}

// Broken on purpose: 64 KB of static shared memory, above the 48 KB a block may declare
// statically (ptxas refuses it; the emulator refuses the launch). Its own library, since
// the emulator counts every static __shared__ variable of a library together.
#include "../../../csrc/common.cuh"

extern "C" __global__ void static_shared_64k(float* out) {
    __shared__ float big[16384];
    big[threadIdx.x] = (float)threadIdx.x;
    __syncthreads();
    out[threadIdx.x] = big[(threadIdx.x + 1) % blockDim.x];
}

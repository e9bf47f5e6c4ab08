// Kernels of the CUDA backend (src/backend/cuda). Storage is bf16 (weights, KV cache); the
// inputs of the matrix products are bf16 too, written so by the kernel before each product
// (the norms, attention, SiLU-and-mul), so no separate conversion runs; the residual stream
// and the products' outputs are f32 (cuBLAS accumulates in f32; the residual adds stay f32 as
// on the CPU); all arithmetic is f32. Every kernel is `extern "C"` (looked up by name from
// the embedded fatbin) and takes plain pointers and sizes, so the launches can be captured
// in a CUDA graph later. Layouts:
//   activations   row-major [tokens][width] (as on the CPU)
//   q, k, v       one row per token [q | k | v], the output of one fused product
//   gate, up      one row per token [gate | up], likewise
//   weights       HF layout [out_features][in_features] (as on the CPU)
//   KV cache      per layer, bf16 [slot][kv_head][head_dim], slot = page * page_size + offset
//                 (the CPU's is f32 [page][kv_head][offset][head_dim]; the slot numbers agree)
//   RoPE          Hugging Face half rotation, cos/sin from a device table [position][dim/2]

#include "common.cuh"

// out[t] = table[tokens[t] - vocab_start], zeros for ids outside this shard's rows. An id
// with its top bit set is not known to the host yet: it is the token the previous step
// sampled in row (id & 0x7fffffff) of its outputs, `future` (the overlap scheduler queues a
// decode step before it has read the tokens of the step before).
extern "C" __global__ void sg_embedding(const bf16* __restrict__ table,
                                        const uint32_t* __restrict__ tokens,
                                        const uint32_t* __restrict__ future,
                                        float* __restrict__ out, int hidden, int vocab_start,
                                        int rows) {
    const int t = blockIdx.x;
    uint32_t id = tokens[t];
    if (id & 0x80000000u) id = future[id & 0x7fffffffu];
    const long row = (long)id - vocab_start;
    float* o = out + (long)t * hidden;
    if (row < 0 || row >= rows) {
        for (int i = threadIdx.x; i < hidden; i += blockDim.x) o[i] = 0.0f;
        return;
    }
    const bf16* src = table + row * hidden;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) o[i] = __bfloat162float(src[i]);
}

// float4s of a row each thread keeps in registers in the one-pass norm: rows up to
// NORM_VEC * 4 * blockDim.x values (8,192 at 256 threads).
#define NORM_VEC 8

// Two bf16 (round to nearest even) in one 32-bit word, `lo` at the lower address.
__device__ __forceinline__ unsigned pack_bf16x2(float lo, float hi) {
    return (unsigned)__bfloat16_as_ushort(__float2bfloat16_rn(lo)) |
           ((unsigned)__bfloat16_as_ushort(__float2bfloat16_rn(hi)) << 16);
}

// One row of RMSNorm, one block: x (+= delta when ADD, written back) then
// out = bf16(x * rsqrt(mean(x^2) + eps) * w), the next product's input. Rows of a multiple of
// 4 values that fit NORM_VEC float4s per thread take one pass over memory: 16-byte loads,
// the values kept in registers between the sum of squares and the output, 8-byte stores.
// Other rows take two passes (x read twice).
template <bool ADD>
__device__ __forceinline__ void rms_norm_row(float* __restrict__ x, const float* __restrict__ delta,
                                             const bf16* __restrict__ w, bf16* __restrict__ o,
                                             int hidden, float eps) {
    const int n4 = hidden / 4;
    if (hidden % 4 == 0 && n4 <= NORM_VEC * (int)blockDim.x) {
        float4 v[NORM_VEC];
        float ss = 0.0f;
#pragma unroll
        for (int k = 0; k < NORM_VEC; k++) {
            const int i = threadIdx.x + k * blockDim.x;
            if (i < n4) {
                float4 a = reinterpret_cast<const float4*>(x)[i];
                if (ADD) {
                    const float4 b = reinterpret_cast<const float4*>(delta)[i];
                    a.x += b.x;
                    a.y += b.y;
                    a.z += b.z;
                    a.w += b.w;
                    reinterpret_cast<float4*>(x)[i] = a;
                }
                v[k] = a;
                ss += a.x * a.x + a.y * a.y + a.z * a.z + a.w * a.w;
            }
        }
        const float inv = rsqrtf(block_sum(ss) / hidden + eps);
#pragma unroll
        for (int k = 0; k < NORM_VEC; k++) {
            const int i = threadIdx.x + k * blockDim.x;
            if (i < n4) {
                const uint2 wb = reinterpret_cast<const uint2*>(w)[i];
                float w0, w1, w2, w3;
                bf16x2_to_float(wb.x, &w0, &w1);
                bf16x2_to_float(wb.y, &w2, &w3);
                const float4 a = v[k];
                reinterpret_cast<uint2*>(o)[i] = uint2{pack_bf16x2(a.x * inv * w0, a.y * inv * w1),
                                                       pack_bf16x2(a.z * inv * w2, a.w * inv * w3)};
            }
        }
        return;
    }
    float ss = 0.0f;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
        const float v = ADD ? x[i] + delta[i] : x[i];
        if (ADD) x[i] = v;
        ss += v * v;
    }
    const float inv = rsqrtf(block_sum(ss) / hidden + eps);
    for (int i = threadIdx.x; i < hidden; i += blockDim.x)
        o[i] = __float2bfloat16_rn(x[i] * inv * __bfloat162float(w[i]));
}

// One block per row: out = bf16(rmsnorm(x) * w), the next product's input.
extern "C" __global__ void sg_rms_norm(const float* __restrict__ x, const bf16* __restrict__ w,
                                       bf16* __restrict__ out, int hidden, float eps) {
    // x is only read (ADD = false)
    rms_norm_row<false>(const_cast<float*>(x) + (long)blockIdx.x * hidden, nullptr, w,
                        out + (long)blockIdx.x * hidden, hidden, eps);
}

// residual += delta; out = bf16(rmsnorm(residual) * w) (one block per row).
extern "C" __global__ void sg_add_rms_norm(float* __restrict__ residual,
                                           const float* __restrict__ delta,
                                           const bf16* __restrict__ w, bf16* __restrict__ out,
                                           int hidden, float eps) {
    const long row = (long)blockIdx.x * hidden;
    rms_norm_row<true>(residual + row, delta + row, w, out + row, hidden, eps);
}

// Activations to bf16 for the tensor-core matrix products (round to nearest even).
extern "C" __global__ void sg_f32_to_bf16(const float* __restrict__ x, bf16* __restrict__ y,
                                          long n) {
    for (long i = (long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long)gridDim.x * blockDim.x)
        y[i] = __float2bfloat16_rn(x[i]);
}

// out[r][i] = bf16(silu(gate) * up) for rows [gate | up] of 2 * inter values (the fused
// product's output); n = rows * inter.
extern "C" __global__ void sg_silu_mul(const float* __restrict__ gate_up, bf16* __restrict__ out,
                                       int inter, long n) {
    for (long i = (long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long)gridDim.x * blockDim.x) {
        const long r = i / inter, j = i % inter;
        const float g = gate_up[r * 2 * inter + j];
        out[i] = __float2bfloat16_rn(g / (1.0f + __expf(-g)) * gate_up[r * 2 * inter + inter + j]);
    }
}

// RoPE and the KV store, one block per new token, on rows [q | k | v] (q_heads, kv_heads and
// kv_heads heads of dim): q is rotated in place (attention reads it there), k rotated and v
// copied into the token's slot of the bf16 cache. cos/sin rows come from the device table
// [position][dim / 2] at the token's position.
extern "C" __global__ void sg_rope_store_kv(float* __restrict__ qkv,
                                            const float* __restrict__ cos_t,
                                            const float* __restrict__ sin_t,
                                            const uint32_t* __restrict__ positions,
                                            const uint32_t* __restrict__ slots,
                                            bf16* __restrict__ kc, bf16* __restrict__ vc,
                                            int q_heads, int kv_heads, int dim) {
    const int t = blockIdx.x, half = dim / 2, kv_dim = kv_heads * dim;
    float* row = qkv + (long)t * (q_heads + 2 * kv_heads) * dim;
    const float* c = cos_t + (long)positions[t] * half;
    const float* s = sin_t + (long)positions[t] * half;
    const long dst = (long)slots[t] * kv_dim;
    const int heads = q_heads + kv_heads;
    for (int j = threadIdx.x; j < heads * half; j += blockDim.x) {
        const int h = j / half, i = j % half;
        float* x = row + (long)h * dim;
        const float x1 = x[i], x2 = x[i + half];
        const float r1 = x1 * c[i] - x2 * s[i], r2 = x2 * c[i] + x1 * s[i];
        if (h < q_heads) {
            x[i] = r1;
            x[i + half] = r2;
        } else {
            const long o = dst + (long)(h - q_heads) * dim;
            kc[o + i] = __float2bfloat16_rn(r1);
            kc[o + i + half] = __float2bfloat16_rn(r2);
        }
    }
    const float* v = row + (long)heads * dim;
    for (int i = threadIdx.x; i < kv_dim; i += blockDim.x) vc[dst + i] = __float2bfloat16_rn(v[i]);
}

// out[i] = x[rows[i]] for bf16 rows of `width` values.
extern "C" __global__ void sg_gather_rows(const bf16* __restrict__ x,
                                          const uint32_t* __restrict__ rows,
                                          bf16* __restrict__ out, int width) {
    const bf16* src = x + (long)rows[blockIdx.x] * width;
    bf16* o = out + (long)blockIdx.x * width;
    for (int i = threadIdx.x; i < width; i += blockDim.x) o[i] = src[i];
}

#define ATTN_WARPS 4
#define MAX_GROUP 8
#define MAX_PER_LANE 8  // head_dim <= 256

// Positions [*begin, *end) of split blockIdx.z of a token at position `pos` (see
// sg_attention): the whole context 0..=pos with one split.
__device__ __forceinline__ void split_range(int pos, int min_split_len, int* begin, int* end) {
    const int ctx = pos + 1;
    const int len = max(min_split_len, (ctx + (int)gridDim.z - 1) / (int)gridDim.z);
    *begin = (int)blockIdx.z * len;
    *end = min(ctx, *begin + len);
}

// The end of every attention kernel: merges the ATTN_WARPS warps' online softmaxes, laid out
// in shared memory as [warps][group] maxima, [warps][group] sums and [warps][group][dim]
// accumulators, and writes the block's output: normalised bf16 with one split, else the
// split's max, sum and unnormalised accumulator for sg_attention_merge.
__device__ __forceinline__ void attention_write(const float* smem, int group, int dim, int t,
                                                int q_heads, int kvh, bf16* __restrict__ out,
                                                float* __restrict__ part_ml,
                                                float* __restrict__ part_acc) {
    const float* sm = smem;
    const float* sl = smem + ATTN_WARPS * group;
    const float* sacc = smem + 2 * ATTN_WARPS * group;
    for (int i = threadIdx.x; i < group * dim; i += blockDim.x) {
        const int g = i / dim, d = i % dim;
        float mm = -INFINITY;
        for (int w = 0; w < ATTN_WARPS; w++) mm = fmaxf(mm, sm[w * group + g]);
        float ll = 0.0f, o = 0.0f;
        for (int w = 0; w < ATTN_WARPS; w++) {
            const float mw = sm[w * group + g];
            if (mw == -INFINITY) continue;  // a warp that saw no position
            const float f = __expf(mw - mm);
            ll += sl[w * group + g] * f;
            o += sacc[((long)w * group + g) * dim + d] * f;
        }
        const long head = (long)t * q_heads + kvh * group + g;
        if (gridDim.z == 1) {
            out[head * dim + d] = __float2bfloat16_rn(o / ll);
        } else {  // an empty split leaves m = -inf, l = 0, acc = 0
            const long row = head * gridDim.z + blockIdx.z;
            part_acc[row * dim + d] = o;
            if (d == 0) {
                part_ml[row * 2] = mm;
                part_ml[row * 2 + 1] = ll;
            }
        }
    }
}

// Paged causal attention, prefill and decode alike. One block per (new token, KV head,
// split): the block reads each cached K/V row once for all query heads of the group (GQA).
// Token t's query heads start at q + t * q_stride (rows [q | k | v]); its output is bf16
// [token][q_heads][dim], the input of the o product.
// Each warp walks a quarter of the block's positions with an online softmax per query head;
// the warps then merge their partial results. Token t sits at position positions[t] of
// sequence token_seq[t] and attends to positions 0..=positions[t] through that sequence's
// pages.
// Split along the sequence (flash-decoding): block z covers positions [z * len, (z + 1) * len)
// of its token's context, len = max(min_split_len, ceil(context / gridDim.z)) (split_range):
// the grid depends on the batch alone, not on context lengths (so a captured graph replays
// at any length), and each token's own context is what gets divided. With one split
// (gridDim.z == 1) the block writes the
// normalised output; with several, each writes its running max and sum to part_ml
// [token][q_head][split][2] and its unnormalised accumulator to part_acc
// [token][q_head][split][dim], and sg_attention_merge combines them. Decode of a few
// sequences with long contexts then fills the GPU instead of using kv_heads blocks.
// Dynamic shared memory: ATTN_WARPS * group * (head_dim + 2) floats.
extern "C" __global__ void __launch_bounds__(ATTN_WARPS * 32)
    sg_attention(const float* __restrict__ q, int q_stride, const bf16* __restrict__ kc,
                 const bf16* __restrict__ vc, bf16* __restrict__ out,
                 const uint32_t* __restrict__ positions, const uint32_t* __restrict__ token_seq,
                 const uint32_t* __restrict__ seq_table_start,
                 const uint32_t* __restrict__ block_tables, int page_size, int q_heads,
                 int kv_heads, int dim, float scale, int min_split_len, float* __restrict__ part_ml,
                 float* __restrict__ part_acc) {
    SG_DYN_SMEM(float, smem);
    const int t = blockIdx.x, kvh = blockIdx.y;
    const int group = q_heads / kv_heads;
    const int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP;
    const int per_lane = (dim + WARP - 1) / WARP;
    const int pos = (int)positions[t];
    const uint32_t* table = block_tables + seq_table_start[token_seq[t]];
    const int kv_dim = kv_heads * dim;

    float qv[MAX_GROUP][MAX_PER_LANE];
    float acc[MAX_GROUP][MAX_PER_LANE];
    float m[MAX_GROUP], l[MAX_GROUP];
#pragma unroll
    for (int g = 0; g < MAX_GROUP; g++) {
        m[g] = -INFINITY;
        l[g] = 0.0f;
#pragma unroll
        for (int j = 0; j < MAX_PER_LANE; j++) {
            acc[g][j] = 0.0f;
            const int d = lane + j * WARP;
            qv[g][j] = (g < group && j < per_lane && d < dim)
                           ? q[(long)t * q_stride + (long)(kvh * group + g) * dim + d] * scale
                           : 0.0f;
        }
    }
    int begin, end;
    split_range(pos, min_split_len, &begin, &end);
    for (int p = begin + warp; p < end; p += ATTN_WARPS) {
        const long slot = (long)table[p / page_size] * page_size + p % page_size;
        const bf16* kr = kc + slot * kv_dim + (long)kvh * dim;
        const bf16* vr = vc + slot * kv_dim + (long)kvh * dim;
        float kx[MAX_PER_LANE], vx[MAX_PER_LANE];
#pragma unroll
        for (int j = 0; j < MAX_PER_LANE; j++) {
            const int d = lane + j * WARP;
            const bool in = j < per_lane && d < dim;
            kx[j] = in ? __bfloat162float(kr[d]) : 0.0f;
            vx[j] = in ? __bfloat162float(vr[d]) : 0.0f;
        }
#pragma unroll
        for (int g = 0; g < MAX_GROUP; g++) {
            if (g >= group) break;
            float s = 0.0f;
#pragma unroll
            for (int j = 0; j < MAX_PER_LANE; j++) s += qv[g][j] * kx[j];
            s = warp_sum(s);
            const float nm = fmaxf(m[g], s);
            const float corr = __expf(m[g] - nm), w = __expf(s - nm);
            l[g] = l[g] * corr + w;
#pragma unroll
            for (int j = 0; j < MAX_PER_LANE; j++) acc[g][j] = acc[g][j] * corr + w * vx[j];
            m[g] = nm;
        }
    }
    // merge the warps: per warp and head, m and l, then the accumulator
    float* sm = smem;                                 // [warps][group] m
    float* sl = smem + ATTN_WARPS * group;            // [warps][group] l
    float* sacc = smem + 2 * ATTN_WARPS * group;      // [warps][group][dim]
    for (int g = 0; g < group; g++) {
        if (lane == 0) {
            sm[warp * group + g] = m[g];
            sl[warp * group + g] = l[g];
        }
        for (int j = 0; j < per_lane; j++) {
            const int d = lane + j * WARP;
            if (d < dim) sacc[((long)warp * group + g) * dim + d] = acc[g][j];
        }
    }
    __syncthreads();
    attention_write(smem, group, dim, t, q_heads, kvh, out, part_ml, part_acc);
}

// Eight consecutive bf16 values (16-byte aligned) as floats, in one 16-byte load.
__device__ __forceinline__ void load8(const bf16* p, float* x) {
    const uint4 w = *reinterpret_cast<const uint4*>(p);
    bf16x2_to_float(w.x, &x[0], &x[1]);
    bf16x2_to_float(w.y, &x[2], &x[3]);
    bf16x2_to_float(w.z, &x[4], &x[5]);
    bf16x2_to_float(w.w, &x[6], &x[7]);
}

// (m, l, acc) of an online softmax merged with another's: the running max and sum and the
// unnormalised accumulator over the union of their positions (-inf: no position yet).
template <int N>
__device__ __forceinline__ void softmax_merge(float* m, float* l, float* acc, float mo, float lo,
                                              const float* acc_o) {
    const float nm = fmaxf(*m, mo);
    const float f = *m == -INFINITY ? 0.0f : __expf(*m - nm);
    const float fo = mo == -INFINITY ? 0.0f : __expf(mo - nm);
    *l = *l * f + lo * fo;
#pragma unroll
    for (int j = 0; j < N; j++) acc[j] = acc[j] * f + acc_o[j] * fo;
    *m = nm;
}

// sg_attention specialised at compile time on the head size DIM (64 or 128) and the query
// heads per KV head GROUP, so that every per-head value lives in registers. A position is
// read by DIM / 8 lanes, each loading 8 consecutive values of K and of V in one 16-byte
// load; a warp has 32 / (DIM / 8) positions in flight (4 at DIM 64, 2 at 128), each lane
// group keeping its own online softmax, merged across the warp by shuffles, then across the
// warps through shared memory as in sg_attention. Same parameters and outputs as
// sg_attention (the KV rows must be 16-byte aligned: head_dim a multiple of 8).
template <int DIM, int GROUP>
__device__ __forceinline__ void attention_fixed(
    const float* __restrict__ q, int q_stride, const bf16* __restrict__ kc,
    const bf16* __restrict__ vc, bf16* __restrict__ out, const uint32_t* __restrict__ positions,
    const uint32_t* __restrict__ token_seq, const uint32_t* __restrict__ seq_table_start,
    const uint32_t* __restrict__ block_tables, int page_size, int q_heads, int kv_heads,
    float scale, int min_split_len, float* __restrict__ part_ml, float* __restrict__ part_acc,
    float* smem) {
    constexpr int L = DIM / 8;     // lanes per position
    constexpr int P = WARP / L;    // positions per warp at a time
    const int t = blockIdx.x, kvh = blockIdx.y;
    const int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP;
    const int slot_in_warp = lane / L, d0 = (lane % L) * 8;
    const int pos = (int)positions[t];
    const uint32_t* table = block_tables + seq_table_start[token_seq[t]];
    const long kv_dim = (long)kv_heads * DIM;

    float qv[GROUP][8], acc[GROUP][8], m[GROUP], l[GROUP];
#pragma unroll
    for (int g = 0; g < GROUP; g++) {
        m[g] = -INFINITY;
        l[g] = 0.0f;
        const float* qh = q + (long)t * q_stride + (long)(kvh * GROUP + g) * DIM + d0;
#pragma unroll
        for (int j = 0; j < 8; j++) {
            qv[g][j] = qh[j] * scale;
            acc[g][j] = 0.0f;
        }
    }
    int begin, end;
    split_range(pos, min_split_len, &begin, &end);
    // warp-uniform loop: every lane takes part in the shuffles, invalid positions are skipped
    for (int base = begin + warp * P; base < end; base += ATTN_WARPS * P) {
        const int p = base + slot_in_warp;
        const bool valid = p < end;
        float kx[8], vx[8];
        if (valid) {
            const long slot = (long)table[p / page_size] * page_size + p % page_size;
            load8(kc + slot * kv_dim + (long)kvh * DIM + d0, kx);
            load8(vc + slot * kv_dim + (long)kvh * DIM + d0, vx);
        } else {
#pragma unroll
            for (int j = 0; j < 8; j++) kx[j] = vx[j] = 0.0f;
        }
#pragma unroll
        for (int g = 0; g < GROUP; g++) {
            float s = 0.0f;
#pragma unroll
            for (int j = 0; j < 8; j++) s += qv[g][j] * kx[j];
#pragma unroll
            for (int o = L / 2; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
            if (valid) {
                const float nm = fmaxf(m[g], s);
                const float corr = __expf(m[g] - nm), w = __expf(s - nm);
                l[g] = l[g] * corr + w;
#pragma unroll
                for (int j = 0; j < 8; j++) acc[g][j] = acc[g][j] * corr + w * vx[j];
                m[g] = nm;
            }
        }
    }
    // merge the warp's position slots (lanes L, 2L, ... apart hold the same dims)
#pragma unroll
    for (int g = 0; g < GROUP; g++) {
#pragma unroll
        for (int o = L; o < WARP; o <<= 1) {
            const float mo = __shfl_xor_sync(0xffffffffu, m[g], o);
            const float lo = __shfl_xor_sync(0xffffffffu, l[g], o);
            float ao[8];
#pragma unroll
            for (int j = 0; j < 8; j++) ao[j] = __shfl_xor_sync(0xffffffffu, acc[g][j], o);
            softmax_merge<8>(&m[g], &l[g], acc[g], mo, lo, ao);
        }
    }
    // then the warps, through shared memory: [warps][group] m and l, [warps][group][dim] acc
    float* sm = smem;
    float* sl = smem + ATTN_WARPS * GROUP;
    float* sacc = smem + 2 * ATTN_WARPS * GROUP;
    if (slot_in_warp == 0) {
#pragma unroll
        for (int g = 0; g < GROUP; g++) {
            if (lane == 0) {
                sm[warp * GROUP + g] = m[g];
                sl[warp * GROUP + g] = l[g];
            }
#pragma unroll
            for (int j = 0; j < 8; j++) sacc[(warp * GROUP + g) * DIM + d0 + j] = acc[g][j];
        }
    }
    __syncthreads();
    attention_write(smem, GROUP, DIM, t, q_heads, kvh, out, part_ml, part_acc);
}

// The instantiations the backend picks by (head_dim, group) (src/backend/cuda:
// FIXED_HEAD_DIMS, MAX_GROUP); other shapes run sg_attention. Group 2 asks for 6 resident
// blocks: left to itself ptxas held it to 64 registers and spilled. `dim` is unused (fixed at compile time) but kept
// so that every attention kernel takes sg_attention's parameters.
#define SG_ATTN_PARAMS                                                                          \
    const float *__restrict__ q, int q_stride, const bf16 *__restrict__ kc,                    \
        const bf16 *__restrict__ vc, bf16 *__restrict__ out,                                   \
        const uint32_t *__restrict__ positions, const uint32_t *__restrict__ token_seq,        \
        const uint32_t *__restrict__ seq_table_start, const uint32_t *__restrict__ block_tables, \
        int page_size, int q_heads, int kv_heads, int dim, float scale, int min_split_len,     \
        float *__restrict__ part_ml, float *__restrict__ part_acc
#define SG_ATTN_FIXED(D, G)                                                                 \
    {                                                                                      \
        SG_DYN_SMEM(float, smem);                                                          \
        (void)dim;                                                                         \
        attention_fixed<D, G>(q, q_stride, kc, vc, out, positions, token_seq,              \
                              seq_table_start, block_tables, page_size, q_heads, kv_heads, \
                              scale, min_split_len, part_ml, part_acc, smem);              \
    }
extern "C" __global__ void __launch_bounds__(ATTN_WARPS * 32) sg_attention_d64_g1(SG_ATTN_PARAMS) SG_ATTN_FIXED(64, 1)
extern "C" __global__ void __launch_bounds__(ATTN_WARPS * 32, 6) sg_attention_d64_g2(SG_ATTN_PARAMS) SG_ATTN_FIXED(64, 2)
extern "C" __global__ void __launch_bounds__(ATTN_WARPS * 32) sg_attention_d64_g3(SG_ATTN_PARAMS) SG_ATTN_FIXED(64, 3)
extern "C" __global__ void __launch_bounds__(ATTN_WARPS * 32) sg_attention_d64_g4(SG_ATTN_PARAMS) SG_ATTN_FIXED(64, 4)
extern "C" __global__ void __launch_bounds__(ATTN_WARPS * 32) sg_attention_d64_g5(SG_ATTN_PARAMS) SG_ATTN_FIXED(64, 5)
extern "C" __global__ void __launch_bounds__(ATTN_WARPS * 32) sg_attention_d64_g6(SG_ATTN_PARAMS) SG_ATTN_FIXED(64, 6)
extern "C" __global__ void __launch_bounds__(ATTN_WARPS * 32) sg_attention_d64_g7(SG_ATTN_PARAMS) SG_ATTN_FIXED(64, 7)
extern "C" __global__ void __launch_bounds__(ATTN_WARPS * 32) sg_attention_d64_g8(SG_ATTN_PARAMS) SG_ATTN_FIXED(64, 8)
extern "C" __global__ void __launch_bounds__(ATTN_WARPS * 32) sg_attention_d128_g1(SG_ATTN_PARAMS) SG_ATTN_FIXED(128, 1)
extern "C" __global__ void __launch_bounds__(ATTN_WARPS * 32, 6) sg_attention_d128_g2(SG_ATTN_PARAMS) SG_ATTN_FIXED(128, 2)
extern "C" __global__ void __launch_bounds__(ATTN_WARPS * 32) sg_attention_d128_g3(SG_ATTN_PARAMS) SG_ATTN_FIXED(128, 3)
extern "C" __global__ void __launch_bounds__(ATTN_WARPS * 32) sg_attention_d128_g4(SG_ATTN_PARAMS) SG_ATTN_FIXED(128, 4)
extern "C" __global__ void __launch_bounds__(ATTN_WARPS * 32) sg_attention_d128_g5(SG_ATTN_PARAMS) SG_ATTN_FIXED(128, 5)
extern "C" __global__ void __launch_bounds__(ATTN_WARPS * 32) sg_attention_d128_g6(SG_ATTN_PARAMS) SG_ATTN_FIXED(128, 6)
extern "C" __global__ void __launch_bounds__(ATTN_WARPS * 32) sg_attention_d128_g7(SG_ATTN_PARAMS) SG_ATTN_FIXED(128, 7)
extern "C" __global__ void __launch_bounds__(ATTN_WARPS * 32) sg_attention_d128_g8(SG_ATTN_PARAMS) SG_ATTN_FIXED(128, 8)

// ---------------------------------------------------------------- prefill on tensor cores

// Prefill attention on tensor cores: FlashAttention-2 over the paged KV cache, causal. One
// warp per tile of 16 consecutive new tokens and one query head (ATTN_WARPS tiles per block:
// grid (ceil(tokens / (16 * ATTN_WARPS)), q_heads)). The tile's query rows (scaled, bf16) stay
// in registers as mma A operands; K and V come from the cache 16 positions at a time straight
// into B operands (no shared memory); scores S = Q·Kᵀ and outputs O += P·V accumulate in f32
// with mma.sync m16n8k16 (bf16 in), the softmax online per row. So a prompt reads its context
// once per 16 tokens (and per query head, from L2 for the heads of a group), where
// sg_attention reads it once per token. The scores' accumulator fragments are the P operand's
// layout (FlashAttention-2's register reuse). A tile holding tokens of several sequences (the
// step packs them one after the other) takes them one sequence at a time, the other rows
// masked. Tokens before `first` are not its (the step's decode tokens, which sg_attention
// takes, so that a token's result does not depend on what else the step holds). Precision:
// the scaled query rows and the softmax weights each enter the products as two bf16 terms
// (value and remainder, twice the products), so they carry about 16 bits, as near f32 as the
// cache's bf16 K and V allow. Output normalised bf16 [token][q_head][DIM]. Fragment layouts (PTX ISA, mma.m16n8k16 with .bf16): lane = 4 g + t;
// A regs {(g, 2t), (g + 8, 2t), (g, 2t + 8), (g + 8, 2t + 8)} (row, first of a column pair);
// B regs {(2t, g), (2t + 8, g)} (k pair, column); C/D {(g, 2t), (g, 2t + 1), (g + 8, 2t),
// (g + 8, 2t + 1)}.
#define PREFILL_ROWS 16

// (lo, hi) as a bf16 pair `v` and the pair of what rounding left, `r` (v + r carries about
// 16 bits of each).
__device__ __forceinline__ void split_bf16x2(float lo, float hi, unsigned* v, unsigned* r) {
    const bf16 l = __float2bfloat16_rn(lo), h = __float2bfloat16_rn(hi);
    *v = (unsigned)__bfloat16_as_ushort(l) | ((unsigned)__bfloat16_as_ushort(h) << 16);
    *r = pack_bf16x2(lo - __bfloat162float(l), hi - __bfloat162float(h));
}

// The raw bits of row[d] (0 without a row).
__device__ __forceinline__ unsigned bf16_bits(const bf16* row, int d) {
    return row ? (unsigned)__bfloat16_as_ushort(row[d]) : 0u;
}

template <int DIM>
__device__ __forceinline__ void prefill_attention(
    const float* __restrict__ q, int q_stride, const bf16* __restrict__ kc,
    const bf16* __restrict__ vc, bf16* __restrict__ out, const uint32_t* __restrict__ positions,
    const uint32_t* __restrict__ token_seq, const uint32_t* __restrict__ seq_table_start,
    const uint32_t* __restrict__ block_tables, int first, int tokens, int page_size, int q_heads,
    int kv_heads, float scale) {
    constexpr int KC = DIM / 16;  // k-steps of Q·Kᵀ
    constexpr int NT = DIM / 8;   // column tiles of O
    const int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP;
    const int g = lane / 4, t = lane % 4;
    const int tile = first + ((int)blockIdx.x * ATTN_WARPS + warp) * PREFILL_ROWS;
    if (tile >= tokens) return;  // the whole warp
    const int qh = blockIdx.y, kvh = qh / (q_heads / kv_heads);
    const long kv_dim = (long)kv_heads * DIM;
    const int row[2] = {tile + g, tile + g + 8};
    const bool valid[2] = {row[0] < tokens, row[1] < tokens};
    const int pos[2] = {valid[0] ? (int)positions[row[0]] : -1,
                        valid[1] ? (int)positions[row[1]] : -1};
    // Q (scaled) as A operands, all of DIM: bf16 values and their remainders
    unsigned qa[KC][4], qr[KC][4];
#pragma unroll
    for (int kc = 0; kc < KC; kc++)
#pragma unroll
        for (int j = 0; j < 4; j++) {
            const int i = j & 1, col = kc * 16 + (j >> 1) * 8 + 2 * t;
            const float* src = q + (long)row[i] * q_stride + (long)qh * DIM + col;
            const float x0 = valid[i] ? src[0] * scale : 0.0f;
            const float x1 = valid[i] ? src[1] * scale : 0.0f;
            split_bf16x2(x0, x1, &qa[kc][j], &qr[kc][j]);
        }
    float o[NT][4];
#pragma unroll
    for (int n = 0; n < NT; n++)
#pragma unroll
        for (int j = 0; j < 4; j++) o[n][j] = 0.0f;
    float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};
    const int tile_end = min(tile + PREFILL_ROWS, tokens);
    // the tile's sequences in turn (every lane reads the same ids: warp-uniform)
    for (int first = tile; first < tile_end;) {
        const uint32_t s = token_seq[first];
        int last = first;
        while (last + 1 < tile_end && token_seq[last + 1] == s) last++;
        const bool active[2] = {row[0] >= first && row[0] <= last,
                                row[1] >= first && row[1] <= last};
        const int ctx = (int)positions[last] + 1;  // the sequence's rows see up to its last
        const uint32_t* table = block_tables + seq_table_start[s];
        for (int c0 = 0; c0 < ctx; c0 += 16) {
            // S = Q·Kᵀ for positions c0..c0+15: two column tiles of 8
            float sc[2][4];
#pragma unroll
            for (int nt = 0; nt < 2; nt++) {
                const int p = c0 + nt * 8 + g;  // this lane's K row (B's column)
                const bf16* kr = nullptr;
                if (p < ctx)
                    kr = kc + ((long)table[p / page_size] * page_size + p % page_size) * kv_dim +
                         (long)kvh * DIM;
#pragma unroll
                for (int j = 0; j < 4; j++) sc[nt][j] = 0.0f;
#pragma unroll
                for (int kc2 = 0; kc2 < KC; kc2++) {
                    unsigned b[2];
                    b[0] = kr ? *reinterpret_cast<const unsigned*>(kr + kc2 * 16 + 2 * t) : 0u;
                    b[1] = kr ? *reinterpret_cast<const unsigned*>(kr + kc2 * 16 + 8 + 2 * t) : 0u;
                    mma_bf16_16816(sc[nt], qa[kc2], b);
                    mma_bf16_16816(sc[nt], qr[kc2], b);
                }
            }
            // mask (causal, other sequences' rows, beyond the context), row maxima
            float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
            for (int nt = 0; nt < 2; nt++)
#pragma unroll
                for (int j = 0; j < 4; j++) {
                    const int i = j >> 1, p = c0 + nt * 8 + 2 * t + (j & 1);
                    if (!active[i] || p > pos[i]) sc[nt][j] = -INFINITY;
                    mx[i] = fmaxf(mx[i], sc[nt][j]);
                }
#pragma unroll
            for (int i = 0; i < 2; i++) {
                mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 1));
                mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 2));
            }
            // online softmax: rescale by the new maxima (rows of other sequences untouched)
            float nm[2], corr[2];
#pragma unroll
            for (int i = 0; i < 2; i++) {
                nm[i] = fmaxf(m[i], mx[i]);
                const bool live = active[i] && nm[i] != -INFINITY;
                corr[i] = live ? __expf(m[i] - nm[i]) : 1.0f;
                if (live) m[i] = nm[i];
            }
            float ps[2][4];
#pragma unroll
            for (int nt = 0; nt < 2; nt++)
#pragma unroll
                for (int j = 0; j < 4; j++) {
                    const int i = j >> 1;
                    ps[nt][j] = sc[nt][j] == -INFINITY ? 0.0f : __expf(sc[nt][j] - m[i]);
                }
#pragma unroll
            for (int i = 0; i < 2; i++)
                l[i] = l[i] * corr[i] + ps[0][2 * i] + ps[0][2 * i + 1] + ps[1][2 * i] +
                       ps[1][2 * i + 1];
#pragma unroll
            for (int n = 0; n < NT; n++) {
                o[n][0] *= corr[0];
                o[n][1] *= corr[0];
                o[n][2] *= corr[1];
                o[n][3] *= corr[1];
            }
            // O += P·V: P (16 x 16 positions) is the A operand the score tiles lay out
            unsigned pa[4], pr[4];
            split_bf16x2(ps[0][0], ps[0][1], &pa[0], &pr[0]);
            split_bf16x2(ps[0][2], ps[0][3], &pa[1], &pr[1]);
            split_bf16x2(ps[1][0], ps[1][1], &pa[2], &pr[2]);
            split_bf16x2(ps[1][2], ps[1][3], &pa[3], &pr[3]);
            // this lane's V rows (B's k): positions c0 + 2t, +1, c0 + 8 + 2t, +1
            const bf16* vr[4];
#pragma unroll
            for (int j = 0; j < 4; j++) {
                const int p = c0 + (j >> 1) * 8 + 2 * t + (j & 1);
                vr[j] = p < ctx ? vc + ((long)table[p / page_size] * page_size + p % page_size) *
                                           kv_dim +
                                      (long)kvh * DIM
                                : nullptr;
            }
#pragma unroll
            for (int n = 0; n < NT; n++) {
                const int d = n * 8 + g;
                // the lower position in the lower half
                const unsigned b[2] = {bf16_bits(vr[0], d) | bf16_bits(vr[1], d) << 16,
                                       bf16_bits(vr[2], d) | bf16_bits(vr[3], d) << 16};
                mma_bf16_16816(o[n], pa, b);
                mma_bf16_16816(o[n], pr, b);
            }
        }
        first = last + 1;
    }
    // the rows' sums over the four lanes of each group, then the normalised output
#pragma unroll
    for (int i = 0; i < 2; i++) {
        l[i] += __shfl_xor_sync(0xffffffffu, l[i], 1);
        l[i] += __shfl_xor_sync(0xffffffffu, l[i], 2);
    }
#pragma unroll
    for (int i = 0; i < 2; i++) {
        if (!valid[i]) continue;
        const float inv = 1.0f / l[i];
        bf16* dst = out + ((long)row[i] * q_heads + qh) * DIM + 2 * t;
#pragma unroll
        for (int n = 0; n < NT; n++)
            *reinterpret_cast<unsigned*>(dst + n * 8) =
                pack_bf16x2(o[n][2 * i] * inv, o[n][2 * i + 1] * inv);
    }
}

#define SG_PREFILL_PARAMS                                                                      \
    const float *__restrict__ q, int q_stride, const bf16 *__restrict__ kc,                     \
        const bf16 *__restrict__ vc, bf16 *__restrict__ out,                                    \
        const uint32_t *__restrict__ positions, const uint32_t *__restrict__ token_seq,          \
        const uint32_t *__restrict__ seq_table_start, const uint32_t *__restrict__ block_tables, \
        int first, int tokens, int page_size, int q_heads, int kv_heads, float scale
#define SG_PREFILL(D)                                                                        \
    {                                                                                        \
        prefill_attention<D>(q, q_stride, kc, vc, out, positions, token_seq, seq_table_start, \
                             block_tables, first, tokens, page_size, q_heads, kv_heads,       \
                             scale);                                                          \
    }
// (d64: at least 3 blocks per SM, up to 168 registers: ptxas's own choice of 128 spills)
extern "C" __global__ void __launch_bounds__(ATTN_WARPS * 32, 3) sg_prefill_attention_d64(SG_PREFILL_PARAMS) SG_PREFILL(64)
extern "C" __global__ void __launch_bounds__(ATTN_WARPS * 32) sg_prefill_attention_d128(SG_PREFILL_PARAMS) SG_PREFILL(128)

// Combines the splits of sg_attention: one block per (token, query head).
extern "C" __global__ void sg_attention_merge(const float* __restrict__ part_ml,
                                              const float* __restrict__ part_acc,
                                              bf16* __restrict__ out, int splits, int dim) {
    const long head = blockIdx.x;
    const float* ml = part_ml + head * splits * 2;
    float mm = -INFINITY;
    for (int s = 0; s < splits; s++) mm = fmaxf(mm, ml[s * 2]);
    float ll = 0.0f;
    for (int s = 0; s < splits; s++)
        if (ml[s * 2] != -INFINITY) ll += ml[s * 2 + 1] * __expf(ml[s * 2] - mm);
    for (int d = threadIdx.x; d < dim; d += blockDim.x) {
        float o = 0.0f;
        for (int s = 0; s < splits; s++)
            if (ml[s * 2] != -INFINITY)
                o += part_acc[(head * splits + s) * dim + d] * __expf(ml[s * 2] - mm);
        out[head * dim + d] = __float2bfloat16_rn(o / ll);
    }
}

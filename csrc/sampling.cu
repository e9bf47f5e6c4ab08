// Sampling on the device: logits processing, the choice of each row's token, and the logprobs
// asked for, so a decode step copies back a few numbers per sequence instead of its whole
// logits row. The rules are the host sampler's (src/sampling/sampler.rs), in its order: a
// constraint's allowed-token bitmask, banned tokens (EOS before min_new_tokens), repetition
// penalty (HF's divide/multiply, prompt and output tokens), frequency and presence penalties
// (output tokens), then greedy argmax, or temperature, top-k, top-p, min-p and a draw. The
// uniform number of the draw comes from the request's own generator on the host (one per
// sampled token, as the host sampler draws), so a seed gives the same tokens on either path
// except where a draw falls within rounding of the boundary between two candidates.
//
// The host sorts the candidates; here the same order is a 64-bit key per token,
// (bits of its probability) << 32 | (0xffffffff - id): larger key = earlier (more likely
// first, lower id first on ties). Every cut the host makes is a prefix in that order, found
// by bisecting on the key with block-wide counts and sums.

#include "common.cuh"

// Threads per block the backend launches sg_sample with (SAMPLE_THREADS in
// src/backend/cuda): __launch_bounds__ makes the compiler keep it launchable (<= 64 registers).

// One row's parameters; matches `SampleRow` in src/sampling/rows.rs (repr(C), 64 bytes).
struct SampleRow {
    float temperature, top_p, min_p, repetition_penalty;
    float frequency_penalty, presence_penalty;
    int top_k;   // <= 0: no top-k filter
    int greedy;  // argmax of the processed logits
    double u;    // uniform in [0, 1) for the draw
    int pen_start, pen_end;  // penalty entries of this row
    int ban_start, ban_end;  // banned tokens of this row
    int n_top;               // top logprobs wanted (<= max_top)
    int mask_start;          // first word of the allowed-token bitmask in `masks`; -1: none
};

__device__ __forceinline__ unsigned long long sample_key(float p, int i) {
    return ((unsigned long long)__float_as_uint(p) << 32) | (0xffffffffu - (unsigned)i);
}

// Count and probability mass of the tokens whose key is >= k (w holds probabilities).
__device__ void mass_from(const float* w, int vocab, unsigned long long k, double* mass,
                          int* count) {
    double m = 0.0;
    int c = 0;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
        if (sample_key(w[i], i) >= k) {
            m += w[i];
            c++;
        }
    }
    *mass = block_sum(m);
    *count = block_sum(c);
}

// The largest key k such that the tokens with key >= k reach `need` (a count when by_count,
// else a mass, reached when > need if strict, >= need otherwise). Assumes key 0 reaches it.
__device__ unsigned long long largest_key(const float* w, int vocab, bool by_count, double need,
                                          bool strict) {
    unsigned long long lo = 0, hi = ~0ull;
    while (lo < hi) {
        const unsigned long long mid = lo + (hi - lo) / 2 + 1;
        double m;
        int c;
        mass_from(w, vocab, mid, &m, &c);
        const double got = by_count ? (double)c : m;
        if (strict ? got > need : got >= need)
            lo = mid;
        else
            hi = mid - 1;
    }
    return lo;
}

// Whether (v, i) comes before (bv, bi) in "larger value, then lower index" (bi == none: no
// pair yet).
__device__ __forceinline__ bool before(float v, int i, float bv, int bi, int none) {
    return i != none && (bi == none || v > bv || (v == bv && i < bi));
}

// The best pair over the warp; every lane gets it.
__device__ __forceinline__ void warp_best(float* v, int* b, int none) {
    for (int o = WARP / 2; o > 0; o >>= 1) {
        const float ov = __shfl_xor_sync(0xffffffffu, *v, o);
        const int ob = __shfl_xor_sync(0xffffffffu, *b, o);
        if (before(ov, ob, *v, *b, none)) {
            *v = ov;
            *b = ob;
        }
    }
}

// Block-wide best (value, index) under "larger value, then lower index"; all threads get it.
// Only pairs ordered strictly after (after_v, after_i) take part (pass +inf, -1 for all).
__device__ void block_best(const float* x, int vocab, float after_v, int after_i, float* best_v,
                           int* best_i) {
    __shared__ float sv[32];
    __shared__ int si[32];
    float v = -INFINITY;
    int b = vocab;  // vocab: none yet
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
        const float xi = x[i];
        const bool allowed = xi < after_v || (xi == after_v && i > after_i);
        if (allowed && before(xi, i, v, b, vocab)) {
            v = xi;
            b = i;
        }
    }
    warp_best(&v, &b, vocab);
    const int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP;
    if (lane == 0) {
        sv[warp] = v;
        si[warp] = b;
    }
    __syncthreads();
    if (warp == 0) {
        const int warps = blockDim.x / WARP;
        v = lane < warps ? sv[lane] : -INFINITY;
        b = lane < warps ? si[lane] : vocab;
        warp_best(&v, &b, vocab);
        if (lane == 0) {
            sv[0] = v;
            si[0] = b;
        }
    }
    __syncthreads();
    *best_v = sv[0];
    *best_i = si[0];
    __syncthreads();  // sv/si may be reused by the next call
}

// One block per row. logits [rows][vocab] (raw, left unchanged); work [rows][vocab] scratch.
// pen_tokens/pen_counts/pen_seen: per entry a token, its count among the output tokens and
// whether it was seen at all (prompt or output); banned: token ids; masks: allowed-token
// bitmasks (bit t % 32 of word t / 32 allows token t) where a row's mask_start >= 0.
// Out: the chosen token, its logprob under the raw distribution, and the n_top most likely
// tokens with theirs ([rows][max_top], most likely first, lower id first on ties).
extern "C" __global__ void __launch_bounds__(1024)
    sg_sample(const float* __restrict__ logits, float* __restrict__ work,
              const SampleRow* __restrict__ rows, const uint32_t* __restrict__ pen_tokens,
              const uint32_t* __restrict__ pen_counts, const uint32_t* __restrict__ pen_seen,
              const uint32_t* __restrict__ banned, const uint32_t* __restrict__ masks,
              int vocab, int max_top,
              uint32_t* __restrict__ out_token, float* __restrict__ out_logprob,
              uint32_t* __restrict__ out_top_ids, float* __restrict__ out_top_logprobs) {
    const int row = blockIdx.x;
    const SampleRow P = rows[row];
    const float* x = logits + (long)row * vocab;
    float* w = work + (long)row * vocab;

    // 1. processed logits
    const uint32_t* mask = P.mask_start >= 0 ? masks + P.mask_start : nullptr;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x)
        w[i] = (mask == nullptr || ((mask[i >> 5] >> (i & 31)) & 1u)) ? x[i] : -INFINITY;
    __syncthreads();
    for (int e = P.ban_start + threadIdx.x; e < P.ban_end; e += blockDim.x)
        if (banned[e] < (uint32_t)vocab) w[banned[e]] = -INFINITY;
    __syncthreads();
    for (int e = P.pen_start + threadIdx.x; e < P.pen_end; e += blockDim.x) {
        const uint32_t t = pen_tokens[e];
        if (t >= (uint32_t)vocab) continue;
        float v = w[t];
        if (P.repetition_penalty != 1.0f && pen_seen[e])
            v = v > 0.0f ? v / P.repetition_penalty : v * P.repetition_penalty;
        if (pen_counts[e] > 0 && (P.frequency_penalty != 0.0f || P.presence_penalty != 0.0f))
            v -= P.frequency_penalty * (float)pen_counts[e] + P.presence_penalty;
        w[t] = v;
    }
    __syncthreads();

    // 2. logprobs of the raw distribution: log-sum-exp, then the n_top best
    float raw_max;
    int raw_arg;
    block_best(x, vocab, INFINITY, -1, &raw_max, &raw_arg);
    double s = 0.0;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) s += (double)__expf(x[i] - raw_max);
    const float lse = raw_max + (float)log(block_sum(s));
    float prev_v = INFINITY;
    int prev_i = -1;
    for (int k = 0; k < P.n_top && k < max_top; k++) {
        float v;
        int b;
        block_best(x, vocab, prev_v, prev_i, &v, &b);
        if (threadIdx.x == 0) {
            out_top_ids[(long)row * max_top + k] = (uint32_t)b;
            out_top_logprobs[(long)row * max_top + k] = v - lse;
        }
        prev_v = v;
        prev_i = b;
    }

    // 3. the token
    float best_v;
    int token;
    block_best(w, vocab, INFINITY, -1, &best_v, &token);
    if (!P.greedy) {
        const float inv_t = 1.0f / P.temperature;
        for (int i = threadIdx.x; i < vocab; i += blockDim.x)
            w[i] = __expf((w[i] - best_v) * inv_t);
        __syncthreads();
        double total = 0.0;
        for (int i = threadIdx.x; i < vocab; i += blockDim.x) total += w[i];
        total = block_sum(total);
        int n = P.top_k > 0 ? min(P.top_k, vocab) : vocab;
        double m;
        int c;
        if (P.top_p < 1.0f) {
            const unsigned long long k =
                largest_key(w, vocab, false, (double)P.top_p * total, false);
            mass_from(w, vocab, k, &m, &c);
            n = min(n, c);
        }
        if (P.min_p > 0.0f) {  // the most likely token has probability 1 here
            int kept = 0;
            for (int i = threadIdx.x; i < vocab; i += blockDim.x) kept += w[i] >= P.min_p;
            n = min(n, block_sum(kept));
        }
        n = max(n, 1);
        const unsigned long long kn = largest_key(w, vocab, true, (double)n, false);
        mass_from(w, vocab, kn, &m, &c);
        const double target = P.u * m;
        // the first candidate whose running sum passes the target; the last kept one when
        // rounding leaves the target at the very end (`total`: the mass of every key >= 0)
        unsigned long long kd = total > target ? largest_key(w, vocab, false, target, true) : kn;
        if (kd < kn) kd = kn;
        token = (int)(0xffffffffu - (unsigned)(kd & 0xffffffffull));
    }
    if (threadIdx.x == 0) {
        out_token[row] = (uint32_t)token;
        out_logprob[row] = x[token] - lse;
    }
}

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
// (bits of its value) << 32 | (0xffffffff - id): larger key = earlier (more likely first,
// lower id first on ties). Every cut the host makes is a prefix in that order (top-k: a
// count; top-p and the draw: a mass), found by radix selection (`select`): a histogram of the
// keys' next 8 bits (count and mass per bin) narrows the prefix's last key to one bin, and
// once a bin holds at most SAMPLE_CAP (1024) tokens they are gathered into shared memory and
// resolved there. A pass reads the row once; a greedy row takes one pass, a sampled row
// with top-k and top-p typically seven or eight (instead of about 195 for the bisections this
// replaced).
//
// Masses are sums of fixed-point probabilities (unsigned 64-bit, 2^S per unit with
// S = 63 - ceil(log2(vocab)), so a row's total cannot overflow): integer atomics are
// associative, so a row gives the same token on every run whatever the threads' order.

#include "common.cuh"

// One row's parameters; matches `SampleRow` in src/sampling/rows.rs (repr(C), 64 bytes).
struct SampleRow {
    float temperature, top_p, min_p, repetition_penalty;
    float frequency_penalty, presence_penalty;
    int top_k;   // <= 0: no top-k filter
    int greedy;  // argmax of the processed logits
    double u;    // uniform in [0, 1) for the draw
    int pen_start, pen_end;  // words of this row's penalty triples in `lists`
    int ban_start, ban_end;  // words of this row's banned tokens in `lists`
    int n_top;               // top logprobs wanted (<= max_top)
    int mask_start;          // first word of the allowed-token bitmask in `lists`; -1: none
};

typedef unsigned long long u64;

#define SAMPLE_BITS 8                  // key bits resolved per histogram pass
#define SAMPLE_BINS (1 << SAMPLE_BITS)
#define SAMPLE_GATHER 1024  // tokens gathered into shared memory at most
#ifndef SAMPLE_CAP  // (tests/kernels.rs also builds it smaller, to walk every level)
#define SAMPLE_CAP SAMPLE_GATHER  // the most a cut's bin may hold to be gathered alone
#endif

struct Hist {
    unsigned cnt[SAMPLE_BINS];
    u64 mass[SAMPLE_BINS];
};

// Calls f(v[i], i) for this thread's tokens of a row (i = threadIdx.x + k * blockDim.x),
// loading SAMPLE_UNROLL of them before using any: one block streams a whole row, so each
// thread keeps several loads in flight.
#define SAMPLE_UNROLL 4
template <class F>
__device__ __forceinline__ void row_pass(const float* v, int n, F f) {
    if (threadIdx.x == 0) SG_EMU_COUNT("sg_sample row pass");
    for (int base = threadIdx.x; base < n; base += SAMPLE_UNROLL * blockDim.x) {
        float x[SAMPLE_UNROLL];
#pragma unroll
        for (int u = 0; u < SAMPLE_UNROLL; u++) {
            const int i = base + u * (int)blockDim.x;
            x[u] = i < n ? v[i] : 0.0f;
        }
#pragma unroll
        for (int u = 0; u < SAMPLE_UNROLL; u++) {
            const int i = base + u * (int)blockDim.x;
            if (i < n) f(x[u], i);
        }
    }
}

// What one selection pass sees of a row: raw logits (keys of all 32 bits, no mass) or
// probabilities in [0, 1] (keys of their bits, whose top two are zero; fixed-point masses).
struct Src {
    const float* v;
    bool prob;
    float scale;  // 2^S: a probability's fixed-point mass
    int top;      // key bits in use (64, or 62 for probabilities)
};

// Larger float, larger image (for raw logits of either sign).
__device__ __forceinline__ unsigned ordered_bits(float v) {
    const unsigned u = __float_as_uint(v);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

__device__ __forceinline__ u64 key_of(const Src& s, float v, int i) {
    const unsigned hi = s.prob ? __float_as_uint(v) : ordered_bits(v);
    return ((u64)hi << 32) | (0xffffffffu - (unsigned)i);
}

__device__ __forceinline__ u64 fixed_mass(const Src& s, float p) {
    return s.prob ? (u64)(p * s.scale) : 0ull;
}

// The mass of a key's token (its probability is the key's upper half).
__device__ __forceinline__ u64 key_mass(const Src& s, u64 k) {
    return fixed_mass(s, __uint_as_float((unsigned)(k >> 32)));
}

__device__ __forceinline__ int key_token(u64 k) {
    return (int)(0xffffffffu - (unsigned)(k & 0xffffffffull));
}

// The cut a selection looks for: the prefix (in key order) whose count (by_count) or mass
// reaches `need` (> need when strict, >= otherwise).
struct Need {
    bool by_count, strict;
    double need;
};

__device__ __forceinline__ bool reached(const Need& n, u64 count, u64 mass) {
    const double got = n.by_count ? (double)count : (double)mass;
    return n.strict ? got > n.need : got >= n.need;
}

// A selection's outcome: the last key of the prefix, and the prefix's count and mass.
struct Cut {
    int found;  // 0: even the whole row does not reach it
    u64 key, count, mass;
};

// Shared state of the selection in progress.
struct SelState {
    int found, bin, n;
    unsigned bin_count;
    u64 cnt_before, mass_before;  // tokens in the bins above the chosen one
    u64 best;                     // the largest candidate key that reaches the cut
    Cut cut;
};

__device__ void clear_hist(Hist* h) {
    for (int b = threadIdx.x; b < SAMPLE_BINS; b += blockDim.x) {
        h->cnt[b] = 0;
        h->mass[b] = 0;
    }
}

__device__ __forceinline__ void hist_add(Hist* h, int bin, u64 mass) {
    atomicAdd(&h->cnt[bin], 1u);
    if (mass) atomicAdd(&h->mass[bin], mass);
}

// Warp 0: the first bin, from the top, at which the prefix reaches the cut, given the count
// and mass above all of `h`'s bins. Each lane takes 8 bins; a scan across lanes finds the
// lane, which walks its own.
__device__ void scan_bins(const Hist* h, const Need& need, u64 cb, u64 mb, SelState* st) {
    const int lane = threadIdx.x % WARP;
    const int per = SAMPLE_BINS / WARP;
    const int hi = SAMPLE_BINS - 1 - lane * per;  // this lane's bins: hi, hi-1, ..., hi-per+1
    u64 c = 0, m = 0;
    for (int j = 0; j < per; j++) {
        c += h->cnt[hi - j];
        m += h->mass[hi - j];
    }
    u64 ic = c, im = m;  // inclusive scan over lanes 0..lane
    for (int o = 1; o < WARP; o <<= 1) {
        const u64 oc = __shfl_up_sync(0xffffffffu, ic, o);
        const u64 om = __shfl_up_sync(0xffffffffu, im, o);
        if (lane >= o) {
            ic += oc;
            im += om;
        }
    }
    int first = reached(need, cb + ic, mb + im) ? lane : WARP;
    for (int o = WARP / 2; o > 0; o >>= 1) first = min(first, __shfl_xor_sync(0xffffffffu, first, o));
    if (first == WARP) {
        if (lane == 0) st->found = 0;
        return;
    }
    if (lane == first) {
        u64 ac = cb + ic - c, am = mb + im - m;  // above this lane's bins
        for (int j = 0; j < per; j++) {
            const int b = hi - j;
            if (reached(need, ac + h->cnt[b], am + h->mass[b]) || j == per - 1) {
                st->found = 1;
                st->bin = b;
                st->bin_count = h->cnt[b];
                st->cnt_before = ac;
                st->mass_before = am;
                break;
            }
            ac += h->cnt[b];
            am += h->mass[b];
        }
    }
}

// The largest value over the block (every thread gets it).
__device__ u64 block_max_u64(u64 v) {
    __shared__ u64 part[32];
    const int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP;
    for (int o = WARP / 2; o > 0; o >>= 1) v = max(v, __shfl_xor_sync(0xffffffffu, v, o));
    if (lane == 0) part[warp] = v;
    __syncthreads();
    const int warps = blockDim.x / WARP;
    u64 r = lane < warps ? part[lane] : 0ull;
    for (int o = WARP / 2; o > 0; o >>= 1) r = max(r, __shfl_xor_sync(0xffffffffu, r, o));
    __syncthreads();  // `part` may be reused by the next call
    return r;
}

// Radix selection of the cut `need` over the row `s` (`vocab` tokens). `root` holds the
// histogram of every token's key at bits [top-8, top) (filled by the caller during a pass it
// makes anyway; left unchanged). With `from_top`, the tokens gathered at the end are the
// whole prefix down to the cut's bin (at most SAMPLE_GATHER), left in `cand[0..n)` for the
// caller; otherwise only the cut's bin. Every thread gets the cut.
__device__ Cut select(const Src& s, int vocab, const Hist* root, const Need& need, bool from_top,
                      Hist* hs, u64* cand, SelState* st) {
    const Hist* h = root;
    int shift = s.top - SAMPLE_BITS;  // the bins of `h` are (key >> shift) & (SAMPLE_BINS - 1)
    int bits = SAMPLE_BITS;           // bits per bin of `h`: s.top - shift at the root
    u64 prefix = 0;                   // key >> (shift + bits) of the tokens `h` counts
    u64 cb = 0, mb = 0;
    for (;;) {
        if (threadIdx.x < WARP) scan_bins(h, need, cb, mb, st);
        __syncthreads();
        if (!st->found) {
            Cut none = {0, 0, 0, 0};
            __syncthreads();
            return none;
        }
        const u64 bucket = (prefix << bits) | (u64)st->bin;  // key >> shift
        const unsigned count = st->bin_count;
        cb = st->cnt_before;
        mb = st->mass_before;
        __syncthreads();
        // (a bin at the last level holds one token)
        if (shift == 0 || (from_top ? cb + count <= SAMPLE_GATHER : count <= SAMPLE_CAP)) {
            // gather, then each candidate's prefix count and mass among the candidates
            const bool all_above = from_top;
            if (threadIdx.x == 0) st->n = 0;
            __syncthreads();
            row_pass(s.v, vocab, [&](float v, int i) {
                const u64 k = key_of(s, v, i);
                const u64 kb = k >> shift;
                if (all_above ? kb >= bucket : kb == bucket) {
                    const int at = (int)atomicAdd((unsigned*)&st->n, 1u);
                    if (at < SAMPLE_GATHER) cand[at] = k;
                }
            });
            __syncthreads();
            const int n = min(st->n, SAMPLE_GATHER);
            const u64 c0 = all_above ? 0 : cb, m0 = all_above ? 0 : mb;
            u64 best = 0;  // no real key is 0 (that would be token 0xffffffff)
            for (int j = threadIdx.x; j < n; j += blockDim.x) {
                const u64 kj = cand[j];
                u64 c = 0, m = 0;
                for (int l = 0; l < n; l++) {
                    const u64 kl = cand[l];
                    if (kl >= kj) {
                        c++;
                        m += key_mass(s, kl);
                    }
                }
                if (reached(need, c0 + c, m0 + m)) best = max(best, kj);
            }
            best = block_max_u64(best);
            for (int j = threadIdx.x; j < n; j += blockDim.x) {
                if (cand[j] != best) continue;
                u64 c = 0, m = 0;
                for (int l = 0; l < n; l++) {
                    if (cand[l] >= best) {
                        c++;
                        m += key_mass(s, cand[l]);
                    }
                }
                st->cut.found = 1;
                st->cut.key = best;
                st->cut.count = c0 + c;
                st->cut.mass = m0 + m;
            }
            __syncthreads();
            const Cut cut = st->cut;
            __syncthreads();
            return cut;
        }
        // one level down: the next bits of the tokens in the chosen bin
        const int next = max(shift - SAMPLE_BITS, 0);
        const u64 low = (1ull << (shift - next)) - 1;
        clear_hist(hs);
        __syncthreads();
        row_pass(s.v, vocab, [&](float v, int i) {
            const u64 k = key_of(s, v, i);
            if (k >> shift == bucket) hist_add(hs, (int)((k >> next) & low), fixed_mass(s, v));
        });
        __syncthreads();
        h = hs;
        prefix = bucket;
        bits = shift - next;
        shift = next;
    }
}

// Whether (v, i) comes before (bv, bi) in "larger value, then lower index" (bi == none: no
// pair yet).
__device__ __forceinline__ bool before(float v, int i, float bv, int bi, int none) {
    return i != none && (bi == none || v > bv || (v == bv && i < bi));
}

// The best (value, index) pair over the block under "larger value, then lower index"; every
// thread gets it.
__device__ void block_best(float* v, int* b, int none) {
    __shared__ float sv[32];
    __shared__ int si[32];
    for (int o = WARP / 2; o > 0; o >>= 1) {
        const float ov = __shfl_xor_sync(0xffffffffu, *v, o);
        const int ob = __shfl_xor_sync(0xffffffffu, *b, o);
        if (before(ov, ob, *v, *b, none)) {
            *v = ov;
            *b = ob;
        }
    }
    const int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP;
    if (lane == 0) {
        sv[warp] = *v;
        si[warp] = *b;
    }
    __syncthreads();
    const int warps = blockDim.x / WARP;
    float rv = lane < warps ? sv[lane] : -INFINITY;
    int rb = lane < warps ? si[lane] : none;
    for (int o = WARP / 2; o > 0; o >>= 1) {
        const float ov = __shfl_xor_sync(0xffffffffu, rv, o);
        const int ob = __shfl_xor_sync(0xffffffffu, rb, o);
        if (before(ov, ob, rv, rb, none)) {
            rv = ov;
            rb = ob;
        }
    }
    *v = rv;
    *b = rb;
    __syncthreads();  // sv/si may be reused by the next call
}

// Online log-sum-exp: (max, sum of exp(x - max)) pairs, merged.
__device__ __forceinline__ void lse_merge(float* m, double* s, float om, double os) {
    if (om == -INFINITY) return;
    if (*m == -INFINITY) {
        *m = om;
        *s = os;
    } else if (om > *m) {
        *s = *s * (double)__expf(*m - om) + os;
        *m = om;
    } else {
        *s += os * (double)__expf(om - *m);
    }
}

// log(sum(exp(x))) over the block from each thread's pair; every thread gets it.
__device__ float block_lse(float m, double s) {
    __shared__ float pm[32];
    __shared__ double ps[32];
    for (int o = WARP / 2; o > 0; o >>= 1) {
        const float om = __shfl_xor_sync(0xffffffffu, m, o);
        const double os = __shfl_xor_sync(0xffffffffu, s, o);
        lse_merge(&m, &s, om, os);
    }
    const int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP;
    if (lane == 0) {
        pm[warp] = m;
        ps[warp] = s;
    }
    __syncthreads();
    const int warps = blockDim.x / WARP;
    m = lane < warps ? pm[lane] : -INFINITY;
    s = lane < warps ? ps[lane] : 0.0;
    for (int o = WARP / 2; o > 0; o >>= 1) {
        const float om = __shfl_xor_sync(0xffffffffu, m, o);
        const double os = __shfl_xor_sync(0xffffffffu, s, o);
        lse_merge(&m, &s, om, os);
    }
    __syncthreads();  // pm/ps may be reused by the next call
    return m + (float)log(s);
}

// One block per row. logits [rows][vocab] (raw, left unchanged); work: per row
// `vocab + ceil(vocab / 32)` 32-bit words of scratch (the processed logits, then their
// probabilities; a bitmap of the tokens the penalty and ban lists touch).
// lists: the rows' lists, each row's at the words its SampleRow names: penalty entries as
// (token, its count among the output tokens, 1 if it was seen at all: prompt or output)
// triples; banned token ids; the allowed-token bitmask (bit t % 32 of word t / 32 allows
// token t) where mask_start >= 0. One array, so a step's whole sampling input is one upload
// (and a captured graph's pointers stay fixed).
// Out: the chosen token, its logprob under the raw distribution, and the n_top most likely
// tokens with theirs ([rows][max_top], most likely first, lower id first on ties).
extern "C" __global__ void __launch_bounds__(1024)
    sg_sample(const float* __restrict__ logits, float* __restrict__ work,
              const SampleRow* __restrict__ rows, const uint32_t* __restrict__ lists, int vocab, int max_top,
              uint32_t* __restrict__ out_token, float* __restrict__ out_logprob,
              uint32_t* __restrict__ out_top_ids, float* __restrict__ out_top_logprobs) {
    __shared__ Hist root, level;
    __shared__ u64 cand[SAMPLE_GATHER];
    __shared__ SelState st;
    __shared__ SampleRow P;  // (in shared memory: 16 registers fewer for the whole kernel)
    const int row = blockIdx.x;
    if (threadIdx.x == 0) P = rows[row];
    __syncthreads();
    const float* x = logits + (long)row * vocab;
    const int words = (vocab + 31) / 32;
    float* w = work + (long)row * (vocab + words);
    uint32_t* touched = (uint32_t*)(w + vocab);
    const uint32_t* mask = P.mask_start >= 0 ? lists + P.mask_start : nullptr;
    const int n_top = min(P.n_top, min(max_top, vocab));

    // 1. the tokens the penalty and ban lists touch: marked, and processed alone
    for (int j = threadIdx.x; j < words; j += blockDim.x) touched[j] = 0;
    clear_hist(&root);
    __syncthreads();
    for (int e = P.pen_start + 3 * threadIdx.x; e < P.pen_end; e += 3 * blockDim.x)
        if (lists[e] < (uint32_t)vocab) atomicOr(&touched[lists[e] >> 5], 1u << (lists[e] & 31));
    for (int e = P.ban_start + threadIdx.x; e < P.ban_end; e += blockDim.x)
        if (lists[e] < (uint32_t)vocab) atomicOr(&touched[lists[e] >> 5], 1u << (lists[e] & 31));
    for (int e = P.pen_start + 3 * threadIdx.x; e < P.pen_end; e += 3 * blockDim.x) {
        const uint32_t t = lists[e], count = lists[e + 1], seen = lists[e + 2];
        if (t >= (uint32_t)vocab) continue;
        float v = (mask == nullptr || ((mask[t >> 5] >> (t & 31)) & 1u)) ? x[t] : -INFINITY;
        if (P.repetition_penalty != 1.0f && seen)
            v = v > 0.0f ? v / P.repetition_penalty : v * P.repetition_penalty;
        if (count > 0 && (P.frequency_penalty != 0.0f || P.presence_penalty != 0.0f))
            v -= P.frequency_penalty * (float)count + P.presence_penalty;
        w[t] = v;
    }
    __syncthreads();
    for (int e = P.ban_start + threadIdx.x; e < P.ban_end; e += blockDim.x)
        if (lists[e] < (uint32_t)vocab) w[lists[e]] = -INFINITY;
    __syncthreads();

    // 2. one pass: the processed logits (kept when the row samples), their best token, the
    // raw distribution's log-sum-exp and, when top logprobs are wanted, the histogram of the
    // raw keys' top bits
    const Src raw = {x, false, 0.0f, 64};
    float best_v = -INFINITY, m = -INFINITY;
    int token = vocab;  // vocab: none yet
    double s = 0.0;
    row_pass(x, vocab, [&](float xi, int i) {
        if (xi > m) {
            s = (m == -INFINITY ? 0.0 : s * (double)__expf(m - xi)) + 1.0;
            m = xi;
        } else if (xi > -INFINITY) {
            s += (double)__expf(xi - m);
        }
        if (n_top > 0) hist_add(&root, (int)(key_of(raw, xi, i) >> (64 - SAMPLE_BITS)), 0);
        float v;
        if ((touched[i >> 5] >> (i & 31)) & 1u) {
            v = w[i];
        } else {
            v = (mask == nullptr || ((mask[i >> 5] >> (i & 31)) & 1u)) ? xi : -INFINITY;
            if (!P.greedy) w[i] = v;
        }
        if (before(v, i, best_v, token, vocab)) {
            best_v = v;
            token = i;
        }
    });
    block_best(&best_v, &token, vocab);
    const float lse = block_lse(m, s);

    // 3. the top logprobs: the n_top largest raw keys, gathered with everything above them
    if (n_top > 0) {
        const Need nn = {true, false, (double)n_top};
        select(raw, vocab, &root, nn, true, &level, cand, &st);
        const int n = min(st.n, SAMPLE_GATHER);
        for (int j = threadIdx.x; j < n; j += blockDim.x) {
            int rank = 0;
            for (int l = 0; l < n; l++) rank += cand[l] > cand[j];
            if (rank < n_top) {
                const int t = key_token(cand[j]);
                out_top_ids[(long)row * max_top + rank] = (uint32_t)t;
                out_top_logprobs[(long)row * max_top + rank] = x[t] - lse;
            }
        }
        __syncthreads();
    }

    // 4. a draw: probabilities relative to the best token (which has 1), their histogram,
    // then the cuts of top-k, top-p and min-p, and the draw's own cut inside what they keep
    if (!P.greedy) {
        int lg = 0;  // ceil(log2(vocab))
        while ((1ll << lg) < (long long)vocab) lg++;
        const Src prob = {w, true, __uint_as_float((unsigned)(127 + 63 - lg) << 23), 62};
        const float inv_t = 1.0f / P.temperature;
        clear_hist(&root);
        __syncthreads();
        u64 kept_c = 0, kept_m = 0;  // min-p: tokens with p >= min_p
        row_pass(w, vocab, [&](float wi, int i) {
            float p = __expf((wi - best_v) * inv_t);
            p = p >= 0.0f ? min(p, 1.0f) : 0.0f;  // NaN (no finite logit): 0
            w[i] = p;
            const u64 q = fixed_mass(prob, p);
            hist_add(&root, (int)(key_of(prob, p, i) >> (62 - SAMPLE_BITS)), q);
            if (p >= P.min_p) {
                kept_c++;
                kept_m += q;
            }
        });
        kept_c = block_sum(kept_c);
        kept_m = block_sum(kept_m);
        u64 total = 0;
        for (int b = threadIdx.x; b < SAMPLE_BINS; b += blockDim.x) total += root.mass[b];
        total = block_sum(total);
        u64 n = (u64)vocab, mass = total;
        if (P.top_k > 0 && P.top_k < vocab) {
            const Need nk = {true, false, (double)P.top_k};
            const Cut c = select(prob, vocab, &root, nk, false, &level, cand, &st);
            if (c.found && c.count < n) {
                n = c.count;
                mass = c.mass;
            }
        }
        if (P.top_p < 1.0f) {
            const Need np = {false, false, (double)P.top_p * (double)total};
            const Cut c = select(prob, vocab, &root, np, false, &level, cand, &st);
            if (c.found && c.count < n) {
                n = c.count;
                mass = c.mass;
            }
        }
        if (P.min_p > 0.0f && kept_c < n) {
            n = kept_c;
            mass = kept_m;
        }
        if (n == 0) {  // min-p above 1: the best token alone
            const Need n1 = {true, false, 1.0};
            n = 1;
            mass = select(prob, vocab, &root, n1, false, &level, cand, &st).mass;
        }
        // the first candidate whose running sum passes u * mass; the last kept one when
        // rounding leaves the target at the very end
        const Need nd = {false, true, P.u * (double)mass};
        Cut c = select(prob, vocab, &root, nd, false, &level, cand, &st);
        if (!c.found || c.count > n) {
            const Need nn = {true, false, (double)n};
            c = select(prob, vocab, &root, nn, false, &level, cand, &st);
        }
        token = key_token(c.key);
    }
    if (threadIdx.x == 0) {
        out_token[row] = (uint32_t)token;
        out_logprob[row] = x[token] - lse;
    }
}

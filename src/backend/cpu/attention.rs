//! Paged attention on the CPU: one query token against its sequence's cached keys and values,
//! for some query heads of one KV-head group.
//!
//! One pass over the context with an online softmax (Milakov & Gimelshein; FlashAttention):
//! keys are scored in chunks of up to 16 positions inside a page, the running maximum and sum
//! are corrected once per chunk, and the value rows are accumulated with the chunk's weights.
//! A page holds its keys dimension by dimension (`KvLayout`), so a chunk's scores are one
//! vector of sixteen lanes built by multiply-adds of each query value with a row of keys: no
//! sum across lanes per key.
//! Every head of the group is handled inside the same chunk loop, so a page's keys and values
//! are read from memory once for the whole group and then from L1.
//!
//! Each head's arithmetic is independent of the other heads in the call, and a context longer
//! than [`SEGMENT`] positions is always computed as segments merged in order, so splitting the
//! work across threads by head or by segment (when there are few tokens, as in decode) gives
//! bit-identical results: the output never depends on how the work was divided.
//!
//! The cache holds f32 or bf16 (`--kv-cache-dtype`); every kernel widens a bf16 row to f32 as
//! it loads it (a shift: bf16 is the top half of an f32), so the arithmetic is the same.

use half::bf16;

use super::kernels::{dot, scale_axpy, Isa};

/// An element of the KV cache: f32, or bf16 (half the memory; rounded to nearest even when
/// stored).
pub trait KvElem: Copy + Send + Sync + Default + 'static {
    fn from_f32(x: f32) -> Self;
    fn to_f32(self) -> f32;
    /// `src` as f32: itself for an f32 cache, else widened into `buf` (same length).
    fn as_f32<'a>(src: &'a [Self], buf: &'a mut [f32]) -> &'a [f32] {
        buf.iter_mut().zip(src).for_each(|(d, s)| *d = s.to_f32());
        buf
    }
    /// Eight elements at `p` widened to f32.
    ///
    /// # Safety
    /// AVX2 present; `p..p + 8` readable.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256;
    /// Sixteen elements at `p` widened to f32.
    ///
    /// # Safety
    /// AVX-512 F present; `p..p + 16` readable.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load16(p: *const Self) -> std::arch::x86_64::__m512;
}

impl KvElem for f32 {
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        x
    }
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    fn as_f32<'a>(src: &'a [Self], _buf: &'a mut [f32]) -> &'a [f32] {
        src
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256 {
        std::arch::x86_64::_mm256_loadu_ps(p)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(p: *const Self) -> std::arch::x86_64::__m512 {
        std::arch::x86_64::_mm512_loadu_ps(p)
    }
}

impl KvElem for bf16 {
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        bf16::from_f32(x)
    }
    #[inline(always)]
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        let h = _mm_loadu_si128(p as *const __m128i);
        _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h)))
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(p: *const Self) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        let h = _mm256_loadu_si256(p as *const __m256i);
        _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)))
    }
}

/// Geometry of the CPU paged KV cache of one layer. One head's part of a page is one block of
/// `page_size * head_dim` values: values `[slot in page][head_dim]` (a row per token), keys
/// `[head_dim][slot in page]` (a row per dimension, so the keys of a run of tokens are a
/// vector per dimension).
#[derive(Debug, Clone, Copy)]
pub struct KvLayout {
    pub page_size: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
}

impl KvLayout {
    /// Offset of the block of (page, head) in a layer's K or V array.
    #[inline]
    pub fn block(&self, page: usize, head: usize) -> usize {
        (page * self.num_kv_heads + head) * self.page_size * self.head_dim
    }
    /// Offset of the value row of (page, head, slot-in-page) in a layer's V array.
    #[inline]
    pub fn v_offset(&self, page: usize, head: usize, in_page: usize) -> usize {
        self.block(page, head) + in_page * self.head_dim
    }
    /// Offset of dimension `d` of the key of (page, head, slot-in-page) in a layer's K array.
    #[inline]
    pub fn k_offset(&self, page: usize, head: usize, in_page: usize, d: usize) -> usize {
        self.block(page, head) + d * self.page_size + in_page
    }
}

/// Widest head the vector kernels stage a partial chunk of keys for.
const MAX_STAGED_HEAD_DIM: usize = 256;

/// Heads handled per chunk loop (running max and sum live on the stack).
pub const MAX_HEADS_PER_PASS: usize = 8;
/// Key positions scored per online-softmax update.
const KEY_CHUNK: usize = 16;

/// What one call attends: the KV cache of one layer and one sequence.
#[derive(Clone, Copy)]
pub struct AttnInput<'a, E: KvElem = f32> {
    pub k_cache: &'a [E],
    pub v_cache: &'a [E],
    pub layout: KvLayout,
    pub block_table: &'a [u32],
    pub kv_head: usize,
    /// Positions `0..ctx` are visible (causal).
    pub ctx: usize,
    pub scale: f32,
    /// Fetch the keys and values of the chunks ahead while a chunk is scored (`Ahead`): for a
    /// query whose context is likely in memory rather than cache (decode; the first token of
    /// a prompt chunk, after which its neighbours find the pages cached).
    pub prefetch: bool,
}

impl<E: KvElem> AttnInput<'_, E> {
    /// The run of keys that starts at position `pos`: the offset of its page's block, its
    /// first slot in the page, and how many follow (at most KEY_CHUNK, never across a page or
    /// past `end`).
    #[inline]
    fn chunk_at(&self, pos: usize, end: usize) -> Chunk {
        let ps = self.layout.page_size;
        let page = self.block_table[pos / ps] as usize;
        let in_page = pos % ps;
        let n = KEY_CHUNK.min(ps - in_page).min(end - pos);
        Chunk {
            block: self.layout.block(page, self.kv_head),
            in_page,
            n,
        }
    }

    /// The chunk's keys as `hd` rows of `KEY_CHUNK` (row stride returned): in place for a
    /// whole chunk, else copied into `stage` with zeros after the last key, so every row can
    /// be read as a full vector. `stage` is left uninitialised by the callers (it is written
    /// here before it is read, and only for a partial chunk), so a call does not clear it.
    #[inline(always)]
    fn keys<'s>(
        &'s self,
        c: &Chunk,
        stage: &'s mut [std::mem::MaybeUninit<E>],
    ) -> (&'s [E], usize) {
        let ps = self.layout.page_size;
        let hd = self.layout.head_dim;
        let start = c.block + c.in_page;
        if c.n == KEY_CHUNK {
            return (&self.k_cache[start..start + (hd - 1) * ps + KEY_CHUNK], ps);
        }
        let staged = &mut stage[..hd * KEY_CHUNK];
        for (d, row) in staged.chunks_exact_mut(KEY_CHUNK).enumerate() {
            let keys = &self.k_cache[start + d * ps..start + d * ps + c.n];
            for (j, v) in row.iter_mut().enumerate() {
                v.write(keys.get(j).copied().unwrap_or_default());
            }
        }
        // SAFETY: every element of `staged` was written just above, and MaybeUninit<E> has the
        // layout of E.
        let keys = unsafe { std::slice::from_raw_parts(staged.as_ptr() as *const E, staged.len()) };
        (keys, KEY_CHUNK)
    }
}

/// A run of keys inside one page (see `AttnInput::chunk_at`).
#[derive(Clone, Copy)]
struct Chunk {
    block: usize,
    in_page: usize,
    n: usize,
}

impl Chunk {
    /// Offset of the chunk's first value row.
    #[inline(always)]
    fn values(&self, hd: usize) -> usize {
        self.block + self.in_page * hd
    }
}

/// The vector kernels' e^x (Cephes' expf): ln 2 split in a high part exact in few bits and
/// the rest, and the degree-5 polynomial's coefficients, highest first.
#[cfg(target_arch = "x86_64")]
pub(super) const EXP_LN2_HI: f32 = 0.693_359_4;
#[cfg(target_arch = "x86_64")]
pub(super) const EXP_LN2_LO: f32 = -2.121_944_4e-4;
#[cfg(target_arch = "x86_64")]
pub(super) const EXP_POLY: [f32; 6] = [
    1.987_569_1e-4,
    1.398_199_9e-3,
    8.333_452e-3,
    4.166_579_6e-2,
    1.666_666_5e-1,
    0.5,
];

/// e^x on eight lanes, Cephes-style: x clamped to [-87, 88], range reduction by ln 2 and a
/// degree-5 polynomial; relative error about 2e-7 (attention weights, where x <= 0, and the
/// SwiGLU of the products).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(super) unsafe fn exp8(x: std::arch::x86_64::__m256) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    let x = _mm256_min_ps(
        _mm256_max_ps(x, _mm256_set1_ps(-87.0)),
        _mm256_set1_ps(88.0),
    );
    let fx = _mm256_floor_ps(_mm256_fmadd_ps(
        x,
        _mm256_set1_ps(std::f32::consts::LOG2_E),
        _mm256_set1_ps(0.5),
    ));
    let x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(EXP_LN2_HI), x);
    let x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(EXP_LN2_LO), x);
    let mut y = _mm256_set1_ps(EXP_POLY[0]);
    for c in &EXP_POLY[1..] {
        y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(*c));
    }
    y = _mm256_fmadd_ps(
        y,
        _mm256_mul_ps(x, x),
        _mm256_add_ps(x, _mm256_set1_ps(1.0)),
    );
    let pow2 = _mm256_slli_epi32::<23>(_mm256_add_epi32(
        _mm256_cvttps_epi32(fx),
        _mm256_set1_epi32(127),
    ));
    _mm256_mul_ps(y, _mm256_castsi256_ps(pow2))
}

/// Bytes of keys and values (of one KV head) between the chunk being scored and the one whose
/// lines are fetched into L2 meanwhile: about two chunks of an f32 cache at head_dim 64.
#[cfg(target_arch = "x86_64")]
const FETCH_AHEAD_BYTES: usize = 16 << 10;

/// The cache lines of a chunk further on, requested one line of keys and one of values per
/// dimension of the chunk being scored, so that the requests spread over its work rather than
/// queue at once. Pages are scattered (a block table) and small, so the hardware prefetcher,
/// which stops at every page, leaves a scan of the cache waiting on memory; fetched this way
/// (the next chunk into L1, one ~16 KB further into L2) decode attention over 2,048 positions
/// ran about 1.4x faster on Zen 4 (`benches/RESULTS.md`). A hint only: results never change.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
struct Ahead {
    /// Key row 0 of the chunk (rows `k_stride` bytes apart); null when there is none.
    k: *const i8,
    k_stride: usize,
    /// Its value rows (contiguous): `v_lines` cache lines.
    v: *const i8,
    v_lines: usize,
}

#[cfg(target_arch = "x86_64")]
impl Ahead {
    const NONE: Ahead = Ahead {
        k: std::ptr::null(),
        k_stride: 0,
        v: std::ptr::null(),
        v_lines: 0,
    };

    /// Requests key row `d` and value line `d` of the chunk, into the cache level `HINT`.
    #[inline(always)]
    unsafe fn line<const HINT: i32>(&self, d: usize) {
        use std::arch::x86_64::_mm_prefetch;
        if self.k.is_null() {
            return;
        }
        // (prefetching is a hint and never faults; the addresses are inside the cache slices
        // anyway: d < head_dim rows of keys, d < v_lines lines of values)
        _mm_prefetch::<HINT>(self.k.wrapping_add(d * self.k_stride));
        if d < self.v_lines {
            _mm_prefetch::<HINT>(self.v.wrapping_add(64 * d));
        }
    }
}

#[cfg(target_arch = "x86_64")]
impl<E: KvElem> AttnInput<'_, E> {
    /// The chunks to fetch while the one at `pos` is scored: the next one (into L1) and the
    /// one [`FETCH_AHEAD_BYTES`] further (into L2). None when `prefetch` is off or the context
    /// ends first.
    #[inline(always)]
    fn ahead(&self, pos: usize) -> (Ahead, Ahead) {
        let hd = self.layout.head_dim;
        let es = std::mem::size_of::<E>();
        let far = (FETCH_AHEAD_BYTES / (2 * KEY_CHUNK * hd * es)).max(2);
        let at = |chunks: usize| {
            let target = pos + chunks * KEY_CHUNK;
            if !self.prefetch || target >= self.ctx {
                return Ahead::NONE;
            }
            let c = self.chunk_at(target, self.ctx);
            Ahead {
                k: self.k_cache[c.block + c.in_page..].as_ptr() as *const i8,
                k_stride: self.layout.page_size * es,
                v: self.v_cache[c.values(hd)..].as_ptr() as *const i8,
                v_lines: (c.n * hd * es).div_ceil(64),
            }
        };
        (at(1), at(far))
    }
}

/// Positions per segment of the context. Attention over a longer context is computed segment
/// by segment, each with its own running maximum and sum (a partial result, `partial_len`),
/// and the partial results are merged in order (`merge`), then normalized (`finish`): the
/// same operations whether one thread runs the segments in turn (`attend`) or several run
/// them side by side (decode, where a token's few KV heads would leave threads idle), so a
/// result never depends on how the work was divided. A multiple of `KEY_CHUNK`.
pub const SEGMENT: usize = 256;

/// Positions `start..end` of the context.
type Span = std::ops::Range<usize>;

/// Floats of the partial result of `heads` query heads over one segment: per head its
/// maximum score, then per head the sum of its weights, then the weighted sums of values
/// (`heads * head_dim`), not yet divided by the sum.
pub fn partial_len(heads: usize, head_dim: usize) -> usize {
    heads * (head_dim + 2)
}

/// The number of segments of a context of `ctx` positions.
pub fn segments(ctx: usize) -> usize {
    ctx.div_ceil(SEGMENT).max(1)
}

/// The partial result (see [`partial_len`]) of the query heads in `q` (`heads * head_dim`)
/// over segment `seg` of positions `0..ctx`, into `part`.
pub fn attend_segment<E: KvElem>(
    isa: Isa,
    a: &AttnInput<'_, E>,
    seg: usize,
    q: &[f32],
    part: &mut [f32],
) {
    let hd = a.layout.head_dim;
    let heads = q.len() / hd;
    let span = seg * SEGMENT..((seg + 1) * SEGMENT).min(a.ctx);
    let (ms, rest) = part[..partial_len(heads, hd)].split_at_mut(heads);
    let (ss, acc) = rest.split_at_mut(heads);
    let mut h0 = 0;
    while h0 < heads {
        let nh = MAX_HEADS_PER_PASS.min(heads - h0);
        let qs = &q[h0 * hd..(h0 + nh) * hd];
        let os = &mut acc[h0 * hd..(h0 + nh) * hd];
        let (m, s) = (&mut ms[h0..h0 + nh], &mut ss[h0..h0 + nh]);
        let span = span.clone();
        match isa {
            // SAFETY: Avx512 is chosen only when the CPU has AVX-512 F (and AVX2, FMA);
            // head_dim % 16 == 0 and fits the staging buffer.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 if hd.is_multiple_of(16) && hd <= MAX_STAGED_HEAD_DIM => unsafe {
                avx512::attend_heads(a, span, qs, os, m, s)
            },
            // SAFETY: Avx2 and Avx512 are chosen only when the CPU has AVX2 and FMA;
            // head_dim % 8 == 0.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 | Isa::Avx512 if hd.is_multiple_of(8) && hd <= MAX_STAGED_HEAD_DIM => unsafe {
                avx2::attend_heads(a, span, qs, os, m, s)
            },
            _ => attend_heads_portable(isa, a, span, qs, os, m, s),
        }
        h0 += nh;
    }
}

/// Merges the partial result of the next segment, `next`, into `run` (the segments before
/// it), both of `heads` heads: each rescaled to their common maximum.
pub fn merge(run: &mut [f32], next: &[f32], heads: usize, head_dim: usize) {
    let (rm, rest) = run[..partial_len(heads, head_dim)].split_at_mut(heads);
    let (rs, racc) = rest.split_at_mut(heads);
    let (nm, rest) = next[..partial_len(heads, head_dim)].split_at(heads);
    let (ns, nacc) = rest.split_at(heads);
    for h in 0..heads {
        let m = rm[h].max(nm[h]);
        let (a, b) = ((rm[h] - m).exp(), (nm[h] - m).exp());
        rm[h] = m;
        rs[h] = rs[h] * a + ns[h] * b;
        let r = &mut racc[h * head_dim..(h + 1) * head_dim];
        for (x, y) in r.iter_mut().zip(&nacc[h * head_dim..(h + 1) * head_dim]) {
            *x = *x * a + y * b;
        }
    }
}

/// The attention output (`heads * head_dim`) of a merged partial result: the weighted sums
/// of values times the inverse of the sum of weights.
pub fn finish(part: &[f32], heads: usize, head_dim: usize, out: &mut [f32]) {
    let (sums, acc) = part[heads..partial_len(heads, head_dim)].split_at(heads);
    for (h, o) in out[..heads * head_dim]
        .chunks_exact_mut(head_dim)
        .enumerate()
    {
        let inv = 1.0 / sums[h];
        for (o, x) in o.iter_mut().zip(&acc[h * head_dim..]) {
            *o = x * inv;
        }
    }
}

/// Attention of the query heads in `q` (`heads * head_dim`) over positions `0..ctx`, into
/// `out` (same shape): the segments in turn, merged.
pub fn attend<E: KvElem>(isa: Isa, a: &AttnInput<'_, E>, q: &[f32], out: &mut [f32]) {
    let hd = a.layout.head_dim;
    let heads = q.len() / hd;
    let len = partial_len(heads, hd);
    let segs = segments(a.ctx);
    let mut buf = vec![0.0f32; if segs > 1 { 2 * len } else { len }];
    let (run, next) = buf.split_at_mut(len);
    attend_segment(isa, a, 0, q, run);
    for seg in 1..segs {
        attend_segment(isa, a, seg, q, next);
        merge(run, next, heads, hd);
    }
    finish(run, heads, hd, out);
}

/// The factor that rescales sums taken under the running maximum `old` to the maximum `new`:
/// e^(old - new), and exactly 1 without a call to `exp` when the maximum did not change (most
/// chunks of a long context; e^0 is 1 exactly, so the result is the same).
#[inline(always)]
fn rescale(old: f32, new: f32) -> f32 {
    if old == new {
        1.0
    } else {
        (old - new).exp()
    }
}

/// The portable twin (also the reference in tests).
#[allow(clippy::needless_range_loop)] // per-head arrays indexed in lockstep
fn attend_heads_portable<E: KvElem>(
    isa: Isa,
    a: &AttnInput<'_, E>,
    span: Span,
    qs: &[f32],
    os: &mut [f32],
    ms: &mut [f32],
    ss: &mut [f32],
) {
    let hd = a.layout.head_dim;
    let nh = qs.len() / hd;
    os.fill(0.0);
    // a bf16 row widened to f32 (an f32 cache is read in place)
    let mut row = vec![0.0f32; hd];
    let mut max = [f32::NEG_INFINITY; MAX_HEADS_PER_PASS];
    let mut sum = [0.0f32; MAX_HEADS_PER_PASS];
    let mut scores = [[0.0f32; KEY_CHUNK]; MAX_HEADS_PER_PASS];
    let ps = a.layout.page_size;
    let mut pos = span.start;
    while pos < span.end {
        let c = a.chunk_at(pos, span.end);
        let (base, n) = (c.values(hd), c.n);
        for j in 0..n {
            let key = c.block + c.in_page + j;
            row.iter_mut()
                .enumerate()
                .for_each(|(d, r)| *r = a.k_cache[key + d * ps].to_f32());
            for h in 0..nh {
                scores[h][j] = dot(isa, &qs[h * hd..(h + 1) * hd], &row) * a.scale;
            }
        }
        for h in 0..nh {
            let chunk_max = scores[h][..n]
                .iter()
                .fold(f32::NEG_INFINITY, |m, &s| m.max(s));
            let new_max = max[h].max(chunk_max);
            let correction = rescale(max[h], new_max);
            max[h] = new_max;
            let acc = &mut os[h * hd..(h + 1) * hd];
            let mut chunk_sum = 0.0f32;
            for j in 0..n {
                let p = (scores[h][j] - new_max).exp();
                chunk_sum += p;
                let vr = E::as_f32(&a.v_cache[base + j * hd..base + (j + 1) * hd], &mut row);
                scale_axpy(isa, acc, if j == 0 { correction } else { 1.0 }, p, vr);
            }
            sum[h] = sum[h] * correction + chunk_sum;
        }
        pos += n;
    }
    ms[..nh].copy_from_slice(&max[..nh]);
    ss[..nh].copy_from_slice(&sum[..nh]);
}

/// `$f::<NH, E>(args)` for the number of heads `$nh` (1..=MAX_HEADS_PER_PASS): the scoring
/// loops keep every head's accumulators in registers.
#[cfg(target_arch = "x86_64")]
macro_rules! by_heads {
    ($nh:expr, $f:ident::<_ $(, $g:tt)*>($($arg:expr),*)) => {
        match $nh {
            1 => $f::<1 $(, $g)*>($($arg),*),
            2 => $f::<2 $(, $g)*>($($arg),*),
            3 => $f::<3 $(, $g)*>($($arg),*),
            4 => $f::<4 $(, $g)*>($($arg),*),
            5 => $f::<5 $(, $g)*>($($arg),*),
            6 => $f::<6 $(, $g)*>($($arg),*),
            7 => $f::<7 $(, $g)*>($($arg),*),
            _ => $f::<8 $(, $g)*>($($arg),*),
        }
    };
}

/// The scoring kernel `$f` (a `qk`) of the chunk at `$pos` through [`by_heads!`]: while
/// `$a.prefetch`, it requests the lines of the chunks ahead as it runs (`AttnInput::ahead`);
/// otherwise its loop has no requests at all.
#[cfg(target_arch = "x86_64")]
macro_rules! score_chunk {
    ($a:expr, $pos:expr, $nh:expr, $f:ident::<_, $e:ty>($($arg:expr),*)) => {
        if $a.prefetch {
            let ahead = $a.ahead($pos);
            by_heads!($nh, $f::<_, $e, true>($($arg),*, ahead))
        } else {
            by_heads!($nh, $f::<_, $e, false>($($arg),*, (Ahead::NONE, Ahead::NONE)))
        }
    };
}

#[cfg(target_arch = "x86_64")]
#[allow(clippy::needless_range_loop)]
mod avx2 {
    use super::*;
    use std::arch::x86_64::*;

    /// The scaled scores of a chunk's keys (`hd` rows of 16 at stride `stride`) for NH heads:
    /// each head's query values broadcast against the rows, two accumulators (even and odd
    /// dimensions) per 8 keys; with `FETCH`, requests the lines of the chunks `near` and `far`.
    #[inline(always)]
    unsafe fn qk<const NH: usize, E: KvElem, const FETCH: bool>(
        q: *const f32,
        hd: usize,
        k: *const E,
        stride: usize,
        scale: f32,
        out: &mut [[f32; KEY_CHUNK]; MAX_HEADS_PER_PASS],
        (near, far): (Ahead, Ahead),
    ) {
        let mut lo = [[_mm256_setzero_ps(); 2]; NH];
        let mut hi = [[_mm256_setzero_ps(); 2]; NH];
        let mut d = 0;
        while d < hd {
            for p in 0..2 {
                if FETCH {
                    near.line::<_MM_HINT_T0>(d + p);
                    far.line::<_MM_HINT_T1>(d + p);
                }
                let kr = k.add((d + p) * stride);
                let (kl, kh) = (E::load8(kr), E::load8(kr.add(8)));
                for h in 0..NH {
                    let qv = _mm256_set1_ps(*q.add(h * hd + d + p));
                    lo[h][p] = _mm256_fmadd_ps(qv, kl, lo[h][p]);
                    hi[h][p] = _mm256_fmadd_ps(qv, kh, hi[h][p]);
                }
            }
            d += 2;
        }
        let sc = _mm256_set1_ps(scale);
        for h in 0..NH {
            let o = out[h].as_mut_ptr();
            _mm256_storeu_ps(o, _mm256_mul_ps(_mm256_add_ps(lo[h][0], lo[h][1]), sc));
            _mm256_storeu_ps(
                o.add(8),
                _mm256_mul_ps(_mm256_add_ps(hi[h][0], hi[h][1]), sc),
            );
        }
    }

    /// `attend_heads_portable` with the scores, exponentials and value updates in
    /// registers. `head_dim` must be a multiple of 8, at most MAX_STAGED_HEAD_DIM.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn attend_heads<E: KvElem>(
        a: &AttnInput<'_, E>,
        span: Span,
        qs: &[f32],
        os: &mut [f32],
        ms: &mut [f32],
        ss: &mut [f32],
    ) {
        let hd = a.layout.head_dim;
        let nh = qs.len() / hd;
        let vecs = hd / 8;
        os.fill(0.0);
        let mut max = [f32::NEG_INFINITY; MAX_HEADS_PER_PASS];
        let mut sum = [0.0f32; MAX_HEADS_PER_PASS];
        let mut all_scores = [[0.0f32; KEY_CHUNK]; MAX_HEADS_PER_PASS];
        let mut weights = [0.0f32; KEY_CHUNK];
        let mut stage = [std::mem::MaybeUninit::<E>::uninit(); MAX_STAGED_HEAD_DIM * KEY_CHUNK];
        let vc = a.v_cache.as_ptr();
        let mut pos = span.start;
        while pos < span.end {
            let c = a.chunk_at(pos, span.end);
            let (base, n) = (c.values(hd), c.n);
            let (keys, stride) = a.keys(&c, &mut stage);
            let (q, k) = (qs.as_ptr(), keys.as_ptr());
            let sc = &mut all_scores;
            score_chunk!(a, pos, nh, qk::<_, E>(q, hd, k, stride, a.scale, sc));
            for h in 0..nh {
                let scores = &all_scores[h];
                let chunk_max = scores[..n].iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s));
                let new_max = max[h].max(chunk_max);
                let correction = rescale(max[h], new_max);
                max[h] = new_max;
                // weights of this chunk (exp of the shifted scores, two vectors of 8)
                let shift = _mm256_set1_ps(new_max);
                for half in 0..2 {
                    let s = _mm256_loadu_ps(scores.as_ptr().add(8 * half));
                    _mm256_storeu_ps(
                        weights.as_mut_ptr().add(8 * half),
                        exp8(_mm256_sub_ps(s, shift)),
                    );
                }
                let mut chunk_sum = 0.0f32;
                for p in &weights[..n] {
                    chunk_sum += p;
                }
                sum[h] = sum[h] * correction + chunk_sum;
                // acc = acc * correction + sum_j w_j v_j, 8 lanes at a time
                let acc = os.as_mut_ptr().add(h * hd);
                let corr = _mm256_set1_ps(correction);
                for c in 0..vecs {
                    let mut r = _mm256_mul_ps(_mm256_loadu_ps(acc.add(8 * c)), corr);
                    for j in 0..n {
                        r = _mm256_fmadd_ps(
                            _mm256_set1_ps(weights[j]),
                            E::load8(vc.add(base + j * hd + 8 * c)),
                            r,
                        );
                    }
                    _mm256_storeu_ps(acc.add(8 * c), r);
                }
            }
            pos += n;
        }
        ms[..nh].copy_from_slice(&max[..nh]);
        ss[..nh].copy_from_slice(&sum[..nh]);
    }
}

/// The AVX-512 kernel: a chunk's sixteen scores as one vector (query values broadcast against
/// the rows of keys), one 16-wide exponential per chunk, and the value rows accumulated key by
/// key into registers holding a whole head's output slice.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::needless_range_loop)]
mod avx512 {
    use super::*;
    use std::arch::x86_64::*;

    /// e^x for x <= 0, as `exp8` on sixteen lanes.
    #[inline(always)]
    unsafe fn exp_neg(x: __m512) -> __m512 {
        let x = _mm512_max_ps(x, _mm512_set1_ps(-87.0));
        let fx =
            _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC }>(_mm512_fmadd_ps(
                x,
                _mm512_set1_ps(std::f32::consts::LOG2_E),
                _mm512_set1_ps(0.5),
            ));
        let x = _mm512_fnmadd_ps(fx, _mm512_set1_ps(EXP_LN2_HI), x);
        let x = _mm512_fnmadd_ps(fx, _mm512_set1_ps(EXP_LN2_LO), x);
        let mut y = _mm512_set1_ps(EXP_POLY[0]);
        for c in &EXP_POLY[1..] {
            y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(*c));
        }
        y = _mm512_fmadd_ps(
            y,
            _mm512_mul_ps(x, x),
            _mm512_add_ps(x, _mm512_set1_ps(1.0)),
        );
        let pow2 = _mm512_slli_epi32::<23>(_mm512_add_epi32(
            _mm512_cvttps_epi32(fx),
            _mm512_set1_epi32(127),
        ));
        _mm512_mul_ps(y, _mm512_castsi512_ps(pow2))
    }

    /// Output vectors of one head kept in registers at a time (64 values).
    const OUT_VECS: usize = 4;

    /// `acc[0..16 C] = acc · corr + Σ_j w[j] · v[j · stride ..][0..16 C]`, in C registers.
    #[inline(always)]
    unsafe fn accumulate<const C: usize, E: KvElem>(
        acc: *mut f32,
        corr: __m512,
        w: &[f32],
        v: *const E,
        stride: usize,
    ) {
        let mut r = [_mm512_setzero_ps(); C];
        for c in 0..C {
            r[c] = _mm512_mul_ps(_mm512_loadu_ps(acc.add(16 * c)), corr);
        }
        for (j, &wj) in w.iter().enumerate() {
            let wj = _mm512_set1_ps(wj);
            let vj = v.add(j * stride);
            for c in 0..C {
                r[c] = _mm512_fmadd_ps(wj, E::load16(vj.add(16 * c)), r[c]);
            }
        }
        for c in 0..C {
            _mm512_storeu_ps(acc.add(16 * c), r[c]);
        }
    }

    /// The scaled scores of a chunk's keys (`hd` rows of 16 at stride `stride`) for NH heads,
    /// one vector each: each head's query values broadcast against the rows, two accumulators
    /// (even and odd dimensions); with `FETCH`, requests the lines of `near` and `far`.
    #[inline(always)]
    unsafe fn qk<const NH: usize, E: KvElem, const FETCH: bool>(
        q: *const f32,
        hd: usize,
        k: *const E,
        stride: usize,
        scale: f32,
        out: &mut [__m512; MAX_HEADS_PER_PASS],
        (near, far): (Ahead, Ahead),
    ) {
        let mut acc = [[_mm512_setzero_ps(); 2]; NH];
        let mut d = 0;
        while d < hd {
            for p in 0..2 {
                if FETCH {
                    near.line::<_MM_HINT_T0>(d + p);
                    far.line::<_MM_HINT_T1>(d + p);
                }
                let kr = E::load16(k.add((d + p) * stride));
                for h in 0..NH {
                    let qv = _mm512_set1_ps(*q.add(h * hd + d + p));
                    acc[h][p] = _mm512_fmadd_ps(qv, kr, acc[h][p]);
                }
            }
            d += 2;
        }
        let sc = _mm512_set1_ps(scale);
        for h in 0..NH {
            out[h] = _mm512_mul_ps(_mm512_add_ps(acc[h][0], acc[h][1]), sc);
        }
    }

    /// `attend_heads_portable` in AVX-512. `head_dim` must be a multiple of 16, at most
    /// MAX_STAGED_HEAD_DIM.
    #[target_feature(enable = "avx512f,avx512dq,avx2,fma")]
    pub(super) unsafe fn attend_heads<E: KvElem>(
        a: &AttnInput<'_, E>,
        span: Span,
        qs: &[f32],
        os: &mut [f32],
        ms: &mut [f32],
        ss: &mut [f32],
    ) {
        let hd = a.layout.head_dim;
        let nh = qs.len() / hd;
        let vecs = hd / 16;
        os.fill(0.0);
        let mut max = [f32::NEG_INFINITY; MAX_HEADS_PER_PASS];
        let mut sum = [0.0f32; MAX_HEADS_PER_PASS];
        let mut weights = [0.0f32; KEY_CHUNK];
        let vc = a.v_cache.as_ptr();
        let mut all_scores = [_mm512_setzero_ps(); MAX_HEADS_PER_PASS];
        let mut stage = [std::mem::MaybeUninit::<E>::uninit(); MAX_STAGED_HEAD_DIM * KEY_CHUNK];
        let mut pos = span.start;
        while pos < span.end {
            let c = a.chunk_at(pos, span.end);
            let (base, n) = (c.values(hd), c.n);
            let (keys, stride) = a.keys(&c, &mut stage);
            let (q, k) = (qs.as_ptr(), keys.as_ptr());
            let sc = &mut all_scores;
            score_chunk!(a, pos, nh, qk::<_, E>(q, hd, k, stride, a.scale, sc));
            let live: __mmask16 = ((1u32 << n) - 1) as __mmask16;
            for h in 0..nh {
                let scores = all_scores[h];
                let chunk_max = _mm512_mask_reduce_max_ps(live, scores);
                let new_max = max[h].max(chunk_max);
                let correction = rescale(max[h], new_max);
                max[h] = new_max;
                let w = _mm512_maskz_mov_ps(
                    live,
                    exp_neg(_mm512_sub_ps(scores, _mm512_set1_ps(new_max))),
                );
                sum[h] = sum[h] * correction + _mm512_reduce_add_ps(w);
                _mm512_storeu_ps(weights.as_mut_ptr(), w);
                // acc = acc * correction + sum_j w_j v_j, OUT_VECS vectors at a time (then
                // one), in registers
                let acc = os.as_mut_ptr().add(h * hd);
                let corr = _mm512_set1_ps(correction);
                let v = vc.add(base);
                let mut c0 = 0;
                while c0 + OUT_VECS <= vecs {
                    accumulate::<OUT_VECS, E>(
                        acc.add(16 * c0),
                        corr,
                        &weights[..n],
                        v.add(16 * c0),
                        hd,
                    );
                    c0 += OUT_VECS;
                }
                while c0 < vecs {
                    accumulate::<1, E>(acc.add(16 * c0), corr, &weights[..n], v.add(16 * c0), hd);
                    c0 += 1;
                }
            }
            pos += n;
        }
        ms[..nh].copy_from_slice(&max[..nh]);
        ss[..nh].copy_from_slice(&sum[..nh]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::backend::cpu::kernels::tests::rand_vec;

    fn dense(a: &AttnInput<'_>, q: &[f32]) -> Vec<f32> {
        let hd = a.layout.head_dim;
        let mut out = vec![0.0; q.len()];
        for h in 0..q.len() / hd {
            let qh = &q[h * hd..(h + 1) * hd];
            let mut s: Vec<f64> = (0..a.ctx)
                .map(|p| {
                    let page = a.block_table[p / a.layout.page_size] as usize;
                    let slot = p % a.layout.page_size;
                    qh.iter()
                        .enumerate()
                        .map(|(d, x)| {
                            (x * a.k_cache[a.layout.k_offset(page, a.kv_head, slot, d)]) as f64
                        })
                        .sum::<f64>()
                        * a.scale as f64
                })
                .collect();
            let mx = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            s.iter_mut().for_each(|v| *v = (*v - mx).exp());
            let tot: f64 = s.iter().sum();
            for (p, w) in s.iter().enumerate() {
                let off = a.layout.v_offset(
                    a.block_table[p / a.layout.page_size] as usize,
                    a.kv_head,
                    p % a.layout.page_size,
                );
                for d in 0..hd {
                    out[h * hd + d] += (w / tot) as f32 * a.v_cache[off + d];
                }
            }
        }
        out
    }

    #[test]
    fn matches_dense_softmax_and_splits_are_exact() {
        for &(page_size, hd, heads, ctx) in &[
            (4usize, 8usize, 3usize, 11usize),
            (16, 64, 3, 70),
            (1, 16, 9, 5),
            (64, 128, 4, 130),
            // several segments, one of them cut inside a page
            (16, 64, 3, 2 * SEGMENT + 70),
            (5, 64, 2, SEGMENT + 3),
        ] {
            let layout = KvLayout {
                page_size,
                num_kv_heads: 2,
                head_dim: hd,
            };
            let pages = ctx.div_ceil(page_size) + 2;
            let k = rand_vec(pages * 2 * page_size * hd, 4);
            let v = rand_vec(pages * 2 * page_size * hd, 5);
            let table: Vec<u32> = (0..ctx.div_ceil(page_size) as u32).rev().collect();
            let a = AttnInput {
                k_cache: &k,
                v_cache: &v,
                layout,
                block_table: &table,
                kv_head: 1,
                ctx,
                scale: 0.3,
                prefetch: true,
            };
            let q = rand_vec(heads * hd, 6);
            let want = dense(&a, &q);
            for isa in Isa::available() {
                let mut out = vec![0.0; heads * hd];
                attend(isa, &a, &q, &mut out);
                let err: f32 = out
                    .iter()
                    .zip(&want)
                    .map(|(x, y)| (x - y).abs())
                    .fold(0.0, f32::max);
                assert!(err < 2e-5, "{isa:?} ps={page_size} hd={hd}: {err}");
                // the segments computed apart, last first (as threads may in decode), then
                // merged in order: the bits of `attend`
                let (len, segs) = (partial_len(heads, hd), segments(ctx));
                let mut parts = vec![0.0; segs * len];
                for seg in (0..segs).rev() {
                    attend_segment(isa, &a, seg, &q, &mut parts[seg * len..(seg + 1) * len]);
                }
                let (run, rest) = parts.split_at_mut(len);
                for next in rest.chunks_exact(len) {
                    merge(run, next, heads, hd);
                }
                let mut split = vec![0.0; heads * hd];
                finish(run, heads, hd, &mut split);
                assert!(
                    split
                        .iter()
                        .zip(&out)
                        .all(|(x, y)| x.to_bits() == y.to_bits()),
                    "{isa:?} ps={page_size} hd={hd} ctx={ctx}: segments apart"
                );
                // a bf16 cache gives the bits of an f32 cache holding the same (widened) values
                let (kb, vb): (Vec<bf16>, Vec<bf16>) = (
                    k.iter().map(|&x| bf16::from_f32(x)).collect(),
                    v.iter().map(|&x| bf16::from_f32(x)).collect(),
                );
                let (kw, vw): (Vec<f32>, Vec<f32>) = (
                    kb.iter().map(|x| x.to_f32()).collect(),
                    vb.iter().map(|x| x.to_f32()).collect(),
                );
                let (mut from_bf16, mut from_f32) = (vec![0.0; heads * hd], vec![0.0; heads * hd]);
                let with_bf16 = AttnInput {
                    k_cache: &kb[..],
                    v_cache: &vb[..],
                    layout,
                    block_table: &table,
                    kv_head: 1,
                    ctx,
                    scale: 0.3,
                    // and without prefetching, which must not change a bit
                    prefetch: false,
                };
                let with_f32 = AttnInput {
                    k_cache: &kw[..],
                    v_cache: &vw[..],
                    ..a
                };
                attend(isa, &with_bf16, &q, &mut from_bf16);
                attend(isa, &with_f32, &q, &mut from_f32);
                assert!(
                    from_bf16
                        .iter()
                        .zip(&from_f32)
                        .all(|(x, y)| x.to_bits() == y.to_bits()),
                    "{isa:?} ps={page_size} hd={hd}: bf16 cache"
                );
                // one head at a time gives the same bits as the whole group
                for h in 0..heads {
                    let mut one = vec![0.0; hd];
                    attend(isa, &a, &q[h * hd..(h + 1) * hd], &mut one);
                    assert!(one
                        .iter()
                        .zip(&out[h * hd..(h + 1) * hd])
                        .all(|(x, y)| x.to_bits() == y.to_bits()));
                }
            }
        }
    }
}

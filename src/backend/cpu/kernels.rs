//! CPU kernels: matrix products over bf16/f16/f32 weights read in place, RMSNorm, RoPE,
//! paged attention.
//!
//! Matrix products compute `out[m, n] = Σ_k x[m, k] · w[n, k]` (HF weight layout). Each
//! thread takes a contiguous range of weight rows. A register tile of MR tokens × NR weight
//! rows accumulates 8-wide f32 vectors along k:
//! * few tokens (decode): weights are converted to f32 inside the tile as they stream in, so
//!   every weight byte is read from memory exactly once per step;
//! * many tokens (prefill, large batches): four weight rows at a time are converted once into
//!   a per-thread f32 panel, and the tile sweeps blocks of tokens small enough to stay in L2.
//!
//! Every SIMD kernel has a plain scalar twin (`Isa::Scalar`), used where AVX2/FMA/F16C are
//! missing and in tests as the reference the SIMD path is compared against.

use crate::loader::{bf16_to_f32, Elems};

/// Instruction set chosen at run time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    Scalar,
    #[cfg(target_arch = "x86_64")]
    Avx2,
}

impl Isa {
    /// The best instruction set this CPU has (`SGLANG_CPU_ISA=scalar` forces the portable path).
    pub fn detect() -> Self {
        if std::env::var("SGLANG_CPU_ISA").as_deref() == Ok("scalar") {
            return Isa::Scalar;
        }
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c")
            {
                return Isa::Avx2;
            }
        }
        Isa::Scalar
    }

    pub fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => "avx2+fma",
        }
    }
}

/// Up to this many tokens, weights are streamed row by row (decode); beyond, packed panels.
const STREAM_MAX_TOKENS: usize = 4;
/// How far ahead of the streaming kernel the weights are prefetched.
#[cfg(target_arch = "x86_64")]
const PREFETCH_BYTES: usize = 2048;

/// Tokens per block in the packed (many-token) path: 48 rows of x at k <= 2048 stay in L2.
const TOKEN_BLOCK: usize = 48;

/// A raw output pointer shared by threads that write disjoint elements.
#[derive(Clone, Copy)]
pub struct OutPtr(pub *mut f32);
// SAFETY: used only to write disjoint regions from different threads (see callers).
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// The pointer (a method, so closures capture the whole `Sync` wrapper, not the field).
    #[inline(always)]
    pub fn get(self) -> *mut f32 {
        self.0
    }
}

/// What to do with the dot products of a tile.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Epilogue {
    Store,
    /// `out = silu(gate) * up`, where this tile holds `gate` and the second matrix `up`.
    SwiGlu,
}

/// Computes rows `rows` (of `w`, i.e. output columns) of `out = x · wᵀ` for all `m` tokens.
/// `up` is the second matrix of a SwiGLU pair (same shape as `w`).
///
/// # Safety
/// `out` must be valid for writes at `out[i * ldo + r]` for `i < m`, `r in rows`, and no other
/// thread may write those elements concurrently.
#[allow(clippy::too_many_arguments)]
pub unsafe fn matmul_rows(
    isa: Isa,
    x: &[f32],
    m: usize,
    k: usize,
    w: Elems<'_>,
    up: Option<Elems<'_>>,
    rows: std::ops::Range<usize>,
    out: OutPtr,
    ldo: usize,
    panel: &mut Vec<f32>,
) {
    debug_assert!(x.len() >= m * k);
    debug_assert!(w.len() >= rows.end * k);
    match isa {
        Isa::Scalar => scalar_rows(x, m, k, w, up, rows, out, ldo),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => avx2::rows(x, m, k, w, up, rows, out, ldo, panel),
    }
    let _ = panel;
}

#[inline]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

#[allow(clippy::too_many_arguments)]
unsafe fn scalar_rows(
    x: &[f32],
    m: usize,
    k: usize,
    w: Elems<'_>,
    up: Option<Elems<'_>>,
    rows: std::ops::Range<usize>,
    out: OutPtr,
    ldo: usize,
) {
    let dot = |wm: &Elems<'_>, r: usize, i: usize| -> f32 {
        let xr = &x[i * k..(i + 1) * k];
        let mut s = 0.0f32;
        for (j, &xv) in xr.iter().enumerate() {
            s += xv * wm.get(r * k + j);
        }
        s
    };
    for r in rows {
        for i in 0..m {
            let g = dot(&w, r, i);
            let v = match &up {
                Some(u) => silu(g) * dot(u, r, i),
                None => g,
            };
            *out.0.add(i * ldo + r) = v;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::*;
    use std::arch::x86_64::*;

    /// Loads 8 consecutive weights as f32.
    pub(super) trait Load8: Copy {
        /// # Safety
        /// `p` must be valid for reading 8 elements; AVX2/F16C must be available.
        unsafe fn load8(p: *const Self) -> __m256;
        fn scalar(self) -> f32;
    }

    #[derive(Clone, Copy)]
    #[repr(transparent)]
    pub(super) struct Bf16(u16);
    #[derive(Clone, Copy)]
    #[repr(transparent)]
    pub(super) struct F16(u16);

    impl Load8 for Bf16 {
        #[inline(always)]
        unsafe fn load8(p: *const Self) -> __m256 {
            let v = _mm_loadu_si128(p as *const __m128i);
            _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(v)))
        }
        #[inline(always)]
        fn scalar(self) -> f32 {
            bf16_to_f32(self.0)
        }
    }
    impl Load8 for F16 {
        #[inline(always)]
        unsafe fn load8(p: *const Self) -> __m256 {
            _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
        }
        #[inline(always)]
        fn scalar(self) -> f32 {
            half::f16::from_bits(self.0).to_f32()
        }
    }
    impl Load8 for f32 {
        #[inline(always)]
        unsafe fn load8(p: *const Self) -> __m256 {
            _mm256_loadu_ps(p)
        }
        #[inline(always)]
        fn scalar(self) -> f32 {
            self
        }
    }

    #[inline(always)]
    unsafe fn hsum(v: __m256) -> f32 {
        let lo = _mm256_castps256_ps128(v);
        let hi = _mm256_extractf128_ps::<1>(v);
        let s = _mm_add_ps(lo, hi);
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }

    /// Dot products of one weight row with MR rows of x, reading the row front to back with a
    /// software prefetch ahead of it (the hardware prefetcher alone leaves bandwidth unused).
    /// Independent accumulators along k hide the FMA latency.
    #[inline(always)]
    unsafe fn stream_row<T: Load8, const MR: usize, const U: usize>(
        x: *const f32,
        k: usize,
        w: *const T,
        res: &mut [f32; STREAM_MAX_TOKENS],
    ) {
        let mut acc = [[_mm256_setzero_ps(); U]; MR];
        let step = 8 * U;
        let lines = (step * std::mem::size_of::<T>()).div_ceil(64);
        let mut kk = 0;
        while kk + step <= k {
            let pf = (w.add(kk) as *const i8).add(PREFETCH_BYTES);
            for l in 0..lines {
                _mm_prefetch::<_MM_HINT_T0>(pf.add(64 * l));
            }
            for u in 0..U {
                let wv = T::load8(w.add(kk + 8 * u));
                for (i, a) in acc.iter_mut().enumerate() {
                    a[u] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x.add(i * k + kk + 8 * u)), a[u]);
                }
            }
            kk += step;
        }
        while kk + 8 <= k {
            let wv = T::load8(w.add(kk));
            for (i, a) in acc.iter_mut().enumerate() {
                a[0] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x.add(i * k + kk)), a[0]);
            }
            kk += 8;
        }
        for (i, a) in acc.iter().enumerate() {
            let mut v = a[0];
            for extra in a.iter().skip(1) {
                v = _mm256_add_ps(v, *extra);
            }
            let mut s = hsum(v);
            for t in kk..k {
                s += *x.add(i * k + t) * (*w.add(t)).scalar();
            }
            res[i] = s;
        }
    }

    #[inline(always)]
    unsafe fn stream_row_dispatch<T: Load8>(
        m: usize,
        x: *const f32,
        k: usize,
        w: *const T,
        res: &mut [f32; STREAM_MAX_TOKENS],
    ) {
        match m {
            1 => stream_row::<T, 1, 4>(x, k, w, res),
            2 => stream_row::<T, 2, 2>(x, k, w, res),
            3 => stream_row::<T, 3, 2>(x, k, w, res),
            _ => stream_row::<T, 4, 2>(x, k, w, res),
        }
    }

    /// Dot products of MR rows of x with NR rows of w, written to `out[i][r]` (row stride 4).
    #[inline(always)]
    unsafe fn tile<T: Load8, const MR: usize, const NR: usize>(
        x: *const f32,
        ldx: usize,
        w: *const T,
        ldw: usize,
        k: usize,
        res: &mut [[f32; 4]; 3],
    ) {
        let mut acc = [[_mm256_setzero_ps(); NR]; MR];
        let k8 = k & !7;
        let mut kk = 0;
        while kk < k8 {
            let mut wv = [_mm256_setzero_ps(); NR];
            for (r, v) in wv.iter_mut().enumerate() {
                *v = T::load8(w.add(r * ldw + kk));
            }
            for (i, row) in acc.iter_mut().enumerate() {
                let xv = _mm256_loadu_ps(x.add(i * ldx + kk));
                for (a, wr) in row.iter_mut().zip(wv.iter()) {
                    *a = _mm256_fmadd_ps(*wr, xv, *a);
                }
            }
            kk += 8;
        }
        for i in 0..MR {
            for r in 0..NR {
                let mut s = hsum(acc[i][r]);
                for t in k8..k {
                    s += *x.add(i * ldx + t) * (*w.add(r * ldw + t)).scalar();
                }
                res[i][r] = s;
            }
        }
    }

    /// One MR x NR tile (runtime MR in 1..=3) of one or two (SwiGLU) matrices.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn tile_dispatch<T: Load8, const NR: usize>(
        mr: usize,
        x: *const f32,
        k: usize,
        w: *const T,
        ldw: usize,
        up: Option<*const T>,
        out: *mut f32,
        ldo: usize,
    ) {
        let mut g = [[0.0f32; 4]; 3];
        let mut u = [[0.0f32; 4]; 3];
        match mr {
            1 => tile::<T, 1, NR>(x, k, w, ldw, k, &mut g),
            2 => tile::<T, 2, NR>(x, k, w, ldw, k, &mut g),
            _ => tile::<T, 3, NR>(x, k, w, ldw, k, &mut g),
        }
        if let Some(up) = up {
            match mr {
                1 => tile::<T, 1, NR>(x, k, up, ldw, k, &mut u),
                2 => tile::<T, 2, NR>(x, k, up, ldw, k, &mut u),
                _ => tile::<T, 3, NR>(x, k, up, ldw, k, &mut u),
            }
        }
        for i in 0..mr {
            for r in 0..NR {
                let v = if up.is_some() {
                    silu(g[i][r]) * u[i][r]
                } else {
                    g[i][r]
                };
                *out.add(i * ldo + r) = v;
            }
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn rows_typed<T: Load8>(
        x: &[f32],
        m: usize,
        k: usize,
        w: *const T,
        up: Option<*const T>,
        rows: std::ops::Range<usize>,
        out: OutPtr,
        ldo: usize,
        panel: &mut Vec<f32>,
    ) {
        let xp = x.as_ptr();
        if m <= STREAM_MAX_TOKENS {
            // Decode: stream the weights once, row after row, converting inside the kernel.
            for r in rows {
                let mut g = [0.0f32; STREAM_MAX_TOKENS];
                let mut u = [0.0f32; STREAM_MAX_TOKENS];
                stream_row_dispatch(m, xp, k, w.add(r * k), &mut g);
                if let Some(up) = up {
                    stream_row_dispatch(m, xp, k, up.add(r * k), &mut u);
                }
                for i in 0..m {
                    let v = if up.is_some() {
                        silu(g[i]) * u[i]
                    } else {
                        g[i]
                    };
                    *out.0.add(i * ldo + r) = v;
                }
            }
            return;
        }
        // Many tokens: convert 4 rows (of each matrix) to an f32 panel once per token block.
        let panel_len = if up.is_some() { 8 * k } else { 4 * k };
        if panel.len() < panel_len {
            panel.resize(panel_len, 0.0);
        }
        let (pg, pu) = panel.split_at_mut(4 * k);
        let mut m0 = 0;
        while m0 < m {
            let mb = TOKEN_BLOCK.min(m - m0);
            let mut r = rows.start;
            while r < rows.end {
                let nr = if r + 4 <= rows.end { 4 } else { 1 };
                convert(w.add(r * k), nr * k, pg.as_mut_ptr());
                if let Some(u) = up {
                    convert(u.add(r * k), nr * k, pu.as_mut_ptr());
                }
                let upp = up.map(|_| pu.as_ptr());
                let mut i = m0;
                while i < m0 + mb {
                    let mr = 3.min(m0 + mb - i);
                    let xi = xp.add(i * k);
                    let o = out.0.add(i * ldo + r);
                    if nr == 4 {
                        tile_dispatch::<f32, 4>(mr, xi, k, pg.as_ptr(), k, upp, o, ldo);
                    } else {
                        tile_dispatch::<f32, 1>(mr, xi, k, pg.as_ptr(), k, upp, o, ldo);
                    }
                    i += mr;
                }
                r += nr;
            }
            m0 += mb;
        }
    }

    #[inline(always)]
    unsafe fn convert<T: Load8>(src: *const T, n: usize, dst: *mut f32) {
        let n8 = n & !7;
        let mut i = 0;
        while i < n8 {
            _mm256_storeu_ps(dst.add(i), T::load8(src.add(i)));
            i += 8;
        }
        for j in n8..n {
            *dst.add(j) = (*src.add(j)).scalar();
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn rows(
        x: &[f32],
        m: usize,
        k: usize,
        w: Elems<'_>,
        up: Option<Elems<'_>>,
        rows: std::ops::Range<usize>,
        out: OutPtr,
        ldo: usize,
        panel: &mut Vec<f32>,
    ) {
        match (w, up) {
            (Elems::BF16(w), None) => rows_typed(
                x,
                m,
                k,
                w.as_ptr() as *const Bf16,
                None,
                rows,
                out,
                ldo,
                panel,
            ),
            (Elems::BF16(w), Some(Elems::BF16(u))) => rows_typed(
                x,
                m,
                k,
                w.as_ptr() as *const Bf16,
                Some(u.as_ptr() as *const Bf16),
                rows,
                out,
                ldo,
                panel,
            ),
            (Elems::F16(w), None) => rows_typed(
                x,
                m,
                k,
                w.as_ptr() as *const F16,
                None,
                rows,
                out,
                ldo,
                panel,
            ),
            (Elems::F16(w), Some(Elems::F16(u))) => rows_typed(
                x,
                m,
                k,
                w.as_ptr() as *const F16,
                Some(u.as_ptr() as *const F16),
                rows,
                out,
                ldo,
                panel,
            ),
            (Elems::F32(w), None) => rows_typed(x, m, k, w.as_ptr(), None, rows, out, ldo, panel),
            (Elems::F32(w), Some(Elems::F32(u))) => {
                rows_typed(x, m, k, w.as_ptr(), Some(u.as_ptr()), rows, out, ldo, panel)
            }
            // gate and up of different dtypes: rare; the scalar path handles any mix.
            (w, up) => scalar_rows(x, m, k, w, up, rows, out, ldo),
        }
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dot(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len().min(b.len());
        let n16 = n & !15;
        let (pa, pb) = (a.as_ptr(), b.as_ptr());
        let mut s0 = _mm256_setzero_ps();
        let mut s1 = _mm256_setzero_ps();
        let mut i = 0;
        while i < n16 {
            s0 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i)), _mm256_loadu_ps(pb.add(i)), s0);
            s1 = _mm256_fmadd_ps(
                _mm256_loadu_ps(pa.add(i + 8)),
                _mm256_loadu_ps(pb.add(i + 8)),
                s1,
            );
            i += 16;
        }
        let mut s = hsum(_mm256_add_ps(s0, s1));
        for j in n16..n {
            s += a[j] * b[j];
        }
        s
    }

    /// `acc = acc * scale + p * v`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn scale_axpy(acc: &mut [f32], scale: f32, p: f32, v: &[f32]) {
        let n = acc.len().min(v.len());
        let n8 = n & !7;
        let (pa, pv) = (acc.as_mut_ptr(), v.as_ptr());
        let sc = _mm256_set1_ps(scale);
        let pp = _mm256_set1_ps(p);
        let mut i = 0;
        while i < n8 {
            let a = _mm256_mul_ps(_mm256_loadu_ps(pa.add(i)), sc);
            _mm256_storeu_ps(
                pa.add(i),
                _mm256_fmadd_ps(pp, _mm256_loadu_ps(pv.add(i)), a),
            );
            i += 8;
        }
        for j in n8..n {
            acc[j] = acc[j] * scale + p * v[j];
        }
    }
}

/// `Σ a[i] * b[i]`.
#[inline]
pub fn dot(isa: Isa, a: &[f32], b: &[f32]) -> f32 {
    match isa {
        // SAFETY: Avx2 is only chosen when the CPU has AVX2 and FMA.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { avx2::dot(a, b) },
        Isa::Scalar => a.iter().zip(b).map(|(x, y)| x * y).sum(),
    }
}

/// `acc = acc * scale + p * v`.
#[inline]
pub fn scale_axpy(isa: Isa, acc: &mut [f32], scale: f32, p: f32, v: &[f32]) {
    match isa {
        // SAFETY: Avx2 is only chosen when the CPU has AVX2 and FMA.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { avx2::scale_axpy(acc, scale, p, v) },
        Isa::Scalar => acc
            .iter_mut()
            .zip(v)
            .for_each(|(a, &x)| *a = *a * scale + p * x),
    }
}

/// `out = x / sqrt(mean(x²) + eps) * w` for one row.
pub fn rms_norm_row(x: &[f32], w: Elems<'_>, eps: f32, out: &mut [f32]) {
    let ss: f32 = x.iter().map(|v| v * v).sum();
    let inv = 1.0 / (ss / x.len() as f32 + eps).sqrt();
    match w {
        Elems::BF16(w) => {
            for ((o, &xv), &wv) in out.iter_mut().zip(x).zip(w) {
                *o = xv * inv * bf16_to_f32(wv);
            }
        }
        Elems::F32(w) => {
            for ((o, &xv), &wv) in out.iter_mut().zip(x).zip(w) {
                *o = xv * inv * wv;
            }
        }
        Elems::F16(_) => {
            for (j, (o, &xv)) in out.iter_mut().zip(x).enumerate() {
                *o = xv * inv * w.get(j);
            }
        }
    }
}

/// HF "half rotation" RoPE on one head: pairs `(x[i], x[i + d/2])` rotate by angle `i`.
#[inline]
pub fn rope_head(x: &mut [f32], cos: &[f32], sin: &[f32]) {
    let half = x.len() / 2;
    let (a, b) = x.split_at_mut(half);
    for i in 0..half {
        let (x1, x2) = (a[i], b[i]);
        a[i] = x1 * cos[i] - x2 * sin[i];
        b[i] = x2 * cos[i] + x1 * sin[i];
    }
}

/// Geometry of the CPU paged KV cache of one layer: `[page][kv_head][slot in page][head_dim]`,
/// so one head's part of a page is contiguous.
#[derive(Debug, Clone, Copy)]
pub struct KvLayout {
    pub page_size: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
}

impl KvLayout {
    /// Offset of (page, head, slot-in-page) in a layer's K or V array.
    #[inline]
    pub fn offset(&self, page: usize, head: usize, in_page: usize) -> usize {
        ((page * self.num_kv_heads + head) * self.page_size + in_page) * self.head_dim
    }
}

/// Heads of one GQA group handled together (scores kept on the stack).
const MAX_HEADS_PER_PASS: usize = 8;
/// Key positions scored per online-softmax update.
const KEY_CHUNK: usize = 16;

/// Attention of one query token for the `heads` query heads of KV head `kv_head`, over
/// positions `0..ctx` of a sequence whose pages are `block_table`. Online softmax (one pass
/// over K and V, each page read once for all heads of the group).
///
/// `q` holds the query heads (`heads * head_dim`), `out` receives them.
#[allow(clippy::too_many_arguments)]
pub fn attend_group(
    isa: Isa,
    q: &[f32],
    k_cache: &[f32],
    v_cache: &[f32],
    layout: KvLayout,
    block_table: &[u32],
    kv_head: usize,
    ctx: usize,
    scale: f32,
    out: &mut [f32],
) {
    let hd = layout.head_dim;
    let heads = q.len() / hd;
    let mut h0 = 0;
    while h0 < heads {
        let nh = MAX_HEADS_PER_PASS.min(heads - h0);
        let qs = &q[h0 * hd..(h0 + nh) * hd];
        let os = &mut out[h0 * hd..(h0 + nh) * hd];
        os.fill(0.0);
        let mut max = [f32::NEG_INFINITY; MAX_HEADS_PER_PASS];
        let mut sum = [0.0f32; MAX_HEADS_PER_PASS];
        let mut scores = [[0.0f32; KEY_CHUNK]; MAX_HEADS_PER_PASS];
        let mut pos = 0;
        while pos < ctx {
            let page = block_table[pos / layout.page_size] as usize;
            let in_page = pos % layout.page_size;
            let n = KEY_CHUNK.min(layout.page_size - in_page).min(ctx - pos);
            let base = layout.offset(page, kv_head, in_page);
            for j in 0..n {
                let kr = &k_cache[base + j * hd..base + (j + 1) * hd];
                for h in 0..nh {
                    scores[h][j] = dot(isa, &qs[h * hd..(h + 1) * hd], kr) * scale;
                }
            }
            for h in 0..nh {
                let chunk_max = scores[h][..n]
                    .iter()
                    .fold(f32::NEG_INFINITY, |a, &b| a.max(b));
                let new_max = max[h].max(chunk_max);
                let correction = (max[h] - new_max).exp();
                max[h] = new_max;
                sum[h] *= correction;
                let acc = &mut os[h * hd..(h + 1) * hd];
                let mut first = true;
                for j in 0..n {
                    let p = (scores[h][j] - new_max).exp();
                    sum[h] += p;
                    let vr = &v_cache[base + j * hd..base + (j + 1) * hd];
                    // rescale the accumulator once per chunk, fused with the first update
                    let c = if first { correction } else { 1.0 };
                    first = false;
                    scale_axpy(isa, acc, c, p, vr);
                }
            }
            pos += n;
        }
        for h in 0..nh {
            let inv = 1.0 / sum[h];
            os[h * hd..(h + 1) * hd].iter_mut().for_each(|v| *v *= inv);
        }
        h0 += nh;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rand_vec(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    fn rel_err(a: &[f32], b: &[f32]) -> f32 {
        let num: f32 = a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum();
        let den: f32 = b.iter().map(|y| y * y).sum();
        (num / den.max(1e-30)).sqrt()
    }

    /// The chosen ISA against the scalar twin, every dtype, decode and prefill shapes.
    #[test]
    fn matmul_simd_matches_scalar() {
        let isa = Isa::detect();
        for &(m, n, k) in &[
            (1, 9, 24),
            (2, 13, 40),
            (3, 8, 64),
            (5, 11, 33),
            (50, 21, 72),
            (97, 6, 16),
        ] {
            let x = rand_vec(m * k, 1);
            let wf = rand_vec(n * k, 2);
            let wu = rand_vec(n * k, 3);
            let bf: Vec<u16> = wf.iter().map(|&v| crate::loader::f32_to_bf16(v)).collect();
            let bu: Vec<u16> = wu.iter().map(|&v| crate::loader::f32_to_bf16(v)).collect();
            let hf: Vec<u16> = wf
                .iter()
                .map(|&v| half::f16::from_f32(v).to_bits())
                .collect();
            let cases: Vec<(Elems, Option<Elems>)> = vec![
                (Elems::F32(&wf), None),
                (Elems::BF16(&bf), None),
                (Elems::F16(&hf), None),
                (Elems::BF16(&bf), Some(Elems::BF16(&bu))),
                (Elems::F32(&wf), Some(Elems::F32(&wu))),
            ];
            for (w, up) in cases {
                let mut want = vec![0.0; m * n];
                let mut got = vec![0.0; m * n];
                let mut panel = Vec::new();
                unsafe {
                    matmul_rows(
                        Isa::Scalar,
                        &x,
                        m,
                        k,
                        w,
                        up,
                        0..n,
                        OutPtr(want.as_mut_ptr()),
                        n,
                        &mut panel,
                    );
                    // two ranges, as two threads would
                    let mid = n / 2;
                    matmul_rows(
                        isa,
                        &x,
                        m,
                        k,
                        w,
                        up,
                        0..mid,
                        OutPtr(got.as_mut_ptr()),
                        n,
                        &mut panel,
                    );
                    matmul_rows(
                        isa,
                        &x,
                        m,
                        k,
                        w,
                        up,
                        mid..n,
                        OutPtr(got.as_mut_ptr()),
                        n,
                        &mut panel,
                    );
                }
                let e = rel_err(&got, &want);
                assert!(e < 1e-5, "m={m} n={n} k={k} rel err {e}");
            }
        }
    }

    #[test]
    fn attention_matches_dense_softmax() {
        let isa = Isa::detect();
        let layout = KvLayout {
            page_size: 4,
            num_kv_heads: 2,
            head_dim: 8,
        };
        let pages = 5;
        let k_cache = rand_vec(pages * 2 * 4 * 8, 4);
        let v_cache = rand_vec(pages * 2 * 4 * 8, 5);
        let block_table = [3u32, 0, 4];
        let ctx = 11;
        let heads = 3;
        let q = rand_vec(heads * 8, 6);
        let kv_head = 1;
        let scale = 0.35;
        let mut out = vec![0.0; heads * 8];
        attend_group(
            isa,
            &q,
            &k_cache,
            &v_cache,
            layout,
            &block_table,
            kv_head,
            ctx,
            scale,
            &mut out,
        );
        for h in 0..heads {
            let qh = &q[h * 8..(h + 1) * 8];
            let mut s: Vec<f32> = (0..ctx)
                .map(|p| {
                    let off = layout.offset(block_table[p / 4] as usize, kv_head, p % 4);
                    qh.iter()
                        .zip(&k_cache[off..off + 8])
                        .map(|(a, b)| a * b)
                        .sum::<f32>()
                        * scale
                })
                .collect();
            let mx = s.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            s.iter_mut().for_each(|v| *v = (*v - mx).exp());
            let tot: f32 = s.iter().sum();
            let mut want = [0.0f32; 8];
            for p in 0..ctx {
                let off = layout.offset(block_table[p / 4] as usize, kv_head, p % 4);
                for d in 0..8 {
                    want[d] += s[p] / tot * v_cache[off + d];
                }
            }
            let e = rel_err(&out[h * 8..(h + 1) * 8], &want);
            assert!(e < 1e-5, "head {h}: {e}");
        }
    }

    #[test]
    fn rope_rotates_pairs_half_apart() {
        let mut x = vec![1.0, 2.0, 3.0, 4.0];
        rope_head(&mut x, &[0.0, 1.0], &[1.0, 0.0]);
        // pair (x0, x2) rotated by 90 degrees, pair (x1, x3) unchanged
        assert_eq!(x, vec![-3.0, 2.0, 1.0, 4.0]);
    }
}

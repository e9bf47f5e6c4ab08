//! CPU kernels: matrix products over bf16/f16/f32 weights read in place, RMSNorm, RoPE.
//! (Paged attention is in `attention.rs`.)
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

/// Tokens per register tile of the streaming (decode) kernel.
const STREAM_MAX_TOKENS: usize = 4;
/// Up to this many tokens, weights are streamed row by row (decode, small batches); beyond,
/// rows are converted once into f32 panels (prefill, large batches).
const STREAM_BATCH_TOKENS: usize = 16;
/// How far ahead of the streaming kernel the weights are prefetched.
#[cfg(target_arch = "x86_64")]
const PREFETCH_BYTES: usize = 2048;

/// Weight rows per f32 panel in the many-token path.
#[cfg(target_arch = "x86_64")]
const PANEL_ROWS: usize = 2;

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
// Register tiles index several accumulator arrays in lockstep; plain index loops read best
// and unroll fully (the bounds are constants).
#[allow(clippy::needless_range_loop)]
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

    // Every dot product of x and a weight row, in every path below, is summed in one canonical
    // order: two 8-lane accumulators over 16-element blocks (lanes 0-7 into the first, 8-15
    // into the second), a trailing 8-element block into the first, then hsum(first + second),
    // then the scalar tail. The result for a token therefore does not depend on how many
    // tokens share the step, which path ran, or how rows were split between threads: batching,
    // chunking and the prefix cache leave the logits bit-for-bit unchanged.

    /// Finishes a canonical dot product: `x` and `w` are the row starts, `kk` where the
    /// vector part stopped.
    #[inline(always)]
    unsafe fn finish<T: Load8>(
        a0: __m256,
        a1: __m256,
        x: *const f32,
        w: *const T,
        kk: usize,
        k: usize,
    ) -> f32 {
        let mut s = hsum(_mm256_add_ps(a0, a1));
        for t in kk..k {
            s += *x.add(t) * (*w.add(t)).scalar();
        }
        s
    }

    /// Dot products of one weight row with MR rows of x (row stride k), reading the row front
    /// to back with a software prefetch ahead of it (the hardware prefetcher alone leaves
    /// bandwidth unused). Used for decode: each weight byte is read once per step.
    #[inline(always)]
    unsafe fn stream_row<T: Load8, const MR: usize>(
        x: *const f32,
        k: usize,
        w: *const T,
        res: &mut [f32; STREAM_MAX_TOKENS],
    ) {
        let mut a0 = [_mm256_setzero_ps(); MR];
        let mut a1 = [_mm256_setzero_ps(); MR];
        let lines = (16 * std::mem::size_of::<T>()).div_ceil(64);
        let mut kk = 0;
        while kk + 16 <= k {
            let pf = (w.add(kk) as *const i8).add(PREFETCH_BYTES);
            for l in 0..lines {
                _mm_prefetch::<_MM_HINT_T0>(pf.add(64 * l));
            }
            let w0 = T::load8(w.add(kk));
            let w1 = T::load8(w.add(kk + 8));
            for i in 0..MR {
                a0[i] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x.add(i * k + kk)), a0[i]);
                a1[i] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x.add(i * k + kk + 8)), a1[i]);
            }
            kk += 16;
        }
        if kk + 8 <= k {
            let w0 = T::load8(w.add(kk));
            for i in 0..MR {
                a0[i] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x.add(i * k + kk)), a0[i]);
            }
            kk += 8;
        }
        for i in 0..MR {
            res[i] = finish(a0[i], a1[i], x.add(i * k), w, kk, k);
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
            1 => stream_row::<T, 1>(x, k, w, res),
            2 => stream_row::<T, 2>(x, k, w, res),
            3 => stream_row::<T, 3>(x, k, w, res),
            _ => stream_row::<T, 4>(x, k, w, res),
        }
    }

    /// Dot products of MR rows of x with NR consecutive rows of an f32 panel (row stride k),
    /// into `res[i][r]`. Register tile: MR x NR x 2 accumulators.
    #[inline(always)]
    unsafe fn panel_tile<const MR: usize, const NR: usize>(
        x: *const f32,
        k: usize,
        w: *const f32,
        res: &mut [[f32; 2]; 3],
    ) {
        let mut a0 = [[_mm256_setzero_ps(); NR]; MR];
        let mut a1 = [[_mm256_setzero_ps(); NR]; MR];
        let mut kk = 0;
        while kk + 16 <= k {
            for r in 0..NR {
                let w0 = _mm256_loadu_ps(w.add(r * k + kk));
                let w1 = _mm256_loadu_ps(w.add(r * k + kk + 8));
                for i in 0..MR {
                    a0[i][r] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x.add(i * k + kk)), a0[i][r]);
                    a1[i][r] =
                        _mm256_fmadd_ps(w1, _mm256_loadu_ps(x.add(i * k + kk + 8)), a1[i][r]);
                }
            }
            kk += 16;
        }
        if kk + 8 <= k {
            for r in 0..NR {
                let w0 = _mm256_loadu_ps(w.add(r * k + kk));
                for i in 0..MR {
                    a0[i][r] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x.add(i * k + kk)), a0[i][r]);
                }
            }
            kk += 8;
        }
        for i in 0..MR {
            for r in 0..NR {
                res[i][r] = finish(a0[i][r], a1[i][r], x.add(i * k), w.add(r * k), kk, k);
            }
        }
    }

    /// One tile (runtime MR in 1..=3) of one or two (SwiGLU) panels, written to `out`.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn panel_tile_dispatch<const NR: usize>(
        mr: usize,
        x: *const f32,
        k: usize,
        gate: *const f32,
        up: Option<*const f32>,
        out: *mut f32,
        ldo: usize,
    ) {
        let mut g = [[0.0f32; 2]; 3];
        let mut u = [[0.0f32; 2]; 3];
        // (a plain match, not a closure: closures do not inherit #[target_feature])
        match mr {
            1 => panel_tile::<1, NR>(x, k, gate, &mut g),
            2 => panel_tile::<2, NR>(x, k, gate, &mut g),
            _ => panel_tile::<3, NR>(x, k, gate, &mut g),
        }
        if let Some(up) = up {
            match mr {
                1 => panel_tile::<1, NR>(x, k, up, &mut u),
                2 => panel_tile::<2, NR>(x, k, up, &mut u),
                _ => panel_tile::<3, NR>(x, k, up, &mut u),
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
        if m <= STREAM_BATCH_TOKENS {
            // Decode: stream the weights once, row after row, converting inside the kernel;
            // groups of up to STREAM_MAX_TOKENS tokens re-read the row from L1.
            for r in rows {
                let mut i0 = 0;
                while i0 < m {
                    let mr = STREAM_MAX_TOKENS.min(m - i0);
                    let xi = xp.add(i0 * k);
                    let mut g = [0.0f32; STREAM_MAX_TOKENS];
                    let mut u = [0.0f32; STREAM_MAX_TOKENS];
                    stream_row_dispatch(mr, xi, k, w.add(r * k), &mut g);
                    if let Some(up) = up {
                        stream_row_dispatch(mr, xi, k, up.add(r * k), &mut u);
                    }
                    for i in 0..mr {
                        let v = if up.is_some() {
                            silu(g[i]) * u[i]
                        } else {
                            g[i]
                        };
                        *out.0.add((i0 + i) * ldo + r) = v;
                    }
                    i0 += mr;
                }
            }
            return;
        }
        // Many tokens: convert PANEL_ROWS rows (of each matrix) to an f32 panel once per token
        // block, and sweep the block's tokens with register tiles.
        let panel_len = 2 * PANEL_ROWS * k;
        if panel.len() < panel_len {
            panel.resize(panel_len, 0.0);
        }
        let (pg, pu) = panel.split_at_mut(PANEL_ROWS * k);
        let mut m0 = 0;
        while m0 < m {
            let mb = TOKEN_BLOCK.min(m - m0);
            let mut r = rows.start;
            while r < rows.end {
                let nr = if r + PANEL_ROWS <= rows.end {
                    PANEL_ROWS
                } else {
                    1
                };
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
                    if nr == PANEL_ROWS {
                        panel_tile_dispatch::<PANEL_ROWS>(mr, xi, k, pg.as_ptr(), upp, o, ldo);
                    } else {
                        panel_tile_dispatch::<1>(mr, xi, k, pg.as_ptr(), upp, o, ldo);
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

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Deterministic values in [-1, 1) (xorshift), for the kernel tests of this backend.
    pub(crate) fn rand_vec(n: usize, seed: u64) -> Vec<f32> {
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
                    for rows in [0..n / 2, n / 2..n] {
                        matmul_rows(
                            isa,
                            &x,
                            m,
                            k,
                            w,
                            up,
                            rows,
                            OutPtr(got.as_mut_ptr()),
                            n,
                            &mut panel,
                        );
                    }
                }
                let e = rel_err(&got, &want);
                assert!(e < 1e-5, "m={m} n={n} k={k} rel err {e}");
            }
        }
    }

    /// A token's result is bit-for-bit the same whatever else shares the step (decode path,
    /// panel path, tails): batching and prefix caching cannot change the output.
    #[test]
    fn matmul_is_batch_invariant() {
        let isa = Isa::detect();
        for &(n, k) in &[(9usize, 40usize), (13, 72), (6, 576)] {
            let m = 53;
            let x = rand_vec(m * k, 11);
            let w: Vec<u16> = rand_vec(n * k, 12)
                .iter()
                .map(|&v| crate::loader::f32_to_bf16(v))
                .collect();
            let u: Vec<u16> = rand_vec(n * k, 13)
                .iter()
                .map(|&v| crate::loader::f32_to_bf16(v))
                .collect();
            for up in [None, Some(Elems::BF16(&u))] {
                let mut panel = Vec::new();
                let mut all = vec![0.0; m * n];
                unsafe {
                    matmul_rows(
                        isa,
                        &x,
                        m,
                        k,
                        Elems::BF16(&w),
                        up,
                        0..n,
                        OutPtr(all.as_mut_ptr()),
                        n,
                        &mut panel,
                    )
                };
                for group in [1usize, 2, 3, 4, 5, 9, 16, 17] {
                    for start in (0..m - group).step_by(7) {
                        let mut part = vec![0.0; group * n];
                        let xs = &x[start * k..(start + group) * k];
                        for rows in [0..n / 2, n / 2..n] {
                            unsafe {
                                matmul_rows(
                                    isa,
                                    xs,
                                    group,
                                    k,
                                    Elems::BF16(&w),
                                    up,
                                    rows,
                                    OutPtr(part.as_mut_ptr()),
                                    n,
                                    &mut panel,
                                );
                            }
                        }
                        let want = &all[start * n..(start + group) * n];
                        assert!(
                            part.iter()
                                .zip(want)
                                .all(|(a, b)| a.to_bits() == b.to_bits()),
                            "n={n} k={k} group={group} start={start}"
                        );
                    }
                }
            }
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

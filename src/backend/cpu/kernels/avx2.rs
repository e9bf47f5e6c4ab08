//! The AVX2 + FMA + F16C kernels behind `Isa::Avx2`: register tiles for the matrix
//! products (weights converted to f32 as they stream, or once into a panel), and the
//! vector dot product and scaled add of attention. Each has its scalar twin in the
//! parent module, which the tests compare it against.

// Register tiles index several accumulator arrays in lockstep; plain index loops read best
// and unroll fully (the bounds are constants).
#![allow(clippy::needless_range_loop)]

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
                a1[i][r] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x.add(i * k + kk + 8)), a1[i][r]);
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

//! CPU kernels: matrix products over bf16/f16/f32 weights read in place, RMSNorm, RoPE.
//! (Paged attention is in `attention.rs`.)
//!
//! Matrix products compute `out[m, n] = Σ_k x[m, k] · w[n, k]` (HF weight layout). Each
//! thread takes a contiguous range of weight rows. A register tile of MR tokens × NR weight
//! rows accumulates 8-wide f32 vectors along k:
//! * few tokens (decode): weights are converted to f32 inside the tile as they stream in, so
//!   every weight byte is read from memory exactly once per step;
//! * many tokens (prefill, large batches): `PANEL_ROWS` weight rows at a time are converted
//!   once into a per-thread f32 panel, and the tile sweeps blocks of tokens small enough to
//!   stay in L2.
//!
//! Every SIMD kernel (in `avx2.rs`) has a plain scalar twin here (`Isa::Scalar`), used where
//! AVX2/FMA/F16C are missing and in tests as the reference the SIMD path is compared against.

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

/// Computes rows `rows` (of `w`, i.e. output columns) of `out = x · wᵀ` for all `m` tokens.
/// `up` is the second matrix of a SwiGLU pair (same shape as `w`).
///
/// # Safety
/// `out` must be valid for writes at `out[i * ldo + r]` for `i < m`, `r in rows`, and no other
/// thread may write those elements concurrently.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn matmul_rows(
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
mod avx2;

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

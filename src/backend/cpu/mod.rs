//! The CPU backend: f32 activations, weights read in place from the safetensors mapping
//! (bf16, f16 or f32), an f32 paged KV cache, and a fork-join pool that keeps every core busy.
//!
//! This is the embedded default and the reference the CUDA kernels are compared against.

mod attention;
/// Positions per segment of a context in CPU attention (see `attention::SEGMENT`).
pub use attention::SEGMENT as ATTENTION_SEGMENT;
mod kernels;
pub mod pool;

use std::borrow::Cow;
use std::sync::atomic::{AtomicUsize, Ordering};

use parking_lot::Mutex;

use self::attention::{AttnInput, KvElem, KvLayout};
use self::kernels::{Bf16Dot, Isa, OutPtr};
use self::pool::ThreadPool;
use super::{Backend, BackendError, RopeTable};
use crate::batch::StepBatch;
use crate::config::{Dtype, KvCacheDtype, ModelConfig};
use crate::loader::{Elems, Tensor};
use crate::parallel::Communicator;
use crate::quant::QuantizedRows;
use crate::sampling::{SampleBatch, Sampler, TokenInfo};

/// A weight on the CPU: the loader's view (no copy), or for Q4_0/Q4_1/Q5_0/Q8_0/Q4_K matrices
/// on an AVX2 or AVX-512 CPU the same bytes repacked sixteen rows at a time
/// (`kernels::rows16`), which then stand in for the loader's (its file pages given back, its owned buffer dropped with the loader's
/// map), so the weight is held once.
pub enum CpuWeight {
    View(Tensor),
    Packed(kernels::rows16::Packed),
}

impl CpuWeight {
    /// The loader's elements of a weight that was not repacked (norms never are; products
    /// check for `Packed` first).
    fn elems(&self) -> Elems<'_> {
        match self {
            CpuWeight::View(t) => t.elems(),
            CpuWeight::Packed(_) => unreachable!("a repacked weight has no loader layout"),
        }
    }
    fn packed(&self) -> Option<&kernels::rows16::Packed> {
        match self {
            CpuWeight::Packed(p) => Some(p),
            CpuWeight::View(_) => None,
        }
    }
    fn is_quant(&self) -> bool {
        match self {
            CpuWeight::View(t) => t.dtype().quant().is_some(),
            CpuWeight::Packed(_) => true,
        }
    }
    fn is_bf16(&self) -> bool {
        matches!(self, CpuWeight::View(t) if matches!(t.elems(), Elems::BF16(_)))
    }
    fn rows(&self) -> usize {
        match self {
            CpuWeight::View(t) => t.shape()[0],
            CpuWeight::Packed(p) => p.rows(),
        }
    }
    fn cols(&self) -> usize {
        match self {
            CpuWeight::View(t) => t.shape().get(1).copied().unwrap_or(1),
            CpuWeight::Packed(p) => p.blocks() * crate::quant::BLOCK,
        }
    }
    /// Row `r` as f32 values (the embedding's lookup).
    fn row_to_f32(&self, r: usize, dst: &mut [f32]) {
        match self {
            CpuWeight::View(t) => {
                let h = self.cols();
                t.elems().slice(r * h, h).to_f32(dst)
            }
            CpuWeight::Packed(p) => p.row_to_f32(r, dst),
        }
    }
}

/// K and V of every layer: per page and KV head, values `[slot][head_dim]` and keys
/// `[head_dim][slot]` (see `KvLayout`), f32 or bf16.
pub struct CpuKv {
    store: KvStore,
    layout: KvLayout,
}

enum KvStore {
    F32 {
        k: Vec<Vec<f32>>,
        v: Vec<Vec<f32>>,
    },
    Bf16 {
        k: Vec<Vec<half::bf16>>,
        v: Vec<Vec<half::bf16>>,
    },
}

/// Per-step tables: cos/sin of every new token's position (`[token][head_dim / 2]`) and the
/// sequence each token belongs to.
pub struct CpuStep {
    cos: Vec<f32>,
    sin: Vec<f32>,
    half: usize,
    seq_of_token: Vec<u32>,
}

pub struct CpuBackend {
    pool: ThreadPool,
    isa: Isa,
    /// One f32 panel per thread for the many-token matmul path.
    panels: Vec<Mutex<Vec<f32>>>,
    /// Buffers of the last step, reused by the next.
    spare_step: Mutex<Option<CpuStep>>,
    /// Sampling in place (the logits are already in host memory: nothing is copied).
    sampler: Mutex<Sampler>,
    /// The activations of a product with quantized weights, quantized once per product.
    xq: Mutex<QuantizedRows>,
    kv_dtype: KvCacheDtype,
    /// `--dtype bfloat16`: products with bf16 weights take their activations rounded to bf16
    /// (into `xb`, once per product) and run this implementation.
    bf16: Option<Bf16Dot>,
    xb: Mutex<Vec<u16>>,
}

/// The CPU kernel set this machine runs (logged at start-up, in `/get_server_info` and the
/// benchmarks): the float products' instruction set (under `--dtype`), and the quantized
/// products'.
pub fn kernel_set(dtype: Dtype) -> String {
    let isa = Isa::detect();
    let dtype = resolve_dtype_for(dtype, isa);
    let mut quant = format!("{} (Q8_0/Q4_0/Q4_1/Q5_0/Q4_K/Q6_K)", isa.quant_name());
    if isa.repacks_rows16() {
        quant.push_str(", Q4_0/Q4_1/Q5_0/Q8_0/Q4_K repacked 16 rows per vector");
    }
    let float = match dtype {
        Dtype::Bfloat16 => format!(
            "{} (bf16 x bf16 activations), {} (f32/f16)",
            Bf16Dot::for_isa(isa).name(),
            isa.name()
        ),
        Dtype::Auto | Dtype::Float32 => format!("{} (f32/bf16/f16)", isa.name()),
    };
    format!("{float}, {quant}")
}

/// What `--dtype auto` is on this CPU (other values stand for themselves): bfloat16 where the
/// float products' instruction set multiplies bf16 natively (AVX-512 BF16 `vdpbf16ps`), as
/// llama.cpp, vLLM and SGLang run bf16 weights; float32 elsewhere, where rounding the inputs
/// to bf16 saves no work (AVX2 widens them back to f32 for its FMAs).
pub fn resolve_dtype(dtype: Dtype) -> Dtype {
    resolve_dtype_for(dtype, Isa::detect())
}

fn resolve_dtype_for(dtype: Dtype, isa: Isa) -> Dtype {
    match dtype {
        Dtype::Auto if Bf16Dot::for_isa(isa).is_native() => Dtype::Bfloat16,
        Dtype::Auto => Dtype::Float32,
        other => other,
    }
}

/// Bytes of one cached K or V value on the CPU for `--kv-cache-dtype` (auto: f32).
pub fn kv_elem_bytes(dtype: KvCacheDtype) -> usize {
    match dtype {
        KvCacheDtype::Bf16 => std::mem::size_of::<half::bf16>(),
        KvCacheDtype::Auto | KvCacheDtype::Fp32 => std::mem::size_of::<f32>(),
    }
}

/// Weight rows a thread takes from its own share at a time, and from another's (multiples of
/// every kernel's row tile; see `pool::Shares`).
const OWN_ROWS: usize = 64;
const STOLEN_ROWS: usize = 16;

/// Below this many rows the elementwise ops run on the calling thread alone.
const PARALLEL_ROWS: usize = 32;

impl CpuBackend {
    /// `num_threads`: None for every available core.
    pub fn new(num_threads: Option<usize>) -> Self {
        let n = num_threads.unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        });
        Self {
            pool: ThreadPool::new(n),
            isa: Isa::detect(),
            panels: (0..n).map(|_| Mutex::new(Vec::new())).collect(),
            spare_step: Mutex::new(None),
            sampler: Mutex::new(Sampler::new()),
            xq: Mutex::new(QuantizedRows::default()),
            kv_dtype: KvCacheDtype::Auto,
            bf16: None,
            xb: Mutex::new(Vec::new()),
        }
    }

    /// The products' input type (`--dtype`; auto: see [`resolve_dtype`]).
    pub fn with_dtype(mut self, dtype: Dtype) -> Self {
        self.bf16 = (resolve_dtype_for(dtype, self.isa) == Dtype::Bfloat16)
            .then(|| Bf16Dot::for_isa(self.isa));
        self
    }

    /// The KV cache's element type (`--kv-cache-dtype`; auto: f32).
    pub fn with_kv_dtype(mut self, dtype: KvCacheDtype) -> Self {
        self.kv_dtype = dtype;
        self
    }

    /// `attention` over one layer's cache of element type `E`.
    #[allow(clippy::too_many_arguments)]
    fn attend_all<E: KvElem>(
        &self,
        step: &CpuStep,
        batch: &StepBatch,
        cfg: &ModelConfig,
        q: &[f32],
        kc: &[E],
        vc: &[E],
        layout: KvLayout,
        out: &mut [f32],
    ) {
        let hd = cfg.head_dim;
        let (nh, nkv) = (cfg.num_heads, cfg.num_kv_heads);
        let group = nh / nkv;
        let scale = 1.0 / (hd as f32).sqrt();
        let op = OutPtr(out.as_mut_ptr());
        let isa = self.isa;
        let ctx_of = |t: usize| {
            let seq = &batch.seqs[step.seq_of_token[t] as usize];
            // causal: this token sees positions 0..=its own
            seq.context_len - seq.num_tokens + (t - seq.token_start) + 1
        };
        let input = |t: usize, g: usize| {
            let seq = &batch.seqs[step.seq_of_token[t] as usize];
            AttnInput {
                k_cache: kc,
                v_cache: vc,
                layout,
                block_table: batch.block_table(seq),
                kv_head: g,
                ctx: ctx_of(t),
                scale,
                prefetch: seq.num_tokens == 1 || t == seq.token_start,
            }
        };
        let qh =
            |t: usize, g: usize| &q[(t * nh + g * group) * hd..(t * nh + (g + 1) * group) * hd];
        // Work items: (token, kv head), handed out dynamically (their cost grows with the
        // context). A whole group per item reads each KV page once for all its query heads;
        // splitting groups across threads balances better at batch 1 but reads the cache once
        // per head, and measured slower (KV reads are what attention waits on).
        let total = batch.num_tokens() * nkv;
        let threads = self.pool.num_threads();
        let long = || (0..batch.num_tokens()).any(|t| ctx_of(t) > attention::SEGMENT);
        if threads > 1 && total < 2 * threads && long() {
            // Too few items to keep the threads busy (decode at batch 1: one per KV head):
            // the items are (token, kv head, segment of the context), their partial results
            // merged in order afterwards, the same operations `attention::attend` performs.
            let plen = attention::partial_len(group, hd);
            let mut items = Vec::new();
            for t in 0..batch.num_tokens() {
                for g in 0..nkv {
                    for s in 0..attention::segments(ctx_of(t)) {
                        items.push((t, g, s));
                    }
                }
            }
            let mut parts = vec![0.0f32; items.len() * plen];
            let pp = OutPtr(parts.as_mut_ptr());
            let next = AtomicUsize::new(0);
            self.pool.run(|_tid| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(&(t, g, s)) = items.get(i) else {
                    break;
                };
                // SAFETY: item i owns part i of `parts`.
                let part = unsafe { std::slice::from_raw_parts_mut(pp.get().add(i * plen), plen) };
                attention::attend_segment(isa, &input(t, g), s, qh(t, g), part);
            });
            let mut i = 0;
            while i < items.len() {
                let (t, g, _) = items[i];
                let segs = attention::segments(ctx_of(t));
                let (run, rest) = parts[i * plen..(i + segs) * plen].split_at_mut(plen);
                for next in rest.chunks_exact(plen) {
                    attention::merge(run, next, group, hd);
                }
                let o = &mut out[(t * nh + g * group) * hd..(t * nh + (g + 1) * group) * hd];
                attention::finish(run, group, hd, o);
                i += segs;
            }
            return;
        }
        let next = AtomicUsize::new(0);
        let work = |_tid: usize| loop {
            let item = next.fetch_add(1, Ordering::Relaxed);
            if item >= total {
                break;
            }
            let (t, g) = (item / nkv, item % nkv);
            // SAFETY: items own disjoint head ranges of `out`.
            let o = unsafe {
                std::slice::from_raw_parts_mut(op.get().add((t * nh + g * group) * hd), group * hd)
            };
            attention::attend(isa, &input(t, g), qh(t, g), o);
        };
        if total < 2 || threads == 1 {
            work(0);
        } else {
            self.pool.run(work);
        }
    }

    /// `rope_and_store_kv` into one layer's cache of element type `E` (bf16: rounded to
    /// nearest even).
    #[allow(clippy::too_many_arguments)]
    fn rope_and_store<E: KvElem>(
        &self,
        step: &CpuStep,
        batch: &StepBatch,
        cfg: &ModelConfig,
        q: &mut [f32],
        k: &mut [f32],
        v: &[f32],
        layout: KvLayout,
        k_cache: &mut [E],
        v_cache: &mut [E],
    ) {
        let hd = cfg.head_dim;
        let (nh, nkv) = (cfg.num_heads, cfg.num_kv_heads);
        let half = step.half;
        let qp = OutPtr(q.as_mut_ptr());
        let kp = OutPtr(k.as_mut_ptr());
        let kc = OutPtr(k_cache.as_mut_ptr());
        let vc = OutPtr(v_cache.as_mut_ptr());
        self.for_rows(batch.num_tokens(), |t| {
            let cos = &step.cos[t * half..(t + 1) * half];
            let sin = &step.sin[t * half..(t + 1) * half];
            let slot = batch.slots[t] as usize;
            let (page, in_page) = (slot / layout.page_size, slot % layout.page_size);
            // SAFETY: token t owns row t of q and k, and its own (unique) KV slot; the batch
            // never gives two new tokens the same slot.
            unsafe {
                let qrow = std::slice::from_raw_parts_mut(qp.get().add(t * nh * hd), nh * hd);
                for h in qrow.chunks_exact_mut(hd) {
                    kernels::rope_head(h, cos, sin);
                }
                let krow = std::slice::from_raw_parts_mut(kp.get().add(t * nkv * hd), nkv * hd);
                for (g, h) in krow.chunks_exact_mut(hd).enumerate() {
                    kernels::rope_head(h, cos, sin);
                    // keys dimension by dimension, values as a row (see KvLayout)
                    let k0 = kc.get().add(layout.k_offset(page, g, in_page, 0));
                    for (d, &x) in h.iter().enumerate() {
                        *k0.add(d * layout.page_size) = E::from_f32(x);
                    }
                    let off = layout.v_offset(page, g, in_page);
                    let vdst = std::slice::from_raw_parts_mut(vc.get().add(off), hd);
                    let vsrc = &v[(t * nkv + g) * hd..(t * nkv + g + 1) * hd];
                    vdst.iter_mut()
                        .zip(vsrc)
                        .for_each(|(d, &x)| *d = E::from_f32(x));
                }
            }
        });
    }

    pub fn num_threads(&self) -> usize {
        self.pool.num_threads()
    }

    pub fn isa(&self) -> Isa {
        self.isa
    }

    /// The weight for `t`: repacked for the kernels of `kernels::rows16` when `repack` allows
    /// it, this ISA has them and `t` is a Q4_0/Q4_1/Q5_0/Q8_0/Q4_K matrix of whole groups of
    /// rows, else the loader's view. A repacked file mapping's pages are given back
    /// (`Tensor::release_pages`), so the copy is held instead of, not beside, them; an owned
    /// buffer goes when the loader's map does.
    fn cpu_weight(&self, t: &Tensor, repack: bool) -> CpuWeight {
        let packed = match (repack && self.isa.repacks_rows16(), t.shape(), t.elems()) {
            (true, &[rows, k], Elems::Quant(q, bytes)) => {
                kernels::rows16::Packed::new(q, bytes, rows, k)
            }
            _ => None,
        };
        match packed {
            Some(p) => {
                t.release_pages();
                CpuWeight::Packed(p)
            }
            None => CpuWeight::View(t.clone()),
        }
    }

    /// `out = x · wᵀ` (and the SwiGLU of a second matrix) over several weight matrices that
    /// share the input, split by weight rows across the pool in one parallel region.
    fn matmul_many(
        &self,
        x: &[f32],
        m: usize,
        parts: &mut [(&CpuWeight, Option<&CpuWeight>, &mut Vec<f32>)],
    ) {
        const MAX_PARTS: usize = 3;
        assert!(parts.len() <= MAX_PARTS);
        let k = parts[0].0.cols();
        let total: usize = parts.iter().map(|p| p.0.rows()).sum();
        // raw output pointers, so the shared closure can hand disjoint rows to each thread
        let mut outs = [(OutPtr(std::ptr::null_mut()), 0usize); MAX_PARTS];
        for (o, p) in outs.iter_mut().zip(parts.iter_mut()) {
            *o = (OutPtr(p.2.as_mut_ptr()), p.0.rows());
        }
        let isa = self.isa;
        // products with quantized weights take the activations quantized to 8 bits, once
        let mut xq = self.xq.lock();
        if parts.iter().any(|p| p.0.is_quant()) {
            xq.quantize(&x[..m * k], m, k);
        }
        let xq = &*xq;
        // products with bf16 weights under --dtype bfloat16 take the activations in bf16, once
        let mut xb = self.xb.lock();
        let bf16 = self.bf16.filter(|_| parts.iter().any(|p| p.0.is_bf16()));
        if let Some(d) = bf16 {
            xb.resize(m * k, 0);
            kernels::to_bf16_rows(d, &x[..m * k], &mut xb);
        }
        let xb = &*xb;
        let job = |range: std::ops::Range<usize>, tid: usize| {
            let mut panel = self.panels[tid].lock();
            let mut base = 0;
            for (i, part) in parts.iter().enumerate() {
                let n = part.0.rows();
                let lo = range.start.max(base);
                let hi = range.end.min(base + n);
                if lo < hi {
                    let (out, ldo) = outs[i];
                    // SAFETY: each thread gets disjoint row ranges of each output, whose
                    // buffers hold m * n values (checked by the callers via ensure_len).
                    unsafe {
                        // a SwiGLU pair is repacked both or neither (`weights`)
                        let up_packed = part.1.map(|u| u.packed());
                        if let (Some(w), None | Some(Some(_))) = (part.0.packed(), up_packed) {
                            kernels::matmul_rows_rows16(
                                isa,
                                xq,
                                m,
                                w,
                                up_packed.flatten(),
                                lo - base..hi - base,
                                out,
                                ldo,
                            );
                            base += n;
                            continue;
                        }
                        match (bf16, part.0.elems(), part.1.map(|u| u.elems())) {
                            (_, Elems::Quant(t, w), None) => kernels::matmul_rows_quant(
                                isa,
                                xq,
                                m,
                                t,
                                w,
                                None,
                                lo - base..hi - base,
                                out,
                                ldo,
                            ),
                            (_, Elems::Quant(t, w), Some(Elems::Quant(ut, u))) => {
                                kernels::matmul_rows_quant(
                                    isa,
                                    xq,
                                    m,
                                    t,
                                    w,
                                    Some((ut, u)),
                                    lo - base..hi - base,
                                    out,
                                    ldo,
                                )
                            }
                            (Some(d), Elems::BF16(w), None) => kernels::matmul_rows_bf16x(
                                d,
                                xb,
                                m,
                                k,
                                w,
                                None,
                                lo - base..hi - base,
                                out,
                                ldo,
                            ),
                            (Some(d), Elems::BF16(w), Some(Elems::BF16(u))) => {
                                kernels::matmul_rows_bf16x(
                                    d,
                                    xb,
                                    m,
                                    k,
                                    w,
                                    Some(u),
                                    lo - base..hi - base,
                                    out,
                                    ldo,
                                )
                            }
                            (_, w, up) => kernels::matmul_rows(
                                isa,
                                x,
                                m,
                                k,
                                w,
                                up,
                                lo - base..hi - base,
                                out,
                                ldo,
                                &mut panel,
                            ),
                        }
                    }
                }
                base += n;
            }
        };
        let threads = self.pool.num_threads();
        if threads == 1 || total * m * k < 65536 {
            job(0..total, 0);
        } else {
            // each thread streams its own share of the rows front to back, then helps with
            // the others' from their back ends: a thread slowed down (by the machine's other
            // tenants, say) does not keep the rest waiting at the end of the region
            // row ranges in whole tiles: groups of sixteen rows for repacked weights (when
            // every part has whole groups, so that the groups' boundaries line up)
            let packed = parts.iter().any(|p| p.0.packed().is_some());
            let align = if packed
                && parts
                    .iter()
                    .all(|p| p.0.rows().is_multiple_of(kernels::rows16::ROWS))
            {
                kernels::rows16::ROWS
            } else {
                4
            };
            let shares = pool::Shares::new(total, align, threads);
            self.pool
                .run(|tid| shares.work(tid, OWN_ROWS, STOLEN_ROWS, |r| job(r, tid)));
        }
    }

    /// Runs `f(row)` for `rows` rows, in parallel when there are many.
    fn for_rows<F: Fn(usize) + Sync>(&self, rows: usize, f: F) {
        if rows < PARALLEL_ROWS {
            (0..rows).for_each(f);
        } else {
            self.pool.for_ranges(rows, 1, |r| r.for_each(&f));
        }
    }
}

/// A zeroed vector (f32 or bf16) from `alloc_zeroed` (calloc): the OS commits its pages only when they
/// are first written, so a large KV pool costs address space until it is used. Allocation
/// failure is an error, not an abort.
fn zeroed<E: KvElem>(n: usize) -> Result<Vec<E>, BackendError> {
    if n == 0 {
        return Ok(Vec::new());
    }
    let layout = std::alloc::Layout::array::<E>(n)
        .map_err(|e| BackendError::OutOfMemory(format!("KV cache of {n} values: {e}")))?;
    // SAFETY: layout has non-zero size; on success the block holds n zeroed values (all-zero
    // bits is 0.0 in f32 and in bf16), allocated by the global allocator with E's alignment,
    // which is what Vec::from_raw_parts requires for capacity n.
    unsafe {
        let ptr = std::alloc::alloc_zeroed(layout) as *mut E;
        if ptr.is_null() {
            return Err(BackendError::OutOfMemory(format!(
                "KV cache: cannot allocate {} bytes",
                layout.size()
            )));
        }
        Ok(Vec::from_raw_parts(ptr, n, n))
    }
}

fn check_len(buf: &[f32], need: usize, what: &str) {
    assert!(
        buf.len() >= need,
        "{what}: buffer of {} values, {need} needed",
        buf.len()
    );
}

impl Backend for CpuBackend {
    type Weight = CpuWeight;
    type Buf = Vec<f32>;
    type Kv = CpuKv;
    type Step = CpuStep;
    type Graph = ();

    fn name(&self) -> &'static str {
        "cpu"
    }

    fn weight(&self, name: &str, t: &Tensor) -> Result<CpuWeight, BackendError> {
        super::weight_dims(name, t)?;
        Ok(self.cpu_weight(t, true))
    }

    /// As `weight` for each, except that the parts are repacked all or none: a SwiGLU pair's
    /// kernel takes both matrices in one layout.
    fn weights(&self, parts: &[(&str, &Tensor)]) -> Result<Vec<CpuWeight>, BackendError> {
        for (name, t) in parts {
            super::weight_dims(name, t)?;
        }
        let all = parts.iter().all(|(_, t)| {
            let (rows, k) = (t.shape()[0], t.shape().get(1).copied().unwrap_or(1));
            matches!(t.elems(), Elems::Quant(q, _) if kernels::rows16::Packed::fits(q, rows, k))
        });
        Ok(parts.iter().map(|(_, t)| self.cpu_weight(t, all)).collect())
    }

    fn buffer(&self, len: usize) -> Result<Vec<f32>, BackendError> {
        Ok(vec![0.0; len])
    }

    fn ensure_len(&self, buf: &mut Vec<f32>, len: usize) -> Result<(), BackendError> {
        if buf.len() < len {
            buf.resize(len, 0.0);
        }
        Ok(())
    }

    fn kv_cache(
        &self,
        cfg: &ModelConfig,
        num_pages: usize,
        page_size: usize,
    ) -> Result<CpuKv, BackendError> {
        let per_layer = num_pages * page_size * cfg.num_kv_heads * cfg.head_dim;
        fn layers<E: KvElem>(n: usize, per_layer: usize) -> Result<Vec<Vec<E>>, BackendError> {
            (0..n).map(|_| zeroed(per_layer)).collect()
        }
        let n = cfg.num_layers;
        let store = match self.kv_dtype {
            KvCacheDtype::Bf16 => KvStore::Bf16 {
                k: layers(n, per_layer)?,
                v: layers(n, per_layer)?,
            },
            KvCacheDtype::Auto | KvCacheDtype::Fp32 => KvStore::F32 {
                k: layers(n, per_layer)?,
                v: layers(n, per_layer)?,
            },
        };
        Ok(CpuKv {
            store,
            layout: KvLayout {
                page_size,
                num_kv_heads: cfg.num_kv_heads,
                head_dim: cfg.head_dim,
            },
        })
    }

    fn kv_bytes_per_token(&self, cfg: &ModelConfig) -> usize {
        cfg.kv_bytes_per_token(kv_elem_bytes(self.kv_dtype))
    }

    fn begin_step(&self, batch: &StepBatch, rope: &RopeTable) -> Result<CpuStep, BackendError> {
        // the previous step's buffers, so steady-state decode does not allocate
        let mut step = self.spare_step.lock().take().unwrap_or(CpuStep {
            cos: Vec::new(),
            sin: Vec::new(),
            half: 0,
            seq_of_token: Vec::new(),
        });
        step.half = rope.inv_freq.len();
        step.cos.clear();
        step.sin.clear();
        step.seq_of_token.clear();
        for &p in &batch.positions {
            for &f in &rope.inv_freq {
                let (s, c) = (p as f64 * f).sin_cos();
                step.cos.push(c as f32);
                step.sin.push(s as f32);
            }
        }
        for (s, seq) in batch.seqs.iter().enumerate() {
            step.seq_of_token
                .extend(std::iter::repeat_n(s as u32, seq.num_tokens));
        }
        Ok(step)
    }

    fn end_step(&self, step: CpuStep) {
        *self.spare_step.lock() = Some(step);
    }

    fn embedding(
        &self,
        _step: &CpuStep,
        table: &CpuWeight,
        vocab_start: usize,
        batch: &StepBatch,
        out: &mut Vec<f32>,
    ) -> Result<(), BackendError> {
        let h = table.cols();
        let rows = table.rows();
        check_len(out, batch.num_tokens() * h, "embedding");
        for (t, &id) in batch.tokens.iter().enumerate() {
            let dst = &mut out[t * h..(t + 1) * h];
            match (id as usize).checked_sub(vocab_start) {
                Some(row) if row < rows => table.row_to_f32(row, dst),
                _ => dst.fill(0.0),
            }
        }
        Ok(())
    }

    fn rms_norm(
        &self,
        x: &Vec<f32>,
        w: &CpuWeight,
        eps: f32,
        rows: usize,
        out: &mut Vec<f32>,
    ) -> Result<(), BackendError> {
        let h = w.rows();
        check_len(out, rows * h, "rms_norm");
        let op = OutPtr(out.as_mut_ptr());
        self.for_rows(rows, |r| {
            // SAFETY: each row index is visited once; rows are disjoint slices of `out`.
            let o = unsafe { std::slice::from_raw_parts_mut(op.get().add(r * h), h) };
            kernels::rms_norm_row(&x[r * h..(r + 1) * h], w.elems(), eps, o);
        });
        Ok(())
    }

    fn add_rms_norm(
        &self,
        residual: &mut Vec<f32>,
        delta: &Vec<f32>,
        w: &CpuWeight,
        eps: f32,
        rows: usize,
        out: &mut Vec<f32>,
    ) -> Result<(), BackendError> {
        let h = w.rows();
        check_len(out, rows * h, "add_rms_norm");
        check_len(residual, rows * h, "add_rms_norm");
        let op = OutPtr(out.as_mut_ptr());
        let rp = OutPtr(residual.as_mut_ptr());
        self.for_rows(rows, |r| {
            // SAFETY: disjoint rows of `residual` and `out`, one visit per row.
            let (res, o) = unsafe {
                (
                    std::slice::from_raw_parts_mut(rp.get().add(r * h), h),
                    std::slice::from_raw_parts_mut(op.get().add(r * h), h),
                )
            };
            res.iter_mut()
                .zip(&delta[r * h..(r + 1) * h])
                .for_each(|(a, b)| *a += b);
            kernels::rms_norm_row(res, w.elems(), eps, o);
        });
        Ok(())
    }

    fn matmul(
        &self,
        x: &Vec<f32>,
        rows: usize,
        w: &CpuWeight,
        out: &mut Vec<f32>,
    ) -> Result<(), BackendError> {
        check_len(x, rows * w.cols(), "matmul input");
        check_len(out, rows * w.rows(), "matmul output");
        self.matmul_many(x, rows, &mut [(w, None, out)]);
        Ok(())
    }

    fn qkv(
        &self,
        x: &Vec<f32>,
        rows: usize,
        wq: &CpuWeight,
        wk: &CpuWeight,
        wv: &CpuWeight,
        q: &mut Vec<f32>,
        k: &mut Vec<f32>,
        v: &mut Vec<f32>,
    ) -> Result<(), BackendError> {
        check_len(x, rows * wq.cols(), "qkv input");
        check_len(q, rows * wq.rows(), "q");
        check_len(k, rows * wk.rows(), "k");
        check_len(v, rows * wv.rows(), "v");
        self.matmul_many(x, rows, &mut [(wq, None, q), (wk, None, k), (wv, None, v)]);
        Ok(())
    }

    fn gate_up_silu(
        &self,
        x: &Vec<f32>,
        rows: usize,
        gate: &CpuWeight,
        up: &CpuWeight,
        out: &mut Vec<f32>,
    ) -> Result<(), BackendError> {
        check_len(x, rows * gate.cols(), "gate_up input");
        check_len(out, rows * gate.rows(), "gate_up output");
        self.matmul_many(x, rows, &mut [(gate, Some(up), out)]);
        Ok(())
    }

    fn rope_and_store_kv(
        &self,
        step: &CpuStep,
        batch: &StepBatch,
        cfg: &ModelConfig,
        q: &mut Vec<f32>,
        k: &mut Vec<f32>,
        v: &Vec<f32>,
        kv: &mut CpuKv,
        layer: usize,
    ) -> Result<(), BackendError> {
        let layout = kv.layout;
        match &mut kv.store {
            KvStore::F32 { k: kc, v: vc } => self.rope_and_store(
                step,
                batch,
                cfg,
                q,
                k,
                v,
                layout,
                &mut kc[layer],
                &mut vc[layer],
            ),
            KvStore::Bf16 { k: kc, v: vc } => self.rope_and_store(
                step,
                batch,
                cfg,
                q,
                k,
                v,
                layout,
                &mut kc[layer],
                &mut vc[layer],
            ),
        }
        Ok(())
    }

    fn attention(
        &self,
        step: &CpuStep,
        batch: &StepBatch,
        cfg: &ModelConfig,
        q: &Vec<f32>,
        kv: &CpuKv,
        layer: usize,
        out: &mut Vec<f32>,
    ) -> Result<(), BackendError> {
        let (hd, nh) = (cfg.head_dim, cfg.num_heads);
        check_len(out, batch.num_tokens() * nh * hd, "attention output");
        match &kv.store {
            KvStore::F32 { k, v } => {
                self.attend_all(step, batch, cfg, q, &k[layer], &v[layer], kv.layout, out)
            }
            KvStore::Bf16 { k, v } => {
                self.attend_all(step, batch, cfg, q, &k[layer], &v[layer], kv.layout, out)
            }
        }
        Ok(())
    }

    fn gather_rows(
        &self,
        _step: &CpuStep,
        x: &Vec<f32>,
        rows: &[u32],
        width: usize,
        out: &mut Vec<f32>,
    ) -> Result<(), BackendError> {
        check_len(out, rows.len() * width, "gather_rows");
        for (i, &r) in rows.iter().enumerate() {
            let r = r as usize;
            out[i * width..(i + 1) * width].copy_from_slice(&x[r * width..(r + 1) * width]);
        }
        Ok(())
    }

    fn all_reduce(
        &self,
        comm: &dyn Communicator,
        buf: &mut Vec<f32>,
        len: usize,
    ) -> Result<(), BackendError> {
        Ok(comm.all_reduce_sum(&mut buf[..len])?)
    }

    fn all_gather(
        &self,
        comm: &dyn Communicator,
        local: &Vec<f32>,
        len: usize,
        out: &mut Vec<f32>,
        total: usize,
    ) -> Result<(), BackendError> {
        Ok(comm.all_gather(&local[..len], &mut out[..total])?)
    }

    fn upload(&self, data: &[f32], out: &mut Vec<f32>) -> Result<(), BackendError> {
        out[..data.len()].copy_from_slice(data);
        Ok(())
    }

    fn to_host<'a>(&self, buf: &'a Vec<f32>, len: usize) -> Result<Cow<'a, [f32]>, BackendError> {
        Ok(Cow::Borrowed(&buf[..len]))
    }

    fn samples_on_device(&self) -> bool {
        true
    }

    fn sample(
        &self,
        logits: &Vec<f32>,
        vocab: usize,
        samples: &SampleBatch,
    ) -> Result<Vec<TokenInfo>, BackendError> {
        let mut sampler = self.sampler.lock();
        Ok(logits
            .chunks_exact(vocab)
            .take(samples.len())
            .enumerate()
            .map(|(i, row)| sampler.sample_row(row, samples, i))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `--dtype auto` takes bf16 inputs exactly where the CPU multiplies bf16 natively, and
    /// says so in the kernel set; explicit values stand on every instruction set.
    #[test]
    fn auto_dtype_is_bf16_only_where_the_cpu_multiplies_bf16() {
        for isa in Isa::available() {
            let native = Bf16Dot::for_isa(isa).is_native();
            let want = if native {
                Dtype::Bfloat16
            } else {
                Dtype::Float32
            };
            assert_eq!(resolve_dtype_for(Dtype::Auto, isa), want, "{isa:?}");
            for d in [Dtype::Float32, Dtype::Bfloat16] {
                assert_eq!(resolve_dtype_for(d, isa), d, "{isa:?}");
            }
        }
        assert!(!Bf16Dot::for_isa(Isa::Scalar).is_native());
        #[cfg(target_arch = "x86_64")]
        assert!(!Bf16Dot::for_isa(Isa::Avx2).is_native());
        let auto_bf16 = resolve_dtype(Dtype::Auto) == Dtype::Bfloat16;
        assert_eq!(
            kernel_set(Dtype::Auto).contains("bf16 x bf16"),
            auto_bf16,
            "{}",
            kernel_set(Dtype::Auto)
        );
        assert_eq!(
            CpuBackend::new(Some(1))
                .with_dtype(Dtype::Auto)
                .bf16
                .is_some(),
            auto_bf16
        );
    }
}

//! The CUDA backend (feature `cuda`): the kernels of `csrc/` (one fatbin built by nvcc in
//! build.rs and embedded here), cuBLAS for the matrix products, bf16 weights and KV cache.
//! The products' inputs are bf16, written so by the kernel before each (norms, attention,
//! SiLU-and-mul: no conversion launch); their outputs and the residual stream are f32.
//! q, k and v are one product (their weights one after the other in one allocation, see
//! [`Backend::weights`]), and so are gate and up; RoPE is applied while K and V are stored,
//! from a cos/sin table kept on the device. A decode step makes 9 launches per layer (10
//! when attention is split along the sequence: at small batches, see `backend::split`).
//! Prompt chunks take a tensor-core attention kernel (`sg_prefill_attention_d{64,128}`:
//! mma.sync, FlashAttention-2 tiles of 16 tokens over the paged cache); a step's decode
//! tokens, which the scheduler plans first, keep the decode kernels.
//!
//! CUDA is loaded at run time (cudarc's dynamic loading): a binary built with `cuda` starts
//! and serves on the CPU where no driver exists; [`driver_available`] is checked before any
//! other call. All work runs on one stream owned by the backend (so a step can be captured
//! in a graph later); memory is plain device allocations owned by small RAII wrappers.
//!
//! Weights go from the safetensors mapping to the device in chunks through one pinned
//! staging buffer (converted to bf16 on the way when the file holds f16 or f32): no full host
//! copy of the model is ever made.

use std::borrow::Cow;
use std::ffi::c_void;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use cudarc::cublas::sys as blas_sys;
use cudarc::driver::result as drv;
use cudarc::driver::sys;
use parking_lot::Mutex;

mod driver;
pub mod report;
pub use driver::SYNC_LAUNCHES_ENV;
use driver::{Driver, Event, Func};

use super::step_meta::{self, MetaLayout, OutLayout};
use super::{Backend, BackendError, RopeTable};
use crate::batch::{StepBatch, FUTURE_TOKEN};
use crate::config::ModelConfig;
use crate::loader::{f32_to_bf16, Elems, Tensor};
use crate::parallel::Communicator;
use crate::sampling::{device_work_words, SampleBatch, TokenInfo, TokenLogprob, MAX_TOP_LOGPROBS};

/// Bytes aligned for the driver: `cuModuleLoadData` reads the fatbin's header in place,
/// which `include_bytes!` alone (1-byte alignment) does not promise.
#[repr(C, align(64))]
struct Aligned<B: ?Sized>(B);

static FATBIN_IMAGE: &Aligned<[u8]> = &Aligned(*include_bytes!(concat!(
    env!("OUT_DIR"),
    "/sglang_kernels.fatbin"
)));

/// The kernels of `csrc/` (fatbin built by nvcc in build.rs, 64-byte aligned); public for
/// the per-kernel tests (`tests/kernels.rs`), which launch them one by one.
pub static FATBIN: &[u8] = &FATBIN_IMAGE.0;

/// Bytes of the pinned buffer weights are staged through.
const STAGING_BYTES: usize = 32 << 20;
use super::kernels::{self as k, Launch, MAX_GROUP, MAX_HEAD_DIM};
pub use super::kernels::{attention_kernel_name, attention_smem_bytes, FIXED_HEAD_DIMS};

/// True when the CUDA driver library loads, initialises and reports at least one device.
pub fn driver_available() -> bool {
    // SAFETY: only tries to dlopen libcuda; no CUDA call is made when it is absent.
    if !unsafe { sys::is_culib_present() } {
        return false;
    }
    drv::init().is_ok() && drv::device::get_count().is_ok_and(|n| n > 0)
}

/// Why CUDA cannot be used here, for `--device cuda` errors.
pub fn unavailable_reason() -> String {
    // SAFETY: as above.
    if !unsafe { sys::is_culib_present() } {
        return "no CUDA driver (libcuda.so) can be loaded on this machine".into();
    }
    match drv::init().and_then(|_| drv::device::get_count()) {
        Ok(0) => "the CUDA driver reports no device".into(),
        Ok(_) => "CUDA is available".into(),
        Err(e) => format!("the CUDA driver failed to initialise: {e:?}"),
    }
}

/// A device allocation, freed on drop.
pub struct DevMem {
    ptr: sys::CUdeviceptr,
    bytes: usize,
    drv: Arc<Driver>,
}

impl DevMem {
    fn new(drv: &Arc<Driver>, bytes: usize) -> Result<Self, BackendError> {
        Ok(Self {
            ptr: drv.alloc(bytes)?,
            bytes,
            drv: drv.clone(),
        })
    }
}

impl Drop for DevMem {
    fn drop(&mut self) {
        self.drv.free(self.ptr);
    }
}

/// A bf16 weight on the device: `rows x cols` at `offset` bytes into an allocation that may
/// hold the weights of its group one after the other (q, k, v; gate, up).
pub struct CudaWeight {
    mem: Arc<DevMem>,
    offset: u64,
    rows: usize,
    cols: usize,
}

impl CudaWeight {
    fn ptr(&self) -> sys::CUdeviceptr {
        self.mem.ptr + self.offset
    }

    /// True when `next` follows this weight directly in the same allocation with the same
    /// columns, so one product covers both.
    fn followed_by(&self, next: &CudaWeight) -> bool {
        Arc::ptr_eq(&self.mem, &next.mem)
            && self.cols == next.cols
            && next.offset == self.offset + (self.rows * self.cols * 2) as u64
    }
}

/// Activations on the device: room for `len` f32 values, holding f32 values or, when `bf16`
/// is set (the products' inputs), bf16 ones in the first half of the bytes.
pub struct CudaBuf {
    mem: DevMem,
    len: usize,
    bf16: bool,
}

/// Bytes of one cached K or V value: the GPU cache holds bf16.
const KV_ELEM_BYTES: usize = 2;

/// The paged KV cache: per layer, bf16 `[slot][kv_head][head_dim]` for K and for V.
pub struct CudaKv {
    k: Vec<DevMem>,
    v: Vec<DevMem>,
}

/// A step's metadata on the device: addresses in the one array the step's input was sent in
/// (`backend::step_meta`).
pub struct CudaStep {
    tokens: sys::CUdeviceptr,
    positions: sys::CUdeviceptr,
    slots: sys::CUdeviceptr,
    token_seq: sys::CUdeviceptr,
    seq_table_start: sys::CUdeviceptr,
    /// The array's base: block-table offsets are absolute (see `step_meta`).
    block_tables: sys::CUdeviceptr,
    logit_rows: sys::CUdeviceptr,
    /// The RoPE table's cos and sin (owned by the backend; only grown between steps).
    cos: sys::CUdeviceptr,
    sin: sys::CUdeviceptr,
    /// The sampling output array, whose tokens a future token id names.
    future: sys::CUdeviceptr,
    n_tokens: usize,
}

impl CudaStep {
    /// The step's addresses in an input array at `base` laid out as `l`.
    fn at(l: &MetaLayout, base: sys::CUdeviceptr) -> Self {
        let at = |words: usize| base + (words * 4) as u64;
        Self {
            tokens: at(l.tokens),
            positions: at(l.positions),
            slots: at(l.slots),
            token_seq: at(l.token_seq),
            seq_table_start: at(l.seq_table_start),
            block_tables: base,
            logit_rows: at(l.logit_rows),
            cos: 0,
            sin: 0,
            future: 0,
            n_tokens: l.token_count(),
        }
    }
}

/// Pinned host memory, freed on drop.
struct Pinned {
    ptr: *mut c_void,
    bytes: usize,
    drv: Arc<Driver>,
}

impl Drop for Pinned {
    fn drop(&mut self) {
        if !self.ptr.is_null() {
            self.drv.free_host(self.ptr);
        }
    }
}

/// A pinned buffer and the fence of the last asynchronous copy that used it: it is not
/// written (or, for a copy back, read) before that fence has passed.
struct Slot {
    pinned: Pinned,
    event: Option<Event>,
    /// The fence's ordinal (0: none yet).
    fence: u64,
}

/// One direction of a step's input or output: the words packed on the host, two pinned
/// copies used in turn (what the asynchronous copies read or write: while one step's copy is
/// in flight the next step's words go into the other) and the device array.
struct Channel {
    host: Vec<u32>,
    slots: [Slot; 2],
    /// The slot the next copy uses.
    next: usize,
    dev: Option<DevMem>,
}

impl Channel {
    fn new(drv: &Arc<Driver>) -> Self {
        let slot = || Slot {
            pinned: Pinned {
                ptr: std::ptr::null_mut(),
                bytes: 0,
                drv: drv.clone(),
            },
            event: None,
            fence: 0,
        };
        Self {
            host: Vec::new(),
            slots: [slot(), slot()],
            next: 0,
            dev: None,
        }
    }

    /// The slot the next copy uses (and the one after it uses the other).
    fn take_slot(&mut self) -> usize {
        let i = self.next;
        self.next ^= 1;
        i
    }
}

/// A copy of sampling results on its way back (`Backend::send_samples_back`): the slot it
/// lands in, the layout of the array it came from, and the words copied.
struct Readback {
    slot: usize,
    layout: OutLayout,
    words: usize,
}

/// A step's input sent by [`Backend::stage`]: its layout and the array it is in.
#[derive(Clone, Copy)]
struct Staged {
    layout: MetaLayout,
    base: sys::CUdeviceptr,
}

/// A captured step: the graph, and the input layout and array it reads.
pub struct CudaGraph {
    graph: driver::Graph,
    staged: Staged,
    drv: Arc<Driver>,
}

// SAFETY: the graph's handles are used only on the engine thread that owns the runner (the
// context is made current before each use).
unsafe impl Send for CudaGraph {}

impl Drop for CudaGraph {
    fn drop(&mut self) {
        self.drv.destroy_graph(&self.graph);
    }
}

/// RoPE's cos and sin on the device, `[position][head_dim / 2]` f32 for positions below
/// `rows` (computed in f64 on the host as the CPU backend does, grown when a step needs a
/// later position).
struct RopeDev {
    cos: DevMem,
    sin: DevMem,
    rows: usize,
}

/// Every kernel of the fatbin, by name (`kernels::all_kernel_names`).
struct Kernels(std::collections::HashMap<&'static str, Func>);

/// Scratch buffers of the matrix products (an f32 input cast to bf16; the fused gate and up
/// output).
struct Scratch {
    x_bf16: Option<DevMem>,
    gate_up: Option<DevMem>,
    /// Partial results of split attention: running max and sum, and accumulators.
    attn_ml: Option<DevMem>,
    attn_acc: Option<DevMem>,
}

/// Device buffers of `sg_sample` beside its input: the processed logits (`work`), and its
/// outputs in one array (`step_meta::OutLayout`).
struct SampleBufs {
    work: Option<DevMem>,
    out: Channel,
    /// The layout of the last sampling's outputs.
    out_layout: OutLayout,
    /// Copies back not yet taken, oldest first (at most one per slot).
    pending: std::collections::VecDeque<Readback>,
}

pub struct CudaBackend {
    drv: Arc<Driver>,
    k: Kernels,
    staging: *mut c_void,
    scratch: Mutex<Scratch>,
    rope: Mutex<Option<RopeDev>>,
    sample_bufs: Mutex<SampleBufs>,
    /// The step's input (`step_meta`), sent in one copy; and the input of a sampling run on
    /// its own (`Backend::sample`), in another array so neither overwrites the other's pinned
    /// copy before it has been sent.
    meta: Mutex<Channel>,
    sample_meta: Mutex<Channel>,
    /// What `Backend::stage` sent, until `Backend::unstage`.
    staged: Mutex<Option<Staged>>,
    /// Weight upload progress: bytes expected and done (logged every 10 %).
    upload_total: AtomicUsize,
    uploaded: AtomicUsize,
    name: String,
    /// Multiprocessors: how many blocks fill the GPU (attention splits).
    sms: usize,
}

// SAFETY: the raw handles (stream, module, cuBLAS handle, pinned buffer) are used only under
// the engine's single-threaded step discipline; the context is made current before each use.
unsafe impl Send for CudaBackend {}
unsafe impl Sync for CudaBackend {}

impl CudaBackend {
    /// Opens GPU `ordinal`: context, stream, the embedded kernels, cuBLAS; or, given
    /// `emulator` (the CPU emulation library of csrc/, built by tests/kernel_emu), the same
    /// backend with its kernels run by that library and its products by plain host code.
    pub fn new(ordinal: usize, emulator: Option<&Path>) -> Result<Self, BackendError> {
        if emulator.is_none() {
            if !driver_available() {
                return Err(BackendError::Unavailable(unavailable_reason()));
            }
            // SAFETY: checks that libcublas can be loaded before cudarc touches it.
            if !unsafe { blas_sys::is_culib_present() } {
                return Err(BackendError::Unavailable(
                    "cuBLAS (libcublas.so.13) cannot be loaded: install the CUDA 13 runtime \
                     libraries"
                        .into(),
                ));
            }
        }
        let (drv, name, sms) = Driver::open(ordinal, emulator)?;
        let k = Kernels(
            k::all_kernel_names()
                .into_iter()
                .map(|name| Ok((name, drv.function(name)?)))
                .collect::<Result<_, BackendError>>()?,
        );
        let staging = drv.alloc_host(STAGING_BYTES)?;
        let (meta, sample_meta, out) = (Channel::new(&drv), Channel::new(&drv), Channel::new(&drv));
        Ok(Self {
            drv,
            k,
            staging,
            scratch: Mutex::new(Scratch {
                x_bf16: None,
                gate_up: None,
                attn_ml: None,
                attn_acc: None,
            }),
            rope: Mutex::new(None),
            sample_bufs: Mutex::new(SampleBufs {
                work: None,
                out,
                out_layout: OutLayout::new(0),
                pending: Default::default(),
            }),
            meta: Mutex::new(meta),
            sample_meta: Mutex::new(sample_meta),
            staged: Mutex::new(None),
            upload_total: AtomicUsize::new(0),
            uploaded: AtomicUsize::new(0),
            name,
            sms,
        })
    }

    /// True when the kernels run on the tests' CPU emulation instead of a GPU.
    pub fn is_emulated(&self) -> bool {
        self.drv.is_emulated()
    }

    /// Announces the bytes of weights about to be uploaded, so the upload can show progress.
    pub fn set_upload_total(&self, bytes: usize) {
        self.upload_total.store(bytes, Ordering::Relaxed);
        self.uploaded.store(0, Ordering::Relaxed);
    }

    fn upload_progress(&self, bytes: usize) {
        let total = self.upload_total.load(Ordering::Relaxed);
        if total == 0 {
            return;
        }
        let before = self.uploaded.fetch_add(bytes, Ordering::Relaxed);
        let (a, b) = (before * 10 / total, (before + bytes) * 10 / total);
        if b > a {
            tracing::info!("uploading weights: {}%", (b * 10).min(100));
        }
    }

    /// The GPU's name (as the driver reports it).
    pub fn device_name(&self) -> &str {
        &self.name
    }

    /// Free and total device memory, bytes.
    pub fn memory(&self) -> Result<(usize, usize), BackendError> {
        self.drv.memory()
    }

    /// KV pages that fit in `fraction` of the device memory beside what is already used
    /// (weights, workspace), keeping `reserve` bytes for activations.
    pub fn kv_pages_for(
        &self,
        fraction: f32,
        bytes_per_page: usize,
        reserve: usize,
    ) -> Result<usize, BackendError> {
        let (free, total) = self.memory()?;
        let used = total - free;
        let budget = (total as f64 * fraction as f64) as usize;
        let left = budget.saturating_sub(used).saturating_sub(reserve);
        let pages = left / bytes_per_page.max(1);
        if pages == 0 {
            return Err(BackendError::OutOfMemory(format!(
                "--mem-fraction-static {fraction} of {:.1} GiB leaves no room for the KV cache \
                 ({:.1} GiB already used by weights and buffers)",
                total as f64 / (1u64 << 30) as f64,
                used as f64 / (1u64 << 30) as f64
            )));
        }
        Ok(pages)
    }

    fn bind(&self) -> Result<(), BackendError> {
        self.drv.bind()
    }

    /// Runs a kernel launch (`backend::kernels`) on the backend's stream.
    fn launch(&self, mut l: Launch) -> Result<(), BackendError> {
        let f = self.k.0.get(l.kernel).ok_or_else(|| {
            BackendError::Internal(format!("kernel {} is not in the fatbin", l.kernel))
        })?;
        let (grid, block, shared) = (l.grid, l.block, l.shared);
        // SAFETY: `backend::kernels` builds each launch with exactly its kernel's parameters,
        // in order; the addresses are this backend's live device buffers.
        l.with_params(|params| unsafe { self.drv.launch(f, grid, block, shared, params) })
    }

    fn sync(&self) -> Result<(), BackendError> {
        self.drv.sync()
    }

    fn htod<T>(&self, dst: &DevMem, data: &[T]) -> Result<(), BackendError> {
        let bytes = std::mem::size_of_val(data);
        if bytes > dst.bytes {
            return Err(BackendError::Internal(format!(
                "upload of {bytes} bytes into {}",
                dst.bytes
            )));
        }
        if bytes == 0 {
            return Ok(());
        }
        // SAFETY: `dst` holds at least `bytes`; `data` is pageable (staged by the driver).
        unsafe { self.drv.htod(dst.ptr, data) }
    }

    /// Grows `slot` to at least `bytes`. A buffer is only freed once the stream is idle, so
    /// no queued kernel can still be using it.
    fn ensure(&self, slot: &mut Option<DevMem>, bytes: usize) -> Result<(), BackendError> {
        if slot.as_ref().is_none_or(|m| m.bytes < bytes) {
            self.sync()?;
            *slot = None;
            *slot = Some(DevMem::new(&self.drv, bytes.next_power_of_two())?);
        }
        Ok(())
    }

    /// x's values as bf16: its own memory when it holds bf16, else converted into scratch.
    fn bf16_input(
        &self,
        x: &CudaBuf,
        n: usize,
        scratch: &mut Scratch,
    ) -> Result<sys::CUdeviceptr, BackendError> {
        if x.bf16 {
            return Ok(x.mem.ptr);
        }
        self.ensure(&mut scratch.x_bf16, n * 2)?;
        let xb = scratch.x_bf16.as_ref().expect("ensured").ptr;
        self.launch(k::f32_to_bf16(x.mem.ptr, xb, n))?;
        Ok(xb)
    }

    /// `out[rows][o] = x[rows][cols] · wᵀ` for the `o = out_rows` weight rows at `w` (bf16
    /// `[o][cols]`), into rows `ldc` apart at `out` (f32 accumulation and output).
    #[allow(clippy::too_many_arguments)]
    fn gemm(
        &self,
        xb: sys::CUdeviceptr,
        rows: usize,
        cols: usize,
        w: sys::CUdeviceptr,
        out_rows: usize,
        out: sys::CUdeviceptr,
        ldc: usize,
    ) -> Result<(), BackendError> {
        // Row-major out[rows][o] = x[rows][i] · W[o][i]ᵀ is, column-major,
        // out(o × rows) = Wᵀ(o × i) · x(i × rows).
        // SAFETY: the pointers are live device buffers of the sizes named by m, n, k and the
        // leading dimensions.
        unsafe {
            self.drv
                .gemm_tn_bf16(out_rows, rows, cols, w, cols, xb, cols, out, ldc)
        }
    }

    /// One product for a group of weights that follow each other in memory (q, k, v; gate,
    /// up), else one per weight: `out[rows][sum of their rows]`, each weight's outputs in its
    /// own columns, in order.
    fn gemm_group(
        &self,
        x: &CudaBuf,
        rows: usize,
        ws: &[&CudaWeight],
        out: sys::CUdeviceptr,
        scratch: &mut Scratch,
    ) -> Result<(), BackendError> {
        let cols = ws[0].cols;
        let xb = self.bf16_input(x, rows * cols, scratch)?;
        let width: usize = ws.iter().map(|w| w.rows).sum();
        if ws.windows(2).all(|p| p[0].followed_by(p[1])) {
            return self.gemm(xb, rows, cols, ws[0].ptr(), width, out, width);
        }
        let mut at = 0;
        for w in ws {
            self.gemm(
                xb,
                rows,
                cols,
                w.ptr(),
                w.rows,
                out + (at * 4) as u64,
                width,
            )?;
            at += w.rows;
        }
        Ok(())
    }

    /// The RoPE table covering positions below `needed` (grown, never shrunk); its cos and
    /// sin pointers.
    fn rope_table(
        &self,
        rope: &RopeTable,
        needed: usize,
    ) -> Result<(sys::CUdeviceptr, sys::CUdeviceptr), BackendError> {
        let mut slot = self.rope.lock();
        if slot.as_ref().is_none_or(|t| t.rows < needed) {
            let rows = needed.next_power_of_two().max(4096);
            let half = rope.inv_freq.len();
            let (mut cos, mut sin) = (vec![0f32; rows * half], vec![0f32; rows * half]);
            for p in 0..rows {
                for (j, &inv) in rope.inv_freq.iter().enumerate() {
                    let a = p as f64 * inv;
                    cos[p * half + j] = a.cos() as f32;
                    sin[p * half + j] = a.sin() as f32;
                }
            }
            self.sync()?; // the old table may be in use by queued work
            *slot = None;
            let t = RopeDev {
                cos: DevMem::new(&self.drv, cos.len() * 4)?,
                sin: DevMem::new(&self.drv, sin.len() * 4)?,
                rows,
            };
            self.htod(&t.cos, &cos)?;
            self.htod(&t.sin, &sin)?;
            *slot = Some(t);
        }
        let t = slot.as_ref().expect("made above");
        Ok((t.cos.ptr, t.sin.ptr))
    }

    /// Sends `ch.host[..words]` to the device in one asynchronous copy from pinned memory
    /// (both grown when needed); the device array's address.
    fn send(&self, ch: &mut Channel, words: usize) -> Result<sys::CUdeviceptr, BackendError> {
        let bytes = words * 4;
        let slot = &mut ch.slots[ch.take_slot()];
        self.slot_fit(slot, bytes)?;
        // SAFETY: the pinned buffer holds `bytes`; no copy reads it any more (slot_fit).
        let pinned = unsafe { std::slice::from_raw_parts_mut(slot.pinned.ptr as *mut u32, words) };
        pinned.copy_from_slice(&ch.host[..words]);
        self.ensure(&mut ch.dev, bytes.max(8))?;
        let dev = ch.dev.as_ref().expect("ensured").ptr;
        // SAFETY: the device array holds `bytes`; the pinned source is not written again
        // before the fence recorded next has passed.
        unsafe { self.drv.htod(dev, &*pinned) }?;
        self.fence(slot)?;
        Ok(dev)
    }

    /// Makes `slot`'s pinned buffer hold `bytes` and safe to touch: the last copy that used
    /// it has completed.
    fn slot_fit(&self, slot: &mut Slot, bytes: usize) -> Result<(), BackendError> {
        if let Some(ev) = &slot.event {
            self.drv.wait(ev, slot.fence)?;
        }
        if slot.pinned.bytes < bytes {
            let size = bytes.next_power_of_two().max(4096);
            let ptr = self.drv.alloc_host(size)?;
            slot.pinned = Pinned {
                ptr,
                bytes: size,
                drv: self.drv.clone(),
            };
        }
        Ok(())
    }

    /// Records a fence after the copy just queued on `slot`.
    fn fence(&self, slot: &mut Slot) -> Result<(), BackendError> {
        if slot.event.is_none() {
            slot.event = Some(Event::new(&self.drv)?);
        }
        slot.fence = self.drv.record(slot.event.as_ref().expect("made above"))?;
        Ok(())
    }

    /// Launches `sg_sample` over `rows` rows of `logits`, their `SampleRow`s at `rows_params`
    /// and their lists at `lists`, its outputs into the sampling output array.
    fn launch_sample(
        &self,
        logits: &CudaBuf,
        vocab: usize,
        rows: usize,
        rows_params: sys::CUdeviceptr,
        lists: sys::CUdeviceptr,
    ) -> Result<(), BackendError> {
        let mut b = self.sample_bufs.lock();
        let b = &mut *b;
        let o = OutLayout::new(rows);
        self.ensure(&mut b.work, rows * device_work_words(vocab) * 4)?;
        self.ensure(&mut b.out.dev, o.words * 4)?;
        b.out_layout = o;
        let out = b.out.dev.as_ref().expect("ensured").ptr;
        let at = |words: usize| out + (words * 4) as u64;
        self.launch(
            k::Sample {
                logits: logits.mem.ptr,
                work: b.work.as_ref().expect("ensured").ptr,
                rows_params,
                lists,
                rows,
                vocab,
                max_top: MAX_TOP_LOGPROBS,
                token: at(o.token),
                logprob: at(o.logprob),
                top_ids: at(o.top_ids),
                top_logprobs: at(o.top_logprobs),
            }
            .launch(),
        )
    }

    /// Uploads `t` (`n` values, converted to bf16 on the way) to `dst` through the pinned
    /// staging buffer.
    fn upload_weight(
        &self,
        name: &str,
        t: &Tensor,
        dst: sys::CUdeviceptr,
        n: usize,
    ) -> Result<(), BackendError> {
        let elems = t.elems();
        let chunk = STAGING_BYTES / 2;
        // SAFETY: `staging` is a pinned buffer of STAGING_BYTES, used by one upload at a
        // time (each chunk is synchronised before the buffer is refilled).
        let staging = unsafe { std::slice::from_raw_parts_mut(self.staging as *mut u16, chunk) };
        let mut at = 0;
        while at < n {
            let len = chunk.min(n - at);
            match elems.slice(at, len) {
                Elems::BF16(s) => staging[..len].copy_from_slice(s),
                // f16, f32 and GGUF blocks (dequantized here: the CUDA kernels read bf16)
                other => {
                    let mut f = vec![0.0f32; len];
                    other.to_f32(&mut f);
                    for (o, v) in staging[..len].iter_mut().zip(f) {
                        *o = f32_to_bf16(v);
                    }
                }
            }
            // SAFETY: the destination range lies inside the caller's allocation; the source
            // is pinned and is not touched again until the stream has finished this copy.
            unsafe { self.drv.htod(dst + (at * 2) as u64, &staging[..len]) }.map_err(|e| {
                BackendError::Weight {
                    name: name.to_string(),
                    message: format!("upload: {e}"),
                }
            })?;
            self.sync()?;
            at += len;
        }
        self.upload_progress(t.size_bytes());
        Ok(())
    }
}

impl Drop for CudaBackend {
    fn drop(&mut self) {
        // the driver itself goes with the last allocation that holds it
        let _ = self.drv.sync();
        self.drv.free_host(self.staging);
    }
}

impl Backend for CudaBackend {
    type Weight = CudaWeight;
    type Buf = CudaBuf;
    type Kv = CudaKv;
    type Step = CudaStep;
    type Graph = CudaGraph;

    fn name(&self) -> &'static str {
        "cuda"
    }

    fn weight(&self, name: &str, t: &Tensor) -> Result<CudaWeight, BackendError> {
        Ok(self.weights(&[(name, t)])?.pop().expect("one weight"))
    }

    /// One allocation for the group, each weight uploaded after the previous one, so that one
    /// product can cover them (`gemm_group`).
    fn weights(&self, parts: &[(&str, &Tensor)]) -> Result<Vec<CudaWeight>, BackendError> {
        let dims = parts
            .iter()
            .map(|(n, t)| super::weight_dims(n, t))
            .collect::<Result<Vec<_>, _>>()?;
        let total: usize = dims.iter().map(|(r, c)| r * c).sum();
        let mem = Arc::new(DevMem::new(&self.drv, total * 2)?);
        let mut out = Vec::with_capacity(parts.len());
        let mut at = 0usize;
        for ((name, t), (rows, cols)) in parts.iter().zip(dims) {
            self.upload_weight(name, t, mem.ptr + (at * 2) as u64, rows * cols)?;
            out.push(CudaWeight {
                mem: mem.clone(),
                offset: (at * 2) as u64,
                rows,
                cols,
            });
            at += rows * cols;
        }
        Ok(out)
    }

    fn buffer(&self, len: usize) -> Result<CudaBuf, BackendError> {
        Ok(CudaBuf {
            mem: DevMem::new(&self.drv, len * 4)?,
            len,
            bf16: false,
        })
    }

    fn ensure_len(&self, buf: &mut CudaBuf, len: usize) -> Result<(), BackendError> {
        if buf.len < len {
            self.sync()?;
            *buf = self.buffer(len)?;
        }
        Ok(())
    }

    fn kv_cache(
        &self,
        cfg: &ModelConfig,
        num_pages: usize,
        page_size: usize,
    ) -> Result<CudaKv, BackendError> {
        // one page more: where the padding rows of a replayed step write (`captures_graphs`)
        let pages = num_pages + 1;
        let bytes = pages * page_size * cfg.num_kv_heads * cfg.head_dim * KV_ELEM_BYTES;
        let mut k = Vec::with_capacity(cfg.num_layers);
        let mut v = Vec::with_capacity(cfg.num_layers);
        for _ in 0..cfg.num_layers {
            k.push(DevMem::new(&self.drv, bytes)?);
            v.push(DevMem::new(&self.drv, bytes)?);
        }
        Ok(CudaKv { k, v })
    }

    fn kv_bytes_per_token(&self, cfg: &ModelConfig) -> usize {
        cfg.kv_bytes_per_token(KV_ELEM_BYTES)
    }

    fn begin_step(&self, batch: &StepBatch, rope: &RopeTable) -> Result<CudaStep, BackendError> {
        self.bind()?;
        let t = batch.num_tokens();
        let mut step = match *self.staged.lock() {
            // sent by `stage` (a step that samples, or is captured or replayed)
            Some(s) => {
                if s.layout.token_count() != t {
                    return Err(BackendError::Internal(format!(
                        "the staged input has {} tokens, the step {t}",
                        s.layout.token_count()
                    )));
                }
                CudaStep::at(&s.layout, s.base)
            }
            None => {
                let mut m = self.meta.lock();
                let l = step_meta::pack(batch, None, &mut m.host);
                let base = self.send(&mut m, l.words)?;
                CudaStep::at(&l, base)
            }
        };
        // the previous step's sampled tokens (token ids with FUTURE_TOKEN set read them)
        step.future = self
            .sample_bufs
            .lock()
            .out
            .dev
            .as_ref()
            .map_or(0, |m| m.ptr);
        if step.future == 0 && batch.tokens.iter().any(|&t| t & FUTURE_TOKEN != 0) {
            return Err(BackendError::Internal(
                "a step reads the tokens of a previous step that sampled nothing".into(),
            ));
        }
        let last = batch.positions.iter().max().map_or(0, |&p| p as usize + 1);
        (step.cos, step.sin) = self.rope_table(rope, last)?;
        Ok(step)
    }

    fn reserve_step_input(&self, words: usize) -> Result<(), BackendError> {
        self.bind()?;
        let mut m = self.meta.lock();
        for slot in &mut m.slots {
            self.slot_fit(slot, words * 4)?;
        }
        self.ensure(&mut m.dev, words * 4)
    }

    fn prepare_positions(&self, rope: &RopeTable, positions: usize) -> Result<(), BackendError> {
        self.rope_table(rope, positions).map(|_| ())
    }

    fn embedding(
        &self,
        step: &CudaStep,
        table: &CudaWeight,
        vocab_start: usize,
        batch: &StepBatch,
        out: &mut CudaBuf,
    ) -> Result<(), BackendError> {
        out.bf16 = false;
        self.launch(k::embedding(
            table.ptr(),
            step.tokens,
            step.future,
            out.mem.ptr,
            batch.num_tokens(),
            table.cols,
            vocab_start,
            table.rows,
        ))
    }

    fn rms_norm(
        &self,
        x: &CudaBuf,
        w: &CudaWeight,
        eps: f32,
        rows: usize,
        out: &mut CudaBuf,
    ) -> Result<(), BackendError> {
        out.bf16 = true;
        self.launch(k::rms_norm(
            x.mem.ptr,
            w.ptr(),
            out.mem.ptr,
            rows,
            w.rows,
            eps,
        ))
    }

    fn add_rms_norm(
        &self,
        residual: &mut CudaBuf,
        delta: &CudaBuf,
        w: &CudaWeight,
        eps: f32,
        rows: usize,
        out: &mut CudaBuf,
    ) -> Result<(), BackendError> {
        out.bf16 = true;
        self.launch(k::add_rms_norm(
            residual.mem.ptr,
            delta.mem.ptr,
            w.ptr(),
            out.mem.ptr,
            rows,
            w.rows,
            eps,
        ))
    }

    fn matmul(
        &self,
        x: &CudaBuf,
        rows: usize,
        w: &CudaWeight,
        out: &mut CudaBuf,
    ) -> Result<(), BackendError> {
        let mut scratch = self.scratch.lock();
        out.bf16 = false;
        self.gemm_group(x, rows, &[w], out.mem.ptr, &mut scratch)
    }

    /// One product into `q` as rows `[q | k | v]` (`k` and `v` stay unused): RoPE, the KV
    /// store and attention read them there.
    fn qkv(
        &self,
        x: &CudaBuf,
        rows: usize,
        wq: &CudaWeight,
        wk: &CudaWeight,
        wv: &CudaWeight,
        q: &mut CudaBuf,
        _k: &mut CudaBuf,
        _v: &mut CudaBuf,
    ) -> Result<(), BackendError> {
        self.ensure_len(q, rows * (wq.rows + wk.rows + wv.rows))?;
        q.bf16 = false;
        let mut scratch = self.scratch.lock();
        self.gemm_group(x, rows, &[wq, wk, wv], q.mem.ptr, &mut scratch)
    }

    fn gate_up_silu(
        &self,
        x: &CudaBuf,
        rows: usize,
        gate: &CudaWeight,
        up: &CudaWeight,
        out: &mut CudaBuf,
    ) -> Result<(), BackendError> {
        let mut scratch = self.scratch.lock();
        let inter = gate.rows;
        let n = rows * inter;
        self.ensure(&mut scratch.gate_up, 2 * n * 4)?;
        let gu = scratch.gate_up.as_ref().expect("ensured").ptr;
        self.gemm_group(x, rows, &[gate, up], gu, &mut scratch)?;
        out.bf16 = true;
        self.launch(k::silu_mul(gu, out.mem.ptr, inter, n))
    }

    fn rope_and_store_kv(
        &self,
        step: &CudaStep,
        _batch: &StepBatch,
        cfg: &ModelConfig,
        q: &mut CudaBuf,
        _k: &mut CudaBuf,
        _v: &CudaBuf,
        kv: &mut CudaKv,
        layer: usize,
    ) -> Result<(), BackendError> {
        self.launch(k::rope_store_kv(
            q.mem.ptr,
            step.cos,
            step.sin,
            step.positions,
            step.slots,
            kv.k[layer].ptr,
            kv.v[layer].ptr,
            step.n_tokens,
            cfg.num_heads,
            cfg.num_kv_heads,
            cfg.head_dim,
        ))
    }

    fn attention(
        &self,
        step: &CudaStep,
        batch: &StepBatch,
        cfg: &ModelConfig,
        q: &CudaBuf,
        kv: &CudaKv,
        layer: usize,
        out: &mut CudaBuf,
    ) -> Result<(), BackendError> {
        let group = cfg.num_heads / cfg.num_kv_heads.max(1);
        if group > MAX_GROUP || cfg.head_dim > MAX_HEAD_DIM || !cfg.head_dim.is_multiple_of(2) {
            return Err(BackendError::Unsupported(format!(
                "the CUDA attention kernel handles up to {MAX_GROUP} query heads per KV head \
                 and head_dim <= {MAX_HEAD_DIM} (this model: {group}, {})",
                cfg.head_dim
            )));
        }
        let t = step.n_tokens;
        // The step's decode tokens come first (the scheduler plans decodes before prompt
        // chunks): they take sg_attention (split by their count), the rest the tensor-core
        // prefill kernel, so that a token's result does not depend on what else the step
        // holds. Head sizes without a tensor-core kernel take sg_attention throughout.
        let decode = if k::prefill_attention_kernel_name(cfg.head_dim).is_some() {
            batch.seqs.iter().take_while(|s| s.num_tokens == 1).count()
        } else {
            t
        };
        // from the batch and the GPU only: each token's kernel divides its own context
        let splits = super::split::attention_splits(decode, cfg.num_kv_heads, self.sms);
        let mut scratch = self.scratch.lock();
        let (ml, acc) = if splits > 1 && decode > 0 {
            let rows = decode * cfg.num_heads * splits;
            self.ensure(&mut scratch.attn_ml, rows * 2 * 4)?;
            self.ensure(&mut scratch.attn_acc, rows * cfg.head_dim * 4)?;
            (
                scratch.attn_ml.as_ref().expect("ensured").ptr,
                scratch.attn_acc.as_ref().expect("ensured").ptr,
            )
        } else {
            (0, 0) // not read with one split
        };
        out.bf16 = true;
        let a = k::Attention {
            q: q.mem.ptr,
            // q's rows are [q | k | v] (see `qkv`)
            q_stride: (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim,
            k_cache: kv.k[layer].ptr,
            v_cache: kv.v[layer].ptr,
            out: out.mem.ptr,
            positions: step.positions,
            token_seq: step.token_seq,
            seq_table_start: step.seq_table_start,
            block_tables: step.block_tables,
            tokens: t,
            page_size: batch.page_size,
            q_heads: cfg.num_heads,
            kv_heads: cfg.num_kv_heads,
            head_dim: cfg.head_dim,
            splits,
            min_split_len: super::split::MIN_SPLIT_LEN,
            ml,
            acc,
        };
        if decode > 0 {
            for l in (k::Attention {
                tokens: decode,
                ..a
            })
            .launches()
            {
                self.launch(l)?;
            }
        }
        match a.prefill_launch(decode).filter(|_| decode < t) {
            Some(l) => self.launch(l),
            None => Ok(()),
        }
    }

    fn gather_rows(
        &self,
        step: &CudaStep,
        x: &CudaBuf,
        rows: &[u32],
        width: usize,
        out: &mut CudaBuf,
    ) -> Result<(), BackendError> {
        if rows.is_empty() {
            return Ok(());
        }
        if !x.bf16 {
            return Err(BackendError::Internal(
                "gather_rows on the CUDA backend takes the bf16 rows a norm wrote".into(),
            ));
        }
        out.bf16 = true;
        // the rows are the step's logits rows, sent with its input
        self.launch(k::gather_rows(
            x.mem.ptr,
            step.logit_rows,
            out.mem.ptr,
            rows.len(),
            width,
        ))
    }

    fn all_reduce(
        &self,
        _comm: &dyn Communicator,
        _buf: &mut CudaBuf,
        _len: usize,
    ) -> Result<(), BackendError> {
        Err(BackendError::Unsupported(
            "tensor parallelism on the GPU needs the NCCL communicator, which is not built yet"
                .into(),
        ))
    }

    fn all_gather(
        &self,
        comm: &dyn Communicator,
        _local: &CudaBuf,
        _len: usize,
        out: &mut CudaBuf,
        _total: usize,
    ) -> Result<(), BackendError> {
        self.all_reduce(comm, out, 0)
    }

    fn samples_on_device(&self) -> bool {
        true
    }

    /// Sampling on its own (the step's input was sent without its sampling rows): the rows
    /// and lists in one copy, the results back in one.
    fn sample(
        &self,
        logits: &CudaBuf,
        vocab: usize,
        samples: &SampleBatch,
    ) -> Result<Vec<TokenInfo>, BackendError> {
        self.bind()?;
        let rows = samples.len();
        if rows == 0 {
            return Ok(Vec::new());
        }
        let (l, base) = {
            let mut m = self.sample_meta.lock();
            let l = step_meta::pack(&StepBatch::default(), Some(samples), &mut m.host);
            (l, self.send(&mut m, l.words)?)
        };
        let at = |words: usize| base + (words * 4) as u64;
        self.launch_sample(logits, vocab, rows, at(l.sample_rows), base)?;
        self.read_samples(samples)
    }

    fn captures_graphs(&self) -> bool {
        true
    }

    fn stage(&self, batch: &StepBatch, samples: &SampleBatch) -> Result<(), BackendError> {
        self.bind()?;
        let mut m = self.meta.lock();
        let layout = step_meta::pack(batch, Some(samples), &mut m.host);
        let base = self.send(&mut m, layout.words)?;
        *self.staged.lock() = Some(Staged { layout, base });
        Ok(())
    }

    fn unstage(&self) {
        *self.staged.lock() = None;
    }

    fn sample_staged(&self, logits: &CudaBuf, vocab: usize) -> Result<(), BackendError> {
        let Some(Staged { layout: l, base }) = *self.staged.lock() else {
            return Err(BackendError::Internal(
                "sample_staged without a staged step".into(),
            ));
        };
        let rows = l.sample_row_count();
        if rows == 0 {
            return Ok(());
        }
        self.launch_sample(logits, vocab, rows, base + (l.sample_rows * 4) as u64, base)
    }

    fn send_samples_back(&self, samples: &SampleBatch) -> Result<(), BackendError> {
        self.bind()?;
        let mut b = self.sample_bufs.lock();
        let b = &mut *b;
        let o = b.out_layout;
        let rows = samples.len();
        if rows > o.rows {
            return Err(BackendError::Internal(format!(
                "{rows} sampling rows read, {} sampled",
                o.rows
            )));
        }
        if b.pending.len() == b.out.slots.len() {
            return Err(BackendError::Internal(
                "a third copy of sampling results before the first was taken".into(),
            ));
        }
        let wants_top = samples.rows.iter().any(|r| r.n_top > 0);
        let words = if rows == 0 {
            0
        } else {
            o.words_to_read(wants_top)
        };
        let i = b.out.take_slot();
        if words > 0 {
            let slot = &mut b.out.slots[i];
            self.slot_fit(slot, words * 4)?;
            let src = b.out.dev.as_ref().expect("sampled into it").ptr;
            // SAFETY: the slot's pinned buffer holds `words` and no copy uses it (slot_fit);
            // it is read only after the fence recorded next (`take_samples`).
            let host =
                unsafe { std::slice::from_raw_parts_mut(slot.pinned.ptr as *mut u32, words) };
            // SAFETY: the output array holds `o.words` >= `words`.
            unsafe { self.drv.dtoh_async(host, src) }?;
            self.fence(slot)?;
        }
        b.pending.push_back(Readback {
            slot: i,
            layout: o,
            words,
        });
        Ok(())
    }

    fn take_samples(&self, samples: &SampleBatch) -> Result<Vec<TokenInfo>, BackendError> {
        self.bind()?;
        let mut b = self.sample_bufs.lock();
        let b = &mut *b;
        let Some(r) = b.pending.pop_front() else {
            return Err(BackendError::Internal(
                "sampling results taken that were not sent back".into(),
            ));
        };
        let rows = samples.len();
        if rows == 0 {
            return Ok(Vec::new());
        }
        let o = r.layout;
        if rows > o.rows || r.words < o.top_ids {
            return Err(BackendError::Internal(format!(
                "{rows} sampling rows taken from a copy of {} rows",
                o.rows
            )));
        }
        let slot = &b.out.slots[r.slot];
        if let Some(ev) = &slot.event {
            // the step's one wait
            self.drv.wait(ev, slot.fence)?;
        }
        // SAFETY: the copy into the slot's `words` has completed (waited above).
        let host = unsafe { std::slice::from_raw_parts(slot.pinned.ptr as *const u32, r.words) };
        let f = |w: u32| f32::from_bits(w);
        Ok((0..rows)
            .map(|i| {
                let n = samples.rows[i].n_top as usize;
                let top = |k: usize| i * MAX_TOP_LOGPROBS + k;
                TokenInfo {
                    token_id: host[o.token + i],
                    logprob: if samples.want_logprob[i] {
                        f(host[o.logprob + i])
                    } else {
                        0.0
                    },
                    top_logprobs: (0..n)
                        .map(|k| TokenLogprob {
                            token_id: host[o.top_ids + top(k)],
                            logprob: f(host[o.top_logprobs + top(k)]),
                        })
                        .collect(),
                }
            })
            .collect())
    }

    fn begin_capture(&self) -> Result<(), BackendError> {
        self.bind()?;
        if self.staged.lock().is_none() {
            return Err(BackendError::Internal(
                "a capture reads a staged step's input".into(),
            ));
        }
        self.drv.begin_capture()
    }

    fn end_capture(&self) -> Result<CudaGraph, BackendError> {
        let graph = self.drv.end_capture()?;
        let staged = (*self.staged.lock()).ok_or_else(|| {
            BackendError::Internal("the staged input was dropped during a capture".into())
        })?;
        Ok(CudaGraph {
            graph,
            staged,
            drv: self.drv.clone(),
        })
    }

    fn replay(&self, g: &CudaGraph) -> Result<(), BackendError> {
        self.bind()?;
        let Some(now) = *self.staged.lock() else {
            return Err(BackendError::Internal(
                "a replay without a staged step".into(),
            ));
        };
        if now.base != g.staged.base || !now.layout.same_fixed_part(&g.staged.layout) {
            return Err(BackendError::Internal(format!(
                "a graph captured for {:?} replayed on {:?}",
                g.staged.layout, now.layout
            )));
        }
        self.drv.launch_graph(&g.graph)?;
        // the output layout is the one the capture's sampling set
        self.sample_bufs.lock().out_layout = OutLayout::new(now.layout.sample_row_count());
        Ok(())
    }

    fn memory_epoch(&self) -> u64 {
        self.drv.allocations()
    }

    fn memory_used(&self) -> Option<usize> {
        self.memory().ok().map(|(free, total)| total - free)
    }

    fn upload(&self, data: &[f32], out: &mut CudaBuf) -> Result<(), BackendError> {
        out.bf16 = false;
        self.htod(&out.mem, data)
    }

    fn to_host<'a>(&self, buf: &'a CudaBuf, len: usize) -> Result<Cow<'a, [f32]>, BackendError> {
        self.bind()?;
        if buf.bf16 {
            let mut bits = vec![0u16; len];
            // SAFETY: `buf` holds at least `len` bf16 values.
            unsafe { self.drv.dtoh(&mut bits, buf.mem.ptr) }?;
            let host = bits
                .into_iter()
                .map(|b| half::bf16::from_bits(b).to_f32())
                .collect();
            return Ok(Cow::Owned(host));
        }
        let mut host = vec![0f32; len];
        // SAFETY: `buf` holds at least `len` f32 values.
        unsafe { self.drv.dtoh(&mut host, buf.mem.ptr) }?;
        Ok(Cow::Owned(host))
    }
}

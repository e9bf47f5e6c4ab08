//! What the CUDA backend asks of a device, in one place: memory, copies, kernel launches, the
//! bf16 matrix product, synchronisation. [`Driver::Cuda`] is the real GPU (cudarc: the
//! driver API and cuBLAS on one stream). [`Driver::Emulated`] runs the same kernels of
//! `csrc/` on the CPU through the emulation library the tests build
//! (`tests/kernel_emu`), with host memory standing in for device memory and a plain f32
//! product following cuBLAS's column-major contract: it lets CI run the backend's own host
//! code (buffer sizes, launch shapes, argument order, cuBLAS operands) end to end on
//! machines without a GPU. It is chosen by the path to that library given to [`Driver::open`]
//! (`EngineConfig::cuda_emulator`) and is far too slow to serve with.
//!
//! Stream capture (CUDA graphs) is part of the contract: between [`Driver::begin_capture`] and
//! [`Driver::end_capture`] launches, products and copies from pinned memory are recorded,
//! not run, and [`Driver::launch_graph`] replays them. A call a capture cannot hold
//! (synchronisation, allocation, freeing, a copy from pageable memory or to the host) fails
//! there, naming the call, and invalidates the capture, on both drivers: the real one
//! because the CUDA driver refuses it (thread-local capture mode), the emulator because it
//! checks the same rules. The emulator also logs each copy, synchronisation and graph launch
//! in its launch log (`cuMemcpyHtoDAsync`, `cuMemcpyDtoHAsync`, `cuStreamSynchronize`,
//! `cuEventSynchronize`, `cuGraphLaunch`), so tests count what a step costs the host.
//!
//! Copies between pinned host memory and the device are asynchronous, and the host learns that
//! one has completed from a synchronisation or an event recorded after it ([`Driver::record`],
//! [`Driver::wait`]). The emulator runs device work at once but holds back what the host can
//! see of such a copy until a wait covers it, as a GPU would: a copy back lands in its pinned
//! destination only then (which holds a poison pattern before), and a pinned source written
//! again before the wait that covers its copy fails that wait, naming the address. So host
//! code that reads a result early or reuses a buffer too soon fails on the emulator too.

use std::ffi::{c_void, CString};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use cudarc::cublas::result as blas;
use cudarc::cublas::sys as blas_sys;
use cudarc::driver::result as drv;
use cudarc::driver::sys;
use cudarc::driver::CudaContext;
use parking_lot::Mutex;

use super::super::BackendError;

/// `SGLANG_CUDA_SYNC_LAUNCHES=1`: synchronise after every kernel launch, so that a kernel
/// that faults is named (with its grid and block) where it fails instead of at the next
/// synchronisation. For debugging a first run; it serialises the host with the GPU.
pub const SYNC_LAUNCHES_ENV: &str = "SGLANG_CUDA_SYNC_LAUNCHES";

fn dev_err(what: &str, e: impl std::fmt::Debug) -> BackendError {
    BackendError::Device {
        call: what.to_string(),
        message: format!("{e:?}"),
    }
}

/// A kernel: its handle in the loaded module (real GPU) and its name (emulator, errors).
pub(super) struct Func {
    f: sys::CUfunction,
    name: &'static str,
    cname: CString,
}

/// A launch, as errors name it.
#[derive(Clone, Copy)]
struct Launched {
    name: &'static str,
    grid: (u32, u32, u32),
    block: u32,
    shared: u32,
}

impl std::fmt::Display for Launched {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (x, y, z) = self.grid;
        write!(
            f,
            "{} (grid {x}x{y}x{z}, block {}, {} bytes of dynamic shared memory)",
            self.name, self.block, self.shared
        )
    }
}

/// cuBLAS's own workspace (set explicitly so that a captured product never allocates; 32 MiB
/// is what NVIDIA recommends for Hopper).
const CUBLAS_WORKSPACE_BYTES: usize = 32 << 20;

pub(super) struct Real {
    ctx: Arc<CudaContext>,
    stream: sys::CUstream,
    module: sys::CUmodule,
    blas: blas_sys::cublasHandle_t,
    blas_workspace: sys::CUdeviceptr,
    /// SGLANG_CUDA_SYNC_LAUNCHES: synchronise (and name the kernel) after every launch.
    sync_launches: bool,
    /// The last kernel queued, named by a failed synchronisation (kernel faults surface
    /// there).
    last: Mutex<Option<Launched>>,
    allocations: AtomicU64,
    fences: Fences,
}

type EmuLaunch = unsafe extern "C" fn(
    *const std::ffi::c_char,
    u32,
    u32,
    u32,
    u32,
    usize,
    *mut *mut c_void,
) -> i32;

pub(super) struct Emulated {
    _lib: libloading::Library,
    launch: EmuLaunch,
    /// The reason of the last failed launch (a NUL-terminated string owned by the library).
    last_error: unsafe extern "C" fn() -> *const std::ffi::c_char,
    /// Counts a cuBLAS product in the emulator's launch log (as "cublas_gemm").
    log_external: unsafe extern "C" fn(*const std::ffi::c_char),
    /// The same with the bytes the product read and wrote.
    log_external_bytes: unsafe extern "C" fn(*const std::ffi::c_char, u64, u64),
    /// Tells the emulator which memory is device memory (the kernels' byte counts).
    device_memory: unsafe extern "C" fn(u64, u64, i32),
    /// Live allocations (address -> layout), for `free` and the memory report.
    allocs: Mutex<std::collections::HashMap<u64, std::alloc::Layout>>,
    /// The pinned ones among them (address -> bytes): the only host memory a captured copy
    /// may read.
    pinned: Mutex<std::collections::HashMap<u64, usize>>,
    /// The capture in progress: what it recorded, and the first call it could not hold.
    capture: Mutex<Option<(Vec<Op>, Option<String>)>>,
    allocations: AtomicU64,
    fences: Fences,
    /// What the host may not see yet of the asynchronous copies queued (see the module).
    host_effects: Mutex<Vec<HostEffect>>,
}

/// Ordinals of the stream's asynchronous work: each fence recorded (and, on the emulator,
/// each copy touching pinned memory) takes the next; `completed` is the highest one the host
/// has waited for (the stream runs in order, so everything below it has completed too).
#[derive(Default)]
struct Fences {
    issued: AtomicU64,
    completed: AtomicU64,
}

impl Fences {
    fn next(&self) -> u64 {
        self.issued.fetch_add(1, Ordering::Relaxed) + 1
    }
    fn done(&self, upto: u64) {
        self.completed.fetch_max(upto, Ordering::Relaxed);
    }
    fn all_done(&self) {
        self.done(self.issued.load(Ordering::Relaxed));
    }
    fn is_done(&self, seq: u64) -> bool {
        self.completed.load(Ordering::Relaxed) >= seq
    }
}

/// An asynchronous copy's effect on pinned host memory, held back by the emulator until a
/// wait covers the copy (its ordinal `seq`).
struct HostEffect {
    seq: u64,
    at: u64,
    bytes: Vec<u8>,
    /// A copy back (the bytes land at `at`), or a copy from `at` (which must still hold
    /// `bytes`).
    lands: bool,
}

/// A CUDA event the backend records after a copy and waits on before it touches the copy's
/// pinned memory again (null on the emulator, which tracks ordinals only).
pub(super) struct Event {
    ev: sys::CUevent,
    drv: Arc<Driver>,
}

// SAFETY: as for `Driver`: used under the engine's step discipline, context bound first.
unsafe impl Send for Event {}

impl Event {
    pub(super) fn new(drv: &Arc<Driver>) -> Result<Self, BackendError> {
        let ev = match &**drv {
            Driver::Cuda(r) => {
                r.bind()?;
                drv::event::create(sys::CUevent_flags::CU_EVENT_DISABLE_TIMING)
                    .map_err(|e| dev_err("cuEventCreate", e))?
            }
            Driver::Emulated(_) => std::ptr::null_mut(),
        };
        Ok(Self {
            ev,
            drv: drv.clone(),
        })
    }
}

impl Drop for Event {
    fn drop(&mut self) {
        if let Driver::Cuda(r) = &*self.drv {
            if r.bind().is_ok() {
                // SAFETY: created by `Event::new`, destroyed once.
                let _ = unsafe { drv::event::destroy(self.ev) };
            }
        }
    }
}

/// One operation a capture recorded on the emulator.
pub(super) enum Op {
    Launch {
        f: CString,
        name: &'static str,
        grid: (u32, u32, u32),
        block: u32,
        shared: u32,
        /// The parameters' values (each in an 8-byte slot, as `Launch` packs them).
        slots: Vec<u64>,
    },
    Gemm([usize; 9]),
    Htod {
        dst: u64,
        src: u64,
        bytes: usize,
    },
}

/// An instantiated graph: the real driver's, or the emulator's recorded operations.
pub(super) enum Graph {
    Cuda {
        graph: sys::CUgraph,
        exec: sys::CUgraphExec,
    },
    Emulated(Vec<Op>),
}

pub(super) enum Driver {
    Cuda(Real),
    Emulated(Emulated),
}

// SAFETY: the raw handles are used under the engine's single-threaded step discipline (the
// context is made current before each use); the emulator serialises its launches.
unsafe impl Send for Driver {}
unsafe impl Sync for Driver {}

/// Bytes the emulated device reports as its memory.
const EMULATED_MEMORY: usize = 8 << 30;

impl Driver {
    /// GPU `ordinal` through cudarc, or the emulation library at `emulator`. Returns the
    /// driver, the device's name and its multiprocessor count.
    pub(super) fn open(
        ordinal: usize,
        emulator: Option<&std::path::Path>,
    ) -> Result<(Arc<Self>, String, usize), BackendError> {
        if let Some(path) = emulator {
            // SAFETY: the library is the emulation build of our own csrc/ (tests/kernel_emu);
            // its initialisers only set up globals.
            let lib = unsafe { libloading::Library::new(path) }
                .map_err(|e| dev_err(&format!("the CUDA emulator {}", path.display()), e))?;
            // SAFETY: the symbol has this signature in the generated emulator unit.
            let launch = unsafe { lib.get::<EmuLaunch>(b"sg_emu_launch") }
                .map(|s| *s)
                .map_err(|e| dev_err("sg_emu_launch in the emulator", e))?;
            // SAFETY: as above.
            let last_error = unsafe {
                lib.get::<unsafe extern "C" fn() -> *const std::ffi::c_char>(b"sg_emu_last_error")
            }
            .map(|s| *s)
            .map_err(|e| dev_err("sg_emu_last_error in the emulator", e))?;
            // SAFETY: as above.
            let log_external = unsafe {
                lib.get::<unsafe extern "C" fn(*const std::ffi::c_char)>(b"sg_emu_log_external")
            }
            .map(|s| *s)
            .map_err(|e| dev_err("sg_emu_log_external in the emulator", e))?;
            // SAFETY: as above.
            let log_external_bytes = unsafe {
                lib.get::<unsafe extern "C" fn(*const std::ffi::c_char, u64, u64)>(
                    b"sg_emu_log_external_bytes",
                )
            }
            .map(|s| *s)
            .map_err(|e| dev_err("sg_emu_log_external_bytes in the emulator", e))?;
            // SAFETY: as above.
            let device_memory =
                unsafe { lib.get::<unsafe extern "C" fn(u64, u64, i32)>(b"sg_emu_device_memory") }
                    .map(|s| *s)
                    .map_err(|e| dev_err("sg_emu_device_memory in the emulator", e))?;
            let d = Emulated {
                _lib: lib,
                launch,
                last_error,
                log_external,
                log_external_bytes,
                device_memory,
                allocs: Mutex::new(Default::default()),
                pinned: Mutex::new(Default::default()),
                capture: Mutex::new(None),
                allocations: AtomicU64::new(0),
                fences: Fences::default(),
                host_effects: Mutex::new(Vec::new()),
            };
            return Ok((
                Arc::new(Driver::Emulated(d)),
                "CUDA emulator (CPU)".into(),
                8,
            ));
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| dev_err("CUDA context", e))?;
        ctx.bind_to_thread()
            .map_err(|e| dev_err("bind context", e))?;
        let name = ctx.name().unwrap_or_else(|_| "GPU".into());
        let sms = ctx
            .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(|e| dev_err("device attributes", e))? as usize;
        let stream = drv::stream::create(drv::stream::StreamKind::NonBlocking)
            .map_err(|e| dev_err("create stream", e))?;
        // SAFETY: FATBIN is a complete fatbin image built by nvcc (build.rs).
        let module = unsafe { drv::module::load_data(super::FATBIN.as_ptr() as *const c_void) }
            .map_err(|e| {
                dev_err(
                    "load the kernels (built for sm_80/sm_90a + compute_80 PTX; the driver must \
                     support CUDA 13.0)",
                    e,
                )
            })?;
        let handle = blas::create_handle().map_err(|e| dev_err("cuBLAS", e))?;
        // SAFETY: both handles are valid; the cast only changes the pointee's nominal type.
        unsafe { blas::set_stream(handle, stream as blas_sys::cudaStream_t) }
            .map_err(|e| dev_err("cuBLAS stream", e))?;
        // SAFETY: a fresh allocation, handed to cuBLAS for the handle's lifetime (freed after
        // the handle in Drop).
        let blas_workspace = unsafe { drv::malloc_sync(CUBLAS_WORKSPACE_BYTES) }
            .map_err(|e| dev_err("cuBLAS workspace", e))?;
        // SAFETY: the handle and the workspace are valid.
        unsafe {
            blas_sys::cublasSetWorkspace_v2(
                handle,
                blas_workspace as *mut c_void,
                CUBLAS_WORKSPACE_BYTES,
            )
        }
        .result()
        .map_err(|e| dev_err("cuBLAS workspace", e))?;
        let sync_launches = std::env::var(SYNC_LAUNCHES_ENV).is_ok_and(|v| v == "1");
        if sync_launches {
            tracing::warn!(
                "{SYNC_LAUNCHES_ENV}=1: synchronising after every kernel launch (slow; for \
                 finding a faulting kernel)"
            );
        }
        let real = Real {
            ctx,
            stream,
            module,
            blas: handle,
            blas_workspace,
            sync_launches,
            last: Mutex::new(None),
            allocations: AtomicU64::new(0),
            fences: Fences::default(),
        };
        Ok((Arc::new(Driver::Cuda(real)), name, sms))
    }

    pub(super) fn is_emulated(&self) -> bool {
        matches!(self, Driver::Emulated(_))
    }

    pub(super) fn function(&self, name: &'static str) -> Result<Func, BackendError> {
        let cname = CString::new(name).expect("kernel names have no NUL");
        let f = match self {
            Driver::Cuda(r) => {
                r.bind()?;
                // SAFETY: the module is loaded and its context current.
                unsafe { drv::module::get_function(r.module, cname.clone()) }
                    .map_err(|e| dev_err(&format!("kernel {name}"), e))?
            }
            Driver::Emulated(_) => std::ptr::null_mut(),
        };
        Ok(Func { f, name, cname })
    }

    /// Makes the context current on this thread (the driver's handles are per thread). Every
    /// call into the real driver below does this first (a check of the current context when
    /// it already is), so no path of any thread reaches the driver without it.
    pub(super) fn bind(&self) -> Result<(), BackendError> {
        match self {
            Driver::Cuda(r) => r.bind(),
            Driver::Emulated(_) => Ok(()),
        }
    }

    pub(super) fn alloc(&self, bytes: usize) -> Result<sys::CUdeviceptr, BackendError> {
        let oom = |e: &dyn std::fmt::Debug| {
            BackendError::OutOfMemory(format!("cannot allocate {bytes} bytes on the GPU: {e:?}"))
        };
        match self {
            Driver::Cuda(r) => {
                self.bind()?;
                r.allocations.fetch_add(1, Ordering::Relaxed);
                // SAFETY: a fresh allocation of at least one byte.
                unsafe { drv::malloc_sync(bytes.max(1)) }.map_err(|e| oom(&e))
            }
            Driver::Emulated(e) => {
                e.refuse_in_capture("cuMemAlloc")?;
                e.allocations.fetch_add(1, Ordering::Relaxed);
                let layout =
                    std::alloc::Layout::from_size_align(bytes.max(1), 256).map_err(|x| oom(&x))?;
                // SAFETY: a non-zero size; NaN-poisoned like fresh GPU memory is garbage.
                let p = unsafe { std::alloc::alloc(layout) };
                if p.is_null() {
                    return Err(oom(&"host allocation failed"));
                }
                // SAFETY: `p` holds layout.size() bytes.
                unsafe { std::ptr::write_bytes(p, 0xff, layout.size()) };
                e.allocs.lock().insert(p as u64, layout);
                // SAFETY: a plain call into the library (it records the range).
                unsafe { (e.device_memory)(p as u64, layout.size() as u64, 1) };
                Ok(p as u64)
            }
        }
    }

    pub(super) fn free(&self, ptr: sys::CUdeviceptr) {
        match self {
            Driver::Cuda(_) => {
                if self.bind().is_ok() {
                    // SAFETY: allocated by `alloc` and freed once.
                    let _ = unsafe { drv::free_sync(ptr) };
                }
            }
            Driver::Emulated(e) => {
                // (freed all the same: the capture fails at its end)
                let _ = e.refuse_in_capture("cuMemFree");
                if let Some(len) = e.pinned.lock().remove(&ptr) {
                    // (a copy still queued on it is the caller's bug; its effect is dropped)
                    let end = ptr + len as u64;
                    e.host_effects.lock().retain(|h| h.at < ptr || h.at >= end);
                }
                if let Some(layout) = e.allocs.lock().remove(&ptr) {
                    // SAFETY: a plain call into the library; then allocated by `alloc` with
                    // this layout, freed once.
                    unsafe {
                        (e.device_memory)(ptr, 0, 0);
                        std::alloc::dealloc(ptr as *mut u8, layout)
                    };
                }
            }
        }
    }

    /// Pinned host memory (the staging buffer of weight uploads).
    pub(super) fn alloc_host(&self, bytes: usize) -> Result<*mut c_void, BackendError> {
        match self {
            Driver::Cuda(r) => {
                r.bind()?;
                // SAFETY: a pinned allocation, freed by `free_host`.
                unsafe { drv::malloc_host(bytes, 0) }
                    .map_err(|e| dev_err("pinned staging buffer", e))
            }
            Driver::Emulated(e) => {
                e.refuse_in_capture("cuMemAllocHost")?;
                let p = self.alloc(bytes)?;
                e.pinned.lock().insert(p, bytes);
                Ok(p as *mut c_void)
            }
        }
    }

    /// Device allocations made so far: a captured graph holds the addresses it was captured
    /// with, so an allocation after a capture may have moved a buffer it uses (the backend
    /// compares this count before replaying).
    pub(super) fn allocations(&self) -> u64 {
        match self {
            Driver::Cuda(r) => r.allocations.load(Ordering::Relaxed),
            Driver::Emulated(e) => e.allocations.load(Ordering::Relaxed),
        }
    }

    pub(super) fn free_host(&self, p: *mut c_void) {
        match self {
            Driver::Cuda(r) => {
                if r.bind().is_ok() {
                    // SAFETY: allocated by malloc_host, freed once.
                    let _ = unsafe { drv::free_host(p) };
                }
            }
            Driver::Emulated(_) => self.free(p as u64),
        }
    }

    /// Free and total device memory, bytes.
    pub(super) fn memory(&self) -> Result<(usize, usize), BackendError> {
        match self {
            Driver::Cuda(_) => {
                self.bind()?;
                drv::mem_get_info().map_err(|e| dev_err("memory info", e))
            }
            Driver::Emulated(e) => {
                let used: usize = e.allocs.lock().values().map(|l| l.size()).sum();
                Ok((EMULATED_MEMORY.saturating_sub(used), EMULATED_MEMORY))
            }
        }
    }

    /// Queues a copy of `src` to `dst` (the caller checked the size). Pageable memory is
    /// staged by the driver before the call returns, so `src` may be dropped afterwards.
    ///
    /// # Safety
    /// `dst` holds at least `size_of_val(src)` bytes; for pinned `src`, it is not touched
    /// until the stream has finished the copy.
    pub(super) unsafe fn htod<T>(
        &self,
        dst: sys::CUdeviceptr,
        src: &[T],
    ) -> Result<(), BackendError> {
        match self {
            Driver::Cuda(r) => {
                r.bind()?;
                drv::memcpy_htod_async(dst, src, r.stream)
                    .map_err(|e| r.named(dev_err("copy to device", e)))
            }
            Driver::Emulated(e) => {
                let n = std::mem::size_of_val(src);
                (e.log_external)(c"cuMemcpyHtoDAsync".as_ptr());
                let from = src.as_ptr() as u64;
                if let Some((ops, _)) = e.capture.lock().as_mut() {
                    if e.is_pinned(from, n) {
                        ops.push(Op::Htod {
                            dst,
                            src: from,
                            bytes: n,
                        });
                        return Ok(());
                    }
                }
                if !e.is_pinned(from, n) {
                    e.refuse_in_capture("cuMemcpyHtoDAsync from pageable memory")?;
                } else {
                    e.refuse_in_capture("cuMemcpyHtoDAsync")?;
                    // the source must hold these bytes until a wait covers the copy
                    let bytes = std::slice::from_raw_parts(from as *const u8, n).to_vec();
                    e.host_effects.lock().push(HostEffect {
                        seq: e.fences.next(),
                        at: from,
                        bytes,
                        lands: false,
                    });
                }
                std::ptr::copy_nonoverlapping(src.as_ptr() as *const u8, dst as *mut u8, n);
                Ok(())
            }
        }
    }

    /// Copies `dst.len()` values from `src` and waits for the stream.
    ///
    /// # Safety
    /// `src` holds at least `size_of_val(dst)` bytes.
    pub(super) unsafe fn dtoh<T>(
        &self,
        dst: &mut [T],
        src: sys::CUdeviceptr,
    ) -> Result<(), BackendError> {
        if !dst.is_empty() {
            match self {
                Driver::Cuda(r) => {
                    r.bind()?;
                    drv::memcpy_dtoh_async(dst, src, r.stream)
                        .map_err(|e| r.named(dev_err("copy to host", e)))?
                }
                Driver::Emulated(e) => {
                    (e.log_external)(c"cuMemcpyDtoHAsync".as_ptr());
                    e.refuse_in_capture("cuMemcpyDtoHAsync")?;
                    let n = std::mem::size_of_val(dst);
                    std::ptr::copy_nonoverlapping(src as *const u8, dst.as_mut_ptr() as *mut u8, n);
                }
            }
        }
        self.sync()
    }

    /// Queues a copy of `dst.len()` values from `src` into pinned memory; they are there once
    /// a wait covers the copy ([`Driver::record`] after it, then [`Driver::wait`]).
    ///
    /// # Safety
    /// `dst` is pinned (`alloc_host`) and not read or written before that wait; `src` holds
    /// at least `size_of_val(dst)` bytes.
    pub(super) unsafe fn dtoh_async<T>(
        &self,
        dst: &mut [T],
        src: sys::CUdeviceptr,
    ) -> Result<(), BackendError> {
        let n = std::mem::size_of_val(dst);
        match self {
            Driver::Cuda(r) => {
                r.bind()?;
                drv::memcpy_dtoh_async(dst, src, r.stream)
                    .map_err(|e| r.named(dev_err("copy to host", e)))
            }
            Driver::Emulated(e) => {
                (e.log_external)(c"cuMemcpyDtoHAsync".as_ptr());
                e.refuse_in_capture("cuMemcpyDtoHAsync")?;
                let at = dst.as_mut_ptr() as u64;
                if !e.is_pinned(at, n) {
                    return Err(dev_err(
                        "cuMemcpyDtoHAsync",
                        "an asynchronous copy back into pageable memory",
                    ));
                }
                // the data as the stream has it now; the destination holds garbage until a
                // wait covers the copy
                let bytes = std::slice::from_raw_parts(src as *const u8, n).to_vec();
                std::ptr::write_bytes(at as *mut u8, 0xff, n);
                e.host_effects.lock().push(HostEffect {
                    seq: e.fences.next(),
                    at,
                    bytes,
                    lands: true,
                });
                Ok(())
            }
        }
    }

    /// Records `ev` after the work queued so far; returns the fence's ordinal for
    /// [`Driver::wait`].
    pub(super) fn record(&self, ev: &Event) -> Result<u64, BackendError> {
        match self {
            Driver::Cuda(r) => {
                r.bind()?;
                // SAFETY: a live event and the backend's stream.
                unsafe { drv::event::record(ev.ev, r.stream) }
                    .map_err(|e| dev_err("cuEventRecord", e))?;
                Ok(r.fences.next())
            }
            Driver::Emulated(e) => {
                e.refuse_in_capture("cuEventRecord")?;
                Ok(e.fences.next())
            }
        }
    }

    /// Waits until the work queued before the fence `seq` (recorded on `ev`) has completed;
    /// no wait when a later wait or synchronisation already covered it.
    pub(super) fn wait(&self, ev: &Event, seq: u64) -> Result<(), BackendError> {
        match self {
            Driver::Cuda(r) => {
                if r.fences.is_done(seq) {
                    return Ok(());
                }
                r.bind()?;
                // SAFETY: a live event recorded on this context's stream.
                unsafe { drv::event::synchronize(ev.ev) }
                    .map_err(|e| r.named(dev_err("cuEventSynchronize", e)))?;
                r.fences.done(seq);
                Ok(())
            }
            Driver::Emulated(e) => {
                if e.fences.is_done(seq) {
                    return Ok(());
                }
                // SAFETY: a NUL-terminated name.
                unsafe { (e.log_external)(c"cuEventSynchronize".as_ptr()) };
                e.refuse_in_capture("cuEventSynchronize")?;
                e.complete(seq)
            }
        }
    }

    pub(super) fn sync(&self) -> Result<(), BackendError> {
        match self {
            Driver::Cuda(r) => {
                r.bind()?;
                // SAFETY: the stream is valid.
                unsafe { drv::stream::synchronize(r.stream) }
                    .map_err(|e| r.named(dev_err("synchronize", e)))?;
                r.fences.all_done();
                Ok(())
            }
            Driver::Emulated(e) => {
                // SAFETY: a NUL-terminated name; the emulator copies it into its log.
                unsafe { (e.log_external)(c"cuStreamSynchronize".as_ptr()) };
                e.refuse_in_capture("cuStreamSynchronize")?;
                e.complete(e.fences.issued.load(Ordering::Relaxed))
            }
        }
    }

    /// Launches `f` on the backend's stream.
    ///
    /// # Safety
    /// `params` points at live values whose types match the kernel's parameters, in order.
    pub(super) unsafe fn launch(
        &self,
        f: &Func,
        grid: (u32, u32, u32),
        block: u32,
        shared: u32,
        params: &mut [*mut c_void],
    ) -> Result<(), BackendError> {
        match self {
            Driver::Cuda(r) => {
                let this = Launched {
                    name: f.name,
                    grid,
                    block,
                    shared,
                };
                r.bind()?;
                drv::launch_kernel(f.f, grid, (block, 1, 1), shared, r.stream, params)
                    .map_err(|e| dev_err(&format!("launch of {this}"), e))?;
                *r.last.lock() = Some(this);
                if r.sync_launches {
                    drv::stream::synchronize(r.stream)
                        .map_err(|e| dev_err(&format!("kernel {this}"), e))?;
                }
                Ok(())
            }
            Driver::Emulated(e) => {
                if let Some((ops, _)) = e.capture.lock().as_mut() {
                    ops.push(Op::Launch {
                        f: f.cname.clone(),
                        name: f.name,
                        grid,
                        block,
                        shared,
                        // each parameter lives in an 8-byte slot (`kernels::Launch`)
                        slots: params.iter().map(|&p| *(p as *const u64)).collect(),
                    });
                    return Ok(());
                }
                e.run(&f.cname, f.name, grid, block, shared, params)
            }
        }
    }

    /// `C = Aᵀ · B` in cuBLAS's column-major terms: A is `k × m` bf16 (lda), B is `k × n`
    /// bf16 (ldb), C is `m × n` f32 (ldc); f32 accumulation.
    ///
    /// # Safety
    /// The pointers are live device buffers of those shapes.
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn gemm_tn_bf16(
        &self,
        m: usize,
        n: usize,
        k: usize,
        a: sys::CUdeviceptr,
        lda: usize,
        b: sys::CUdeviceptr,
        ldb: usize,
        c: sys::CUdeviceptr,
        ldc: usize,
    ) -> Result<(), BackendError> {
        match self {
            Driver::Cuda(r) => {
                r.bind()?;
                let (alpha, beta) = (1.0f32, 0.0f32);
                blas::gemm_ex(
                    r.blas,
                    blas_sys::cublasOperation_t::CUBLAS_OP_T,
                    blas_sys::cublasOperation_t::CUBLAS_OP_N,
                    m as i32,
                    n as i32,
                    k as i32,
                    &alpha as *const f32 as *const c_void,
                    a as *const c_void,
                    blas_sys::cudaDataType::CUDA_R_16BF,
                    lda as i32,
                    b as *const c_void,
                    blas_sys::cudaDataType::CUDA_R_16BF,
                    ldb as i32,
                    &beta as *const f32 as *const c_void,
                    c as *mut c_void,
                    blas_sys::cudaDataType::CUDA_R_32F,
                    ldc as i32,
                    blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                    blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
                )
                .map_err(|e| dev_err("cuBLAS gemm", e))
            }
            Driver::Emulated(e) => {
                let args = [m, n, k, a as usize, lda, b as usize, ldb, c as usize, ldc];
                if let Some((ops, _)) = e.capture.lock().as_mut() {
                    ops.push(Op::Gemm(args));
                    return Ok(());
                }
                emulated_gemm(e, args);
                Ok(())
            }
        }
    }

    /// Starts capturing the stream's work into a graph (see the module's comment).
    pub(super) fn begin_capture(&self) -> Result<(), BackendError> {
        match self {
            Driver::Cuda(r) => {
                r.bind()?;
                // SAFETY: the stream is valid; thread-local mode makes this thread's unsafe
                // calls (allocation, synchronisation) fail during the capture.
                unsafe {
                    sys::cuStreamBeginCapture_v2(
                        r.stream,
                        sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL,
                    )
                }
                .result()
                .map_err(|e| dev_err("cuStreamBeginCapture", e))
            }
            Driver::Emulated(e) => {
                let mut c = e.capture.lock();
                if c.is_some() {
                    return Err(dev_err("cuStreamBeginCapture", "a capture is in progress"));
                }
                *c = Some((Vec::new(), None));
                Ok(())
            }
        }
    }

    /// Ends the capture and instantiates its graph; fails (naming the first call the capture
    /// could not hold) when the capture was invalidated.
    pub(super) fn end_capture(&self) -> Result<Graph, BackendError> {
        match self {
            Driver::Cuda(r) => {
                r.bind()?;
                let mut graph = std::ptr::null_mut();
                // SAFETY: the stream is capturing (or the call fails and says so).
                unsafe { sys::cuStreamEndCapture(r.stream, &mut graph) }
                    .result()
                    .map_err(|e| dev_err("cuStreamEndCapture (the capture was invalidated)", e))?;
                let mut exec = std::ptr::null_mut();
                // SAFETY: `graph` is the graph just captured.
                if let Err(e) =
                    unsafe { sys::cuGraphInstantiateWithFlags(&mut exec, graph, 0) }.result()
                {
                    // SAFETY: destroyed once, not used again.
                    unsafe { sys::cuGraphDestroy(graph) };
                    return Err(dev_err("cuGraphInstantiate", e));
                }
                Ok(Graph::Cuda { graph, exec })
            }
            Driver::Emulated(e) => match e.capture.lock().take() {
                None => Err(dev_err("cuStreamEndCapture", "no capture in progress")),
                Some((_, Some(call))) => Err(BackendError::Device {
                    call: "cuStreamEndCapture".into(),
                    message: format!(
                        "the capture was invalidated by {call}, which a captured stream cannot \
                         hold"
                    ),
                }),
                Some((ops, None)) => Ok(Graph::Emulated(ops)),
            },
        }
    }

    /// Queues a replay of `graph` on the stream.
    pub(super) fn launch_graph(&self, graph: &Graph) -> Result<(), BackendError> {
        match (self, graph) {
            (Driver::Cuda(r), Graph::Cuda { exec, .. }) => {
                r.bind()?;
                // SAFETY: an instantiated graph of this context.
                unsafe { sys::cuGraphLaunch(*exec, r.stream) }
                    .result()
                    .map_err(|e| r.named(dev_err("cuGraphLaunch", e)))
            }
            (Driver::Emulated(e), Graph::Emulated(ops)) => {
                // SAFETY: as in `sync`.
                unsafe { (e.log_external)(c"cuGraphLaunch".as_ptr()) };
                e.refuse_in_capture("cuGraphLaunch")?;
                for op in ops {
                    match op {
                        Op::Launch {
                            f,
                            name,
                            grid,
                            block,
                            shared,
                            slots,
                        } => {
                            let mut slots = slots.clone();
                            let mut params: Vec<*mut c_void> = slots
                                .iter_mut()
                                .map(|s| s as *mut u64 as *mut c_void)
                                .collect();
                            // SAFETY: recorded from a launch whose parameters matched its
                            // kernel; the buffers are alive (the backend replays only while
                            // no allocation has happened since the capture).
                            unsafe { e.run(f, name, *grid, *block, *shared, &mut params) }?;
                        }
                        // SAFETY: as above, for the product's buffers.
                        Op::Gemm(args) => unsafe { emulated_gemm(e, *args) },
                        Op::Htod { dst, src, bytes } => {
                            // SAFETY: a pinned buffer and a device buffer, both alive.
                            unsafe {
                                std::ptr::copy_nonoverlapping(
                                    *src as *const u8,
                                    *dst as *mut u8,
                                    *bytes,
                                )
                            }
                        }
                    }
                }
                Ok(())
            }
            _ => Err(BackendError::Internal(
                "a graph replayed on another driver".into(),
            )),
        }
    }

    /// Releases a graph.
    pub(super) fn destroy_graph(&self, graph: &Graph) {
        if let (Driver::Cuda(r), Graph::Cuda { graph, exec }) = (self, graph) {
            if r.bind().is_ok() {
                // SAFETY: both were created by `end_capture` and are destroyed once.
                unsafe {
                    sys::cuGraphExecDestroy(*exec);
                    sys::cuGraphDestroy(*graph);
                }
            }
        }
    }
}

impl Emulated {
    /// Refuses `call` while a capture is in progress (and invalidates it, as the driver does).
    fn refuse_in_capture(&self, call: &str) -> Result<(), BackendError> {
        let mut c = self.capture.lock();
        let Some((_, error)) = c.as_mut() else {
            return Ok(());
        };
        error.get_or_insert_with(|| call.to_string());
        Err(BackendError::Device {
            call: call.to_string(),
            message: "not permitted while the stream is being captured into a graph \
                      (CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED)"
                .into(),
        })
    }

    /// Makes visible to the host every queued copy up to ordinal `upto`: copies back land,
    /// and the sources of copies from pinned memory are checked to be as they were queued.
    fn complete(&self, upto: u64) -> Result<(), BackendError> {
        let due: Vec<HostEffect> = {
            let mut q = self.host_effects.lock();
            let (due, rest) = std::mem::take(&mut *q)
                .into_iter()
                .partition(|h| h.seq <= upto);
            *q = rest;
            due
        };
        self.fences.done(upto);
        for h in due {
            let n = h.bytes.len();
            // SAFETY: pinned buffers stay allocated while copies use them (the backend frees
            // one only after a synchronisation), and a copy's span was checked when queued.
            unsafe {
                if h.lands {
                    std::ptr::copy_nonoverlapping(h.bytes.as_ptr(), h.at as *mut u8, n);
                } else if std::slice::from_raw_parts(h.at as *const u8, n) != h.bytes {
                    return Err(dev_err(
                        "cuMemcpyHtoDAsync",
                        format!(
                            "the pinned source at {:#x} ({n} bytes) was written before the copy \
                             reading it had completed",
                            h.at
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    fn is_pinned(&self, p: u64, bytes: usize) -> bool {
        self.pinned
            .lock()
            .iter()
            .any(|(&at, &len)| p >= at && p + bytes as u64 <= at + len as u64)
    }

    /// Runs one kernel launch on the emulator.
    ///
    /// # Safety
    /// As [`Driver::launch`].
    unsafe fn run(
        &self,
        f: &CString,
        name: &str,
        grid: (u32, u32, u32),
        block: u32,
        shared: u32,
        params: &mut [*mut c_void],
    ) -> Result<(), BackendError> {
        static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());
        let _g = ONE_AT_A_TIME.lock();
        let rc = (self.launch)(
            f.as_ptr(),
            grid.0,
            grid.1,
            grid.2,
            block,
            shared as usize,
            params.as_mut_ptr(),
        );
        if rc != 0 {
            return Err(BackendError::Device {
                call: format!("kernel {name} (emulator)"),
                message: format!(
                    "failed with status {rc}: {}",
                    std::ffi::CStr::from_ptr((self.last_error)()).to_string_lossy()
                ),
            });
        }
        Ok(())
    }
}

/// The emulator's cuBLAS product (see [`Driver::gemm_tn_bf16`]), `[m, n, k, a, lda, b, ldb,
/// c, ldc]`.
///
/// # Safety
/// The addresses are live buffers of those shapes.
unsafe fn emulated_gemm(e: &Emulated, [m, n, k, a, lda, b, ldb, c, ldc]: [usize; 9]) {
    let bytes = |n: usize, size: usize| (n * size) as u64;
    (e.log_external_bytes)(
        c"cublas_gemm".as_ptr(),
        bytes(m * k + k * n, 2),
        bytes(m * n, 4),
    );
    let bf = |p: usize, i: usize| half::bf16::from_bits(*(p as *const u16).add(i)).to_f32();
    let cp = c as *mut f32;
    // B's columns (one per output column) in f32 once, then each row of op(A)
    let bt: Vec<f32> = (0..n)
        .flat_map(|j| (0..k).map(move |l| (j, l)))
        .map(|(j, l)| bf(b, l + j * ldb))
        .collect();
    let mut row_a = vec![0f32; k];
    for i in 0..m {
        // op(A)(i, l) = A(l, i) = a[l + i * lda]
        for (l, v) in row_a.iter_mut().enumerate() {
            *v = bf(a, l + i * lda);
        }
        for (j, col) in bt.chunks_exact(k.max(1)).enumerate().take(n) {
            let mut acc = [0f32; 4];
            let (ra, rb) = (row_a.chunks_exact(4), col.chunks_exact(4));
            let (ta, tb) = (ra.remainder(), rb.remainder());
            for (x, y) in ra.zip(rb) {
                for q in 0..4 {
                    acc[q] += x[q] * y[q];
                }
            }
            let tail: f32 = ta.iter().zip(tb).map(|(x, y)| x * y).sum();
            *cp.add(i + j * ldc) = acc.iter().sum::<f32>() + tail;
        }
    }
}

impl Real {
    fn bind(&self) -> Result<(), BackendError> {
        self.ctx
            .bind_to_thread()
            .map_err(|e| dev_err("bind context", e))
    }

    /// A failed synchronisation or copy reports an earlier kernel's fault: names the last
    /// kernel queued, and how to find the faulting one.
    fn named(&self, e: BackendError) -> BackendError {
        match (e, *self.last.lock()) {
            (BackendError::Device { call, message }, Some(last)) => BackendError::Device {
                call,
                message: format!(
                    "{message} (the last kernel queued was {last}; {SYNC_LAUNCHES_ENV}=1 names \
                     the kernel that fails)"
                ),
            },
            (e, _) => e,
        }
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        if let Driver::Cuda(r) = self {
            if r.ctx.bind_to_thread().is_ok() {
                // SAFETY: each handle was created in `open` and is released once.
                unsafe {
                    let _ = drv::stream::synchronize(r.stream);
                    let _ = blas::destroy_handle(r.blas);
                    let _ = drv::free_sync(r.blas_workspace);
                    let _ = drv::module::unload(r.module);
                    let _ = drv::stream::destroy(r.stream);
                }
            }
        }
    }
}

//! What the CUDA backend asks of a device, in one place: memory, copies, kernel launches, the
//! bf16 matrix product, synchronisation. [`Driver::Cuda`] is the real GPU (cudarc: the
//! driver API and cuBLAS on one stream). [`Driver::Emulated`] runs the same kernels of
//! `csrc/` on the CPU through the emulation library the tests build
//! (`tests/kernel_emu`), with host memory standing in for device memory and a plain f32
//! product following cuBLAS's column-major contract: it lets CI run the backend's own host
//! code (buffer sizes, launch shapes, argument order, cuBLAS operands) end to end on
//! machines without a GPU. It is chosen by the path to that library given to [`Driver::open`]
//! (`EngineConfig::cuda_emulator`) and is far too slow to serve with.

use std::ffi::{c_void, CString};
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

pub(super) struct Real {
    ctx: Arc<CudaContext>,
    stream: sys::CUstream,
    module: sys::CUmodule,
    blas: blas_sys::cublasHandle_t,
    /// SGLANG_CUDA_SYNC_LAUNCHES: synchronise (and name the kernel) after every launch.
    sync_launches: bool,
    /// The last kernel queued, named by a failed synchronisation (kernel faults surface
    /// there).
    last: Mutex<Option<Launched>>,
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
    /// Live allocations (address -> layout), for `free` and the memory report.
    allocs: Mutex<std::collections::HashMap<u64, std::alloc::Layout>>,
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
            let d = Emulated {
                _lib: lib,
                launch,
                last_error,
                log_external,
                allocs: Mutex::new(Default::default()),
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
            sync_launches,
            last: Mutex::new(None),
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
            Driver::Cuda(_) => {
                self.bind()?;
                // SAFETY: a fresh allocation of at least one byte.
                unsafe { drv::malloc_sync(bytes.max(1)) }.map_err(|e| oom(&e))
            }
            Driver::Emulated(e) => {
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
                if let Some(layout) = e.allocs.lock().remove(&ptr) {
                    // SAFETY: allocated by `alloc` with this layout, freed once.
                    unsafe { std::alloc::dealloc(ptr as *mut u8, layout) };
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
            Driver::Emulated(_) => Ok(self.alloc(bytes)? as *mut c_void),
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
            Driver::Emulated(_) => {
                let n = std::mem::size_of_val(src);
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
                Driver::Emulated(_) => {
                    let n = std::mem::size_of_val(dst);
                    std::ptr::copy_nonoverlapping(src as *const u8, dst.as_mut_ptr() as *mut u8, n);
                }
            }
        }
        self.sync()
    }

    pub(super) fn sync(&self) -> Result<(), BackendError> {
        match self {
            Driver::Cuda(r) => {
                r.bind()?;
                // SAFETY: the stream is valid.
                unsafe { drv::stream::synchronize(r.stream) }
                    .map_err(|e| r.named(dev_err("synchronize", e)))
            }
            Driver::Emulated(_) => Ok(()),
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
                static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());
                let _g = ONE_AT_A_TIME.lock();
                let rc = (e.launch)(
                    f.cname.as_ptr(),
                    grid.0,
                    grid.1,
                    grid.2,
                    block,
                    shared as usize,
                    params.as_mut_ptr(),
                );
                if rc != 0 {
                    return Err(BackendError::Device {
                        call: format!("kernel {} (emulator)", f.name),
                        message: format!(
                            "failed with status {rc}: {}",
                            std::ffi::CStr::from_ptr((e.last_error)()).to_string_lossy()
                        ),
                    });
                }
                Ok(())
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
                (e.log_external)(c"cublas_gemm".as_ptr());
                let bf = |p: sys::CUdeviceptr, i: usize| {
                    half::bf16::from_bits(*(p as *const u16).add(i)).to_f32()
                };
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
                Ok(())
            }
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
                    let _ = drv::module::unload(r.module);
                    let _ = drv::stream::destroy(r.stream);
                }
            }
        }
    }
}

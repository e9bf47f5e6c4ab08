//! Builds `csrc/*.cu` against `cuda_emu.h` with the system C++ compiler into a shared
//! library exporting `sg_emu_launch(name, grid, block, shared, args)` (cuLaunchKernel's
//! argument convention) and the emulator's controls (`sg_emu_last_error`, `sg_emu_seed`,
//! `sg_emu_set_seed`, `sg_emu_set_max_dynamic_smem`, `sg_emu_launch_log`,
//! `sg_emu_log_external`), once per test
//! process. Used by tests/kernels.rs (each kernel alone), tests/cuda.rs (the CUDA
//! backend through `SGLANG_CUDA_EMULATOR`) and tests/kernel_emu_strict.rs (kernels broken on
//! purpose, built from tests/kernel_emu/broken/).
#![allow(dead_code)]

use std::path::{Path, PathBuf};

/// The emulation library of `csrc/*.cu` (built on first use).
pub fn library() -> &'static Path {
    static LIB: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    LIB.get_or_init(|| build_with(&csrc_sources(), &[]))
}

/// The emulation library of `csrc/*.cu` that counts the bytes each kernel reads and writes in
/// device memory (`Emulator::bytes_log`): compiled with `-fsanitize=thread` for the compiler's
/// access hooks, which `cuda_emu.h` implements (linked without the sanitizer's runtime); a few
/// times slower than [`library`].
pub fn library_counting_bytes() -> &'static Path {
    static LIB: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    LIB.get_or_init(|| build_inner(&csrc_sources(), &["SG_EMU_COUNT_BYTES=1"], true))
}

/// `csrc/*.cu`, sorted.
pub fn csrc_sources() -> Vec<PathBuf> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let mut sources: Vec<PathBuf> = std::fs::read_dir(root.join("csrc"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "cu"))
        .collect();
    sources.sort();
    sources
}

/// A kernel found in a source: its name and its `__launch_bounds__` expression (the
/// largest block it may be launched with), if any.
struct Kernel {
    name: String,
    bound: Option<String>,
}

fn kernels_in(text: &str) -> Vec<Kernel> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(i) = rest.find("extern \"C\" __global__ void ") {
        rest = rest[i + 27..].trim_start();
        let mut bound = None;
        if let Some(after) = rest.strip_prefix("__launch_bounds__(") {
            // up to the matching parenthesis; the first argument is the block-size bound
            let (mut depth, mut close, mut comma) = (0usize, None, None);
            for (j, c) in after.char_indices() {
                match c {
                    '(' => depth += 1,
                    ')' if depth == 0 => {
                        close = Some(j);
                        break;
                    }
                    ')' => depth -= 1,
                    ',' if depth == 0 && comma.is_none() => comma = Some(j),
                    _ => {}
                }
            }
            let close = close.expect("__launch_bounds__(...) closes");
            bound = Some(after[..comma.unwrap_or(close)].trim().to_string());
            rest = after[close + 1..].trim_start();
        }
        let name: String = rest
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect();
        out.push(Kernel { name, bound });
    }
    out
}

/// Builds an emulation library from `sources` (CUDA files written against csrc's
/// conventions: `extern "C" __global__` kernels with 1-D blocks) and returns its path.
pub fn build(sources: &[PathBuf]) -> PathBuf {
    build_with(sources, &[])
}

/// [`build`] with preprocessor definitions (`NAME=VALUE`), e.g. a kernel's capacity made
/// small so that a test reaches the paths large inputs take.
pub fn build_with(sources: &[PathBuf], defines: &[&str]) -> PathBuf {
    build_inner(sources, defines, false)
}

fn build_inner(sources: &[PathBuf], defines: &[&str], count_bytes: bool) -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let dir = tempfile::tempdir().unwrap().keep();
    let mut unit = format!(
        "#include \"{}\"\n",
        root.join("tests/kernel_emu/cuda_emu.h").display()
    );
    let mut kernels = Vec::new();
    for s in sources {
        unit += &format!("#include \"{}\"\n", s.display());
        kernels.extend(kernels_in(&std::fs::read_to_string(s).unwrap()));
    }
    assert!(!kernels.is_empty(), "no kernels found in {sources:?}");
    unit += "SG_EMU_API int sg_emu_launch(const char* name, unsigned gx, unsigned gy, \
             unsigned gz, unsigned bx, size_t smem, void** args) {\n";
    for k in &kernels {
        let bound = k.bound.as_deref().unwrap_or("1024");
        unit += &format!(
            "  if (!std::strcmp(name, \"{n}\")) return sg_emu::launch(\"{n}\", {n}, \
             dim3{{gx, gy, gz}}, dim3{{bx, 1, 1}}, smem, (unsigned)({bound}), args);\n",
            n = k.name
        );
    }
    unit += r#"  sg_emu::error = std::string("no kernel ") + name;
  return -2;
}
SG_EMU_API const char* sg_emu_last_error() { return sg_emu::error.c_str(); }
SG_EMU_API unsigned long long sg_emu_seed() { return sg_emu::seed; }
SG_EMU_API void sg_emu_set_seed(unsigned long long s) { sg_emu::seed = s; }
SG_EMU_API void sg_emu_set_max_dynamic_smem(const char* name, size_t bytes) {
  sg_emu::kernels[name].max_dynamic_smem = bytes;
}
// Work done outside the emulated kernels (the CUDA backend's emulated cuBLAS products), in
// the launch log under `name`.
SG_EMU_API void sg_emu_log_external(const char* name) { sg_emu::kernels[name].launches++; }
// The same with the bytes that work read and wrote (the emulated cuBLAS products).
SG_EMU_API void sg_emu_log_external_bytes(const char* name, unsigned long long read,
                                          unsigned long long written) {
  auto& k = sg_emu::kernels[name];
  k.launches++;
  k.read += read;
  k.written += written;
}
// Device memory the kernels' byte counts cover (add) or no longer (remove).
SG_EMU_API void sg_emu_device_memory(unsigned long long p, unsigned long long len, int add) {
  sg_emu::device_memory(p, len, add != 0);
}
// One line per kernel that moved bytes since the last reset: "name read written".
SG_EMU_API size_t sg_emu_bytes_log(char* out, size_t cap, int reset) {
  std::string s;
  for (auto& [name, k] : sg_emu::kernels) {
    if (k.read == 0 && k.written == 0) continue;
    s += name + " " + std::to_string(k.read) + " " + std::to_string(k.written) + "\n";
    if (reset) k.read = k.written = 0;
  }
  if (out && cap) {
    const size_t n = s.size() < cap - 1 ? s.size() : cap - 1;
    std::memcpy(out, s.data(), n);
    out[n] = 0;
  }
  return s.size();
}
// How many times kernels marked `what` (SG_EMU_COUNT) since the last call; resets it.
SG_EMU_API unsigned long long sg_emu_take_count(const char* what) {
  const unsigned long long n = sg_emu::counts[what];
  sg_emu::counts[what] = 0;
  return n;
}
// One line per kernel launched since the last reset: "name launches blocks threads".
SG_EMU_API size_t sg_emu_launch_log(char* out, size_t cap, int reset) {
  std::string s;
  for (auto& [name, k] : sg_emu::kernels) {
    if (k.launches == 0) continue;
    s += name + " " + std::to_string(k.launches) + " " + std::to_string(k.blocks) + " " +
         std::to_string(k.threads) + "\n";
    if (reset) k.launches = k.blocks = k.threads = 0;
  }
  if (out && cap) {
    const size_t n = s.size() < cap - 1 ? s.size() : cap - 1;
    std::memcpy(out, s.data(), n);
    out[n] = 0;
  }
  return s.size();
}
"#;
    let src = dir.join("emu.cpp");
    std::fs::write(&src, unit).unwrap();
    let lib = dir.join("libsg_emu.so");
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
    let flags = [
        "-std=c++17",
        "-O2",
        "-g",
        "-fPIC",
        // each library keeps its own globals (no symbol shared between two loaded ones)
        "-fvisibility=hidden",
        "-Wall",
        "-Wno-unknown-pragmas",
    ];
    let run = |cmd: &mut std::process::Command| {
        let status = cmd
            .status()
            .unwrap_or_else(|e| panic!("cannot run the C++ compiler `{cxx}`: {e}"));
        assert!(status.success(), "the emulator build of {sources:?} failed");
    };
    let defines = defines.iter().map(|d| format!("-D{d}"));
    if count_bytes {
        // the access hooks without the sanitizer's runtime: compile instrumented, link plain
        let obj = dir.join("emu.o");
        run(std::process::Command::new(&cxx)
            .args(flags)
            .arg("-fsanitize=thread")
            .args(defines)
            .arg("-c")
            .arg("-o")
            .arg(&obj)
            .arg(&src));
        run(std::process::Command::new(&cxx)
            .args(["-shared", "-o"])
            .arg(&lib)
            .arg(&obj));
    } else {
        run(std::process::Command::new(&cxx)
            .args(flags)
            .arg("-shared")
            .args(defines)
            .arg("-o")
            .arg(&lib)
            .arg(&src));
    }
    lib
}

type LaunchFn = unsafe extern "C" fn(
    *const std::ffi::c_char,
    u32,
    u32,
    u32,
    u32,
    usize,
    *mut *mut std::ffi::c_void,
) -> i32;

/// A loaded emulation library. Its state is global to the library (one launch at a time);
/// loading the same path twice (here and in the CUDA backend) shares it.
pub struct Emulator {
    lib: libloading::Library,
    lock: std::sync::Mutex<()>,
}

impl Emulator {
    pub fn load(path: &Path) -> Self {
        // SAFETY: the library was built by `build` from our own sources; its initialisers
        // only set up globals.
        let lib = unsafe { libloading::Library::new(path) }.unwrap();
        Self {
            lib,
            lock: std::sync::Mutex::new(()),
        }
    }

    fn sym<T: Copy>(&self, name: &[u8]) -> T {
        // SAFETY: every caller names a symbol of the generated unit with the type T.
        unsafe { *self.lib.get::<T>(name).unwrap() }
    }

    /// Launches `kernel` (cuLaunchKernel's conventions); the emulator's reason on failure.
    ///
    /// # Safety
    /// `args` points at values of the kernel's parameter types, in order; pointers among them
    /// are live host memory of the sizes the kernel reads and writes.
    pub unsafe fn launch(
        &self,
        kernel: &str,
        grid: (u32, u32, u32),
        block: u32,
        smem: u32,
        args: &mut [*mut std::ffi::c_void],
    ) -> Result<(), String> {
        let name = std::ffi::CString::new(kernel).unwrap();
        let _g = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        let launch: LaunchFn = self.sym(b"sg_emu_launch");
        let rc = launch(
            name.as_ptr(),
            grid.0,
            grid.1,
            grid.2,
            block,
            smem as usize,
            args.as_mut_ptr(),
        );
        if rc == 0 {
            Ok(())
        } else {
            Err(self.last_error())
        }
    }

    /// The last launch's failure ("" after a good one).
    pub fn last_error(&self) -> String {
        let f: unsafe extern "C" fn() -> *const std::ffi::c_char = self.sym(b"sg_emu_last_error");
        // SAFETY: a NUL-terminated string owned by the library, copied at once.
        unsafe { std::ffi::CStr::from_ptr(f()) }
            .to_string_lossy()
            .into_owned()
    }

    /// The thread-order seed (SG_EMU_SEED reproduces a run; 0 is ascending order).
    pub fn seed(&self) -> u64 {
        let f: unsafe extern "C" fn() -> u64 = self.sym(b"sg_emu_seed");
        // SAFETY: reads a global.
        unsafe { f() }
    }

    pub fn set_seed(&self, seed: u64) {
        let _g = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        let f: unsafe extern "C" fn(u64) = self.sym(b"sg_emu_set_seed");
        // SAFETY: sets a global between launches.
        unsafe { f(seed) }
    }

    /// How many times the kernels marked `what` with `SG_EMU_COUNT` since the last call.
    pub fn take_count(&self, what: &str) -> u64 {
        let _g = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        let f: unsafe extern "C" fn(*const std::ffi::c_char) -> u64 =
            self.sym(b"sg_emu_take_count");
        let name = std::ffi::CString::new(what).unwrap();
        // SAFETY: reads and resets a counter between launches.
        unsafe { f(name.as_ptr()) }
    }

    /// cuFuncSetAttribute(MAX_DYNAMIC_SHARED_SIZE_BYTES) for `kernel`.
    pub fn set_max_dynamic_smem(&self, kernel: &str, bytes: usize) {
        let name = std::ffi::CString::new(kernel).unwrap();
        let _g = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        let f: unsafe extern "C" fn(*const std::ffi::c_char, usize) =
            self.sym(b"sg_emu_set_max_dynamic_smem");
        // SAFETY: a NUL-terminated name; sets the library's table between launches.
        unsafe { f(name.as_ptr(), bytes) }
    }

    /// Per kernel launched since the last reset: (name, launches, blocks, threads).
    pub fn launch_log(&self, reset: bool) -> Vec<(String, u64, u64, u64)> {
        self.log(b"sg_emu_launch_log", reset)
            .into_iter()
            .map(|(name, n)| (name, n[0], n[1], n[2]))
            .collect()
    }

    /// Per kernel (and emulated cuBLAS product) that moved bytes of device memory since the
    /// last reset: (name, bytes read, bytes written). Only the library from
    /// [`library_counting_bytes`] counts the kernels'.
    pub fn bytes_log(&self, reset: bool) -> Vec<(String, u64, u64)> {
        self.log(b"sg_emu_bytes_log", reset)
            .into_iter()
            .map(|(name, n)| (name, n[0], n[1]))
            .collect()
    }

    /// One of the library's logs: lines of a name and numbers.
    fn log(&self, symbol: &[u8], reset: bool) -> Vec<(String, Vec<u64>)> {
        let _g = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        let f: unsafe extern "C" fn(*mut std::ffi::c_char, usize, i32) -> usize = self.sym(symbol);
        let mut buf = vec![0u8; 1 << 16];
        // SAFETY: writes at most buf.len() bytes, NUL-terminated.
        let n = unsafe { f(buf.as_mut_ptr() as *mut _, buf.len(), reset as i32) };
        assert!(n < buf.len(), "log longer than its buffer");
        String::from_utf8_lossy(&buf[..n])
            .lines()
            .map(|l| {
                let mut f = l.split(' ');
                let name = f.next().unwrap_or_default().to_string();
                (name, f.map(|v| v.parse::<u64>().unwrap()).collect())
            })
            .collect()
    }
}

//! Zero-copy safetensors loading.
//!
//! Each `.safetensors` file is memory-mapped once (memmap2); a [`Tensor`] is a typed view into
//! that mapping (offset + dtype + shape) kept alive by an `Arc` of the mapping, so weight bytes
//! are never copied on the CPU path. Sharded checkpoints are found through
//! `model.safetensors.index.json`. The header is parsed here, entry by entry, so that every
//! problem (corrupt header, truncated file, unsupported dtype, shape mismatch, missing tensor)
//! becomes a [`LoadError`] naming the file and the tensor rather than a panic.
//!
//! `--load-format dummy` builds deterministic random bf16 weights with the same names and
//! shapes instead (see [`dummy_weights`]).

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::Mmap;

use crate::quant::{QuantType, SUPER};

#[path = "loader_gguf.rs"]
mod gguf;
pub use gguf::{find_gguf, load_gguf, read_metadata, GgufMetadata, MetaValue};
use safetensors::tensor::{Dtype as StDtype, TensorInfo};

/// Largest JSON header we accept (the format's own limit is 100 MB).
const MAX_HEADER_BYTES: usize = 100 * 1024 * 1024;

/// Element type of a weight tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DType {
    BF16,
    F16,
    F32,
    /// GGUF block-quantized (see `crate::quant`).
    Quant(QuantType),
}

impl DType {
    /// Bytes per element (float types only: a quantized type has bytes per block of 32).
    pub fn size(self) -> usize {
        match self {
            DType::BF16 | DType::F16 => 2,
            DType::F32 => 4,
            DType::Quant(_) => 1,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            DType::BF16 => "BF16",
            DType::F16 => "F16",
            DType::F32 => "F32",
            DType::Quant(q) => q.name(),
        }
    }
    /// The block format, for a quantized type.
    pub fn quant(self) -> Option<QuantType> {
        match self {
            DType::Quant(q) => Some(q),
            _ => None,
        }
    }
}

/// A weight file could not be used; names the file and, where there is one, the tensor.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{file}: {message}")]
    File { file: PathBuf, message: String },
    #[error("{file}: tensor `{tensor}`: {message}")]
    Tensor {
        file: PathBuf,
        tensor: String,
        message: String,
    },
}

impl LoadError {
    fn file(file: &Path, message: impl Into<String>) -> Self {
        Self::File {
            file: file.to_path_buf(),
            message: message.into(),
        }
    }
    fn tensor(file: &Path, tensor: &str, message: impl Into<String>) -> Self {
        Self::Tensor {
            file: file.to_path_buf(),
            tensor: tensor.to_string(),
            message: message.into(),
        }
    }
}

/// Backing memory of tensors: a file mapping, or owned buffers for dummy / re-aligned weights.
enum Storage {
    Mapped(Mmap),
    OwnedU8(Vec<u8>),
    OwnedU16(Vec<u16>),
    OwnedF32(Vec<f32>),
}

impl Storage {
    fn bytes(&self) -> &[u8] {
        match self {
            Storage::Mapped(m) => m,
            Storage::OwnedU8(v) => v,
            // SAFETY: u16/f32 have no padding or invalid bit patterns as bytes.
            Storage::OwnedU16(v) => unsafe {
                std::slice::from_raw_parts(v.as_ptr().cast(), v.len() * 2)
            },
            Storage::OwnedF32(v) => unsafe {
                std::slice::from_raw_parts(v.as_ptr().cast(), v.len() * 4)
            },
        }
    }
}

/// A typed view into a weight file (or an owned buffer). Cheap to clone.
#[derive(Clone)]
pub struct Tensor {
    storage: Arc<Storage>,
    offset: usize,
    len_bytes: usize,
    dtype: DType,
    shape: Vec<usize>,
}

impl std::fmt::Debug for Tensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tensor")
            .field("dtype", &self.dtype)
            .field("shape", &self.shape)
            .field("mapped", &matches!(*self.storage, Storage::Mapped(_)))
            .finish()
    }
}

/// The elements of a tensor, typed. bf16 and f16 are raw 16-bit patterns.
#[derive(Clone, Copy)]
pub enum Elems<'a> {
    BF16(&'a [u16]),
    F16(&'a [u16]),
    F32(&'a [f32]),
    /// Whole blocks of a quantized format, as raw bytes.
    Quant(QuantType, &'a [u8]),
}

impl<'a> Elems<'a> {
    pub fn len(&self) -> usize {
        match self {
            Elems::BF16(s) | Elems::F16(s) => s.len(),
            Elems::F32(s) => s.len(),
            Elems::Quant(t, b) => b.len() / t.block_bytes() * t.block_values(),
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Element `i` as f32.
    #[inline]
    pub fn get(&self, i: usize) -> f32 {
        match self {
            Elems::BF16(s) => bf16_to_f32(s[i]),
            Elems::F16(s) => half::f16::from_bits(s[i]).to_f32(),
            Elems::F32(s) => s[i],
            Elems::Quant(t, b) => {
                let (bb, bv) = (t.block_bytes(), t.block_values());
                let mut block = [0.0f32; SUPER];
                t.dequantize_block(&b[i / bv * bb..(i / bv + 1) * bb], &mut block);
                block[i % bv]
            }
        }
    }
    /// Elements `start..start + n` as a sub-view.
    pub fn slice(&self, start: usize, n: usize) -> Elems<'a> {
        match self {
            Elems::BF16(s) => Elems::BF16(&s[start..start + n]),
            Elems::F16(s) => Elems::F16(&s[start..start + n]),
            Elems::F32(s) => Elems::F32(&s[start..start + n]),
            Elems::Quant(t, b) => {
                let bv = t.block_values();
                assert!(
                    start.is_multiple_of(bv) && n.is_multiple_of(bv),
                    "{}: elements {start}..{} are not whole blocks",
                    t.name(),
                    start + n
                );
                Elems::Quant(*t, &b[t.row_bytes(start)..t.row_bytes(start + n)])
            }
        }
    }
    /// Converts into `out` (same length).
    pub fn to_f32(&self, out: &mut [f32]) {
        match self {
            Elems::BF16(s) => out
                .iter_mut()
                .zip(*s)
                .for_each(|(o, &b)| *o = bf16_to_f32(b)),
            Elems::F16(s) => out
                .iter_mut()
                .zip(*s)
                .for_each(|(o, &b)| *o = half::f16::from_bits(b).to_f32()),
            Elems::F32(s) => out.copy_from_slice(s),
            Elems::Quant(t, b) => {
                let bb = t.block_bytes();
                for (o, blk) in out.chunks_mut(t.block_values()).zip(b.chunks(bb)) {
                    t.dequantize_block(blk, o);
                }
            }
        }
    }
}

#[inline]
pub fn bf16_to_f32(b: u16) -> f32 {
    f32::from_bits((b as u32) << 16)
}

/// Round-to-nearest-even f32 -> bf16 bits (NaN stays NaN).
#[inline]
pub fn f32_to_bf16(x: f32) -> u16 {
    half::bf16::from_f32(x).to_bits()
}

impl Tensor {
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    pub fn size_bytes(&self) -> usize {
        self.len_bytes
    }
    /// True when the bytes live in a file mapping (not copied).
    pub fn is_mapped(&self) -> bool {
        matches!(*self.storage, Storage::Mapped(_))
    }
    pub fn bytes(&self) -> &[u8] {
        &self.storage.bytes()[self.offset..self.offset + self.len_bytes]
    }
    /// For a tensor in a file mapping: gives the pages wholly inside it back to the OS
    /// (`MADV_DONTNEED`), for a tensor the backend copied and will not read again. Reading it
    /// later still works (the pages come back from the file); owned tensors are untouched.
    pub fn release_pages(&self) {
        #[cfg(unix)]
        if let Storage::Mapped(m) = &*self.storage {
            const PAGE: usize = 4096;
            let start = (m.as_ptr() as usize + self.offset).next_multiple_of(PAGE);
            let end = (m.as_ptr() as usize + self.offset + self.len_bytes) / PAGE * PAGE;
            if end > start {
                let at = start - m.as_ptr() as usize;
                // SAFETY: a read-only shared file mapping: the dropped pages are read back
                // from the file on the next access, with the same bytes, so no reference into
                // the mapping sees its contents change. A failure only leaves the pages held.
                let _ = unsafe {
                    m.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, at, end - start)
                };
            }
        }
    }
    /// Typed elements. Alignment was checked (or fixed by a copy) when the tensor was built.
    pub fn elems(&self) -> Elems<'_> {
        let b = self.bytes();
        // SAFETY: `Tensor` is only constructed with `offset` aligned for its dtype (see
        // `aligned_view`), the length is a multiple of the element size, and any bit pattern
        // is a valid u16 / f32.
        unsafe {
            match self.dtype {
                DType::BF16 => {
                    Elems::BF16(std::slice::from_raw_parts(b.as_ptr().cast(), b.len() / 2))
                }
                DType::F16 => {
                    Elems::F16(std::slice::from_raw_parts(b.as_ptr().cast(), b.len() / 2))
                }
                DType::F32 => {
                    Elems::F32(std::slice::from_raw_parts(b.as_ptr().cast(), b.len() / 4))
                }
                DType::Quant(t) => Elems::Quant(t, b),
            }
        }
    }

    /// Rows `start..start + n` of a 2-D tensor (or elements of a 1-D one): a view into the
    /// same storage, nothing is copied. Tensor-parallel shards of q/k/v, gate/up, embedding
    /// and lm_head are taken this way straight from the mapping.
    pub fn narrow_rows(&self, start: usize, n: usize) -> Tensor {
        let rows = self.shape[0];
        assert!(start + n <= rows, "rows {start}..{} of {rows}", start + n);
        let row_bytes = self.len_bytes / rows.max(1);
        let mut shape = self.shape.clone();
        shape[0] = n;
        Tensor {
            storage: self.storage.clone(),
            offset: self.offset + start * row_bytes,
            len_bytes: n * row_bytes,
            dtype: self.dtype,
            shape,
        }
    }

    /// Columns `start..start + n` of a 2-D tensor, copied into an owned tensor of the same
    /// dtype (a column shard is not contiguous in the file). Only the shard's bytes are read.
    pub fn narrow_cols(&self, start: usize, n: usize) -> Tensor {
        assert_eq!(self.shape.len(), 2, "narrow_cols needs a 2-D tensor");
        let (rows, cols) = (self.shape[0], self.shape[1]);
        assert!(
            start + n <= cols,
            "columns {start}..{} of {cols}",
            start + n
        );
        let (storage, len_bytes) = match self.elems() {
            Elems::BF16(s) | Elems::F16(s) => {
                let mut v = Vec::with_capacity(rows * n);
                for r in 0..rows {
                    v.extend_from_slice(&s[r * cols + start..r * cols + start + n]);
                }
                (Storage::OwnedU16(v), rows * n * 2)
            }
            Elems::F32(s) => {
                let mut v = Vec::with_capacity(rows * n);
                for r in 0..rows {
                    v.extend_from_slice(&s[r * cols + start..r * cols + start + n]);
                }
                (Storage::OwnedF32(v), rows * n * 4)
            }
            Elems::Quant(t, _) => {
                // whole blocks of each row (callers check that the shard is block-aligned)
                let mut v = Vec::with_capacity(rows * t.row_bytes(n));
                for r in 0..rows {
                    let row = self.elems().slice(r * cols, cols);
                    if let Elems::Quant(_, b) = row.slice(start, n) {
                        v.extend_from_slice(b);
                    }
                }
                let len = v.len();
                (Storage::OwnedU8(v), len)
            }
        };
        Tensor {
            storage: Arc::new(storage),
            offset: 0,
            len_bytes,
            dtype: self.dtype,
            shape: vec![rows, n],
        }
    }

    /// This 2-D float tensor quantized to `t`, row by row (`row`: a scratch buffer); its
    /// rows must be whole blocks.
    fn quantized(&self, t: QuantType, row: &mut Vec<f32>) -> Tensor {
        let (rows, cols) = (self.shape[0], self.shape[1]);
        let mut data = Vec::with_capacity(rows * t.row_bytes(cols));
        row.resize(cols, 0.0);
        let e = self.elems();
        for r in 0..rows {
            e.slice(r * cols, cols).to_f32(row);
            crate::quant::quantize_into(t, row, &mut data);
        }
        Tensor::from_quant(t, data, self.shape.clone())
    }

    /// A copy of this tensor in owned memory (same dtype and shape).
    pub fn owned_copy(&self) -> Tensor {
        let storage = match self.elems() {
            Elems::BF16(s) | Elems::F16(s) => Storage::OwnedU16(s.to_vec()),
            Elems::F32(s) => Storage::OwnedF32(s.to_vec()),
            Elems::Quant(_, b) => Storage::OwnedU8(b.to_vec()),
        };
        Tensor {
            storage: Arc::new(storage),
            offset: 0,
            len_bytes: self.len_bytes,
            dtype: self.dtype,
            shape: self.shape.clone(),
        }
    }

    /// An owned bf16 tensor (dummy weights, tests).
    pub fn from_bf16(data: Vec<u16>, shape: Vec<usize>) -> Self {
        assert_eq!(data.len(), shape.iter().product::<usize>());
        let len_bytes = data.len() * 2;
        Self {
            storage: Arc::new(Storage::OwnedU16(data)),
            offset: 0,
            len_bytes,
            dtype: DType::BF16,
            shape,
        }
    }

    /// An owned tensor of whole quantized blocks, `shape` `[rows, cols]` (GGUF rows that had
    /// to be reordered; tests).
    pub fn from_quant(t: QuantType, data: Vec<u8>, shape: Vec<usize>) -> Self {
        let numel: usize = shape.iter().product();
        assert_eq!(numel % t.block_values(), 0);
        assert_eq!(data.len(), t.row_bytes(numel));
        let len_bytes = data.len();
        Self {
            storage: Arc::new(Storage::OwnedU8(data)),
            offset: 0,
            len_bytes,
            dtype: DType::Quant(t),
            shape,
        }
    }

    /// An owned f32 tensor (tests).
    pub fn from_f32(data: Vec<f32>, shape: Vec<usize>) -> Self {
        assert_eq!(data.len(), shape.iter().product::<usize>());
        let len_bytes = data.len() * 4;
        Self {
            storage: Arc::new(Storage::OwnedF32(data)),
            offset: 0,
            len_bytes,
            dtype: DType::F32,
            shape,
        }
    }
}

/// Name and shape of a tensor the model needs.
#[derive(Debug, Clone)]
pub struct TensorSpec {
    pub name: String,
    pub shape: Vec<usize>,
}

/// The weights of one model, by HF tensor name.
pub struct WeightMap {
    tensors: HashMap<String, Tensor>,
    /// The file each tensor came from (error messages, progress).
    files: Vec<PathBuf>,
}

impl WeightMap {
    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.tensors.get(name)
    }
    pub fn files(&self) -> &[PathBuf] {
        &self.files
    }
    /// Whether any tensor is block-quantized.
    pub fn is_quantized(&self) -> bool {
        self.tensors.values().any(|t| t.dtype.quant().is_some())
    }
    pub fn total_bytes(&self) -> usize {
        self.tensors.values().map(|t| t.size_bytes()).sum()
    }
    pub fn len(&self) -> usize {
        self.tensors.len()
    }
    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }
}

impl WeightMap {
    /// Quantizes in place (`--quantization`): every 2-D float tensor whose rows are whole
    /// blocks (the linear layers and the embedding) becomes `t` ([`crate::quant::quantize`];
    /// for a k-quant, rows that are not whole super-blocks take its fallback,
    /// [`QuantType::for_row`]); the others
    /// (norms) are copied out of the file mapping, so that the mapping is released and the
    /// memory held is the quantized size. `threads` workers take tensors in turn; progress is
    /// logged by quarters. Returns the number of tensors quantized. Quantized (GGUF) tensors
    /// are an error naming the tensor: they are not quantized twice.
    pub fn quantize(&mut self, t: QuantType, threads: usize) -> Result<usize, LoadError> {
        let file = self.files.first().cloned().unwrap_or_default();
        if let Some((name, q)) = self
            .tensors
            .iter()
            .find_map(|(n, w)| w.dtype.quant().map(|q| (n, q)))
        {
            return Err(LoadError::tensor(
                &file,
                name,
                format!(
                    "is {} already; --quantization applies to bf16/f16/f32 weights",
                    q.name()
                ),
            ));
        }
        let mut names: Vec<String> = self.tensors.keys().cloned().collect();
        names.sort(); // a fixed order (the log, and the work split, do not depend on hashing)
                      // the format of each 2-D tensor: `t`, or its fallback where rows are not whole
                      // super-blocks (Q4_K rows of 576 values are Q5_0, as llama.cpp's quantizer does)
        let format = |w: &Tensor| match w.shape[..] {
            [_, cols] => t.for_row(cols),
            _ => None,
        };
        let total: usize = self
            .tensors
            .values()
            .map(|w| w.len_bytes)
            .sum::<usize>()
            .max(1);
        let next = std::sync::atomic::AtomicUsize::new(0);
        let done = std::sync::atomic::AtomicUsize::new(0);
        let started = std::time::Instant::now();
        let tensors = &self.tensors;
        let results: Vec<(String, Tensor)> = std::thread::scope(|scope| {
            let workers: Vec<_> = (0..threads.max(1))
                .map(|_| {
                    scope.spawn(|| {
                        use std::sync::atomic::Ordering::Relaxed;
                        let mut out = Vec::new();
                        let mut row = Vec::new();
                        loop {
                            let i = next.fetch_add(1, Relaxed);
                            let Some(name) = names.get(i) else { break };
                            let w = &tensors[name];
                            let new = match format(w) {
                                Some(f) => w.quantized(f, &mut row),
                                None => w.owned_copy(),
                            };
                            let before = done.fetch_add(w.len_bytes, Relaxed);
                            let quarter = |b: usize| b * 4 / total;
                            if quarter(before) != quarter(before + w.len_bytes) {
                                tracing::info!(
                                    "quantizing to {}: {}% ({:.1}s)",
                                    t.name(),
                                    (before + w.len_bytes) * 100 / total,
                                    started.elapsed().as_secs_f64()
                                );
                            }
                            out.push((name.clone(), new));
                        }
                        out
                    })
                })
                .collect();
            workers
                .into_iter()
                .flat_map(|h| h.join().expect("quantization worker panicked"))
                .collect()
        });
        let quantized = results
            .iter()
            .filter(|(_, w)| w.dtype.quant().is_some())
            .count();
        self.tensors = results.into_iter().collect();
        Ok(quantized)
    }
}

/// Loads the safetensors weights of `dir` and checks every tensor of `specs` for presence,
/// dtype and shape. Extra tensors in the files are ignored.
pub fn load_safetensors(dir: &Path, specs: &[TensorSpec]) -> Result<WeightMap, LoadError> {
    let index = dir.join("model.safetensors.index.json");
    let single = dir.join("model.safetensors");
    // name -> file it is expected in
    let mut placement: BTreeMap<String, PathBuf> = BTreeMap::new();
    let files: Vec<PathBuf> = if index.exists() {
        let text = std::fs::read_to_string(&index)
            .map_err(|e| LoadError::file(&index, format!("cannot read: {e}")))?;
        let json: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| LoadError::file(&index, format!("invalid JSON: {e}")))?;
        let map = json
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| LoadError::file(&index, "no `weight_map` object"))?;
        let mut files = Vec::new();
        for (name, file) in map {
            let file = file.as_str().ok_or_else(|| {
                LoadError::tensor(&index, name, "weight_map entry is not a file name")
            })?;
            if file.contains('/') || file.contains("..") {
                return Err(LoadError::tensor(
                    &index,
                    name,
                    format!("shard name {file:?} must be a plain file name"),
                ));
            }
            let path = dir.join(file);
            if !files.contains(&path) {
                files.push(path.clone());
            }
            placement.insert(name.clone(), path);
        }
        files
    } else if single.exists() {
        vec![single]
    } else {
        return Err(LoadError::file(
            dir,
            "no model.safetensors or model.safetensors.index.json in the model directory",
        ));
    };

    let mut tensors = HashMap::new();
    let mut origin: HashMap<String, PathBuf> = HashMap::new();
    for file in &files {
        for (name, t) in read_file(file)? {
            origin.insert(name.clone(), file.clone());
            tensors.insert(name, t);
        }
    }
    for spec in specs {
        let file = origin
            .get(&spec.name)
            .or_else(|| placement.get(&spec.name))
            .cloned()
            .unwrap_or_else(|| files[0].clone());
        let t = tensors
            .get(&spec.name)
            .ok_or_else(|| LoadError::tensor(&file, &spec.name, "missing from the checkpoint"))?;
        if t.shape != spec.shape {
            return Err(LoadError::tensor(
                &file,
                &spec.name,
                format!(
                    "shape {:?} does not match {:?} implied by config.json",
                    t.shape, spec.shape
                ),
            ));
        }
    }
    Ok(WeightMap { tensors, files })
}

#[derive(serde::Deserialize)]
struct RawInfo {
    dtype: serde_json::Value,
    shape: Vec<usize>,
    data_offsets: (usize, usize),
}

/// Maps one file and parses its header into tensor views.
fn read_file(path: &Path) -> Result<Vec<(String, Tensor)>, LoadError> {
    let file = File::open(path).map_err(|e| LoadError::file(path, format!("cannot open: {e}")))?;
    // SAFETY: the mapping is read-only; like every mmap-based loader we rely on the file not
    // being modified while the engine runs (model files are immutable artefacts).
    let mmap = unsafe { Mmap::map(&file) }
        .map_err(|e| LoadError::file(path, format!("cannot map: {e}")))?;
    let file_len = mmap.len();
    if file_len < 8 {
        return Err(LoadError::file(
            path,
            format!("file is {file_len} bytes, too short for a safetensors header"),
        ));
    }
    let header_len = u64::from_le_bytes(mmap[..8].try_into().expect("8 bytes")) as usize;
    if header_len > MAX_HEADER_BYTES {
        return Err(LoadError::file(
            path,
            format!("corrupt header: header length {header_len} exceeds the 100 MB limit"),
        ));
    }
    if 8 + header_len > file_len {
        return Err(LoadError::file(
            path,
            format!(
                "corrupt or truncated header: header length {header_len} but the file has {} bytes after the length",
                file_len - 8
            ),
        ));
    }
    let header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&mmap[8..8 + header_len])
            .map_err(|e| LoadError::file(path, format!("corrupt header (invalid JSON): {e}")))?;
    let data_start = 8 + header_len;
    let data_len = file_len - data_start;
    let storage = Arc::new(Storage::Mapped(mmap));
    let mut out = Vec::with_capacity(header.len());
    for (name, value) in header {
        if name == "__metadata__" {
            continue;
        }
        let raw: RawInfo = serde_json::from_value(value)
            .map_err(|e| LoadError::tensor(path, &name, format!("corrupt header entry: {e}")))?;
        let st_dtype: StDtype = serde_json::from_value(raw.dtype.clone())
            .map_err(|_| LoadError::tensor(path, &name, format!("unknown dtype {}", raw.dtype)))?;
        let dtype = match st_dtype {
            StDtype::BF16 => DType::BF16,
            StDtype::F16 => DType::F16,
            StDtype::F32 => DType::F32,
            other => {
                return Err(LoadError::tensor(
                    path,
                    &name,
                    format!("dtype {other} is not supported (BF16, F16, F32)"),
                ))
            }
        };
        let info = TensorInfo {
            dtype: st_dtype,
            shape: raw.shape,
            data_offsets: raw.data_offsets,
        };
        let (begin, end) = info.data_offsets;
        let numel = info
            .shape
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .ok_or_else(|| LoadError::tensor(path, &name, "shape overflows"))?;
        let need = numel
            .checked_mul(dtype.size())
            .ok_or_else(|| LoadError::tensor(path, &name, "shape overflows"))?;
        if end < begin || end - begin != need {
            return Err(LoadError::tensor(
                path,
                &name,
                format!(
                    "data_offsets [{begin}, {end}] span {} bytes but shape {:?} of {} needs {need}",
                    end.saturating_sub(begin),
                    info.shape,
                    dtype.name()
                ),
            ));
        }
        if end > data_len {
            return Err(LoadError::tensor(
                path,
                &name,
                format!(
                    "file is truncated: the tensor needs bytes {begin}..{end} of the data section, which has only {data_len}"
                ),
            ));
        }
        let t = aligned_view(&storage, data_start + begin, need, dtype, info.shape);
        out.push((name, t));
    }
    Ok(out)
}

/// A view at `offset`, or (rarely: a writer that did not pad its header) an aligned copy.
fn aligned_view(
    storage: &Arc<Storage>,
    offset: usize,
    len: usize,
    dtype: DType,
    shape: Vec<usize>,
) -> Tensor {
    let ptr = storage.bytes()[offset..].as_ptr() as usize;
    if ptr.is_multiple_of(dtype.size()) {
        return Tensor {
            storage: storage.clone(),
            offset,
            len_bytes: len,
            dtype,
            shape,
        };
    }
    tracing::warn!("misaligned tensor data at byte {offset}: copying it");
    let bytes = &storage.bytes()[offset..offset + len];
    let owned = match dtype {
        DType::F32 => Storage::OwnedF32(
            bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
                .collect(),
        ),
        _ => Storage::OwnedU16(
            bytes
                .chunks_exact(2)
                .map(|c| u16::from_le_bytes(c.try_into().expect("2 bytes")))
                .collect(),
        ),
    };
    Tensor {
        storage: Arc::new(owned),
        offset: 0,
        len_bytes: len,
        dtype,
        shape,
    }
}

/// Deterministic random bf16 weights for `specs` (xorshift per tensor, seeded by name).
///
/// Matrices are uniform in ±1/sqrt(fan_in) so activations keep a sane scale through many
/// layers; 1-D tensors (norm weights) are 1 ± 0.1.
pub fn dummy_weights(specs: &[TensorSpec], seed: u64) -> WeightMap {
    let mut tensors = HashMap::new();
    for spec in specs {
        let numel: usize = spec.shape.iter().product();
        let mut state = seed ^ fnv1a(spec.name.as_bytes()) | 1;
        let (center, scale) = if spec.shape.len() == 1 {
            (1.0f32, 0.1f32)
        } else {
            (0.0, 1.0 / (*spec.shape.last().unwrap_or(&1) as f32).sqrt())
        };
        let data: Vec<u16> = (0..numel)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                let u = (state >> 40) as f32 / (1u64 << 24) as f32; // [0, 1)
                f32_to_bf16(center + scale * (2.0 * u - 1.0))
            })
            .collect();
        tensors.insert(
            spec.name.clone(),
            Tensor::from_bf16(data, spec.shape.clone()),
        );
    }
    WeightMap {
        tensors,
        files: Vec::new(),
    }
}

/// FNV-1a, 64 bits: stable across builds and machines (unlike the std hasher), for seeds and
/// fingerprints that must agree between processes and releases.
pub(crate) fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf29ce484222325u64, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x100000001b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_round_trip() {
        for x in [0.0f32, 1.0, -2.5, 3.25, 1e-20, 65504.0] {
            let b = f32_to_bf16(x);
            assert!((bf16_to_f32(b) - x).abs() <= x.abs() / 128.0);
        }
    }

    #[test]
    fn dummy_weights_are_deterministic() {
        let specs = vec![TensorSpec {
            name: "w".into(),
            shape: vec![4, 8],
        }];
        let a = dummy_weights(&specs, 7);
        let b = dummy_weights(&specs, 7);
        let c = dummy_weights(&specs, 8);
        assert_eq!(a.get("w").unwrap().bytes(), b.get("w").unwrap().bytes());
        assert_ne!(a.get("w").unwrap().bytes(), c.get("w").unwrap().bytes());
    }
}

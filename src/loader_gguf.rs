//! Zero-copy GGUF loading (a child module of `loader`).
//!
//! The file is mapped once; every tensor is a view into the mapping with its GGUF type (F32,
//! F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q4_K, Q6_K), under its Hugging Face name and shape
//! (`[out, in]`, the reverse of GGUF's fastest-first dimensions). One exception is copied: llama.cpp's converter
//! reorders the rows of `attn_q` and `attn_k` within each head (pairs of RoPE dimensions made
//! adjacent), so those rows are put back in Hugging Face order, whole quantized rows at a time
//! (about a tenth of the weights of a Llama model).
//!
//! Every problem (bad magic, truncated metadata or data, an unsupported type, a shape that
//! does not match config.json) is a [`LoadError`] naming the file and the tensor.

use std::collections::HashMap;
use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use memmap2::Mmap;

use super::{DType, LoadError, Storage, Tensor, TensorSpec, WeightMap};
use crate::quant::QuantType;

/// GGUF's default data alignment (`general.alignment` overrides it).
const DEFAULT_ALIGNMENT: u64 = 32;
/// The most values a metadata array may hold.
const MAX_META_ARRAY: u64 = 1 << 22;

/// A little-endian reader over the header, with errors that name the file.
struct Cursor<'a> {
    b: &'a [u8],
    at: usize,
    file: &'a Path,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], LoadError> {
        let end = self
            .at
            .checked_add(n)
            .filter(|&e| e <= self.b.len())
            .ok_or_else(|| {
                LoadError::file(
                    self.file,
                    format!(
                        "GGUF header is truncated at byte {} (needs {n} more)",
                        self.at
                    ),
                )
            })?;
        let s = &self.b[self.at..end];
        self.at = end;
        Ok(s)
    }
    fn u32(&mut self) -> Result<u32, LoadError> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4")))
    }
    fn u64(&mut self) -> Result<u64, LoadError> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8")))
    }
    fn string(&mut self) -> Result<String, LoadError> {
        let n = self.u64()?;
        if n > 1 << 24 {
            return Err(LoadError::file(
                self.file,
                format!("GGUF string of {n} bytes"),
            ));
        }
        let b = self.take(n as usize)?;
        String::from_utf8(b.to_vec())
            .map_err(|_| LoadError::file(self.file, "GGUF string is not UTF-8"))
    }
    /// Magic and version; returns the tensor and key/value counts.
    fn header(&mut self) -> Result<(u64, u64), LoadError> {
        if self.take(4)? != b"GGUF" {
            return Err(LoadError::file(self.file, "not a GGUF file (bad magic)"));
        }
        let version = self.u32()?;
        if !(2..=3).contains(&version) {
            return Err(LoadError::file(
                self.file,
                format!("GGUF version {version} is not supported (2, 3)"),
            ));
        }
        Ok((self.u64()?, self.u64()?))
    }
    /// An `n`-byte little-endian unsigned integer.
    fn le(&mut self, n: usize) -> Result<u64, LoadError> {
        let b = self.take(n)?;
        Ok(b.iter().rev().fold(0u64, |a, &x| (a << 8) | x as u64))
    }
    /// Reads a metadata value of type `ty`.
    fn meta(&mut self, ty: u32) -> Result<MetaValue, LoadError> {
        Ok(match ty {
            0 | 2 | 4 | 10 => {
                MetaValue::UInt(self.le([1, 0, 2, 0, 4, 0, 0, 0, 0, 0, 8][ty as usize])?)
            }
            1 => MetaValue::Int(self.le(1)? as u8 as i8 as i64),
            3 => MetaValue::Int(self.le(2)? as u16 as i16 as i64),
            5 => MetaValue::Int(self.le(4)? as u32 as i32 as i64),
            11 => MetaValue::Int(self.le(8)? as i64),
            6 => MetaValue::Float(f32::from_bits(self.le(4)? as u32) as f64),
            12 => MetaValue::Float(f64::from_bits(self.le(8)?)),
            7 => MetaValue::Bool(self.le(1)? != 0),
            8 => MetaValue::Str(self.string()?),
            9 => {
                let inner = self.u32()?;
                let count = self.u64()?;
                // every value takes at least a byte of the file, and the largest real arrays
                // (vocabularies, merges) hold a few hundred thousand: a damaged count is an
                // error, not an allocation of many times the file
                if count > (self.b.len() - self.at) as u64 || count > MAX_META_ARRAY {
                    return Err(LoadError::file(
                        self.file,
                        format!("GGUF array of {count} values"),
                    ));
                }
                let mut items = Vec::new();
                for _ in 0..count {
                    items.push(self.meta(inner)?);
                }
                MetaValue::Array(items)
            }
            t => {
                return Err(LoadError::file(
                    self.file,
                    format!("unknown GGUF value type {t}"),
                ))
            }
        })
    }
}

/// The ggml type `ty` as our dtype, or the error naming it.
fn dtype_of(ty: u32) -> Result<DType, String> {
    Ok(match ty {
        0 => DType::F32,
        1 => DType::F16,
        30 => DType::BF16,
        2 => DType::Quant(QuantType::Q4_0),
        3 => DType::Quant(QuantType::Q4_1),
        8 => DType::Quant(QuantType::Q8_0),
        6 => DType::Quant(QuantType::Q5_0),
        12 => DType::Quant(QuantType::Q4_K),
        14 => DType::Quant(QuantType::Q6_K),
        other => {
            let name = match other {
                7 => "Q5_1",
                9 => "Q8_1",
                10 => "Q2_K",
                11 => "Q3_K",
                13 => "Q5_K",
                15 => "Q8_K",
                _ => "",
            };
            return Err(format!(
                "type {name}{} is not supported (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q4_K, Q6_K)",
                if name.is_empty() {
                    format!("{other}")
                } else {
                    format!(" ({other})")
                }
            ));
        }
    })
}

/// The Hugging Face name of a GGUF tensor of a Llama model.
fn hf_name(gguf: &str) -> Option<String> {
    match gguf {
        "token_embd.weight" => return Some("model.embed_tokens.weight".into()),
        "output_norm.weight" => return Some("model.norm.weight".into()),
        "output.weight" => return Some("lm_head.weight".into()),
        _ => {}
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let part = match rest.strip_suffix(".weight")? {
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{part}.weight"))
}

/// Puts the rows of a GGUF `attn_q`/`attn_k` back in Hugging Face order: within each head
/// of `head_dim` rows, GGUF row `2i + j` is HF row `j · head_dim/2 + i`.
fn unpermute_rows(t: &Tensor, heads: usize) -> Tensor {
    let rows = t.shape[0];
    let row_bytes = t.len_bytes / rows;
    let (hd, half) = (rows / heads, rows / heads / 2);
    let src = t.bytes();
    let mut out = vec![0u8; t.len_bytes];
    for h in 0..heads {
        for j in 0..2 {
            for i in 0..half {
                let from = h * hd + 2 * i + j;
                let to = h * hd + j * half + i;
                out[to * row_bytes..(to + 1) * row_bytes]
                    .copy_from_slice(&src[from * row_bytes..(from + 1) * row_bytes]);
            }
        }
    }
    let storage = match t.dtype {
        DType::F32 => Storage::OwnedF32(
            out.chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().expect("4")))
                .collect(),
        ),
        DType::BF16 | DType::F16 => Storage::OwnedU16(
            out.chunks_exact(2)
                .map(|c| u16::from_le_bytes(c.try_into().expect("2")))
                .collect(),
        ),
        DType::Quant(_) => Storage::OwnedU8(out),
    };
    Tensor {
        storage: Arc::new(storage),
        offset: 0,
        len_bytes: t.len_bytes,
        dtype: t.dtype,
        shape: t.shape.clone(),
    }
}

/// Loads a Llama GGUF file and checks every tensor of `specs` (HF names and shapes) for
/// presence and shape. `heads` and `kv_heads` undo the converter's q/k row order.
pub fn load_gguf(
    path: &Path,
    specs: &[TensorSpec],
    heads: usize,
    kv_heads: usize,
) -> Result<WeightMap, LoadError> {
    let file = File::open(path).map_err(|e| LoadError::file(path, format!("cannot open: {e}")))?;
    // SAFETY: the mapping is read-only; as with safetensors, the file must not be truncated
    // while the engine runs (a documented requirement of serving from a mapped file).
    let map = unsafe { Mmap::map(&file) }
        .map_err(|e| LoadError::file(path, format!("cannot map: {e}")))?;
    let storage = Arc::new(Storage::Mapped(map));
    let bytes = storage.bytes();
    let mut c = Cursor {
        b: bytes,
        at: 0,
        file: path,
    };
    let (n_tensors, n_kv) = c.header()?;
    let mut alignment = DEFAULT_ALIGNMENT;
    for _ in 0..n_kv {
        let key = c.string()?;
        let ty = c.u32()?;
        let v = c.meta(ty)?;
        if key == "general.alignment" {
            alignment = Some(v)
                .and_then(|v| match v {
                    MetaValue::UInt(a) => Some(a),
                    _ => None,
                })
                .filter(|&a| a > 0 && a.is_power_of_two())
                .ok_or_else(|| LoadError::file(path, "general.alignment is not a power of two"))?;
        }
    }
    struct Info {
        name: String,
        dims: Vec<usize>,
        dtype: Result<DType, String>,
        offset: u64,
    }
    let mut infos = Vec::new();
    for _ in 0..n_tensors {
        let name = c.string()?;
        let n_dims = c.u32()?;
        if n_dims > 4 {
            return Err(LoadError::tensor(
                path,
                &name,
                format!("{n_dims} dimensions"),
            ));
        }
        let mut dims = Vec::new();
        for _ in 0..n_dims {
            dims.push(c.u64()? as usize);
        }
        let dtype = dtype_of(c.u32()?);
        let offset = c.u64()?;
        infos.push(Info {
            name,
            dims,
            dtype,
            offset,
        });
    }
    let data_start = (c.at as u64).div_ceil(alignment) * alignment;
    let data_len = (bytes.len() as u64).saturating_sub(data_start);

    let mut tensors = HashMap::new();
    for info in infos {
        let Some(name) = hf_name(&info.name) else {
            continue; // e.g. rope_freqs: not used by this model definition
        };
        let dtype = info
            .dtype
            .map_err(|m| LoadError::tensor(path, &info.name, m))?;
        let numel = info
            .dims
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .ok_or_else(|| LoadError::tensor(path, &info.name, "shape overflows"))?;
        let need = match dtype.quant() {
            Some(q) => {
                if info.dims.first().is_none_or(|d| d % q.block_values() != 0) {
                    return Err(LoadError::tensor(
                        path,
                        &info.name,
                        format!(
                            "{} rows of {:?} values are not whole blocks",
                            q.name(),
                            info.dims.first()
                        ),
                    ));
                }
                q.row_bytes(numel)
            }
            None => numel * dtype.size(),
        } as u64;
        if info.offset % alignment != 0 {
            return Err(LoadError::tensor(
                path,
                &info.name,
                format!("offset {} is not aligned to {alignment}", info.offset),
            ));
        }
        if info
            .offset
            .checked_add(need)
            .is_none_or(|end| end > data_len)
        {
            return Err(LoadError::tensor(
                path,
                &info.name,
                format!(
                    "file is truncated: the tensor needs bytes {}..{} of the data section, which has only {data_len}",
                    info.offset,
                    info.offset.saturating_add(need)
                ),
            ));
        }
        let shape: Vec<usize> = info.dims.iter().rev().copied().collect();
        let t = Tensor {
            storage: storage.clone(),
            offset: (data_start + info.offset) as usize,
            len_bytes: need as usize,
            dtype,
            shape,
        };
        let t = if info.name.ends_with("attn_q.weight") {
            check_heads(path, &info.name, &t, heads)?;
            unpermute_rows(&t, heads)
        } else if info.name.ends_with("attn_k.weight") {
            check_heads(path, &info.name, &t, kv_heads)?;
            unpermute_rows(&t, kv_heads)
        } else {
            t
        };
        tensors.insert(name, t);
    }
    for spec in specs {
        let t = tensors
            .get(&spec.name)
            .ok_or_else(|| LoadError::tensor(path, &spec.name, "missing from the GGUF file"))?;
        if t.shape != spec.shape {
            return Err(LoadError::tensor(
                path,
                &spec.name,
                format!(
                    "shape {:?} does not match {:?} implied by config.json",
                    t.shape, spec.shape
                ),
            ));
        }
        if t.shape.len() == 1 && t.dtype.quant().is_some() {
            return Err(LoadError::tensor(
                path,
                &spec.name,
                "a quantized vector is not supported",
            ));
        }
    }
    Ok(WeightMap {
        tensors,
        files: vec![path.to_path_buf()],
    })
}

fn check_heads(path: &Path, name: &str, t: &Tensor, heads: usize) -> Result<(), LoadError> {
    let rows = t.shape.first().copied().unwrap_or(0);
    if heads == 0 || t.shape.len() != 2 || rows % heads != 0 || !(rows / heads).is_multiple_of(2) {
        return Err(LoadError::tensor(
            path,
            name,
            format!("{rows} rows cannot be {heads} heads of an even head size"),
        ));
    }
    Ok(())
}

/// The GGUF file a model path names: the path itself when it is a file, else the one `.gguf`
/// file in the directory.
pub fn find_gguf(model_path: &Path) -> Result<std::path::PathBuf, LoadError> {
    if model_path.is_file() {
        return Ok(model_path.to_path_buf());
    }
    let mut found: Vec<_> = std::fs::read_dir(model_path)
        .map_err(|e| LoadError::file(model_path, format!("cannot list: {e}")))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "gguf"))
        .collect();
    found.sort();
    match found.len() {
        1 => Ok(found.remove(0)),
        0 => Err(LoadError::file(
            model_path,
            "no .gguf file in the model directory",
        )),
        _ => Err(LoadError::file(
            model_path,
            format!("several .gguf files ({found:?}): name one with --model-path"),
        )),
    }
}

/// A metadata value of a GGUF file.
#[derive(Debug, Clone, PartialEq)]
pub enum MetaValue {
    UInt(u64),
    Int(i64),
    Float(f64),
    Bool(bool),
    Str(String),
    Array(Vec<MetaValue>),
}

/// The key/value metadata of a GGUF file and the names of its tensors: what a GGUF without a
/// Hugging Face directory around it has to say about its model and tokenizer.
#[derive(Debug)]
pub struct GgufMetadata {
    pub path: std::path::PathBuf,
    pub kv: std::collections::BTreeMap<String, MetaValue>,
    pub tensors: Vec<String>,
}

/// Reads the metadata of the GGUF file `path` (not its tensor data).
pub fn read_metadata(path: &Path) -> Result<GgufMetadata, LoadError> {
    let file = File::open(path).map_err(|e| LoadError::file(path, format!("cannot open: {e}")))?;
    // SAFETY: read-only, and only for the duration of this call.
    let map = unsafe { Mmap::map(&file) }
        .map_err(|e| LoadError::file(path, format!("cannot map: {e}")))?;
    let mut c = Cursor {
        b: &map,
        at: 0,
        file: path,
    };
    let (n_tensors, n_kv) = c.header()?;
    let mut kv = std::collections::BTreeMap::new();
    for _ in 0..n_kv {
        let key = c.string()?;
        let ty = c.u32()?;
        kv.insert(key, c.meta(ty)?);
    }
    let mut tensors = Vec::new();
    for _ in 0..n_tensors {
        tensors.push(c.string()?);
        let n_dims = c.u32()?;
        c.take(8 * n_dims.min(4) as usize + 12)?; // dims, type, offset
    }
    Ok(GgufMetadata {
        path: path.to_path_buf(),
        kv,
        tensors,
    })
}

/// Texts of control tokens that end a turn, which llama.cpp also treats as end of generation
/// whatever the file's `eos_token_id` says.
const END_OF_TURN: &[&str] = &[
    "<|im_end|>",
    "<|eot_id|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|end_of_text|>",
];

impl GgufMetadata {
    fn err(&self, key: &str, message: impl std::fmt::Display) -> LoadError {
        LoadError::file(&self.path, format!("metadata `{key}`: {message}"))
    }
    fn uint(&self, key: &str) -> Result<Option<u64>, LoadError> {
        match self.kv.get(key) {
            None => Ok(None),
            Some(MetaValue::UInt(v)) => Ok(Some(*v)),
            Some(MetaValue::Int(v)) if *v >= 0 => Ok(Some(*v as u64)),
            Some(v) => Err(self.err(key, format!("{v:?} is not a count"))),
        }
    }
    fn need_uint(&self, key: &str) -> Result<u64, LoadError> {
        self.uint(key)?.ok_or_else(|| self.err(key, "missing"))
    }
    fn float(&self, key: &str) -> Result<Option<f64>, LoadError> {
        match self.kv.get(key) {
            None => Ok(None),
            Some(MetaValue::Float(v)) => Ok(Some(*v)),
            Some(v) => Err(self.err(key, format!("{v:?} is not a number"))),
        }
    }
    fn str(&self, key: &str) -> Result<Option<&str>, LoadError> {
        match self.kv.get(key) {
            None => Ok(None),
            Some(MetaValue::Str(v)) => Ok(Some(v)),
            Some(v) => Err(self.err(key, format!("{v:?} is not a string"))),
        }
    }
    fn strings(&self, key: &str) -> Result<Vec<&str>, LoadError> {
        match self.kv.get(key) {
            Some(MetaValue::Array(items)) => items
                .iter()
                .map(|v| match v {
                    MetaValue::Str(s) => Ok(s.as_str()),
                    _ => Err(self.err(key, "is not a list of strings")),
                })
                .collect(),
            None => Err(self.err(key, "missing")),
            Some(_) => Err(self.err(key, "is not a list of strings")),
        }
    }
    fn token_types(&self, n: usize) -> Result<Vec<i64>, LoadError> {
        let key = "tokenizer.ggml.token_type";
        match self.kv.get(key) {
            // absent: all normal
            None => Ok(vec![1; n]),
            Some(MetaValue::Array(items)) if items.len() == n => items
                .iter()
                .map(|v| match v {
                    MetaValue::Int(t) => Ok(*t),
                    MetaValue::UInt(t) => Ok(*t as i64),
                    _ => Err(self.err(key, "is not a list of integers")),
                })
                .collect(),
            Some(_) => Err(self.err(key, format!("is not a list of {n} integers"))),
        }
    }

    /// The model's end-of-generation ids: `tokenizer.ggml.eos_token_id`, `eot_token_id`, and
    /// the control tokens that end a turn ([`END_OF_TURN`]), as llama.cpp gathers them.
    fn eos_ids(&self) -> Result<Vec<u64>, LoadError> {
        let mut ids: Vec<u64> = ["tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id"]
            .iter()
            .filter_map(|k| self.uint(k).transpose())
            .collect::<Result<_, _>>()?;
        if let Ok(tokens) = self.strings("tokenizer.ggml.tokens") {
            let types = self.token_types(tokens.len())?;
            for (i, (t, ty)) in tokens.iter().zip(types).enumerate() {
                if ty == 3 && END_OF_TURN.contains(t) && !ids.contains(&(i as u64)) {
                    ids.push(i as u64);
                }
            }
        }
        Ok(ids)
    }

    /// The Hugging Face `config.json` this file's `llama.*` metadata describes (a model
    /// directory's config.json, when there is one, is used instead). Tied embeddings when the
    /// file has no `output.weight`. RoPE scaling is not read from GGUF metadata: a file that
    /// declares it is an error naming the key.
    pub fn hf_config(&self) -> Result<serde_json::Value, LoadError> {
        let arch = self.str("general.architecture")?.unwrap_or("");
        if arch != "llama" {
            return Err(self.err(
                "general.architecture",
                format!("{arch:?} is not supported (llama)"),
            ));
        }
        let k = |name: &str| format!("llama.{name}");
        if let Some(t) = self.str(&k("rope.scaling.type"))? {
            if t != "none" {
                return Err(self.err(
                    &k("rope.scaling.type"),
                    format!("{t:?}: RoPE scaling from GGUF metadata is not supported; put the model's config.json beside the file"),
                ));
            }
        }
        if self.tensors.iter().any(|t| t == "rope_freqs.weight") {
            return Err(self.err(
                "rope_freqs.weight",
                "RoPE frequency factors (Llama 3.1 scaling) from GGUF are not supported; put the model's config.json beside the file",
            ));
        }
        let heads = self.need_uint(&k("attention.head_count"))?;
        let hidden = self.need_uint(&k("embedding_length"))?;
        let vocab = match self.uint(&k("vocab_size"))? {
            Some(v) => v,
            None => self.strings("tokenizer.ggml.tokens")?.len() as u64,
        };
        let mut cfg = serde_json::json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_act": "silu",
            "hidden_size": hidden,
            "intermediate_size": self.need_uint(&k("feed_forward_length"))?,
            "num_hidden_layers": self.need_uint(&k("block_count"))?,
            "num_attention_heads": heads,
            "num_key_value_heads": self.uint(&k("attention.head_count_kv"))?.unwrap_or(heads),
            "rms_norm_eps": self.float(&k("attention.layer_norm_rms_epsilon"))?.unwrap_or(1e-5),
            "rope_theta": self.float(&k("rope.freq_base"))?.unwrap_or(10000.0),
            "max_position_embeddings": self.need_uint(&k("context_length"))?,
            "vocab_size": vocab,
            "tie_word_embeddings": !self.tensors.iter().any(|t| t == "output.weight"),
            "eos_token_id": self.eos_ids()?,
        });
        if let Some(hd) = self.uint(&k("attention.key_length"))? {
            cfg["head_dim"] = hd.into();
        }
        if let Some(bos) = self.uint("tokenizer.ggml.bos_token_id")? {
            cfg["bos_token_id"] = bos.into();
        }
        Ok(cfg)
    }

    /// The Hugging Face `tokenizer.json` and `tokenizer_config.json` (chat template, bos and
    /// eos texts) this file's `tokenizer.*` metadata describes. Byte-level BPE only
    /// (`tokenizer.ggml.model` `gpt2`) with the `smollm` (digits split one by one, then GPT-2's
    /// byte-level rule) or the plain `gpt-2` pre-tokenizer; other tokenizers are an error
    /// naming the key (a tokenizer.json beside the file is used instead).
    pub fn hf_tokenizer(&self) -> Result<(serde_json::Value, serde_json::Value), LoadError> {
        use serde_json::json;
        let model = self.str("tokenizer.ggml.model")?.unwrap_or("");
        if model != "gpt2" {
            return Err(self.err(
                "tokenizer.ggml.model",
                format!("{model:?} is not supported from GGUF metadata (gpt2, byte-level BPE); put the model's tokenizer.json beside the file"),
            ));
        }
        let byte_level = json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true});
        let pre = match self.str("tokenizer.ggml.pre")?.unwrap_or("default") {
            "smollm" => json!({"type": "Sequence", "pretokenizers": [
                {"type": "Digits", "individual_digits": true}, byte_level]}),
            "gpt-2" | "default" => byte_level,
            other => {
                return Err(self.err(
                    "tokenizer.ggml.pre",
                    format!("{other:?} is not supported from GGUF metadata (smollm, gpt-2); put the model's tokenizer.json beside the file"),
                ))
            }
        };
        let tokens = self.strings("tokenizer.ggml.tokens")?;
        let types = self.token_types(tokens.len())?;
        let merges = self.strings("tokenizer.ggml.merges")?;
        let vocab: serde_json::Map<String, serde_json::Value> = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.to_string(), i.into()))
            .collect();
        // control (3) and user-defined (4) tokens are matched whole, before the BPE
        let added: Vec<_> = tokens
            .iter()
            .zip(&types)
            .enumerate()
            .filter(|(_, (_, &ty))| ty == 3 || ty == 4)
            .map(|(i, (t, &ty))| {
                json!({"id": i, "content": t, "single_word": false, "lstrip": false,
                       "rstrip": false, "normalized": false, "special": ty == 3})
            })
            .collect();
        let name = |key: &str| -> Result<Option<&str>, LoadError> {
            Ok(self
                .uint(key)?
                .and_then(|id| tokens.get(id as usize).copied()))
        };
        let bos = name("tokenizer.ggml.bos_token_id")?;
        let post = if self.kv.get("tokenizer.ggml.add_bos_token") == Some(&MetaValue::Bool(true)) {
            let bos = bos.ok_or_else(|| self.err("tokenizer.ggml.bos_token_id", "missing"))?;
            let id = self.need_uint("tokenizer.ggml.bos_token_id")?;
            json!({"type": "TemplateProcessing",
                   "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                   "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                            {"Sequence": {"id": "B", "type_id": 1}}],
                   "special_tokens": {bos: {"id": bos, "ids": [id], "tokens": [bos]}}})
        } else {
            json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true})
        };
        let tokenizer = json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added,
            "normalizer": null,
            "pre_tokenizer": pre,
            "post_processor": post,
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
            "model": {"type": "BPE", "dropout": null, "unk_token": null,
                      "continuing_subword_prefix": null, "end_of_word_suffix": null,
                      "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                      "vocab": vocab, "merges": merges},
        });
        let eos = name("tokenizer.ggml.eos_token_id")?;
        let config = json!({
            "chat_template": self.str("tokenizer.chat_template")?,
            "bos_token": bos,
            "eos_token": eos,
        });
        Ok((tokenizer, config))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_to_hugging_face() {
        assert_eq!(
            hf_name("blk.12.ffn_down.weight").as_deref(),
            Some("model.layers.12.mlp.down_proj.weight")
        );
        assert_eq!(
            hf_name("token_embd.weight").as_deref(),
            Some("model.embed_tokens.weight")
        );
        assert_eq!(hf_name("rope_freqs.weight"), None);
    }

    #[test]
    fn unpermute_inverts_the_converters_order() {
        // 2 heads of 4 rows, one f32 value per row = its HF index, stored in GGUF order
        let hf: Vec<f32> = (0..8).map(|i| i as f32).collect();
        let mut gguf = vec![0.0; 8];
        for h in 0..2 {
            for i in 0..2 {
                for j in 0..2 {
                    gguf[h * 4 + 2 * i + j] = hf[h * 4 + j * 2 + i];
                }
            }
        }
        let t = unpermute_rows(&Tensor::from_f32(gguf, vec![8, 1]), 2);
        let mut out = vec![0.0; 8];
        t.elems().to_f32(&mut out);
        assert_eq!(out, hf);
    }

    /// A metadata array's declared count is checked before anything is allocated for it: past
    /// the file's end, or past MAX_META_ARRAY values even where the file is that long.
    #[test]
    fn metadata_array_counts_are_bounded() {
        let file = Path::new("m.gguf");
        let array = |count: u64, pad: usize| {
            let mut b = 0u32.to_le_bytes().to_vec(); // of u8
            b.extend(count.to_le_bytes());
            b.resize(b.len() + pad, 7);
            b
        };
        let read = |b: &[u8]| {
            let mut c = Cursor { b, at: 0, file };
            c.meta(9)
        };
        let ok = read(&array(3, 3)).unwrap();
        assert_eq!(ok, MetaValue::Array(vec![MetaValue::UInt(7); 3]));
        for (count, pad) in [(4, 3), (MAX_META_ARRAY + 1, MAX_META_ARRAY as usize + 1)] {
            let err = read(&array(count, pad)).unwrap_err().to_string();
            assert!(
                err.contains("m.gguf") && err.contains(&format!("{count} values")),
                "{err}"
            );
        }
    }

    #[test]
    fn unsupported_types_are_named() {
        assert!(dtype_of(13).unwrap_err().contains("Q5_K"));
        assert!(dtype_of(99).unwrap_err().contains("99"));
        assert_eq!(dtype_of(3).unwrap(), DType::Quant(QuantType::Q4_1));
        assert_eq!(dtype_of(12).unwrap(), DType::Quant(QuantType::Q4_K));
        assert_eq!(dtype_of(14).unwrap(), DType::Quant(QuantType::Q6_K));
        assert_eq!(dtype_of(6).unwrap(), DType::Quant(QuantType::Q5_0));
    }
}

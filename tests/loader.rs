//! Loader: every damaged model file is a clear error naming the file and the tensor; good files
//! load zero-copy (bf16, f16, f32, one file or shards); `--load-format dummy` works.

use std::collections::BTreeMap;
use std::path::Path;

use sglang::batch::{LogitsWanted, StepBatch};
use sglang::config::{Dtype, EngineConfig, LoadFormat, ModelConfig};
use sglang::kv::PagePool;
use sglang::loader;
use sglang::model::llama;
use sglang::runner;

const CONFIG: &str = r#"{"architectures": ["LlamaForCausalLM"], "hidden_size": 64,
  "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
  "num_key_value_heads": 2, "vocab_size": 128, "max_position_embeddings": 256,
  "rms_norm_eps": 1e-5, "tie_word_embeddings": false, "eos_token_id": 2}"#;

#[derive(Clone)]
struct T {
    dtype: &'static str,
    shape: Vec<usize>,
    data: Vec<u8>,
}

/// Random tensors for CONFIG in `dtype` ("BF16", "F16", "F32"); the values are the same
/// bf16-representable numbers whatever the dtype, so every dtype gives the same model.
fn tensors(dtype: &'static str) -> BTreeMap<String, T> {
    let cfg = ModelConfig::from_json(CONFIG, Path::new("config.json")).unwrap();
    let mut out = BTreeMap::new();
    let mut s = 0x9E3779B97F4A7C15u64;
    for spec in llama::tensor_specs(&cfg) {
        let n: usize = spec.shape.iter().product();
        let vals: Vec<f32> = (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                let u = (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
                let v = if spec.shape.len() == 1 {
                    1.0 + u * 0.2
                } else {
                    u * 0.3
                };
                loader::bf16_to_f32(loader::f32_to_bf16(v))
            })
            .collect();
        let data: Vec<u8> = match dtype {
            "BF16" => vals
                .iter()
                .flat_map(|&v| loader::f32_to_bf16(v).to_le_bytes())
                .collect(),
            "F16" => vals
                .iter()
                .flat_map(|&v| half::f16::from_f32(v).to_bits().to_le_bytes())
                .collect(),
            _ => vals.iter().flat_map(|&v| v.to_le_bytes()).collect(),
        };
        out.insert(
            spec.name,
            T {
                dtype,
                shape: spec.shape,
                data,
            },
        );
    }
    out
}

/// Writes a safetensors file (header padded to 8 bytes, as writers do).
fn write(path: &Path, tensors: &BTreeMap<String, T>) {
    let mut header = serde_json::Map::new();
    let mut offset = 0;
    for (name, t) in tensors {
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": t.dtype, "shape": t.shape, "data_offsets": [offset, offset + t.data.len()]}),
        );
        offset += t.data.len();
    }
    let mut h = serde_json::to_vec(&header).unwrap();
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let mut bytes = (h.len() as u64).to_le_bytes().to_vec();
    bytes.extend(h);
    for t in tensors.values() {
        bytes.extend(&t.data);
    }
    std::fs::write(path, bytes).unwrap();
}

fn model_dir(tensors: &BTreeMap<String, T>) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("config.json"), CONFIG).unwrap();
    write(&dir.path().join("model.safetensors"), tensors);
    dir
}

fn load_err(dir: &Path) -> String {
    let mut cfg = EngineConfig::new(dir);
    cfg.max_total_tokens = Some(256);
    match runner::load(&cfg) {
        Ok(_) => panic!("loading {} should fail", dir.display()),
        Err(e) => e.to_string(),
    }
}

const VICTIM: &str = "model.layers.1.self_attn.q_proj.weight";

#[test]
fn truncated_file_names_file_and_tensor() {
    let dir = model_dir(&tensors("BF16"));
    let path = dir.path().join("model.safetensors");
    let len = std::fs::metadata(&path).unwrap().len();
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.set_len(len - 100).unwrap();
    let e = load_err(dir.path());
    assert!(
        e.contains("model.safetensors") && e.contains("truncated"),
        "{e}"
    );
    // the tensors are sorted by name; the last one is cut
    assert!(e.contains("model.norm.weight"), "{e}");
}

#[test]
fn unsupported_dtype_names_the_tensor() {
    let mut t = tensors("BF16");
    let v = t.get_mut(VICTIM).unwrap();
    v.dtype = "I16"; // same size, so only the dtype is wrong
    let dir = model_dir(&t);
    let e = load_err(dir.path());
    assert!(
        e.contains(VICTIM) && e.contains("I16") && e.contains("not supported"),
        "{e}"
    );
}

#[test]
fn missing_tensor_is_named() {
    let mut t = tensors("BF16");
    t.remove("model.layers.0.mlp.up_proj.weight");
    let dir = model_dir(&t);
    let e = load_err(dir.path());
    assert!(
        e.contains("model.layers.0.mlp.up_proj.weight") && e.contains("missing"),
        "{e}"
    );
    assert!(e.contains("model.safetensors"), "{e}");
}

#[test]
fn corrupt_headers_are_errors() {
    let dir = model_dir(&tensors("BF16"));
    let path = dir.path().join("model.safetensors");
    let mut bytes = std::fs::read(&path).unwrap();
    // garbage in the JSON
    bytes[8..20].copy_from_slice(b"{{{{not json");
    std::fs::write(&path, &bytes).unwrap();
    let e = load_err(dir.path());
    assert!(
        e.contains("model.safetensors") && e.contains("corrupt header"),
        "{e}"
    );
    // a header length past the end of the file
    bytes[..8].copy_from_slice(&(u64::MAX / 2).to_le_bytes());
    std::fs::write(&path, &bytes).unwrap();
    let e = load_err(dir.path());
    assert!(e.contains("corrupt"), "{e}");
    // too short to hold a header at all
    std::fs::write(&path, b"abc").unwrap();
    let e = load_err(dir.path());
    assert!(e.contains("too short"), "{e}");
    // offsets that do not match the shape
    let mut t = tensors("BF16");
    t.get_mut(VICTIM).unwrap().data.truncate(10);
    write(&path, &t);
    let e = load_err(dir.path());
    assert!(e.contains(VICTIM) && e.contains("data_offsets"), "{e}");
}

#[test]
fn shape_mismatch_names_the_tensor() {
    let mut t = tensors("BF16");
    let v = t.get_mut(VICTIM).unwrap();
    v.shape = vec![32, 128]; // same element count, wrong shape
    let dir = model_dir(&t);
    let e = load_err(dir.path());
    assert!(
        e.contains(VICTIM) && e.contains("shape") && e.contains("[64, 64]"),
        "{e}"
    );
}

#[test]
fn bad_config_is_named() {
    let dir = model_dir(&tensors("BF16"));
    std::fs::write(dir.path().join("config.json"), r#"{"hidden_size": 64}"#).unwrap();
    let e = load_err(dir.path());
    assert!(e.contains("config.json"), "{e}");
}

/// Logits of a short prompt on the model in `dir`.
fn logits(dir: &Path, format: LoadFormat) -> Vec<f32> {
    let mut cfg = EngineConfig::new(dir);
    cfg.max_total_tokens = Some(256);
    cfg.load_format = format;
    // f32 inputs: bf16 inputs would round only the products with bf16 weights
    cfg.dtype = Dtype::Float32;
    let mut r = runner::load(&cfg).unwrap();
    let (pages, ps) = r.kv_pages();
    let mut pool = PagePool::new(pages, ps);
    let mut table = Vec::new();
    assert!(pool.alloc_into(&mut table, 1));
    let mut b = StepBatch {
        page_size: ps,
        ..Default::default()
    };
    b.push_seq(&[5, 17, 99, 3], 0, &table, LogitsWanted::Last);
    r.forward(&b).unwrap().to_vec()
}

#[test]
fn every_dtype_and_shards_give_the_same_model() {
    let bf16 = logits(model_dir(&tensors("BF16")).path(), LoadFormat::Safetensors);
    for dtype in ["F16", "F32"] {
        let l = logits(model_dir(&tensors(dtype)).path(), LoadFormat::Safetensors);
        let err: f32 = l
            .iter()
            .zip(&bf16)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        assert!(err < 1e-4, "{dtype}: max abs diff {err}");
    }
    // two shards and an index
    let all = tensors("BF16");
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("config.json"), CONFIG).unwrap();
    let (a, b): (BTreeMap<_, _>, BTreeMap<_, _>) =
        all.into_iter().partition(|(n, _)| n.contains("layers.0"));
    write(&dir.path().join("model-00001-of-00002.safetensors"), &a);
    write(&dir.path().join("model-00002-of-00002.safetensors"), &b);
    let mut map = serde_json::Map::new();
    for n in a.keys() {
        map.insert(n.clone(), "model-00001-of-00002.safetensors".into());
    }
    for n in b.keys() {
        map.insert(n.clone(), "model-00002-of-00002.safetensors".into());
    }
    std::fs::write(
        dir.path().join("model.safetensors.index.json"),
        serde_json::json!({"metadata": {}, "weight_map": map}).to_string(),
    )
    .unwrap();
    assert_eq!(logits(dir.path(), LoadFormat::Safetensors), bf16);
}

#[test]
fn weights_are_views_into_the_mapping() {
    let dir = model_dir(&tensors("BF16"));
    let cfg = ModelConfig::from_dir(dir.path()).unwrap();
    let w = loader::load_safetensors(dir.path(), &llama::tensor_specs(&cfg)).unwrap();
    let t = w.get(VICTIM).unwrap();
    assert!(t.is_mapped(), "bf16 weights must not be copied");
    assert_eq!(t.shape(), &[64, 64]);
}

#[test]
fn dummy_weights_need_only_a_config() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("config.json"), CONFIG).unwrap();
    let a = logits(dir.path(), LoadFormat::Dummy);
    let b = logits(dir.path(), LoadFormat::Dummy);
    assert_eq!(a, b, "dummy weights are deterministic");
    assert!(a.iter().all(|v| v.is_finite()));
}

//! From a configuration to a [`ModelRunner`]: device choice, reading (or generating) the
//! weights, sizing the KV pool, and starting the ranks of a tensor-parallel group (threads of
//! this process, or processes that join rank 0 over TCP).

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::tp::{self, TpRunner};
use super::{weight_bytes, ModelRunner, Runner};
use crate::backend::cpu::CpuBackend;
use crate::backend::BackendError;
use crate::config::{
    ConfigError, Device, Dtype, EngineConfig, KvCacheDtype, LoadFormat, ModelConfig,
};
use crate::loader::{self, LoadError, WeightMap};
use crate::model::llama::{self, LlamaModel};
use crate::parallel::tcp::{GroupParams, TcpComm};
use crate::parallel::{CommError, Communicator, Shard};

#[derive(Debug, thiserror::Error)]
pub enum LoadModelError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error("--device cuda: {0}")]
    NoCuda(String),
    /// The tensor-parallel group could not form, or stopped while starting.
    #[error("tensor parallelism: {0}")]
    Group(#[from] CommError),
    /// A tensor-parallel set-up this build or this call cannot run.
    #[error("tensor parallelism: {0}")]
    Unsupported(String),
}

/// A model read and checked, before it is built on a device.
struct Prepared {
    model_cfg: ModelConfig,
    weights: WeightMap,
    /// KV pages of every rank (the pool is sized for the whole model).
    num_pages: usize,
    /// Ranks of the tensor-parallel group.
    group: usize,
}

/// The GGUF file whose metadata stands in for the Hugging Face file `name` (`config.json`,
/// `tokenizer.json`) when the model directory lacks it; None when the directory has it or the
/// model is not GGUF.
fn gguf_standing_in_for(cfg: &EngineConfig, name: &str) -> Option<std::path::PathBuf> {
    let dir = cfg.model_dir();
    if dir.join(name).exists() || cfg.resolved_load_format() != LoadFormat::Gguf {
        return None;
    }
    loader::find_gguf(&cfg.model_path).ok()
}

/// The model's configuration: `config.json` of the model directory, or, for a GGUF model
/// without one, the file's `llama.*` metadata ([`loader::GgufMetadata::hf_config`]).
pub fn model_config(cfg: &EngineConfig) -> Result<ModelConfig, LoadModelError> {
    match gguf_standing_in_for(cfg, "config.json") {
        None => Ok(ModelConfig::from_dir(cfg.model_dir())?),
        Some(path) => {
            let json = loader::read_metadata(&path)?.hf_config()?;
            Ok(ModelConfig::from_json(&json.to_string(), &path)?)
        }
    }
}

/// For a GGUF model whose directory has no `tokenizer.json`: the `tokenizer.json` and
/// `tokenizer_config.json` texts its metadata describes, and the file's path (the engine
/// builds the tokenizer; this floor does not know tokenizers).
pub fn gguf_tokenizer(
    cfg: &EngineConfig,
) -> Result<Option<(String, serde_json::Value, std::path::PathBuf)>, LoadModelError> {
    let Some(path) = gguf_standing_in_for(cfg, "tokenizer.json") else {
        return Ok(None);
    };
    let (tokenizer, config) = loader::read_metadata(&path)?.hf_tokenizer()?;
    Ok(Some((tokenizer.to_string(), config, path)))
}

fn prepare(cfg: &EngineConfig) -> Result<Prepared, LoadModelError> {
    cfg.validate()?;
    let model_cfg = model_config(cfg)?;
    let group = cfg.group_size();
    Shard::check(&model_cfg, group).map_err(|message| ConfigError::Option {
        option: "tp-size",
        message,
    })?;
    let started = Instant::now();
    let specs = llama::tensor_specs(&model_cfg);
    let format = cfg.resolved_load_format();
    if cfg.quantization.is_some() && format == LoadFormat::Gguf {
        return Err(ConfigError::Option {
            option: "quantization",
            message: "applies to safetensors (and dummy) weights; a GGUF file is served in the \
                      formats it holds"
                .into(),
        }
        .into());
    }
    let mut weights = match format {
        LoadFormat::Safetensors | LoadFormat::Auto => {
            loader::load_safetensors(&cfg.model_path, &specs)?
        }
        LoadFormat::Gguf => loader::load_gguf(
            &loader::find_gguf(&cfg.model_path)?,
            &specs,
            model_cfg.num_heads,
            model_cfg.num_kv_heads,
        )?,
        LoadFormat::Dummy => loader::dummy_weights(&specs, cfg.dummy_seed),
    };
    if let Some(q) = cfg.quantization {
        let from = weights.total_bytes();
        let n = weights.quantize(q, threads_per_rank(cfg, 1))?;
        tracing::info!(
            "quantized {n} tensors to {} while loading: {:.1} MB -> {:.1} MB",
            q.name(),
            from as f64 / 1e6,
            weights.total_bytes() as f64 / 1e6
        );
    }
    if group > 1 && weights.is_quantized() {
        return Err(ConfigError::Option {
            option: "tp-size",
            message: "tensor parallelism over quantized (GGUF) weights is not supported yet".into(),
        }
        .into());
    }
    tracing::info!(
        "loaded {} ({} parameters, {:.1} MB of weights, {} tensors) in {:.2}s",
        cfg.model_path.display(),
        model_cfg.num_parameters(),
        weights.total_bytes() as f64 / 1e6,
        weights.len(),
        started.elapsed().as_secs_f64()
    );
    let per_token =
        model_cfg.kv_bytes_per_token(crate::backend::cpu::kv_elem_bytes(cfg.kv_cache_dtype));
    let total_tokens = cfg
        .max_total_tokens
        .unwrap_or_else(|| default_kv_tokens(per_token, cfg.page_size));
    kv_pool_bytes(total_tokens, per_token)?;
    Ok(Prepared {
        num_pages: (total_tokens / cfg.page_size).max(1),
        model_cfg,
        weights,
        group,
    })
}

/// CPU threads of each rank of this process: the cores shared by its ranks.
fn threads_per_rank(cfg: &EngineConfig, ranks_here: usize) -> usize {
    let cores = cfg.num_threads.unwrap_or_else(|| {
        std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
    });
    (cores / ranks_here).max(1)
}

/// Identifies a model across processes: its shape, the size of every tensor, and the
/// numerics that must match across ranks (`--dtype` and `--kv-cache-dtype`, as the CPU, where
/// groups run, resolves `auto`).
fn model_fingerprint(cfg: &EngineConfig, p: &Prepared) -> u64 {
    let c = &p.model_cfg;
    let kv = match cfg.kv_cache_dtype {
        KvCacheDtype::Bf16 => "bf16",
        KvCacheDtype::Auto | KvCacheDtype::Fp32 => "fp32",
    };
    let dtype = crate::backend::cpu::resolve_dtype(cfg.dtype).name();
    let text = format!(
        "{} {} {} {} {} {} {} {} {} {kv} {dtype}",
        c.hidden_size,
        c.intermediate_size,
        c.num_layers,
        c.num_heads,
        c.num_kv_heads,
        c.head_dim,
        c.vocab_size,
        c.tie_word_embeddings,
        p.weights.total_bytes()
    );
    loader::fnv1a(text.as_bytes())
}

fn dist_timeout(cfg: &EngineConfig) -> Duration {
    Duration::from_secs(cfg.dist_timeout_secs)
}

fn master(cfg: &EngineConfig) -> String {
    format!(
        "{}:{}",
        cfg.master_addr.as_deref().unwrap_or("127.0.0.1"),
        cfg.master_port
    )
}

/// The device `cfg` runs on in this build on this machine: `auto` is CUDA when the build has
/// it and a driver with a device is present, else the CPU; `cuda` where it cannot work is an
/// error that says why.
pub fn resolve_device(cfg: &EngineConfig) -> Result<Device, LoadModelError> {
    match cfg.device {
        Device::Cpu => Ok(Device::Cpu),
        Device::Auto => Ok(if cuda_usable(cfg) {
            Device::Cuda
        } else {
            Device::Cpu
        }),
        Device::Cuda => {
            #[cfg(feature = "cuda")]
            {
                if cuda_usable(cfg) {
                    return Ok(Device::Cuda);
                }
                Err(LoadModelError::NoCuda(format!(
                    "{}; use --device cpu (or auto)",
                    crate::backend::cuda::unavailable_reason()
                )))
            }
            #[cfg(not(feature = "cuda"))]
            Err(LoadModelError::NoCuda(
                "this build has no CUDA backend: rebuild with `--features sglang/cuda` \
                 (scripts/cuda-toolchain.sh installs nvcc), or use --device cpu"
                    .into(),
            ))
        }
    }
}

/// [`resolve_device`] for a tensor-parallel group: GPU groups need NCCL, which is not built
/// yet, so `auto` runs a group on the CPU and `cuda` is refused.
fn group_device(cfg: &EngineConfig) -> Result<Device, LoadModelError> {
    let device = resolve_device(cfg)?;
    if device != Device::Cuda || cfg.group_size() == 1 {
        return Ok(device);
    }
    if cfg.device == Device::Auto {
        tracing::warn!("tensor parallelism runs on the CPU: the GPU path (NCCL) is not built yet");
        return Ok(Device::Cpu);
    }
    Err(LoadModelError::Unsupported(
        "tensor parallelism on GPUs needs the NCCL communicator, which is not built yet; use \
         --device cpu (or auto) with --tp-size/--world-size"
            .into(),
    ))
}

/// A GPU with its driver, or the emulator the config names (`cuda_emulator`).
fn cuda_usable(cfg: &EngineConfig) -> bool {
    #[cfg(feature = "cuda")]
    {
        cfg.cuda_emulator.is_some() || crate::backend::cuda::driver_available()
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = cfg;
        false
    }
}

/// Reads the model of `cfg` and builds it on the configured device. With `--tp-size` the
/// ranks are threads of this process; with `--world-size` this is rank 0 of a group of
/// processes, and returns once every other rank has joined (see [`serve_rank`]).
pub fn load(cfg: &EngineConfig) -> Result<Box<dyn ModelRunner>, LoadModelError> {
    let device = group_device(cfg)?;
    let p = prepare(cfg)?;
    if device == Device::Cuda {
        #[cfg(feature = "cuda")]
        return build_cuda(cfg, p);
    }
    let (num_pages, page_size) = (p.num_pages, cfg.page_size);
    // the CPU pool lives in host memory (all of it in this process unless the group spans
    // processes): a size beyond it would fail, or be killed, later
    let per_token = p
        .model_cfg
        .kv_bytes_per_token(crate::backend::cpu::kv_elem_bytes(cfg.kv_cache_dtype));
    let bytes = kv_pool_bytes(num_pages * page_size, per_token)?;
    if let (1, Some(total)) = (cfg.world_size, crate::sys::MemInfo::read().total_bytes) {
        if bytes as u64 > total {
            return Err(ConfigError::Option {
                option: "max-total-tokens",
                message: format!(
                    "{} tokens of KV cache need {bytes} bytes, more than this machine's {total} bytes of memory",
                    num_pages * page_size
                ),
            }
            .into());
        }
    }
    let runner: Box<dyn ModelRunner> = if p.group == 1 {
        build_rank(
            &p.model_cfg,
            &p.weights,
            Shard::full(&p.model_cfg),
            None,
            KvPool::new(num_pages, page_size, cfg.kv_cache_dtype),
            cfg.num_threads,
            cfg.dtype,
        )?
    } else if cfg.world_size == 1 {
        let tp = p.group;
        let threads = threads_per_rank(cfg, tp);
        tracing::info!("tensor parallelism: {tp} ranks on CPU threads, {threads} threads each");
        let model_cfg = p.model_cfg.clone();
        let weights = Arc::new(p.weights);
        let kv_dtype = cfg.kv_cache_dtype;
        let dtype = cfg.dtype;
        Box::new(tp::start(
            &p.model_cfg,
            tp,
            dist_timeout(cfg),
            move |shard, comm| {
                build_rank(
                    &model_cfg,
                    &weights,
                    shard,
                    Some(comm),
                    KvPool::new(num_pages, page_size, kv_dtype),
                    Some(threads),
                    dtype,
                )
            },
        )?)
    } else {
        Box::new(start_process_group(cfg, &p)?)
    };
    tracing::info!(
        "KV cache: {} pages x {} tokens = {} tokens, {:.1} MB ({} bytes per token)",
        num_pages,
        page_size,
        num_pages * page_size,
        (num_pages * page_size * runner.kv_bytes_per_token()) as f64 / 1e6,
        runner.kv_bytes_per_token()
    );
    Ok(runner)
}

/// Rank 0 of a group of processes: waits for the other ranks on `--master-port`, builds its
/// own shard, and returns once every rank is ready.
fn start_process_group(cfg: &EngineConfig, p: &Prepared) -> Result<TpRunner, LoadModelError> {
    if cfg.rank != 0 {
        return Err(LoadModelError::Unsupported(format!(
            "rank {} does not serve; it runs the steps rank 0 sends (serve_rank)",
            cfg.rank
        )));
    }
    let bind = format!("0.0.0.0:{}", cfg.master_port);
    tracing::info!(
        "tensor parallelism: rank 0 of {} processes, waiting for the others on {bind}",
        p.group
    );
    let params = GroupParams {
        model_fingerprint: model_fingerprint(cfg, p),
        num_pages: p.num_pages as u64,
        page_size: cfg.page_size as u64,
    };
    let comm = TcpComm::listen(&bind, p.group, params, dist_timeout(cfg))?;
    let comm: Arc<dyn Communicator> = Arc::new(comm);
    let built = build_rank(
        &p.model_cfg,
        &p.weights,
        Shard::new(&p.model_cfg, 0, p.group),
        Some(comm.clone()),
        KvPool::new(p.num_pages, cfg.page_size, cfg.kv_cache_dtype),
        Some(threads_per_rank(cfg, 1)),
        cfg.dtype,
    );
    let rank0 = match built {
        Ok(r) => r,
        Err(e) => {
            comm.abort(&format!("rank 0 failed at start-up: {e}"));
            return Err(e);
        }
    };
    comm.barrier()?;
    tracing::info!("tensor parallelism: all {} ranks ready", p.group);
    Ok(tp::process_group(rank0, comm))
}

/// A rank other than 0 of a group of processes: loads its shard, joins rank 0 at
/// `--master-addr:--master-port`, and runs the steps rank 0 broadcasts until rank 0 stops
/// the group (`Ok`) or the group fails (`Err` naming the rank and the reason).
pub fn serve_rank(cfg: &EngineConfig) -> Result<(), LoadModelError> {
    group_device(cfg)?;
    let p = prepare(cfg)?;
    if cfg.world_size < 2 || cfg.rank == 0 {
        return Err(LoadModelError::Unsupported(
            "serve_rank is for ranks 1.. of a multi-process group".into(),
        ));
    }
    let at = master(cfg);
    tracing::info!("rank {} of {}: joining rank 0 at {at}", cfg.rank, p.group);
    let (comm, params) = TcpComm::connect(
        &at,
        cfg.rank,
        cfg.world_size,
        model_fingerprint(cfg, &p),
        dist_timeout(cfg),
    )?;
    let comm: Arc<dyn Communicator> = Arc::new(comm);
    let shard = Shard::new(&p.model_cfg, cfg.rank, p.group);
    let built = build_rank(
        &p.model_cfg,
        &p.weights,
        shard,
        Some(comm.clone()),
        KvPool::new(
            params.num_pages as usize,
            params.page_size as usize,
            cfg.kv_cache_dtype,
        ),
        Some(threads_per_rank(cfg, 1)),
        cfg.dtype,
    );
    let mut runner = match built {
        Ok(r) => r,
        Err(e) => {
            comm.abort(&format!("rank {} failed at start-up: {e}", cfg.rank));
            return Err(e);
        }
    };
    comm.barrier()?;
    tracing::info!("rank {}: ready", cfg.rank);
    tp::serve_steps(cfg.rank, runner.as_mut(), comm.as_ref())?;
    tracing::info!("rank {}: rank 0 stopped the group", cfg.rank);
    Ok(())
}

/// The whole model on GPU 0: weights uploaded through pinned staging, the KV pool sized by
/// `--mem-fraction-static` (or `--max-total-tokens`).
#[cfg(feature = "cuda")]
fn build_cuda(cfg: &EngineConfig, p: Prepared) -> Result<Box<dyn ModelRunner>, LoadModelError> {
    use crate::backend::cuda::CudaBackend;
    use crate::backend::Backend;
    if cfg.kv_cache_dtype == KvCacheDtype::Fp32 {
        return Err(LoadModelError::Unsupported(
            "--kv-cache-dtype fp32 is CPU only: the CUDA backend keeps its KV cache in bf16".into(),
        ));
    }
    if cfg.dtype == Dtype::Float32 {
        return Err(LoadModelError::Unsupported(
            "--dtype float32 is CPU only: the CUDA backend's products take bf16 inputs".into(),
        ));
    }
    let backend = CudaBackend::new(0, cfg.cuda_emulator.as_deref())?;
    let (free, total) = backend.memory()?;
    tracing::info!(
        "CUDA backend: {} ({:.1} GiB, {:.1} GiB free)",
        backend.device_name(),
        total as f64 / (1u64 << 30) as f64,
        free as f64 / (1u64 << 30) as f64
    );
    let started = Instant::now();
    backend.set_upload_total(p.weights.total_bytes());
    let model = LlamaModel::new(&backend, p.model_cfg.clone(), &p.weights)?;
    tracing::info!(
        "weights on the GPU in {:.2}s",
        started.elapsed().as_secs_f64()
    );
    let page_size = cfg.page_size;
    let c = &p.model_cfg;
    let per_token = backend.kv_bytes_per_token(c);
    let num_pages = match cfg.max_total_tokens {
        Some(t) => (t / page_size).max(1),
        None => {
            // activations of the largest step, logits of a full batch, cuBLAS and slack
            let q = c.num_heads * c.head_dim;
            let per_row = 6 * c.hidden_size + 3 * c.intermediate_size + 3 * q;
            let reserve = cfg.chunked_prefill_size * per_row * 4
                + 2 * cfg.max_running_requests * c.vocab_size * 4 // logits, sampling work
                + (512 << 20);
            backend.kv_pages_for(cfg.mem_fraction_static, per_token * page_size, reserve)?
        }
    };
    let weight_bytes = weight_bytes(c, &p.weights);
    let mut runner = Runner::new(backend, model, num_pages, page_size, weight_bytes, None)?;
    tracing::info!(
        "KV cache: {} pages x {} tokens = {} tokens, {:.1} MB ({} bytes per token)",
        num_pages,
        page_size,
        num_pages * page_size,
        (num_pages * page_size * per_token) as f64 / 1e6,
        per_token
    );
    if cfg.disable_cuda_graph {
        tracing::info!("CUDA graphs disabled: every step runs eagerly");
    } else {
        let captured = runner.capture_graphs(super::GraphOptions {
            max_bs: cfg.cuda_graph_max_bs.min(cfg.max_running_requests),
            max_tokens: cfg.chunked_prefill_size,
            max_rows: cfg.max_running_requests,
            max_positions: cfg.context_length.unwrap_or(c.max_position_embeddings),
        });
        // serving eagerly beats not serving; /get_server_info then lists no graph sizes
        if let Err(e) = captured {
            tracing::error!(
                "capturing the decode step's CUDA graphs failed, every step runs eagerly: {e}"
            );
        }
    }
    Ok(Box::new(runner))
}

/// The KV pool of a CPU rank: pages, tokens per page, element type.
#[derive(Debug, Clone, Copy)]
pub struct KvPool {
    pub num_pages: usize,
    pub page_size: usize,
    pub dtype: KvCacheDtype,
}

impl KvPool {
    pub fn new(num_pages: usize, page_size: usize, dtype: KvCacheDtype) -> Self {
        Self {
            num_pages,
            page_size,
            dtype,
        }
    }
}

/// One rank's runner on the CPU backend (the whole model when `shard` is full): its shard of
/// `weights`, a KV cache of `kv.num_pages` pages for its KV heads, and `threads` CPU threads.
pub fn build_rank(
    model_cfg: &ModelConfig,
    weights: &WeightMap,
    shard: Shard,
    comm: Option<Arc<dyn Communicator>>,
    kv: KvPool,
    threads: Option<usize>,
    dtype: Dtype,
) -> Result<Box<dyn ModelRunner>, LoadModelError> {
    let backend = CpuBackend::new(threads)
        .with_kv_dtype(kv.dtype)
        .with_dtype(dtype);
    let (num_pages, page_size) = (kv.num_pages, kv.page_size);
    if shard.rank == 0 {
        tracing::info!(
            "CPU backend: {} threads, kernels: {}",
            backend.num_threads(),
            crate::backend::cpu::kernel_set(dtype)
        );
    }
    let weight_bytes = weight_bytes(model_cfg, weights);
    let model = LlamaModel::new_shard(&backend, model_cfg.clone(), weights, shard)?;
    let runner = Runner::new(backend, model, num_pages, page_size, weight_bytes, comm)?;
    Ok(Box::new(runner))
}

/// Bytes of a KV pool of `tokens` tokens; an error naming the option when the size cannot
/// be represented (a `--max-total-tokens` of 2^58 would otherwise wrap to a tiny allocation).
fn kv_pool_bytes(tokens: usize, per_token: usize) -> Result<usize, ConfigError> {
    tokens
        .checked_mul(per_token)
        .filter(|&b| b <= isize::MAX as usize)
        .ok_or_else(|| ConfigError::Option {
            option: "max-total-tokens",
            message: format!(
                "{tokens} tokens of KV cache at {per_token} bytes each overflow the address space"
            ),
        })
}

/// Default CPU KV pool: a quarter of the available memory, at most 65536 tokens, at least 64
/// pages. The allocation is lazily committed, so unused capacity costs address space only.
fn default_kv_tokens(bytes_per_token: usize, page_size: usize) -> usize {
    let available = crate::sys::MemInfo::read()
        .available_bytes
        .map_or(4 << 30, |b| b as usize);
    let by_memory = available / 4 / bytes_per_token.max(1);
    by_memory.clamp(64 * page_size, 65536)
}

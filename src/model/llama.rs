//! The Llama decoder, written only against [`Backend`].
//!
//! Pre-norm transformer: for each layer `x += o(attn(rope(qkv(norm(x)))))`, then
//! `x += down(silu(gate(norm(x))) * up(norm(x)))`; final norm and the lm_head (the embedding
//! matrix when `tie_word_embeddings`). Grouped-query attention over the paged KV cache; RoPE in
//! Hugging Face's half-rotation layout with `rope_theta` and `rope_scaling`. Logits are computed
//! only for the rows the step asks for.

use crate::backend::{Backend, BackendError, RopeTable};
use crate::batch::StepBatch;
use crate::config::{ModelConfig, RopeScaling};
use crate::loader::{Tensor, TensorSpec, WeightMap};
use crate::parallel::{Communicator, Shard};

/// Every tensor a Llama checkpoint with this config must hold, with its shape.
pub fn tensor_specs(cfg: &ModelConfig) -> Vec<TensorSpec> {
    let h = cfg.hidden_size;
    let q = cfg.num_heads * cfg.head_dim;
    let kv = cfg.num_kv_heads * cfg.head_dim;
    let i = cfg.intermediate_size;
    let mut specs = vec![
        spec("model.embed_tokens.weight", &[cfg.vocab_size, h]),
        spec("model.norm.weight", &[h]),
    ];
    if !cfg.tie_word_embeddings {
        specs.push(spec("lm_head.weight", &[cfg.vocab_size, h]));
    }
    for l in 0..cfg.num_layers {
        let p = |n: &str| format!("model.layers.{l}.{n}.weight");
        specs.push(spec(&p("input_layernorm"), &[h]));
        specs.push(spec(&p("self_attn.q_proj"), &[q, h]));
        specs.push(spec(&p("self_attn.k_proj"), &[kv, h]));
        specs.push(spec(&p("self_attn.v_proj"), &[kv, h]));
        specs.push(spec(&p("self_attn.o_proj"), &[h, q]));
        specs.push(spec(&p("post_attention_layernorm"), &[h]));
        specs.push(spec(&p("mlp.gate_proj"), &[i, h]));
        specs.push(spec(&p("mlp.up_proj"), &[i, h]));
        specs.push(spec(&p("mlp.down_proj"), &[h, i]));
    }
    specs
}

fn spec(name: &str, shape: &[usize]) -> TensorSpec {
    TensorSpec {
        name: name.to_string(),
        shape: shape.to_vec(),
    }
}

/// RoPE inverse frequencies after `rope_scaling` (as in HF's `_compute_*_parameters`).
pub fn rope_table(cfg: &ModelConfig) -> RopeTable {
    let d = cfg.head_dim;
    let mut inv: Vec<f64> = (0..d / 2)
        .map(|i| 1.0 / cfg.rope_theta.powf((2 * i) as f64 / d as f64))
        .collect();
    match cfg.rope_scaling {
        None => {}
        Some(RopeScaling::Linear { factor }) => inv.iter_mut().for_each(|f| *f /= factor as f64),
        Some(RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        }) => {
            let (factor, lo, hi) = (
                factor as f64,
                low_freq_factor as f64,
                high_freq_factor as f64,
            );
            let old = original_max_position_embeddings as f64;
            let (low_wavelen, high_wavelen) = (old / lo, old / hi);
            for f in inv.iter_mut() {
                let wavelen = 2.0 * std::f64::consts::PI / *f;
                if wavelen > low_wavelen {
                    *f /= factor;
                } else if wavelen >= high_wavelen {
                    let smooth = (old / wavelen - lo) / (hi - lo);
                    *f = (1.0 - smooth) * *f / factor + smooth * *f;
                }
            }
        }
    }
    RopeTable { inv_freq: inv }
}

struct Layer<B: Backend> {
    attn_norm: B::Weight,
    q: B::Weight,
    k: B::Weight,
    v: B::Weight,
    o: B::Weight,
    mlp_norm: B::Weight,
    gate: B::Weight,
    up: B::Weight,
    down: B::Weight,
}

pub struct LlamaModel<B: Backend> {
    cfg: ModelConfig,
    /// This rank's part of the model (the whole model without tensor parallelism).
    shard: Shard,
    /// `cfg` as this rank sees it (its heads, intermediate columns and vocabulary slice).
    local: ModelConfig,
    embed: B::Weight,
    /// None when tied to the embedding.
    lm_head: Option<B::Weight>,
    norm: B::Weight,
    layers: Vec<Layer<B>>,
    rope: RopeTable,
}

/// Activation buffers of a step, grown to the largest step seen and then reused.
pub struct Workspace<B: Backend> {
    x: B::Buf,
    h: B::Buf,
    q: B::Buf,
    k: B::Buf,
    v: B::Buf,
    attn: B::Buf,
    delta: B::Buf,
    mlp: B::Buf,
    selected: B::Buf,
    logits: B::Buf,
    /// This rank's slice of the logits, `[rank][rows][local vocab]` after the gather
    /// (tensor parallelism only).
    local_logits: B::Buf,
    gathered: B::Buf,
    /// Host staging for putting the gathered slices back in row order.
    reorder: Vec<f32>,
    tokens: usize,
    logit_rows: usize,
}

impl<B: Backend> Workspace<B> {
    pub fn new(backend: &B) -> Result<Self, BackendError> {
        Ok(Self {
            x: backend.buffer(0)?,
            h: backend.buffer(0)?,
            q: backend.buffer(0)?,
            k: backend.buffer(0)?,
            v: backend.buffer(0)?,
            attn: backend.buffer(0)?,
            delta: backend.buffer(0)?,
            mlp: backend.buffer(0)?,
            selected: backend.buffer(0)?,
            logits: backend.buffer(0)?,
            local_logits: backend.buffer(0)?,
            gathered: backend.buffer(0)?,
            reorder: Vec::new(),
            tokens: 0,
            logit_rows: 0,
        })
    }

    /// `cfg` is the rank's local config; `vocab` the full vocabulary size.
    fn reserve(
        &mut self,
        backend: &B,
        cfg: &ModelConfig,
        vocab: usize,
        tokens: usize,
        logit_rows: usize,
    ) -> Result<(), BackendError> {
        if tokens > self.tokens {
            let qd = cfg.num_heads * cfg.head_dim;
            let kvd = cfg.num_kv_heads * cfg.head_dim;
            let h = cfg.hidden_size;
            backend.ensure_len(&mut self.x, tokens * h)?;
            backend.ensure_len(&mut self.h, tokens * h)?;
            backend.ensure_len(&mut self.q, tokens * qd)?;
            backend.ensure_len(&mut self.k, tokens * kvd)?;
            backend.ensure_len(&mut self.v, tokens * kvd)?;
            backend.ensure_len(&mut self.attn, tokens * qd)?;
            backend.ensure_len(&mut self.delta, tokens * h)?;
            backend.ensure_len(&mut self.mlp, tokens * cfg.intermediate_size)?;
            self.tokens = tokens;
        }
        if logit_rows > self.logit_rows {
            backend.ensure_len(&mut self.selected, logit_rows * cfg.hidden_size)?;
            backend.ensure_len(&mut self.logits, logit_rows * vocab)?;
            if cfg.vocab_size != vocab {
                backend.ensure_len(&mut self.local_logits, logit_rows * cfg.vocab_size)?;
                backend.ensure_len(&mut self.gathered, logit_rows * vocab)?;
            }
            self.logit_rows = logit_rows;
        }
        Ok(())
    }

    /// Logits of the last step: `[logit_rows][vocab]`.
    pub fn logits(&self) -> &B::Buf {
        &self.logits
    }
}

impl<B: Backend> LlamaModel<B> {
    /// Takes every tensor of `tensor_specs(cfg)` from `weights` (already checked by the loader).
    pub fn new(backend: &B, cfg: ModelConfig, weights: &WeightMap) -> Result<Self, BackendError> {
        let shard = Shard::full(&cfg);
        Self::new_shard(backend, cfg, weights, shard)
    }

    /// Rank `shard.rank`'s part of the model: row shards are views into `weights` (the file
    /// mapping), column shards (o, down) copies of just this rank's columns.
    pub fn new_shard(
        backend: &B,
        cfg: ModelConfig,
        weights: &WeightMap,
        shard: Shard,
    ) -> Result<Self, BackendError> {
        /// Which part of a tensor this rank keeps.
        enum Part {
            All,
            Rows(std::ops::Range<usize>),
            Cols(std::ops::Range<usize>),
        }
        // this rank's part of a tensor
        let part_of = |name: &str, part: Part| -> Result<Tensor, BackendError> {
            // the loader checks every tensor of `tensor_specs`; only a hand-made map lacks one
            let t = weights.get(name).ok_or_else(|| BackendError::Weight {
                name: name.to_string(),
                message: format!("missing from the weights ({:?})", weights.files()),
            })?;
            let full = |r: &std::ops::Range<usize>, n: usize| r.start == 0 && r.end == n;
            Ok(match part {
                Part::Rows(r) if !full(&r, t.shape()[0]) => t.narrow_rows(r.start, r.len()),
                Part::Cols(c) if !full(&c, t.shape()[1]) => t.narrow_cols(c.start, c.len()),
                _ => t.clone(),
            })
        };
        let take = |name: String, part: Part| -> Result<B::Weight, BackendError> {
            backend.weight(&name, &part_of(&name, part)?)
        };
        // weights multiplied by the same input, handed over together (see Backend::weights)
        let take_group = |parts: Vec<(String, Part)>| -> Result<Vec<B::Weight>, BackendError> {
            let tensors = parts
                .into_iter()
                .map(|(n, p)| Ok((part_of(&n, p)?, n)))
                .collect::<Result<Vec<_>, BackendError>>()?;
            let named: Vec<(&str, &Tensor)> =
                tensors.iter().map(|(t, n)| (n.as_str(), t)).collect();
            backend.weights(&named)
        };
        let d = cfg.head_dim;
        let q_cols = shard.q_heads.start * d..shard.q_heads.end * d;
        let kv = shard.kv_heads.start * d..shard.kv_heads.end * d;
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for l in 0..cfg.num_layers {
            let p = |n: &str| format!("model.layers.{l}.{n}.weight");
            let attn_norm = take(p("input_layernorm"), Part::All)?;
            let [q, k, v]: [B::Weight; 3] = take_group(vec![
                (p("self_attn.q_proj"), Part::Rows(q_cols.clone())),
                (p("self_attn.k_proj"), Part::Rows(kv.clone())),
                (p("self_attn.v_proj"), Part::Rows(kv.clone())),
            ])?
            .try_into()
            .map_err(|_| BackendError::Internal("q, k, v: three weights expected".into()))?;
            let o = take(p("self_attn.o_proj"), Part::Cols(q_cols.clone()))?;
            let mlp_norm = take(p("post_attention_layernorm"), Part::All)?;
            let [gate, up]: [B::Weight; 2] = take_group(vec![
                (p("mlp.gate_proj"), Part::Rows(shard.intermediate.clone())),
                (p("mlp.up_proj"), Part::Rows(shard.intermediate.clone())),
            ])?
            .try_into()
            .map_err(|_| BackendError::Internal("gate, up: two weights expected".into()))?;
            let down = take(p("mlp.down_proj"), Part::Cols(shard.intermediate.clone()))?;
            layers.push(Layer {
                attn_norm,
                q,
                k,
                v,
                o,
                mlp_norm,
                gate,
                up,
                down,
            });
        }
        let vocab = || Part::Rows(shard.vocab.clone());
        let lm_head = if cfg.tie_word_embeddings {
            None
        } else {
            Some(take("lm_head.weight".into(), vocab())?)
        };
        Ok(Self {
            embed: take("model.embed_tokens.weight".into(), vocab())?,
            norm: take("model.norm.weight".into(), Part::All)?,
            lm_head,
            layers,
            rope: rope_table(&cfg),
            local: shard.local_config(&cfg),
            shard,
            cfg,
        })
    }

    /// The whole model's config.
    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// The config of this rank's part (equal to `config()` without tensor parallelism).
    pub fn local_config(&self) -> &ModelConfig {
        &self.local
    }

    pub fn shard(&self) -> &Shard {
        &self.shard
    }

    /// Grows `ws` ahead of time for steps of up to `tokens` tokens and `logit_rows` logits
    /// rows (so that no later step allocates: a captured graph holds the buffers' addresses).
    pub fn reserve_workspace(
        &self,
        backend: &B,
        ws: &mut Workspace<B>,
        tokens: usize,
        logit_rows: usize,
    ) -> Result<(), BackendError> {
        ws.reserve(
            backend,
            &self.local,
            self.cfg.vocab_size,
            tokens,
            logit_rows,
        )
    }

    /// RoPE's frequencies.
    pub fn rope(&self) -> &RopeTable {
        &self.rope
    }

    /// Runs one step: writes the new tokens' K/V into `kv` and leaves the logits of
    /// `batch.logit_rows` in `ws.logits()` (`[rows][vocab]`). Returns the number of rows.
    ///
    /// With tensor parallelism every rank calls this with the same batch and its own `comm`;
    /// all ranks end with the full logits.
    pub fn forward(
        &self,
        backend: &B,
        batch: &StepBatch,
        kv: &mut B::Kv,
        ws: &mut Workspace<B>,
        comm: Option<&dyn Communicator>,
    ) -> Result<usize, BackendError> {
        let cfg = &self.local;
        let comm = comm.filter(|c| c.world_size() > 1);
        if comm.is_none() != self.shard.is_full() {
            return Err(BackendError::Internal(format!(
                "rank {} of {} needs a communicator for its group",
                self.shard.rank, self.shard.world
            )));
        }
        let t = batch.num_tokens();
        if t == 0 {
            return Ok(0);
        }
        let h = cfg.hidden_size;
        // the partial sums of o and down (and of the embedding lookup) meet here
        let reduce = |buf: &mut B::Buf| match comm {
            Some(c) => backend.all_reduce(c, buf, t * h),
            None => Ok(()),
        };
        let n_logits = batch.logit_rows.len();
        ws.reserve(backend, cfg, self.cfg.vocab_size, t, n_logits)?;
        let eps = cfg.rms_norm_eps;
        let step = backend.begin_step(batch, &self.rope)?;
        backend.embedding(&step, &self.embed, self.shard.vocab.start, batch, &mut ws.x)?;
        reduce(&mut ws.x)?;
        backend.rms_norm(&ws.x, &self.layers[0].attn_norm, eps, t, &mut ws.h)?;
        for (l, layer) in self.layers.iter().enumerate() {
            backend.qkv(
                &ws.h, t, &layer.q, &layer.k, &layer.v, &mut ws.q, &mut ws.k, &mut ws.v,
            )?;
            backend.rope_and_store_kv(&step, batch, cfg, &mut ws.q, &mut ws.k, &ws.v, kv, l)?;
            backend.attention(&step, batch, cfg, &ws.q, kv, l, &mut ws.attn)?;
            backend.matmul(&ws.attn, t, &layer.o, &mut ws.delta)?;
            reduce(&mut ws.delta)?;
            backend.add_rms_norm(&mut ws.x, &ws.delta, &layer.mlp_norm, eps, t, &mut ws.h)?;
            backend.gate_up_silu(&ws.h, t, &layer.gate, &layer.up, &mut ws.mlp)?;
            backend.matmul(&ws.mlp, t, &layer.down, &mut ws.delta)?;
            reduce(&mut ws.delta)?;
            let next_norm = match self.layers.get(l + 1) {
                Some(next) => &next.attn_norm,
                None => &self.norm,
            };
            backend.add_rms_norm(&mut ws.x, &ws.delta, next_norm, eps, t, &mut ws.h)?;
        }
        if n_logits == 0 {
            backend.end_step(step);
            return Ok(0);
        }
        let rows = &batch.logit_rows;
        let gathered = backend.gather_rows(&step, &ws.h, rows, h, &mut ws.selected);
        backend.end_step(step);
        gathered?;
        let head = self.lm_head.as_ref().unwrap_or(&self.embed);
        let Some(comm) = comm else {
            backend.matmul(&ws.selected, n_logits, head, &mut ws.logits)?;
            return Ok(n_logits);
        };
        // each rank's vocabulary slice, gathered rank after rank, then put back row by row
        let local = n_logits * cfg.vocab_size;
        let vocab = self.cfg.vocab_size;
        backend.matmul(&ws.selected, n_logits, head, &mut ws.local_logits)?;
        backend.all_gather(
            comm,
            &ws.local_logits,
            local,
            &mut ws.gathered,
            n_logits * vocab,
        )?;
        let world = self.shard.world;
        let host = backend.to_host(&ws.gathered, n_logits * vocab)?;
        let out = &mut ws.reorder;
        out.clear();
        for row in 0..n_logits {
            for r in 0..world {
                let part = Shard::new(&self.cfg, r, world).vocab;
                let base = n_logits * part.start + row * part.len();
                out.extend_from_slice(&host[base..base + part.len()]);
            }
        }
        drop(host);
        backend.upload(out, &mut ws.logits)?;
        Ok(n_logits)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn llama3_rope_scaling_matches_hf_formula() {
        let text = r#"{"hidden_size": 256, "intermediate_size": 8, "num_hidden_layers": 1,
            "num_attention_heads": 2, "vocab_size": 8, "rope_theta": 500000.0,
            "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}"#;
        let cfg = ModelConfig::from_json(text, Path::new("config.json")).unwrap();
        let table = rope_table(&cfg);
        let base: Vec<f64> = (0..64)
            .map(|i| 1.0 / 500000f64.powf(2.0 * i as f64 / 128.0))
            .collect();
        // highest frequency untouched, lowest divided by the factor
        assert_eq!(table.inv_freq[0], base[0]);
        assert!((table.inv_freq[63] - base[63] / 8.0).abs() < 1e-18);
    }
}

//! Structured output: a request's constraint (a JSON schema, a regular expression or a Lark
//! grammar) compiled by llguidance into a matcher that gives, before each token, the set of
//! tokens that keep the output inside the language, and follows each sampled token.
//!
//! One [`ConstraintCompiler`] per engine holds llguidance's token trie of the model's
//! vocabulary (built from our `tokenizers` tokenizer by `toktrie_hf_tokenizers`, the first
//! time a constraint is compiled) and a small cache of compiled grammars, so the `n` choices
//! of a request, or many requests with one schema, compile once. Compilation runs on the
//! caller's thread (the engine handle's `submit`, off the engine thread) under llguidance's
//! size and fuel limits and a wall-clock limit; a grammar that fails any of them is refused
//! before the request is queued, naming the field. Each request then owns a [`Constraint`]
//! (a clone of the compiled matcher); computing its mask costs llguidance's ~10-100 us for
//! this vocabulary (bounded by its per-step fuel), following a token is cheaper.
//!
//! JSON schemas are compiled with fixed separators (`", "` and `": "`) and no free
//! whitespace, so a small model cannot wander into endless spaces; a schema may override
//! that with llguidance's `x-guidance` options.

use std::collections::VecDeque;
use std::sync::{mpsc, Arc, OnceLock};
use std::time::Duration;

use llguidance::api::{ParserLimits, TopLevelGrammar};
use llguidance::{Matcher, ParserFactory};
use parking_lot::Mutex;

use crate::tokenizer::Tokenizer;

/// Longest constraint text accepted (a schema, regex or grammar), in bytes.
pub const MAX_CONSTRAINT_BYTES: usize = 256 * 1024;
/// Longest a compilation may take before the request is refused.
pub const COMPILE_TIMEOUT: Duration = Duration::from_secs(10);
/// Compiled grammars kept for reuse.
const CACHE_ENTRIES: usize = 32;

/// What a request constrains its output to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ConstraintSpec {
    /// A JSON schema (its text).
    JsonSchema(String),
    /// A regular expression the whole output must match.
    Regex(String),
    /// A grammar in llguidance's Lark dialect.
    Grammar(String),
}

impl ConstraintSpec {
    /// The `sampling_params` field the constraint came from, for error messages.
    pub fn field(&self) -> &'static str {
        match self {
            ConstraintSpec::JsonSchema(_) => "json_schema",
            ConstraintSpec::Regex(_) => "regex",
            ConstraintSpec::Grammar(_) => "ebnf",
        }
    }

    fn text(&self) -> &str {
        match self {
            ConstraintSpec::JsonSchema(s)
            | ConstraintSpec::Regex(s)
            | ConstraintSpec::Grammar(s) => s,
        }
    }
}

/// Why a constraint could not be compiled (the request is refused before it is queued).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ConstraintError {
    /// The schema, regex or grammar is invalid or exceeds llguidance's limits.
    #[error("`{field}` is not a usable constraint: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
    #[error("`{field}` is longer than {MAX_CONSTRAINT_BYTES} bytes")]
    TooLarge { field: &'static str },
    #[error("`{field}` took longer than {}s to compile", COMPILE_TIMEOUT.as_secs())]
    Timeout { field: &'static str },
    /// The tokenizer cannot be used for constrained decoding at all.
    #[error("structured output is not available for this tokenizer: {0}")]
    Unavailable(String),
}

impl ConstraintError {
    /// The request field the error is about (`None` when no request could be constrained).
    pub fn field(&self) -> Option<&'static str> {
        match self {
            ConstraintError::Invalid { field, .. }
            | ConstraintError::TooLarge { field }
            | ConstraintError::Timeout { field } => Some(field),
            ConstraintError::Unavailable(_) => None,
        }
    }
}

/// Compiles constraints for one model's vocabulary.
pub struct ConstraintCompiler {
    tokenizer: Arc<Tokenizer>,
    /// The model's vocabulary (its logits rows), at least the tokenizer's.
    vocab_size: usize,
    eos_ids: Vec<u32>,
    factory: OnceLock<Result<Arc<ParserFactory>, String>>,
    /// Compiled grammars, the most recent last.
    cache: Mutex<VecDeque<(ConstraintSpec, Matcher)>>,
}

impl ConstraintCompiler {
    pub fn new(tokenizer: Arc<Tokenizer>, vocab_size: usize, eos_ids: &[u32]) -> Self {
        Self {
            tokenizer,
            vocab_size,
            eos_ids: eos_ids.to_vec(),
            factory: OnceLock::new(),
            cache: Mutex::new(VecDeque::new()),
        }
    }

    /// Words of one token bitmask (bit `t % 32` of word `t / 32` allows token `t`).
    pub fn mask_words(&self) -> usize {
        self.vocab_size.div_ceil(32)
    }

    fn factory(&self) -> Result<Arc<ParserFactory>, ConstraintError> {
        self.factory
            .get_or_init(|| {
                let tok = toktrie_hf_tokenizers::ByteTokenizer::from_tokenizer(
                    self.tokenizer.hf_tokenizer().clone(),
                );
                let mut tok = tok.map_err(|e| e.to_string())?;
                if !self.eos_ids.is_empty() {
                    tok.set_eos_tokens(&self.eos_ids);
                }
                let env = tok
                    .into_tok_env(Some(self.vocab_size))
                    .map_err(|e| e.to_string())?;
                let mut factory = ParserFactory::new_simple(&env).map_err(|e| e.to_string())?;
                factory.set_stderr_log_level(0);
                *factory.limits_mut() = ParserLimits {
                    verbose_errors: false,
                    ..ParserLimits::default()
                };
                Ok(Arc::new(factory))
            })
            .clone()
            .map_err(ConstraintError::Unavailable)
    }

    /// A matcher for `spec` at the start of the output: from the cache, or compiled within
    /// the limits (on a helper thread, abandoned after [`COMPILE_TIMEOUT`]).
    pub fn compile(&self, spec: &ConstraintSpec) -> Result<Constraint, ConstraintError> {
        let field = spec.field();
        if spec.text().len() > MAX_CONSTRAINT_BYTES {
            return Err(ConstraintError::TooLarge { field });
        }
        if let Some(m) = self.cached(spec) {
            return Ok(Constraint::new(m, self.mask_words()));
        }
        let factory = self.factory()?;
        let (tx, rx) = mpsc::channel();
        let job = spec.clone();
        std::thread::Builder::new()
            .name("sglang-grammar".into())
            .spawn(move || {
                let _ = tx.send(compile_matcher(&factory, &job));
            })
            .map_err(|e| ConstraintError::Unavailable(format!("cannot start a thread: {e}")))?;
        let matcher = match rx.recv_timeout(COMPILE_TIMEOUT) {
            Ok(r) => r.map_err(|message| ConstraintError::Invalid { field, message })?,
            Err(_) => return Err(ConstraintError::Timeout { field }),
        };
        let mut cache = self.cache.lock();
        if cache.len() == CACHE_ENTRIES {
            cache.pop_front();
        }
        cache.push_back((spec.clone(), matcher.clone()));
        drop(cache);
        Ok(Constraint::new(matcher, self.mask_words()))
    }

    fn cached(&self, spec: &ConstraintSpec) -> Option<Matcher> {
        let mut cache = self.cache.lock();
        let i = cache.iter().position(|(s, _)| s == spec)?;
        let entry = cache.remove(i)?;
        let m = entry.1.clone();
        cache.push_back(entry);
        Some(m)
    }
}

/// llguidance's options for JSON schemas that do not set their own: compact separators,
/// no free whitespace.
fn with_json_defaults(mut schema: serde_json::Value) -> serde_json::Value {
    if let Some(obj) = schema.as_object_mut() {
        obj.entry("x-guidance").or_insert_with(|| {
            serde_json::json!({
                "whitespace_flexible": false,
                "item_separator": ", ",
                "key_separator": ": ",
            })
        });
    }
    schema
}

/// Compiles `spec` and checks that its first step allows some token.
fn compile_matcher(factory: &ParserFactory, spec: &ConstraintSpec) -> Result<Matcher, String> {
    let grammar = match spec {
        ConstraintSpec::JsonSchema(text) => {
            let schema: serde_json::Value =
                serde_json::from_str(text).map_err(|e| format!("not valid JSON: {e}"))?;
            if !(schema.is_object() || schema.is_boolean()) {
                return Err("a JSON schema is an object (or a boolean)".into());
            }
            TopLevelGrammar::from_json_schema(with_json_defaults(schema))
        }
        ConstraintSpec::Regex(rx) => TopLevelGrammar::from_regex(rx),
        ConstraintSpec::Grammar(lark) => TopLevelGrammar::from_lark(lark.clone()),
    };
    let parser = factory.create_parser(grammar).map_err(|e| e.to_string())?;
    let matcher = Matcher::new(Ok(parser));
    // the first mask also compiles the lexer's start states: a grammar that cannot begin is
    // refused here rather than failing its request's first step
    let mut probe = matcher.clone();
    let mask = probe.compute_mask().map_err(|e| e.to_string())?;
    if mask.is_zero() {
        return Err("it allows no output at all".into());
    }
    match matcher.get_error() {
        Some(e) => Err(e),
        None => Ok(matcher),
    }
}

/// One request's constraint: where its output is in the grammar.
pub struct Constraint {
    matcher: Matcher,
    /// The allowed tokens of the next step (bit `t % 32` of word `t / 32`).
    mask: Vec<u32>,
    words: usize,
}

impl std::fmt::Debug for Constraint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Constraint")
            .field("stopped", &self.matcher.is_stopped())
            .finish()
    }
}

impl Constraint {
    fn new(matcher: Matcher, words: usize) -> Self {
        Self {
            matcher,
            mask: Vec::with_capacity(words),
            words,
        }
    }

    /// Computes the allowed tokens of the next step (only EOS once the grammar is complete).
    /// Err: the grammar allows no token, or llguidance gave up (a limit, an internal error).
    pub fn compute_mask(&mut self) -> Result<(), String> {
        let vob = self
            .matcher
            .compute_mask_or_eos()
            .map_err(|e| e.to_string())?;
        self.mask.clear();
        self.mask.extend_from_slice(vob.as_slice());
        self.mask.resize(self.words, 0);
        if self.mask.iter().all(|&w| w == 0) {
            return Err("the constraint allows no token here".into());
        }
        Ok(())
    }

    /// The mask the last [`Constraint::compute_mask`] left.
    pub fn mask(&self) -> &[u32] {
        &self.mask
    }

    /// Follows the sampled token. Err: the token is not in the grammar (it was not in the
    /// mask) or llguidance failed.
    pub fn advance(&mut self, token: u32) -> Result<(), String> {
        self.matcher.consume_token(token).map_err(|e| e.to_string())
    }

    /// Whether the grammar is complete: only the end of the output may follow.
    pub fn is_complete(&self) -> bool {
        self.matcher.is_stopped()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_defaults_do_not_override_a_schema_s_own() {
        let s = with_json_defaults(serde_json::json!({"type": "object"}));
        assert_eq!(s["x-guidance"]["whitespace_flexible"], false);
        let own =
            serde_json::json!({"type": "object", "x-guidance": {"whitespace_flexible": true}});
        assert_eq!(with_json_defaults(own.clone()), own);
        assert_eq!(
            with_json_defaults(serde_json::json!(true)),
            serde_json::json!(true)
        );
    }
}

//! Tokenizer, chat template, and the text of a generation as it streams.
//!
//! Tokenization is the `tokenizers` crate on the model's `tokenizer.json`. Chat templates are
//! the Jinja templates of `tokenizer_config.json`, rendered with minijinja configured like
//! Hugging Face's renderer (`trim_blocks`, `lstrip_blocks`, Python string methods,
//! `raise_exception`). Generated text as it streams (the incremental detokenizer and the
//! stop strings) is in `streaming.rs`.

use std::collections::HashSet;
use std::path::Path;

use minijinja::{Environment, ErrorKind};
use serde::{Deserialize, Serialize};

mod streaming;
pub use streaming::{IncrementalDecoder, StopCheck, StopMatcher};

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("{file}: {message}")]
    Load { file: String, message: String },
    #[error("tokenization failed: {0}")]
    Encode(String),
    #[error("detokenization failed: {0}")]
    Decode(String),
    #[error("token id {id} is outside the vocabulary (size {vocab})")]
    BadId { id: u32, vocab: usize },
    #[error("this model has no chat template (tokenizer_config.json has no `chat_template`; pass --chat-template)")]
    NoChatTemplate,
    #[error("chat template: {0}")]
    Template(String),
}

/// Starts the mark of an escaped special token in chat content (a private-use character,
/// followed by [`mark_char`] of the token's index).
const CONTENT_MARK: char = '\u{E000}';
/// Base of the second character of a mark: index `i` is `MARK_BASE + i`.
const MARK_BASE: u32 = 0xE100;
/// Special tokens that can be marked (the rest of the private-use area).
const MAX_MARKED_SPECIALS: usize = 0xF8FF - 0xE100;

fn mark_char(index: usize) -> char {
    char::from_u32(MARK_BASE + index as u32).unwrap_or(CONTENT_MARK)
}

fn mark_index(c: char) -> Option<usize> {
    let v = c as u32;
    (MARK_BASE..=0xF8FF)
        .contains(&v)
        .then(|| (v - MARK_BASE) as usize)
}

/// One chat message as the template sees it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: &str, content: &str) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
}

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// `inner` with special tokens' texts read as plain text (chat content).
    plain: tokenizers::Tokenizer,
    /// The special tokens' texts and ids, and a matcher for them (index = position).
    specials: Vec<(String, u32)>,
    special_matcher: Option<aho_corasick::AhoCorasick>,
    /// `special_matcher` plus [`CONTENT_MARK`] itself (last pattern), for escaping content.
    escape_matcher: Option<aho_corasick::AhoCorasick>,
    chat_template: Option<String>,
    bos_token: String,
    eos_token: String,
    special_ids: HashSet<u32>,
    vocab_size: usize,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size)
            .field("has_chat_template", &self.chat_template.is_some())
            .finish()
    }
}

/// `bos_token` / `eos_token` in tokenizer_config.json: a string or `{"content": ...}`.
fn token_string(v: Option<&serde_json::Value>) -> String {
    match v {
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(serde_json::Value::Object(o)) => o
            .get("content")
            .and_then(|c| c.as_str())
            .unwrap_or_default()
            .to_string(),
        _ => String::new(),
    }
}

impl Tokenizer {
    /// Loads `dir/tokenizer.json` and, if present, `dir/tokenizer_config.json`.
    pub fn from_dir(dir: &Path) -> Result<Self, TokenizerError> {
        let path = dir.join("tokenizer.json");
        let inner = tokenizers::Tokenizer::from_file(&path).map_err(|e| TokenizerError::Load {
            file: path.display().to_string(),
            message: e.to_string(),
        })?;
        let cfg_path = dir.join("tokenizer_config.json");
        let cfg: serde_json::Value = match std::fs::read_to_string(&cfg_path) {
            Ok(text) => serde_json::from_str(&text).map_err(|e| TokenizerError::Load {
                file: cfg_path.display().to_string(),
                message: format!("invalid JSON: {e}"),
            })?,
            Err(_) => serde_json::Value::Null,
        };
        Ok(Self::with_config(inner, &cfg))
    }

    /// A tokenizer from the texts of a `tokenizer.json` and a `tokenizer_config.json` (the
    /// ones a GGUF file's metadata describes); `source` names them in errors.
    pub fn from_json(
        tokenizer_json: &str,
        config: &serde_json::Value,
        source: &str,
    ) -> Result<Self, TokenizerError> {
        let inner: tokenizers::Tokenizer =
            tokenizer_json
                .parse()
                .map_err(|e: tokenizers::Error| TokenizerError::Load {
                    file: source.to_string(),
                    message: e.to_string(),
                })?;
        Ok(Self::with_config(inner, config))
    }

    /// `inner` with the chat template and bos/eos texts of a `tokenizer_config.json`.
    fn with_config(inner: tokenizers::Tokenizer, cfg: &serde_json::Value) -> Self {
        let chat_template = match cfg.get("chat_template") {
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            // A list of named templates: take "default".
            Some(serde_json::Value::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                .and_then(|t| t.get("template"))
                .and_then(|t| t.as_str())
                .map(str::to_string),
            _ => None,
        };
        Self::new(
            inner,
            chat_template,
            token_string(cfg.get("bos_token")),
            token_string(cfg.get("eos_token")),
        )
    }

    fn new(
        inner: tokenizers::Tokenizer,
        chat_template: Option<String>,
        bos_token: String,
        eos_token: String,
    ) -> Self {
        let mut specials: Vec<(String, u32)> = inner
            .get_added_tokens_decoder()
            .into_iter()
            .filter(|(_, t)| t.special && !t.content.is_empty())
            .map(|(id, t)| (t.content, id))
            .collect();
        specials.sort_by_key(|s| s.1);
        // ids are a 16-bit offset from a private-use base in the escape marks
        specials.truncate(MAX_MARKED_SPECIALS);
        let special_ids = specials.iter().map(|s| s.1).collect();
        let texts: Vec<&str> = specials.iter().map(|s| s.0.as_str()).collect();
        let matcher = |extra: Option<&str>| {
            let mut pats = texts.clone();
            pats.extend(extra);
            aho_corasick::AhoCorasick::builder()
                .match_kind(aho_corasick::MatchKind::LeftmostLongest)
                .build(pats)
                .ok()
        };
        let mark = CONTENT_MARK.to_string();
        let (special_matcher, escape_matcher) = if specials.is_empty() {
            (None, None)
        } else {
            (matcher(None), matcher(Some(&mark)))
        };
        let mut plain = inner.clone();
        plain.set_encode_special_tokens(true);
        let vocab_size = inner.get_vocab_size(true);
        Self {
            plain,
            specials,
            special_matcher,
            escape_matcher,
            inner,
            chat_template,
            bos_token,
            eos_token,
            special_ids,
            vocab_size,
        }
    }

    /// Replaces the chat template (`--chat-template`).
    pub fn set_chat_template(&mut self, template: String) {
        self.chat_template = Some(template);
    }

    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }

    /// Vocabulary size including added tokens.
    /// The `tokenizers` tokenizer underneath (for llguidance's token trie).
    pub(crate) fn hf_tokenizer(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    pub fn is_special(&self, id: u32) -> bool {
        self.special_ids.contains(&id)
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// Token ids of `text`. `add_special_tokens` applies the tokenizer's post-processor (a BOS
    /// for models whose tokenizer.json adds one); chat-templated text already carries its
    /// special tokens and is encoded without.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, TokenizerError> {
        let enc = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(|e| TokenizerError::Encode(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Escapes the special tokens' texts in `text` (chat content), so that templated they come
    /// back as plain text from [`Tokenizer::encode_chat`] rather than as control tokens.
    /// `None` when there is nothing to escape.
    pub fn escape_specials(&self, text: &str) -> Option<String> {
        let m = self.escape_matcher.as_ref()?;
        if !m.is_match(text) {
            return None;
        }
        let mut out = String::with_capacity(text.len() + 8);
        m.replace_all_with(text, &mut out, |hit, _, out| {
            out.push(CONTENT_MARK);
            // the pattern after the specials is CONTENT_MARK itself
            out.push(mark_char(hit.pattern().as_usize()));
            true
        });
        Some(out)
    }

    /// Escapes every string inside `v` (message contents, tool arguments, tool definitions).
    pub fn escape_specials_in(&self, v: &mut serde_json::Value) {
        match v {
            serde_json::Value::String(s) => {
                if let Some(e) = self.escape_specials(s) {
                    *s = e;
                }
            }
            serde_json::Value::Array(list) => {
                list.iter_mut().for_each(|x| self.escape_specials_in(x))
            }
            serde_json::Value::Object(map) => {
                map.values_mut().for_each(|x| self.escape_specials_in(x))
            }
            _ => {}
        }
    }

    /// Token ids of a rendered chat prompt. Without escaped content this is
    /// `encode(text, false)`. Where content was escaped ([`Tokenizer::escape_specials`]), the
    /// text is split at the template's own special tokens (as the tokenizer itself splits at
    /// added tokens) and each piece, its escapes restored, is encoded with special tokens read
    /// as plain text: only the template's markup yields control tokens.
    pub fn encode_chat(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        let Some(m) = self
            .special_matcher
            .as_ref()
            .filter(|_| text.contains(CONTENT_MARK))
        else {
            return self.encode(text, false);
        };
        let mut ids = Vec::new();
        let piece = |s: &str, ids: &mut Vec<u32>| -> Result<(), TokenizerError> {
            if s.is_empty() {
                return Ok(());
            }
            let restored = self.unescape(s);
            let enc = self
                .plain
                .encode(restored.as_str(), false)
                .map_err(|e| TokenizerError::Encode(e.to_string()))?;
            ids.extend_from_slice(enc.get_ids());
            Ok(())
        };
        let mut at = 0;
        for hit in m.find_iter(text) {
            piece(&text[at..hit.start()], &mut ids)?;
            ids.push(self.specials[hit.pattern().as_usize()].1);
            at = hit.end();
        }
        piece(&text[at..], &mut ids)?;
        Ok(ids)
    }

    /// `text` with the marks of [`Tokenizer::escape_specials`] turned back into their texts.
    fn unescape(&self, text: &str) -> String {
        let mut out = String::with_capacity(text.len());
        let mut chars = text.chars().peekable();
        while let Some(c) = chars.next() {
            let index = (c == CONTENT_MARK)
                .then(|| chars.peek().and_then(|&n| mark_index(n)))
                .flatten();
            match index {
                Some(i) if i < self.specials.len() => out.push_str(&self.specials[i].0),
                Some(_) => out.push(CONTENT_MARK),
                None => {
                    out.push(c);
                    continue;
                }
            }
            chars.next();
        }
        out
    }

    /// Checks that every id is inside the vocabulary.
    pub fn check_ids(&self, ids: &[u32]) -> Result<(), TokenizerError> {
        match ids.iter().find(|&&id| id as usize >= self.vocab_size) {
            Some(&id) => Err(TokenizerError::BadId {
                id,
                vocab: self.vocab_size,
            }),
            None => Ok(()),
        }
    }

    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String, TokenizerError> {
        self.check_ids(ids)?;
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| TokenizerError::Decode(e.to_string()))
    }

    /// Renders `messages` through the chat template, as Hugging Face's `apply_chat_template`
    /// does (`add_generation_prompt` appends the assistant turn header).
    pub fn apply_chat_template<M: Serialize>(
        &self,
        messages: &[M],
        add_generation_prompt: bool,
    ) -> Result<String, TokenizerError> {
        self.apply_chat_template_with_tools::<M, ()>(messages, None, add_generation_prompt)
    }

    /// [`Tokenizer::apply_chat_template`] with the template's `tools` variable set (OpenAI's
    /// tool objects), for templates that render tools ([`Tokenizer::template_uses_tools`]).
    pub fn apply_chat_template_with_tools<M: Serialize, T: Serialize>(
        &self,
        messages: &[M],
        tools: Option<&[T]>,
        add_generation_prompt: bool,
    ) -> Result<String, TokenizerError> {
        let template = self
            .chat_template
            .as_deref()
            .ok_or(TokenizerError::NoChatTemplate)?;
        render_template(
            template,
            minijinja::context! {
                messages => messages,
                tools => tools,
                add_generation_prompt => add_generation_prompt,
                bos_token => &self.bos_token,
                eos_token => &self.eos_token,
            },
        )
    }

    /// Whether the chat template reads a `tools` variable (else tools must be described to
    /// the model some other way).
    pub fn template_uses_tools(&self) -> bool {
        self.chat_template
            .as_deref()
            .is_some_and(|t| t.contains("tools"))
    }
}

/// Instructions a chat template may run per rendering (minijinja's fuel).
pub const TEMPLATE_FUEL: u64 = 20_000_000;

/// Renders a Hugging Face chat template with HF's Jinja settings.
fn render_template(template: &str, ctx: minijinja::Value) -> Result<String, TokenizerError> {
    let mut env = Environment::new();
    // about a second of instructions: real templates use a few per message
    env.set_fuel(Some(TEMPLATE_FUEL));
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    minijinja_contrib::add_to_environment(&mut env);
    env.add_function(
        "raise_exception",
        |msg: String| -> Result<String, minijinja::Error> {
            Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
        },
    );
    env.add_template("chat", template)
        .map_err(|e| TokenizerError::Template(e.to_string()))?;
    let tpl = env
        .get_template("chat")
        .map_err(|e| TokenizerError::Template(e.to_string()))?;
    tpl.render(ctx)
        .map_err(|e| TokenizerError::Template(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn template_with_hf_settings() {
        // expected outputs are what Python's jinja2 renders with the same settings
        let tpl = "{% for m in messages %}\n  {% if true %}{{ m.role | upper }}{% endif %}:{{ m.content.strip() }}\n{% endfor %}{% if add_generation_prompt %}A:{% endif %}";
        let out = render_template(
            tpl,
            minijinja::context! {
                messages => vec![ChatMessage::new("user", " hi ")],
                add_generation_prompt => true,
            },
        )
        .unwrap();
        assert_eq!(out, "USER:hi\nA:");
    }

    #[test]
    fn a_runaway_template_runs_out_of_fuel() {
        let started = std::time::Instant::now();
        let err = render_template(
            "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
            minijinja::context! {},
        )
        .unwrap_err();
        assert!(err.to_string().contains("fuel"), "{err}");
        assert!(started.elapsed().as_secs() < 30);
    }

    #[test]
    fn raise_exception_is_an_error() {
        let err = render_template(
            "{{ raise_exception('roles must alternate') }}",
            minijinja::context! {},
        )
        .unwrap_err();
        assert!(err.to_string().contains("roles must alternate"), "{err}");
    }
}

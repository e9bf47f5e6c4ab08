//! Sampling parameters as requests give them (SGLang's `sampling_params`), with the bounds
//! every field is checked against before a request is queued.

use serde::{Deserialize, Serialize};

/// Most `top_logprobs_num` a request may ask for (OpenAI's bound).
pub const MAX_TOP_LOGPROBS: usize = 20;
/// Most stop strings per request.
pub const MAX_STOP_STRINGS: usize = 16;
/// Longest stop string in bytes: each is looked for at every step, so its length bounds the
/// engine thread's work per token.
pub const MAX_STOP_STRING_BYTES: usize = 512;

/// A parameter outside its bound; `param` is the field name as the API spells it.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("`{param}` {message}")]
pub struct ParamError {
    pub param: String,
    pub message: String,
}

impl ParamError {
    pub fn new(param: &str, message: impl Into<String>) -> Self {
        Self {
            param: param.to_string(),
            message: message.into(),
        }
    }
}

/// SGLang's `sampling_params` (field names and defaults as in SGLang).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SamplingParams {
    pub max_new_tokens: usize,
    pub min_new_tokens: usize,
    pub temperature: f32,
    pub top_p: f32,
    /// -1 (or 0): no top-k filter.
    pub top_k: i64,
    pub min_p: f32,
    pub repetition_penalty: f32,
    pub frequency_penalty: f32,
    pub presence_penalty: f32,
    pub stop: Vec<String>,
    pub stop_token_ids: Vec<u32>,
    pub ignore_eos: bool,
    pub skip_special_tokens: bool,
    /// Keep the matched stop string at the end of the text.
    pub no_stop_trim: bool,
    pub seed: Option<u64>,
    /// Structured output: the text must match this JSON schema (given as a JSON string)...
    pub json_schema: Option<String>,
    /// ... or fully match this regular expression ...
    pub regex: Option<String>,
    /// ... or this grammar (llguidance's Lark dialect). At most one of the three.
    pub ebnf: Option<String>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            max_new_tokens: 128,
            min_new_tokens: 0,
            temperature: 1.0,
            top_p: 1.0,
            top_k: -1,
            min_p: 0.0,
            repetition_penalty: 1.0,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            stop: Vec::new(),
            stop_token_ids: Vec::new(),
            ignore_eos: false,
            skip_special_tokens: true,
            no_stop_trim: false,
            seed: None,
            json_schema: None,
            regex: None,
            ebnf: None,
        }
    }
}

impl SamplingParams {
    /// Greedy decoding with `max_new_tokens`.
    pub fn greedy(max_new_tokens: usize) -> Self {
        Self {
            max_new_tokens,
            temperature: 0.0,
            ..Self::default()
        }
    }

    pub fn is_greedy(&self) -> bool {
        self.temperature < 1e-6 || self.top_k == 1
    }

    /// Whether a penalty (frequency, presence, repetition) makes each token's sampling
    /// depend on the tokens before it.
    pub fn has_penalties(&self) -> bool {
        self.frequency_penalty != 0.0
            || self.presence_penalty != 0.0
            || self.repetition_penalty != 1.0
    }

    /// Checks every field against its bound; the error names the field.
    pub fn validate(&self, vocab_size: usize) -> Result<(), ParamError> {
        let finite = |name: &str, v: f32| {
            if v.is_finite() {
                Ok(())
            } else {
                Err(ParamError::new(
                    name,
                    format!("must be a finite number, got {v}"),
                ))
            }
        };
        finite("temperature", self.temperature)?;
        finite("top_p", self.top_p)?;
        finite("min_p", self.min_p)?;
        finite("repetition_penalty", self.repetition_penalty)?;
        finite("frequency_penalty", self.frequency_penalty)?;
        finite("presence_penalty", self.presence_penalty)?;
        if self.temperature < 0.0 {
            return Err(ParamError::new(
                "temperature",
                format!("must be >= 0, got {}", self.temperature),
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(ParamError::new(
                "top_p",
                format!("must be > 0 and <= 1, got {}", self.top_p),
            ));
        }
        if self.top_k < -1 {
            return Err(ParamError::new(
                "top_k",
                format!("must be -1 or 0 (disabled) or >= 1, got {}", self.top_k),
            ));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return Err(ParamError::new(
                "min_p",
                format!("must be >= 0 and <= 1, got {}", self.min_p),
            ));
        }
        if !(self.repetition_penalty > 0.0 && self.repetition_penalty <= 2.0) {
            return Err(ParamError::new(
                "repetition_penalty",
                format!("must be > 0 and <= 2, got {}", self.repetition_penalty),
            ));
        }
        if !(-2.0..=2.0).contains(&self.frequency_penalty) {
            return Err(ParamError::new(
                "frequency_penalty",
                format!("must be >= -2 and <= 2, got {}", self.frequency_penalty),
            ));
        }
        if !(-2.0..=2.0).contains(&self.presence_penalty) {
            return Err(ParamError::new(
                "presence_penalty",
                format!("must be >= -2 and <= 2, got {}", self.presence_penalty),
            ));
        }
        if self.min_new_tokens > self.max_new_tokens {
            return Err(ParamError::new(
                "min_new_tokens",
                format!(
                    "must be <= max_new_tokens ({}), got {}",
                    self.max_new_tokens, self.min_new_tokens
                ),
            ));
        }
        if self.stop.len() > MAX_STOP_STRINGS {
            return Err(ParamError::new(
                "stop",
                format!(
                    "at most {MAX_STOP_STRINGS} stop strings, got {}",
                    self.stop.len()
                ),
            ));
        }
        if self.stop.iter().any(|s| s.is_empty()) {
            return Err(ParamError::new("stop", "stop strings must not be empty"));
        }
        if let Some(s) = self.stop.iter().find(|s| s.len() > MAX_STOP_STRING_BYTES) {
            return Err(ParamError::new(
                "stop",
                format!(
                    "stop strings are at most {MAX_STOP_STRING_BYTES} bytes, got one of {}",
                    s.len()
                ),
            ));
        }
        let constraints: Vec<&str> = [
            ("json_schema", &self.json_schema),
            ("regex", &self.regex),
            ("ebnf", &self.ebnf),
        ]
        .iter()
        .filter(|(_, v)| v.is_some())
        .map(|(name, _)| *name)
        .collect();
        if let [first, second, ..] = constraints[..] {
            return Err(ParamError::new(
                second,
                format!("cannot be given with `{first}`: a request takes at most one constraint"),
            ));
        }
        if let Some(&id) = self
            .stop_token_ids
            .iter()
            .find(|&&id| id as usize >= vocab_size)
        {
            return Err(ParamError::new(
                "stop_token_ids",
                format!("{id} is outside the vocabulary (size {vocab_size})"),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_names_the_field_and_bound() {
        let check = |p: SamplingParams| p.validate(1000).unwrap_err().to_string();
        let e = check(SamplingParams {
            top_p: 1.5,
            ..Default::default()
        });
        assert!(e.contains("`top_p`") && e.contains("<= 1"), "{e}");
        let e = check(SamplingParams {
            temperature: -1.0,
            ..Default::default()
        });
        assert!(e.contains("`temperature`"), "{e}");
        let e = check(SamplingParams {
            top_k: -5,
            ..Default::default()
        });
        assert!(e.contains("`top_k`"), "{e}");
        let e = check(SamplingParams {
            min_p: 2.0,
            ..Default::default()
        });
        assert!(e.contains("`min_p`"), "{e}");
        let e = check(SamplingParams {
            stop_token_ids: vec![5000],
            ..Default::default()
        });
        assert!(e.contains("`stop_token_ids`"), "{e}");
        let e = check(SamplingParams {
            temperature: f32::NAN,
            ..Default::default()
        });
        assert!(e.contains("`temperature`"), "{e}");
        assert!(SamplingParams::default().validate(1000).is_ok());
        let e = check(SamplingParams {
            json_schema: Some("{}".into()),
            regex: Some("a+".into()),
            ..Default::default()
        });
        assert!(
            e.contains("`regex` cannot be given with `json_schema`"),
            "{e}"
        );
    }
}

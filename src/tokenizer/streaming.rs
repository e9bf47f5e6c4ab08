//! Generated text as it streams. [`IncrementalDecoder`] turns a growing list of token ids into
//! text deltas without ever emitting half of a multi-byte UTF-8 character (the algorithm of
//! TGI and vLLM: decode a short window twice and emit only the stable, complete suffix).
//! [`StopMatcher`] finds stop strings in the text as it grows and holds back the tail that
//! could still become one, so that a stop string is never streamed. Both are per request and
//! owned by the engine thread; each step costs O(window) and O(stops x longest stop).

use super::{Tokenizer, TokenizerError};

/// Streams text for a growing list of ids, never splitting a UTF-8 character.
///
/// Keeps two offsets into `ids`: text up to `read_offset` has been emitted; decoding starts at
/// `prefix_offset` (a few tokens earlier) so byte-level merges across the boundary decode the
/// same way both times.
#[derive(Debug, Clone)]
pub struct IncrementalDecoder {
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
    skip_special_tokens: bool,
}

impl IncrementalDecoder {
    pub fn new(skip_special_tokens: bool) -> Self {
        Self {
            ids: Vec::new(),
            prefix_offset: 0,
            read_offset: 0,
            skip_special_tokens,
        }
    }

    /// Adds one token; returns the text that became complete (possibly empty).
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> Result<String, TokenizerError> {
        self.ids.push(id);
        let prefix = tok.decode(
            &self.ids[self.prefix_offset..self.read_offset],
            self.skip_special_tokens,
        )?;
        let full = tok.decode(&self.ids[self.prefix_offset..], self.skip_special_tokens)?;
        if full.len() > prefix.len() && !full.ends_with('\u{FFFD}') {
            if let Some(delta) = full.get(prefix.len()..) {
                if full.starts_with(&prefix) {
                    let delta = delta.to_string();
                    self.prefix_offset = self.read_offset;
                    self.read_offset = self.ids.len();
                    return Ok(delta);
                }
            }
        }
        Ok(String::new())
    }

    /// Text held back at the end (an incomplete character at the end of generation decodes to
    /// U+FFFD, as a full decode would).
    pub fn finish(&mut self, tok: &Tokenizer) -> Result<String, TokenizerError> {
        let prefix = tok.decode(
            &self.ids[self.prefix_offset..self.read_offset],
            self.skip_special_tokens,
        )?;
        let full = tok.decode(&self.ids[self.prefix_offset..], self.skip_special_tokens)?;
        self.prefix_offset = self.read_offset;
        self.read_offset = self.ids.len();
        Ok(full.get(prefix.len()..).unwrap_or_default().to_string())
    }
}

/// Finds stop strings in generated text as it grows, and decides how much text is safe to
/// stream: text that could still turn out to be the start of a stop string is held back.
#[derive(Debug, Clone, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    longest: usize,
}

/// Result of [`StopMatcher::check`].
#[derive(Debug, Clone, PartialEq)]
pub enum StopCheck {
    /// No stop string; text up to `safe_len` bytes may be emitted.
    Continue { safe_len: usize },
    /// A stop string begins at byte `at` (the text is to be cut there).
    Stop { at: usize, matched: String },
}

impl StopMatcher {
    pub fn new(stops: &[String]) -> Self {
        Self {
            longest: stops.iter().map(|s| s.len()).max().unwrap_or(0),
            stops: stops.to_vec(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.stops.is_empty()
    }

    /// `text` is all generated text; `new_from` the byte where this step's new text starts.
    /// Only matches overlapping the new text are looked for (older text was checked already).
    pub fn check(&self, text: &str, new_from: usize) -> StopCheck {
        if self.stops.is_empty() {
            return StopCheck::Continue {
                safe_len: text.len(),
            };
        }
        let mut from = new_from.saturating_sub(self.longest.saturating_sub(1));
        while !text.is_char_boundary(from) {
            from -= 1;
        }
        let mut best: Option<(usize, &str)> = None;
        for s in &self.stops {
            if let Some(i) = text[from..].find(s.as_str()) {
                let at = from + i;
                if best.is_none_or(|(b, _)| at < b) {
                    best = Some((at, s));
                }
            }
        }
        if let Some((at, s)) = best {
            return StopCheck::Stop {
                at,
                matched: s.to_string(),
            };
        }
        // Hold back the longest suffix of `text` that is a proper prefix of some stop string:
        // only suffixes no longer than the text (and than the stop) are candidates, tried
        // longest first, each ruled out at its first differing byte.
        let mut hold = 0;
        for s in &self.stops {
            let longest = (s.len() - 1).min(text.len());
            for len in (hold + 1..=longest).rev() {
                let tail = &text.as_bytes()[text.len() - len..];
                if s.as_bytes().starts_with(tail) && s.is_char_boundary(len) {
                    hold = len;
                    break;
                }
            }
        }
        StopCheck::Continue {
            safe_len: text.len() - hold,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_strings_cut_exactly_and_hold_back_prefixes() {
        let m = StopMatcher::new(&["###".to_string(), "\nUser:".to_string()]);
        assert_eq!(m.check("hello", 0), StopCheck::Continue { safe_len: 5 });
        // "##" might become "###": held back
        assert_eq!(m.check("hello ##", 5), StopCheck::Continue { safe_len: 6 });
        assert_eq!(
            m.check("hello ###!", 8),
            StopCheck::Stop {
                at: 6,
                matched: "###".into()
            }
        );
        // a match spanning old and new text is found
        assert_eq!(m.check("a\nUse", 1), StopCheck::Continue { safe_len: 1 });
        assert_eq!(
            m.check("a\nUser: hi", 5),
            StopCheck::Stop {
                at: 1,
                matched: "\nUser:".into()
            }
        );
        // multi-byte text near a boundary does not panic
        let m = StopMatcher::new(&["é!".to_string()]);
        assert_eq!(m.check("caféé", 4), StopCheck::Continue { safe_len: 5 });
        assert_eq!(
            m.check("caféé!", 6),
            StopCheck::Stop {
                at: 5,
                matched: "é!".into()
            }
        );
    }
}

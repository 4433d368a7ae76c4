//! The Hugging Face tokenizer (`tokenizer.json`, a Qwen2-style byte-level BPE for
//! dots.llm1), loaded offline, plus the inst model's chat format and a streaming decoder.

use std::path::Path;

use super::error::ModelError;

/// The system prompt of the inst model's chat format when none is given.
pub const DEFAULT_SYSTEM_PROMPT: &str = "You are a helpful assistant.";

/// The token that ends an answer of the inst model.
pub const END_OF_RESPONSE: &str = "<|endofresponse|>";

/// Wraps `user` in the dots.llm1 inst chat format:
/// `<|system|>SYSTEM<|endofsystem|><|userprompt|>USER<|endofuserprompt|><|response|>`.
pub fn chat_prompt(user: &str, system: Option<&str>) -> String {
    let system = system.unwrap_or(DEFAULT_SYSTEM_PROMPT);
    format!("<|system|>{system}<|endofsystem|><|userprompt|>{user}<|endofuserprompt|><|response|>")
}

/// A loaded `tokenizer.json`.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// `inner.get_vocab_size(true)`, which builds the whole vocabulary map: asked once.
    vocab_size: usize,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer").field("vocab_size", &self.vocab_size()).finish()
    }
}

impl Tokenizer {
    /// Loads `path` (a `tokenizer.json`).
    pub fn from_file(path: &Path) -> Result<Self, ModelError> {
        let bytes = std::fs::read(path).map_err(|e| ModelError::io(path, e))?;
        Self::from_bytes(&bytes).map_err(|e| match e {
            ModelError::Tokenizer(reason) => ModelError::Tokenizer(format!("{}: {reason}", path.display())),
            other => other,
        })
    }

    /// Parses the contents of a `tokenizer.json`.
    ///
    /// The JSON syntax is checked first: the `tokenizers` crate panics (instead of
    /// returning an error) on some syntax errors inside the `"decoder"` value, and a
    /// panic that still escapes it is turned into an error too.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, ModelError> {
        serde_json::from_slice::<serde::de::IgnoredAny>(bytes)
            .map_err(|e| ModelError::Tokenizer(format!("tokenizer.json is not valid JSON: {e}")))?;
        let parsed = std::panic::catch_unwind(|| tokenizers::Tokenizer::from_bytes(bytes))
            .map_err(|_| ModelError::Tokenizer("the tokenizers crate panicked on this tokenizer.json".into()))?;
        let inner = parsed.map_err(|e| ModelError::Tokenizer(e.to_string()))?;
        let vocab_size = inner.get_vocab_size(true);
        Ok(Tokenizer { inner, vocab_size })
    }

    /// Loads `dir/tokenizer.json` if the directory has one.
    pub fn from_dir(dir: &Path) -> Result<Option<Self>, ModelError> {
        let path = dir.join("tokenizer.json");
        if path.exists() { Self::from_file(&path).map(Some) } else { Ok(None) }
    }

    /// Tokens of `text`, with the tokenizer's own special-token post-processing (none
    /// for dots.llm1: it has no BOS). Special tokens written in the text are recognised.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, ModelError> {
        let encoding =
            self.inner.encode(text, true).map_err(|e| ModelError::Tokenizer(format!("encoding failed: {e}")))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Text of `ids`, skipping special tokens.
    pub fn decode(&self, ids: &[u32]) -> Result<String, ModelError> {
        self.inner.decode(ids, true).map_err(|e| ModelError::Tokenizer(format!("decoding failed: {e}")))
    }

    /// The id of a token string (an added or special token, or a vocabulary entry).
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }
}

/// Turns a stream of token ids into a stream of text pieces.
///
/// Byte-level BPE tokens can end in the middle of a UTF-8 character; a piece is released
/// only once it decodes to complete characters (no trailing U+FFFD). Each step decodes
/// only a short window (the ids since the last released piece and the one before it), so
/// streaming `n` tokens costs O(n), not O(n^2).
#[derive(Debug, Default)]
pub struct TextStream {
    ids: Vec<u32>,
    /// Start of the decode window: ids before it are released and no longer needed.
    prefix: usize,
    /// Ids `prefix..read` are released; `read..` are pending.
    read: usize,
}

impl TextStream {
    /// An empty stream.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `id`; returns the text it completes, if any.
    pub fn push(&mut self, tokenizer: &Tokenizer, id: u32) -> Result<Option<String>, ModelError> {
        self.ids.push(id);
        let released = tokenizer.decode(&self.ids[self.prefix..self.read])?;
        let text = tokenizer.decode(&self.ids[self.prefix..])?;
        if text.ends_with('\u{FFFD}') || text.len() <= released.len() || !text.is_char_boundary(released.len()) {
            return Ok(None);
        }
        let piece = text[released.len()..].to_string();
        self.prefix = self.read;
        self.read = self.ids.len();
        Ok(Some(piece))
    }

    /// The text not yet released (an incomplete character at the end, decoded lossily).
    pub fn finish(&mut self, tokenizer: &Tokenizer) -> Result<Option<String>, ModelError> {
        let released = tokenizer.decode(&self.ids[self.prefix..self.read])?;
        let text = tokenizer.decode(&self.ids[self.prefix..])?;
        if text.len() > released.len() && text.is_char_boundary(released.len()) {
            let piece = text[released.len()..].to_string();
            self.prefix = self.read;
            self.read = self.ids.len();
            return Ok(Some(piece));
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chat_format_matches_dots1() {
        assert_eq!(
            chat_prompt("Hi", None),
            "<|system|>You are a helpful assistant.<|endofsystem|><|userprompt|>Hi<|endofuserprompt|><|response|>"
        );
    }

    #[test]
    fn bad_json_is_an_error() {
        assert!(matches!(Tokenizer::from_bytes(b"{not json"), Err(ModelError::Tokenizer(_))));
    }
}

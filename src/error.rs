//! Typed errors of the configuration and MoE layers.
//!
//! Every error names what was wrong: the field, the tensor with its expected and actual
//! shape, the token and expert of a bad logit. Nothing in the public API panics on user
//! input; it returns one of these.

use std::path::PathBuf;

/// A `config.json` that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The text is not valid JSON, or a required field is missing or has the wrong type.
    #[error("config.json: {0}")]
    Json(String),
    /// A field has a value the model cannot work with.
    #[error("config field `{field}`: {reason}")]
    Invalid {
        /// The config field (Hugging Face name).
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The operating system's error.
        source: std::io::Error,
    },
}

/// An error of the MoE contract: shapes, bad values, missing weights.
#[derive(Debug, thiserror::Error)]
pub enum MoeError {
    /// The configuration is inconsistent.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A tensor has the wrong shape (or its buffer the wrong length for its shape).
    #[error("tensor `{name}`: expected shape {expected:?}, got {actual}")]
    Shape {
        /// Which tensor.
        name: String,
        /// The shape the configuration implies.
        expected: Vec<usize>,
        /// What was given, described (a shape or a buffer length).
        actual: String,
    },
    /// A router logit is NaN or infinite: the routing would be garbage.
    #[error("router logit of token {token} for expert {expert} is {value}, not finite")]
    NonFiniteLogit {
        /// Token row.
        token: usize,
        /// Expert index.
        expert: usize,
        /// The offending value.
        value: f32,
    },
    /// A bias value is NaN or infinite.
    #[error("e_score_correction_bias[{expert}] is {value}, not finite")]
    NonFiniteBias {
        /// Expert index.
        expert: usize,
        /// The offending value.
        value: f32,
    },
    /// A routing refers to an expert that does not exist, or repeats one for a token.
    #[error("routing of token {token}: {reason}")]
    BadRouting {
        /// Token row.
        token: usize,
        /// What is wrong.
        reason: String,
    },
    /// A permutation made elsewhere (a GPU download, a test, an engine) is not one that
    /// [`crate::moe::permute()`] could have made.
    #[error("malformed permutation: {0}")]
    BadPermutation(#[from] PermutationError),
    /// A layer was built without some of its weights.
    #[error("missing weights: {0}")]
    MissingWeights(String),
    /// The requested kernels cannot run on this machine, or not on this configuration
    /// (an architecture, a dtype, a precision, a shape multiple they do not take).
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// A size is past a limit of the device or of a kernel (grid blocks, shared memory,
    /// expert groups, slots per token): a smaller input would run.
    #[error("limit exceeded: {what}: needs {needed}, the limit is {limit}")]
    Limit {
        /// What is limited, with its unit and the kernel it is a limit of.
        what: String,
        /// What the input needs.
        needed: usize,
        /// The most there may be.
        limit: usize,
    },
    /// A size computation overflowed (`tokens * hidden` and the like).
    #[error("size overflow: {0}")]
    Overflow(String),
}

/// What is wrong with a malformed [`crate::moe::Permutation`] (see
/// [`crate::moe::Permutation::validate`]).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PermutationError {
    /// `expert_offsets` is empty: it needs `n_slots + 1` entries, at least one.
    #[error("expert_offsets is empty")]
    NoOffsets,
    /// `expert_offsets[0]` is not 0.
    #[error("expert_offsets[0] is {first}, not 0")]
    FirstOffset {
        /// The offending first offset.
        first: u32,
    },
    /// The offsets fall from one slot to the next: slot `slot`'s rows would end before
    /// they start.
    #[error("expert_offsets[{}] = {end} is below expert_offsets[{slot}] = {start}", slot + 1)]
    OffsetsDecrease {
        /// The slot whose row range is reversed.
        slot: usize,
        /// `expert_offsets[slot]`.
        start: u32,
        /// `expert_offsets[slot + 1]`.
        end: u32,
    },
    /// The last offset is not the number of pairs `T * slots_per_token`.
    #[error("the last expert offset is {last}, not the {pairs} pairs")]
    LastOffset {
        /// The offending last offset.
        last: u32,
        /// The pair count, `tokens * slots_per_token`.
        pairs: usize,
    },
    /// `row_pairs` and `pair_rows` are not inverse permutations of `0..T * slots_per_token`:
    /// `row_pairs[row] = pair`, but `pair_rows[pair]` is not `row` (or `pair` is out of range).
    #[error("row_pairs[{row}] = {pair}, but pair_rows[{pair}] is {back:?}, not {row}")]
    NotInverse {
        /// The permuted row.
        row: usize,
        /// `row_pairs[row]`.
        pair: u32,
        /// `pair_rows[pair]`, `None` when `pair` is out of range.
        back: Option<u32>,
    },
}

impl MoeError {
    /// A shape error for a flat buffer of `len` elements that should hold `expected`.
    pub fn length(name: impl Into<String>, expected: &[usize], len: usize) -> Self {
        MoeError::Shape {
            name: name.into(),
            expected: expected.to_vec(),
            actual: format!("a buffer of {len} elements"),
        }
    }

    /// A shape error between two shapes.
    pub fn shape(name: impl Into<String>, expected: &[usize], actual: &[usize]) -> Self {
        MoeError::Shape { name: name.into(), expected: expected.to_vec(), actual: format!("{actual:?}") }
    }
}

/// The message a caught panic carried (`catch_unwind`'s payload: a `&str` or a `String`),
/// for the embedding layers (C ABI, Python) that turn a panic into an error at their
/// boundary.
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

/// Checks that `len` equals the product of `shape`, naming the tensor otherwise.
pub fn check_len(name: &str, shape: &[usize], len: usize) -> Result<(), MoeError> {
    let expected = shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| MoeError::Overflow(format!("tensor `{name}` of shape {shape:?}")))?;
    if expected == len { Ok(()) } else { Err(MoeError::length(name, shape, len)) }
}

//! Regression tests for inputs the `config` fuzz target found.

use dots_moe::{ConfigError, Dots1Config, MoeConfig, RouterConfig};

/// `MoeConfig::validate` computed `2 * moe_intermediate_size` unchecked: a panic with
/// overflow checks, and without them a wrapped size of 0 that validated. Found by
/// `fuzz/fuzz_targets/config.rs`.
#[test]
fn huge_moe_intermediate_size_is_an_error_not_an_overflow() {
    let cfg = MoeConfig {
        hidden_size: 1,
        moe_intermediate_size: usize::MAX / 2 + 1,
        n_shared_experts: 0,
        router: RouterConfig { n_experts: 1, top_k: 1, ..RouterConfig::dots1() },
    };
    assert!(matches!(cfg.validate(), Err(ConfigError::Invalid { field: "moe_intermediate_size", .. })));

    let text = r#"{"hidden_size": 4, "num_hidden_layers": 1, "num_attention_heads": 2,
        "intermediate_size": 4, "moe_intermediate_size": 9223372036854775808,
        "n_routed_experts": 1, "num_experts_per_tok": 1, "vocab_size": 4}"#;
    match Dots1Config::from_json(text) {
        Err(ConfigError::Invalid { field, .. }) => assert_eq!(field, "moe_intermediate_size"),
        other => panic!("expected an error naming moe_intermediate_size, got {other:?}"),
    }
}

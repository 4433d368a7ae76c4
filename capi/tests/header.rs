//! `include/dots_moe.h` is what cbindgen generates from `src/lib.rs` today: this test fails
//! when the committed header is stale. `DOTS_MOE_BLESS=1` rewrites it instead.

use std::path::PathBuf;

#[test]
fn the_committed_header_is_fresh() {
    let crate_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let config = cbindgen::Config::from_file(crate_dir.join("cbindgen.toml")).expect("capi/cbindgen.toml");
    let mut generated = Vec::new();
    cbindgen::Builder::new()
        .with_crate(&crate_dir)
        .with_config(config)
        .generate()
        .expect("cbindgen reads capi/src/lib.rs")
        .write(&mut generated);
    let path = crate_dir.join("../include/dots_moe.h");
    if std::env::var("DOTS_MOE_BLESS").is_ok_and(|v| v == "1") {
        std::fs::write(&path, &generated).expect("write include/dots_moe.h");
        return;
    }
    let committed = std::fs::read(&path).unwrap_or_default();
    assert!(
        committed == generated,
        "include/dots_moe.h is stale: regenerate it with `DOTS_MOE_BLESS=1 cargo test -p dots-moe-capi --test header`"
    );
}

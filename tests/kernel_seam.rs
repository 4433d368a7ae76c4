//! The seam between the Rust launchers and the `.cu` files, checked on text (no NVRTC, no
//! GPU): every `extern "C" __global__` signature of every kernel file (function-like macros
//! that stamp them expanded) equals its declaration in the registry (`dots_moe::cuda::source`)
//! — names, order, pointer element types and constness, scalar types, parameter names —,
//! every kernel file and header under `cuda/` is registered, every `#include` names a
//! registered header, and every integer `#define` of every file and header equals the
//! Rust constant of the same name (`source::KERNEL_CONSTANTS`, no exception).
#![cfg(feature = "cuda")]

use std::collections::HashMap;
use std::path::Path;

use dots_moe::cuda::launch::ParamType;
use dots_moe::cuda::source::{self, FILES, HEADERS, KERNEL_CONSTANTS};

/// The text without `//` and `/* */` comments.
fn strip_comments(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while !rest.is_empty() {
        if let Some(r) = rest.strip_prefix("//") {
            rest = r.find('\n').map_or("", |i| &r[i..]);
        } else if let Some(r) = rest.strip_prefix("/*") {
            rest = r.find("*/").map_or("", |i| &r[i + 2..]);
        } else {
            let c = rest.chars().next().unwrap();
            out.push(c);
            rest = &rest[c.len_utf8()..];
        }
    }
    out
}

/// Logical lines: backslash continuations joined.
fn logical_lines(text: &str) -> Vec<String> {
    text.replace("\\\n", " ").lines().map(str::to_string).collect()
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// Replaces whole-word `from` by `to`.
fn replace_word(text: &str, from: &str, to: &str) -> String {
    let mut out = String::new();
    let mut word = String::new();
    for c in text.chars().chain(std::iter::once(' ')) {
        if is_ident(c) {
            word.push(c);
        } else {
            out.push_str(if word == from { to } else { &word });
            word.clear();
            out.push(c);
        }
    }
    out.pop();
    out
}

/// The text with the function-like macros that define kernels expanded at their uses.
fn expand_kernel_macros(text: &str) -> String {
    let lines = logical_lines(&strip_comments(text));
    let mut macros: HashMap<String, (Vec<String>, String)> = HashMap::new();
    let mut out = String::new();
    for line in &lines {
        let t = line.trim();
        if let Some(def) = t.strip_prefix("#define ")
            && let Some(open) = def.find('(')
            && def[..open].chars().all(is_ident)
            && def.contains("__global__")
        {
            let close = def.find(')').unwrap();
            let params = def[open + 1..close].split(',').map(|p| p.trim().to_string()).collect();
            macros.insert(def[..open].to_string(), (params, def[close + 1..].to_string()));
            continue;
        }
        let invoked = t.find('(').and_then(|open| macros.get(&t[..open]).map(|m| (open, m)));
        if let Some((open, (params, body))) = invoked {
            let args: Vec<&str> = t[open + 1..t.rfind(')').unwrap()].split(',').map(str::trim).collect();
            assert_eq!(args.len(), params.len(), "macro use {t}");
            let mut expanded = body.clone();
            for (p, a) in params.iter().zip(args) {
                expanded = replace_word(&expanded, p, a);
            }
            out.push_str(&expanded);
        } else {
            out.push_str(line);
        }
        out.push('\n');
    }
    out
}

/// Every `extern "C" __global__` kernel of `text`: name and `(type, name)` parameters, with
/// whitespace normalised.
fn signatures(text: &str) -> Vec<(String, Vec<(String, String)>)> {
    let text = expand_kernel_macros(text);
    let mut found = Vec::new();
    for (at, _) in text.match_indices("extern \"C\" __global__") {
        let rest = &text[at..];
        let open_body = rest.find('{').expect("a kernel body");
        let head = rest[..open_body].split_whitespace().collect::<Vec<_>>().join(" ");
        // Drop `__launch_bounds__(...)`.
        let head = match head.find("__launch_bounds__(") {
            Some(i) => {
                let close = i + head[i..].find(')').unwrap();
                format!("{}{}", &head[..i], &head[close + 1..])
            }
            None => head,
        };
        let open = head.find('(').expect("a parameter list");
        let name = head[..open].split_whitespace().last().unwrap().to_string();
        let params = head[open + 1..head.rfind(')').unwrap()]
            .split(',')
            .map(|p| {
                let p = p.split_whitespace().collect::<Vec<_>>().join(" ").replace(" *", "*");
                let split = p.rfind(|c: char| !is_ident(c)).expect("a typed parameter");
                (p[..=split].trim().to_string(), p[split + 1..].to_string())
            })
            .collect();
        found.push((name, params));
    }
    found
}

#[test]
fn every_kernel_signature_matches_its_declaration() {
    let mut checked = 0;
    for file in FILES {
        let found = signatures(file.text);
        let names: Vec<&str> = found.iter().map(|(n, _)| n.as_str()).collect();
        let mut declared = file.entry_points();
        let mut sorted = names.clone();
        sorted.sort_unstable();
        declared.sort_unstable();
        assert_eq!(sorted, declared, "{}: the file's kernels differ from the registry's", file.name);
        for (name, params) in &found {
            let decl = file.kernels.iter().find(|k| k.entry == name).unwrap();
            assert_eq!(decl.file, file.name, "{name}: declared in the wrong file");
            let want: Vec<(String, String)> = decl.params.iter().map(|p| (p.ty.c_type(), p.name.to_string())).collect();
            assert_eq!(params, &want, "{}: {name}: the .cu signature differs from the declaration", file.name);
            checked += 1;
        }
    }
    assert_eq!(checked, source::kernels().count());
    assert_eq!(checked, 40);
}

/// The kernels of `text` whose body does not begin with `grid_dependency_sync();` (the
/// programmatic-dependent-launch wait, `cuda/include/common.cuh`): under programmatic
/// stream serialisation such a kernel could read or write global memory while the kernel
/// before it still runs.
fn kernels_without_dependency_sync(text: &str) -> Vec<String> {
    let text = expand_kernel_macros(&strip_comments(text));
    let mut missing = Vec::new();
    for (at, _) in text.match_indices("extern \"C\" __global__") {
        let rest = &text[at..];
        let open = rest.find('{').expect("a kernel body");
        let head = &rest[..open];
        let name = head[..head.find('(').unwrap_or(head.len())].split_whitespace().last().unwrap_or("?");
        // `__launch_bounds__(...)` comes first: the name is the word before the parameters.
        let name = match head.find("__launch_bounds__(") {
            Some(i) => {
                let after = &head[i + head[i..].find(')').unwrap() + 1..];
                after[..after.find('(').unwrap_or(after.len())].split_whitespace().last().unwrap_or(name)
            }
            None => name,
        };
        if !rest[open + 1..].trim_start().starts_with("grid_dependency_sync();") {
            missing.push(name.to_string());
        }
    }
    missing
}

#[test]
fn every_kernel_waits_for_the_previous_grid_before_touching_memory() {
    let mut checked = 0;
    for file in FILES {
        assert_eq!(kernels_without_dependency_sync(file.text), Vec::<String>::new(), "{}", file.name);
        checked += file.kernels.len();
    }
    assert_eq!(checked, source::kernels().count());
    // The check on a kernel that reads first.
    let text = "extern \"C\" __global__ void __launch_bounds__(128) k(const u32* a) {\n    u32 v = a[0];\n}\n";
    assert_eq!(kernels_without_dependency_sync(text), vec!["k".to_string()]);
    let macro_text =
        "#define K(NAME) \\\n    extern \"C\" __global__ void NAME(u32* a) { \\\n        a[0] = 1; \\\n    }\nK(k2)\n";
    assert_eq!(kernels_without_dependency_sync(macro_text), vec!["k2".to_string()]);
}

#[test]
fn the_signature_check_sees_a_drift() {
    // A parameter type, an order and a name, each changed in a copy of combine.cu: the
    // parsed signature must differ from the declaration.
    let decl: Vec<(String, String)> =
        source::COMBINE_KERNEL.params.iter().map(|p| (p.ty.c_type(), p.name.to_string())).collect();
    let original = signatures(source::COMBINE.text);
    assert_eq!(original[0].1, decl);
    for (from, to) in [
        ("u64 hidden_size", "u32 hidden_size"),
        ("u32 slots_per_token, u64 hidden_size", "u64 hidden_size, u32 slots_per_token"),
        ("const u32* __restrict__ pair_rows", "const u32* __restrict__ rows_of_pairs"),
        ("const float* __restrict__ expert_rows", "float* __restrict__ expert_rows"),
    ] {
        assert!(source::COMBINE.text.contains(from), "{from}");
        let mutated = signatures(&source::COMBINE.text.replace(from, to));
        assert_ne!(mutated[0].1, decl, "{from} -> {to} went unnoticed");
    }
    // The macro-stamped kernels are seen with their arguments substituted.
    let route = signatures(source::ROUTE.text);
    let bf16 = route.iter().find(|(n, _)| n == "moe_router_logits_bf16_f32_e4").unwrap();
    assert_eq!(bf16.1[0], ("const u16* __restrict__".to_string(), "x".to_string()));
    assert_eq!(bf16.1[1], ("const float* __restrict__".to_string(), "w".to_string()));
}

#[test]
fn declarations_are_consistent() {
    let mut entries: Vec<&str> = source::kernels().map(|k| k.entry).collect();
    let n = entries.len();
    entries.sort_unstable();
    entries.dedup();
    assert_eq!(entries.len(), n, "an entry point is declared twice");
    for k in source::kernels() {
        assert!(k.block > 0 && k.block % 32 == 0 && k.block <= 1024, "{}: block {}", k.entry, k.block);
        assert!(k.max_registers <= 255 && k.max_registers * k.block <= 65_536, "{}: register budget", k.entry);
        // Every pointer parameter names an element type; outputs are never const.
        assert!(k.params.iter().any(|p| matches!(p.ty, ParamType::Out(_))), "{}: writes nothing", k.entry);
    }
}

#[test]
fn every_file_and_header_is_registered_and_includes_only_registered_headers() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("cuda");
    let mut on_disk: Vec<String> = std::fs::read_dir(&root)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".cu") || n.ends_with(".cuh"))
        .collect();
    on_disk.sort();
    let mut registered: Vec<String> = FILES.iter().map(|f| f.name.to_string()).collect();
    registered.sort();
    assert_eq!(on_disk, registered, "kernel files under cuda/ vs the registry");
    let mut headers: Vec<String> = std::fs::read_dir(root.join("include"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    headers.sort();
    let mut names: Vec<String> = HEADERS.iter().map(|h| h.name.to_string()).collect();
    names.sort();
    assert_eq!(headers, names, "headers under cuda/include/ vs the registry");
    for text in FILES.iter().map(|f| f.text).chain(HEADERS.iter().map(|h| h.text)) {
        for line in text.lines().filter(|l| l.trim_start().starts_with("#include")) {
            let name = line.split('"').nth(1).unwrap_or_else(|| panic!("{line}: only \"header.cuh\" includes"));
            assert!(HEADERS.iter().any(|h| h.name == name), "{line}: not a registered header (no toolkit headers)");
        }
    }
    for file in FILES {
        assert!(file.text.contains("#include \""), "{} includes no header", file.name);
        assert!(
            !file.text.contains("extern __shared__"),
            "{}: declare dynamic shared memory with DECLARE_DYNAMIC_SMEM",
            file.name
        );
    }
}

/// Evaluates an integer expression of literals (decimal or hex, `u` suffixes), known
/// names, `+ - * /` and parentheses; `None` for anything else.
fn eval(text: &str, known: &HashMap<String, i128>) -> Option<i128> {
    fn tokens(s: &str) -> Option<Vec<String>> {
        let mut out = Vec::new();
        let mut chars = s.chars().peekable();
        while let Some(&c) = chars.peek() {
            if c.is_whitespace() {
                chars.next();
            } else if is_ident(c) {
                let mut w = String::new();
                while let Some(&c) = chars.peek().filter(|c| is_ident(**c)) {
                    w.push(c);
                    chars.next();
                }
                out.push(w);
            } else if "+-*/()".contains(c) {
                out.push(c.to_string());
                chars.next();
            } else {
                return None;
            }
        }
        Some(out)
    }
    fn expr(t: &[String], i: &mut usize, k: &HashMap<String, i128>) -> Option<i128> {
        let mut v = term(t, i, k)?;
        while *i < t.len() && (t[*i] == "+" || t[*i] == "-") {
            let op = t[*i].clone();
            *i += 1;
            let r = term(t, i, k)?;
            v = if op == "+" { v + r } else { v - r };
        }
        Some(v)
    }
    fn term(t: &[String], i: &mut usize, k: &HashMap<String, i128>) -> Option<i128> {
        let mut v = atom(t, i, k)?;
        while *i < t.len() && (t[*i] == "*" || t[*i] == "/") {
            let op = t[*i].clone();
            *i += 1;
            let r = atom(t, i, k)?;
            v = if op == "*" { v * r } else { v.checked_div(r)? };
        }
        Some(v)
    }
    fn atom(t: &[String], i: &mut usize, k: &HashMap<String, i128>) -> Option<i128> {
        let tok = t.get(*i)?.clone();
        *i += 1;
        if tok == "(" {
            let v = expr(t, i, k)?;
            (t.get(*i)? == ")").then_some(())?;
            *i += 1;
            return Some(v);
        }
        let lit = tok.trim_end_matches(['u', 'U', 'l', 'L']);
        if let Some(hex) = lit.strip_prefix("0x") {
            return i128::from_str_radix(hex, 16).ok();
        }
        lit.parse().ok().or_else(|| k.get(&tok).copied())
    }
    let t = tokens(text)?;
    let mut i = 0;
    let v = expr(&t, &mut i, known)?;
    (i == t.len()).then_some(v)
}

/// Checks every integer `#define` of `texts` (name, text) against the Rust constants.
fn check_defines<'a>(texts: impl Iterator<Item = (&'a str, &'a str)>) -> Result<usize, String> {
    let rust: HashMap<String, i128> = KERNEL_CONSTANTS.iter().map(|&(n, v)| (n.to_string(), v as i128)).collect();
    if rust.len() != KERNEL_CONSTANTS.len() {
        return Err("a constant is listed twice".into());
    }
    let mut known: HashMap<String, i128> = HashMap::new();
    let mut seen: HashMap<String, &str> = HashMap::new();
    for (name, text) in texts {
        for line in logical_lines(&strip_comments(text)) {
            let Some(def) = line.trim().strip_prefix("#define ") else { continue };
            let def = def.trim();
            let split = def.find(|c: char| !is_ident(c)).unwrap_or(def.len());
            if def[split..].starts_with('(') {
                continue; // a function-like macro, not a size
            }
            let (macro_name, value) = (&def[..split], def[split..].trim());
            let Some(v) = eval(value, &known) else { continue }; // not an integer (NEG_INF)
            let Some(want) = rust.get(macro_name) else {
                return Err(format!("{name}: #define {macro_name} {value} has no Rust constant in KERNEL_CONSTANTS"));
            };
            if v != *want {
                return Err(format!("{name}: #define {macro_name} = {v}, the Rust side launches with {want}"));
            }
            if let Some(other) = seen.insert(macro_name.to_string(), name) {
                return Err(format!("{macro_name} is defined in both {other} and {name}"));
            }
            known.insert(macro_name.to_string(), v);
        }
    }
    if let Some(name) = rust.keys().find(|n| !seen.contains_key(*n)) {
        return Err(format!("KERNEL_CONSTANTS names {name}, which no kernel file defines"));
    }
    Ok(seen.len())
}

/// Every header, then every file (the files' defines may use the headers').
fn all_texts() -> impl Iterator<Item = (&'static str, &'static str)> {
    HEADERS.iter().map(|h| (h.name, h.text)).chain(FILES.iter().map(|f| (f.name, f.text)))
}

#[test]
fn every_integer_define_equals_its_rust_constant() {
    let n = check_defines(all_texts()).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(n, KERNEL_CONSTANTS.len());
}

#[test]
fn the_parity_check_sees_a_changed_size() {
    let known = HashMap::from([("TILE_THREADS".to_string(), 256i128)]);
    assert_eq!(eval("(TILE_THREADS / 32)", &known), Some(8));
    assert_eq!(eval("0xffffffffu", &known), Some(u32::MAX as i128));
    assert_eq!(eval("(4 * (128 + 256) * 64 * 2 + 1024)", &known), Some(197_632));
    assert_eq!(eval("__int_as_float(0xff800000)", &known), None);
    // Planted: a size changed in a file, a new unmirrored size, a derived size changed.
    for (file, from, to) in [
        ("common.cuh", "#define TILE_TOKENS 32", "#define TILE_TOKENS 16"),
        ("combine.cu", "#define COMBINE_MAX_SLOTS 64", "#define COMBINE_MAX_SLOTS 64\n#define COMBINE_UNROLL 2"),
        ("expert_gemm_wgmma.cu", "#define WG_STAGES 4", "#define WG_STAGES 5"),
    ] {
        let to = to.replace("\\n", "\n");
        let texts: Vec<(&str, String)> = all_texts()
            .map(|(n, t)| {
                if n == file {
                    assert!(t.contains(from), "{file}: {from}");
                    (n, t.replace(from, &to))
                } else {
                    (n, t.to_string())
                }
            })
            .collect();
        let err = check_defines(texts.iter().map(|(n, t)| (*n, t.as_str())));
        assert!(err.is_err(), "{file}: {from} -> {to} went unnoticed");
    }
}

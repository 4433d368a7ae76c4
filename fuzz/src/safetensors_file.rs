//! Writing safetensors files by hand, including the broken ones: the header JSON is
//! built as text, so a fuzzer-chosen file can repeat a name, claim any shape, dtype or
//! offsets, and be truncated or padded afterwards.

/// One header entry, exactly as it will be written.
#[derive(Clone, Debug)]
pub struct Entry {
    /// Tensor name.
    pub name: String,
    /// Dtype string (`"F32"`, `"BF16"`, `"F16"`, or anything else).
    pub dtype: String,
    /// Shape as claimed.
    pub shape: Vec<u64>,
    /// Byte range in the data section, as claimed.
    pub offsets: (u64, u64),
}

/// JSON string literal of `s`.
pub fn json_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// The header JSON for `entries`, with optional `__metadata__`.
pub fn header_json(entries: &[Entry], metadata: bool) -> String {
    let mut parts = Vec::with_capacity(entries.len() + 1);
    if metadata {
        parts.push(r#""__metadata__":{"format":"pt"}"#.to_string());
    }
    for e in entries {
        let shape: Vec<String> = e.shape.iter().map(u64::to_string).collect();
        parts.push(format!(
            r#"{}:{{"dtype":{},"shape":[{}],"data_offsets":[{},{}]}}"#,
            json_string(&e.name),
            json_string(&e.dtype),
            shape.join(","),
            e.offsets.0,
            e.offsets.1
        ));
    }
    format!("{{{}}}", parts.join(","))
}

/// A file: the 8-byte little-endian header length, the header padded with spaces to a
/// multiple of 8 (as the reference writer does), then `data`.
pub fn file_bytes(header: &str, data: &[u8]) -> Vec<u8> {
    let mut header = header.as_bytes().to_vec();
    while header.len() % 8 != 0 {
        header.push(b' ');
    }
    let mut out = Vec::with_capacity(8 + header.len() + data.len());
    out.extend_from_slice(&(header.len() as u64).to_le_bytes());
    out.extend_from_slice(&header);
    out.extend_from_slice(data);
    out
}

/// Bytes per element of the dtypes the fuzzer writes (`None`: unknown to the writer).
pub fn dtype_size(dtype: &str) -> Option<usize> {
    Some(match dtype {
        "F64" | "I64" | "U64" => 8,
        "F32" | "I32" | "U32" => 4,
        "F16" | "BF16" | "I16" | "U16" => 2,
        "I8" | "U8" | "BOOL" | "F8_E4M3" | "F8_E5M2" => 1,
        _ => return None,
    })
}

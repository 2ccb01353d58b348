//! Our structural check of `.safetensors` files, run before MLX reads one.
//!
//! MLX's safetensors loader trusts the header: it allocates whatever header length the file
//! claims, takes each tensor's shape and start offset as given and reads `shape x dtype` bytes
//! from there, ignoring the end offset. So the header is parsed here first (length within the
//! file, a JSON object without duplicate names, known dtypes, non-negative 32-bit dimensions,
//! `data_offsets` that lie inside the data section and match the shape) and anything else is
//! rejected with a typed error.
use std::collections::HashSet;
use std::fmt;
use std::fs::File;
use std::io::Read;
use std::path::Path;

use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde_json::Value;

use crate::error::{Error, Result};

/// Largest header accepted (the reference implementation's limit).
const MAX_HEADER: u64 = 100 << 20;

/// Checks the file at `path` (see the module docs).
pub(crate) fn validate(path: &Path) -> Result<()> {
    let mut f = File::open(path).map_err(|e| Error::ModelNotFound {
        path: path.to_owned(),
        reason: e.to_string(),
    })?;
    let size = f.metadata().map(|m| m.len()).unwrap_or(0);
    let bad = |reason: String| corrupt(path, reason);
    let mut len = [0u8; 8];
    f.read_exact(&mut len)
        .map_err(|e| bad(format!("while reading the header length: {e}")))?;
    let n = header_len(u64::from_le_bytes(len), size, path)?;
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header)
        .map_err(|e| bad(format!("while reading the header: {e}")))?;
    check_header(&header, size - 8 - n, path)
}

/// [`validate`] on the bytes of a whole file (`path` only names it in errors).
pub(crate) fn validate_bytes(data: &[u8], path: &Path) -> Result<()> {
    let Some((len, rest)) = data.split_first_chunk::<8>() else {
        return Err(corrupt(
            path,
            "shorter than the 8-byte header length".into(),
        ));
    };
    let n = header_len(u64::from_le_bytes(*len), data.len() as u64, path)? as usize;
    check_header(&rest[..n], (rest.len() - n) as u64, path)
}

fn corrupt(path: &Path, reason: String) -> Error {
    Error::CorruptModel {
        path: path.to_owned(),
        reason,
    }
}

/// Checks the declared header length against the file size.
fn header_len(n: u64, size: u64, path: &Path) -> Result<u64> {
    if n == 0 || n > MAX_HEADER || n > size.saturating_sub(8) {
        return Err(corrupt(
            path,
            format!("header length {n} does not fit a file of {size} bytes (truncated?)"),
        ));
    }
    Ok(n)
}

/// Bytes per element of the safetensors dtypes.
fn dtype_size(dtype: &str) -> Option<u64> {
    Some(match dtype {
        "BOOL" | "U8" | "I8" | "F8_E4M3" | "F8_E5M2" => 1,
        "U16" | "I16" | "F16" | "BF16" => 2,
        "U32" | "I32" | "F32" => 4,
        "U64" | "I64" | "F64" | "C64" => 8,
        _ => return None,
    })
}

/// A JSON object read as a list of entries, refusing duplicate keys (readers disagree on which
/// of two duplicates counts, so a checked entry could hide the one MLX uses).
struct Entries(Vec<(String, Value)>);

impl<'de> serde::Deserialize<'de> for Entries {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Entries;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(
                self,
                mut map: A,
            ) -> std::result::Result<Entries, A::Error> {
                let mut seen = HashSet::new();
                let mut entries = Vec::new();
                while let Some((k, v)) = map.next_entry::<String, Value>()? {
                    if !seen.insert(k.clone()) {
                        return Err(de::Error::custom(format!("duplicate entry {k:?}")));
                    }
                    entries.push((k, v));
                }
                Ok(Entries(entries))
            }
        }
        d.deserialize_map(V)
    }
}

/// Checks a header (the JSON text) for a data section of `data_len` bytes.
fn check_header(header: &[u8], data_len: u64, path: &Path) -> Result<()> {
    let bad = |reason: String| corrupt(path, reason);
    let Entries(entries) =
        serde_json::from_slice(header).map_err(|e| bad(format!("header: {e}")))?;
    for (name, entry) in entries {
        if name == "__metadata__" {
            // A map (of strings, by the format; MLX writes null when it has none).
            if !(entry.is_object() || entry.is_null()) {
                return Err(bad("__metadata__ is not a map".into()));
            }
            continue;
        }
        let field = |key: &str| {
            entry
                .get(key)
                .ok_or_else(|| bad(format!("tensor {name:?} has no {key}")))
        };
        let dtype = field("dtype")?
            .as_str()
            .ok_or_else(|| bad(format!("tensor {name:?}: dtype is not a string")))?;
        let Some(elem_size) = dtype_size(dtype) else {
            return Err(Error::UnsupportedQuantization(format!(
                "tensor {name:?} in {} has dtype {dtype:?}",
                path.display()
            )));
        };
        let shape = field("shape")?
            .as_array()
            .ok_or_else(|| bad(format!("tensor {name:?}: shape is not a list")))?;
        let mut elems = 1u64;
        for d in shape {
            let d = d
                .as_u64()
                .filter(|&d| d <= i32::MAX as u64)
                .ok_or_else(|| bad(format!("tensor {name:?}: bad dimension {d}")))?;
            elems = elems.saturating_mul(d);
        }
        let offsets = field("data_offsets")?
            .as_array()
            .filter(|o| o.len() == 2)
            .and_then(|o| Some((o[0].as_u64()?, o[1].as_u64()?)))
            .ok_or_else(|| bad(format!("tensor {name:?}: data_offsets is not [begin, end]")))?;
        let (begin, end) = offsets;
        let want = elems.saturating_mul(elem_size);
        if begin > end || end > data_len || end - begin != want {
            return Err(bad(format!(
                "tensor {name:?} ({dtype} {shape:?}: {want} bytes) has data_offsets \
                 [{begin}, {end}] in a data section of {data_len} bytes"
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(header: &str, data: usize) -> Vec<u8> {
        let mut v = (header.len() as u64).to_le_bytes().to_vec();
        v.extend_from_slice(header.as_bytes());
        v.resize(v.len() + data, 0);
        v
    }

    #[test]
    fn accepts_valid_and_rejects_bad_headers() {
        let p = Path::new("t.safetensors");
        let ok = r#"{"__metadata__":{"format":"mlx"},"a":{"dtype":"F32","shape":[2,3],"data_offsets":[0,24]}}"#;
        validate_bytes(&file(ok, 24), p).unwrap();
        let bad = [
            (ok, 23),
            (
                r#"{"a":{"dtype":"F32","shape":[2,3],"data_offsets":[0,20]}}"#,
                24,
            ),
            (
                r#"{"a":{"dtype":"F32","shape":[-2,3],"data_offsets":[0,24]}}"#,
                24,
            ),
            (
                r#"{"a":{"dtype":"F32","shape":[2,3],"data_offsets":[8,0]}}"#,
                24,
            ),
            (
                r#"{"a":{"dtype":"F32","shape":[],"data_offsets":[0,4]},"a":{"dtype":"F32","shape":[],"data_offsets":[0,4]}}"#,
                4,
            ),
            (r#"{"__metadata__":[1]}"#, 0),
            (r#"[]"#, 0),
        ];
        for (h, n) in bad {
            assert!(validate_bytes(&file(h, n), p).is_err(), "{h}");
        }
        let e = validate_bytes(
            &file(r#"{"a":{"dtype":"Q4","shape":[],"data_offsets":[0,1]}}"#, 1),
            p,
        )
        .unwrap_err();
        assert!(matches!(e, Error::UnsupportedQuantization(_)), "{e}");
        let mut huge = u64::MAX.to_le_bytes().to_vec();
        huge.extend_from_slice(b"{}");
        assert!(validate_bytes(&huge, p).is_err());
        assert!(validate_bytes(b"1234", p).is_err());
    }
}

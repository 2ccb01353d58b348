//! GGUF loading through MLX's loader, guarded by our own structural check.
//!
//! MLX's GGUF reader trusts the file: a truncated or corrupt file can make it read past the end
//! of its mapping. So the header, metadata and tensor table are walked here first, every
//! tensor's byte range is checked against the file size, and tensor types MLX cannot convert
//! are rejected with a typed error before MLX touches the file.
use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Read, Seek};
use std::path::Path;

use mlx_rs::io::{GgufError, GgufFile};
use mlx_rs::Array;

use super::{Architecture, LoadOptions, LoadedModel, Model, ModelConfig, RopeScaling};
use crate::error::{Error, Result};
use crate::tokenizer::Tokenizer;

/// GGUF quantization blocks become MLX affine groups of 32.
const GGUF_GROUP_SIZE: i32 = 32;

pub(crate) fn load(path: &Path, options: LoadOptions) -> Result<LoadedModel> {
    validate(path)?;
    let file = GgufFile::load(path).map_err(|e| match e {
        GgufError::UnsupportedExtension | GgufError::NotFile => Error::ModelNotFound {
            path: path.to_owned(),
            reason: "expected a .gguf file or an MLX/Hugging Face model folder".into(),
        },
        other => corrupt(path, other.to_string()),
    })?;
    let arch_name = meta_string(&file, "general.architecture")?
        .ok_or_else(|| corrupt(path, "no general.architecture".into()))?;
    let architecture = Architecture::parse(&arch_name)?;
    let num = |key: &str| -> Result<Option<f64>> {
        let key = format!("{arch_name}.{key}");
        match file.get_metadata_array(&key) {
            Ok(Some(a)) => Ok(Some(
                a.try_item_cast::<f64>()
                    .map_err(|e| Error::Mlx(e.to_string()))?,
            )),
            Ok(None) => Ok(None),
            Err(e) => Err(corrupt(path, format!("{key}: {e}"))),
        }
    };
    let need = |key: &str| -> Result<f64> {
        num(key)?.ok_or_else(|| corrupt(path, format!("missing {arch_name}.{key}")))
    };
    let hidden = need("embedding_length")? as usize;
    let heads = need("attention.head_count")? as usize;
    let tokenizer = Tokenizer::from_gguf(&file, path)?;
    let mut tensors = canonical_names(file.arrays().map_err(|e| corrupt(path, e.to_string()))?);
    let tie = !tensors.contains_key("lm_head.weight");
    let rope_scaling = match num("rope.scaling.factor")? {
        Some(f) if f > 1.0 => Some(RopeScaling::Linear { factor: f as f32 }),
        _ => None,
    };
    let config = ModelConfig {
        architecture,
        hidden_size: hidden,
        num_layers: need("block_count")? as usize,
        num_heads: heads,
        num_kv_heads: num("attention.head_count_kv")?.map_or(heads, |v| v as usize),
        head_dim: num("attention.key_length")?.map_or(hidden / heads.max(1), |v| v as usize),
        intermediate_size: need("feed_forward_length")? as usize,
        vocab_size: tokenizer.vocab_size(),
        rms_norm_eps: num("attention.layer_norm_rms_epsilon")?.unwrap_or(1e-5) as f32,
        rope_theta: num("rope.freq_base")?.unwrap_or(10000.0) as f32,
        rope_traditional: true,
        rope_scaling,
        max_position_embeddings: num("context_length")?.unwrap_or(4096.0) as usize,
        tie_word_embeddings: tie,
    };
    if tie {
        tensors.remove("lm_head.weight");
    }
    let model = Model::from_tensors(config, tensors, GGUF_GROUP_SIZE, options.weights)?;
    tokenizer.check_fits(&model.config)?;
    Ok(LoadedModel {
        model,
        tokenizer: std::sync::Arc::new(tokenizer),
    })
}

fn corrupt(path: &Path, reason: String) -> Error {
    Error::CorruptModel {
        path: path.to_owned(),
        reason,
    }
}

pub(crate) fn meta_string(file: &GgufFile, key: &str) -> Result<Option<String>> {
    file.get_metadata_string(key)
        .map_err(|e| Error::CorruptModel {
            path: key.into(),
            reason: e.to_string(),
        })
}

/// GGUF tensor names -> the canonical names `Model::from_tensors` expects.
fn canonical_names(arrays: HashMap<String, Array>) -> HashMap<String, Array> {
    arrays
        .into_iter()
        .map(|(name, a)| {
            let renamed = if let Some(rest) = name.strip_prefix("blk.") {
                let (layer, rest) = rest.split_once('.').unwrap_or((rest, ""));
                let (part, suffix) = rest.split_once('.').unwrap_or((rest, "weight"));
                let part = match part {
                    "attn_q" => "q",
                    "attn_k" => "k",
                    "attn_v" => "v",
                    "attn_output" => "o",
                    "ffn_gate" => "gate",
                    "ffn_up" => "up",
                    "ffn_down" => "down",
                    other => other, // attn_norm, ffn_norm keep their names
                };
                format!("l{layer}.{part}.{suffix}")
            } else if let Some(s) = name.strip_prefix("token_embd.") {
                format!("embed.{s}")
            } else if let Some(s) = name.strip_prefix("output_norm.") {
                format!("norm.{s}")
            } else if let Some(s) = name.strip_prefix("output.") {
                format!("lm_head.{s}")
            } else {
                name
            };
            (renamed, a)
        })
        .collect()
}

/// Bytes per block and elements per block of the GGUF tensor types MLX can load.
fn type_layout(ty: u32) -> Option<(u64, u64)> {
    Some(match ty {
        0 => (4, 1),   // F32
        1 => (2, 1),   // F16
        2 => (18, 32), // Q4_0
        3 => (20, 32), // Q4_1
        8 => (34, 32), // Q8_0
        30 => (2, 1),  // BF16
        _ => return None,
    })
}

fn type_name(ty: u32) -> String {
    let names = [
        "F32", "F16", "Q4_0", "Q4_1", "Q4_2", "Q4_3", "Q5_0", "Q5_1", "Q8_0", "Q8_1", "Q2_K",
        "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_K",
    ];
    names
        .get(ty as usize)
        .map_or(format!("type {ty}"), |s| s.to_string())
}

struct Reader<R> {
    r: R,
}

impl<R: Read> Reader<R> {
    fn bytes<const N: usize>(&mut self) -> std::io::Result<[u8; N]> {
        let mut b = [0u8; N];
        self.r.read_exact(&mut b)?;
        Ok(b)
    }
    fn u32(&mut self) -> std::io::Result<u32> {
        Ok(u32::from_le_bytes(self.bytes()?))
    }
    fn u64(&mut self) -> std::io::Result<u64> {
        Ok(u64::from_le_bytes(self.bytes()?))
    }
    fn skip(&mut self, n: u64) -> std::io::Result<()> {
        let copied = std::io::copy(&mut (&mut self.r).take(n), &mut std::io::sink())?;
        if copied == n {
            Ok(())
        } else {
            Err(std::io::ErrorKind::UnexpectedEof.into())
        }
    }
    fn string(&mut self, limit: u64) -> std::io::Result<Vec<u8>> {
        let n = self.u64()?;
        if n > limit {
            return Err(std::io::Error::other(format!("string of {n} bytes")));
        }
        let mut s = vec![0u8; n as usize];
        self.r.read_exact(&mut s)?;
        Ok(s)
    }
    /// Skips one metadata value of type `ty`; returns its u64 value for integer types.
    fn value(&mut self, ty: u32, depth: u32) -> std::io::Result<Option<u64>> {
        let scalar = |ty: u32| -> Option<u64> {
            match ty {
                0 | 1 | 7 => Some(1),
                2 | 3 => Some(2),
                4..=6 => Some(4),
                10..=12 => Some(8),
                _ => None,
            }
        };
        match ty {
            4 => Ok(Some(self.u32()? as u64)),
            10 => Ok(Some(self.u64()?)),
            8 => self.string(1 << 24).map(|_| None),
            9 if depth == 0 => {
                let elem = self.u32()?;
                let n = self.u64()?;
                if n > 1 << 26 {
                    return Err(std::io::Error::other(format!("array of {n} elements")));
                }
                match scalar(elem) {
                    Some(size) => self.skip(n * size)?,
                    None => {
                        for _ in 0..n {
                            self.value(elem, depth + 1)?;
                        }
                    }
                }
                Ok(None)
            }
            t => match scalar(t) {
                Some(size) => self.skip(size).map(|_| None),
                None => Err(std::io::Error::other(format!("bad metadata type {t}"))),
            },
        }
    }
}

/// Walks the GGUF structure and checks every tensor lies inside the file.
pub(crate) fn validate(path: &Path) -> Result<()> {
    let f = File::open(path).map_err(|e| Error::ModelNotFound {
        path: path.to_owned(),
        reason: e.to_string(),
    })?;
    let size = f.metadata().map(|m| m.len()).unwrap_or(0);
    let mut r = Reader {
        r: BufReader::new(f),
    };
    let bad = |reason: String| corrupt(path, reason);
    let io = |e: std::io::Error| corrupt(path, format!("while reading the header: {e}"));

    if &r.bytes::<4>().map_err(io)? != b"GGUF" {
        return Err(bad("not a GGUF file (bad magic)".into()));
    }
    let version = r.u32().map_err(io)?;
    if !(2..=3).contains(&version) {
        return Err(bad(format!("unsupported GGUF version {version}")));
    }
    let n_tensors = r.u64().map_err(io)?;
    let n_kv = r.u64().map_err(io)?;
    if n_tensors > 1 << 20 || n_kv > 1 << 20 {
        return Err(bad(format!(
            "implausible counts: {n_tensors} tensors, {n_kv} keys"
        )));
    }
    let mut alignment = 32u64;
    for _ in 0..n_kv {
        let key = r.string(1 << 16).map_err(io)?;
        let ty = r.u32().map_err(io)?;
        let v = r.value(ty, 0).map_err(io)?;
        if key == b"general.alignment" {
            alignment = v.filter(|a| a.is_power_of_two()).unwrap_or(32);
        }
    }
    let mut tensors = Vec::with_capacity(n_tensors as usize);
    for _ in 0..n_tensors {
        let name = String::from_utf8_lossy(&r.string(1 << 16).map_err(io)?).into_owned();
        let n_dims = r.u32().map_err(io)?;
        if n_dims > 4 {
            return Err(bad(format!("tensor {name} has {n_dims} dimensions")));
        }
        let mut elems = 1u64;
        for _ in 0..n_dims {
            elems = elems.saturating_mul(r.u64().map_err(io)?);
        }
        let ty = r.u32().map_err(io)?;
        let offset = r.u64().map_err(io)?;
        tensors.push((name, elems, ty, offset));
    }
    let pos = r.r.stream_position().map_err(io)?;
    let data_start = pos.div_ceil(alignment) * alignment;
    for (name, elems, ty, offset) in tensors {
        let Some((block_bytes, block_elems)) = type_layout(ty) else {
            return Err(Error::UnsupportedQuantization(format!(
                "tensor {name} is {} in {}; MLX loads F32, F16, BF16, Q4_0, Q4_1 and Q8_0 GGUF tensors",
                type_name(ty),
                path.display()
            )));
        };
        let bytes = elems.div_ceil(block_elems).saturating_mul(block_bytes);
        let end = data_start.saturating_add(offset).saturating_add(bytes);
        if end > size {
            return Err(bad(format!(
                "tensor {name} ends at byte {end} but the file has {size} bytes (truncated?)"
            )));
        }
    }
    Ok(())
}

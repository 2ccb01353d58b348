//! GGUF loading through MLX's loader, guarded by our own structural check.
//!
//! MLX's GGUF reader trusts the file: a truncated or corrupt file can make it read past the end
//! of its mapping. So the header, metadata and tensor table are walked here first, every
//! tensor's byte range is checked against the file size, and tensor types MLX cannot convert
//! are rejected with a typed error before MLX touches the file.
use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Read};
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
    let meta = MlxMetadata { file: &file, path };
    let mut config = model_config(&meta)?;
    let tokenizer = Tokenizer::from_gguf(&meta)?;
    let name = meta
        .string("general.name")
        .ok()
        .flatten()
        .filter(|n| !n.trim().is_empty())
        .unwrap_or_else(|| super::file_name(path));
    let mut tensors = canonical_names(file.arrays().map_err(|e| corrupt(path, e.to_string()))?);
    // Llama 3.1+ rope scaling travels as per-dimension factors (`rope_freqs.weight`), each
    // dividing its frequency: the same as multiplying its period, as longrope does.
    if let Some(f) = tensors.remove("rope_freqs.weight") {
        let f = f.as_type::<f32>()?;
        f.eval()?;
        if config.rope_scaling.is_some() || f.ndim() != 1 {
            return Err(corrupt(
                path,
                format!(
                    "rope_freqs.weight of shape {:?} with {:?}",
                    f.shape(),
                    config.rope_scaling
                ),
            ));
        }
        config.rope_scaling = Some(RopeScaling::LongRope {
            long_factor: f.as_slice::<f32>().to_vec(),
            mscale: 1.0,
        });
    }
    let tie = !tensors.contains_key("lm_head.weight");
    config.vocab_size = tokenizer.vocab_size();
    config.tie_word_embeddings = tie;
    if tie {
        tensors.remove("lm_head.weight");
    }
    let model = Model::from_tensors(config, tensors, GGUF_GROUP_SIZE, options)?;
    tokenizer.check_fits(&model.config)?;
    Ok(LoadedModel {
        model,
        tokenizer: std::sync::Arc::new(tokenizer),
        name,
    })
}

/// The model hyper-parameters a GGUF file's metadata describes. The caller fills in
/// `vocab_size` (from the tokenizer) and `tie_word_embeddings` (from the tensor names).
pub(crate) fn model_config(meta: &impl Metadata) -> Result<ModelConfig> {
    let path = meta.path();
    let arch_name = meta
        .string("general.architecture")?
        .ok_or_else(|| corrupt(path, "no general.architecture".into()))?;
    let architecture = Architecture::parse(&arch_name)?;
    if !matches!(architecture, Architecture::Llama | Architecture::Qwen2) {
        return Err(Error::UnsupportedArchitecture(format!(
            "{arch_name} in a GGUF file (convoy loads it from an MLX or Hugging Face folder)"
        )));
    }
    let num = |key: &str| meta.number(&format!("{arch_name}.{key}"));
    let need = |key: &str| -> Result<f64> {
        num(key)?.ok_or_else(|| corrupt(path, format!("missing {arch_name}.{key}")))
    };
    let hidden = need("embedding_length")? as usize;
    let heads = need("attention.head_count")? as usize;
    // llama.cpp writes `rope.scaling.type` (none, linear, yarn, longrope); only linear
    // scaling is a factor on positions. Anything else must not run as linear.
    match meta
        .string(&format!("{arch_name}.rope.scaling.type"))?
        .as_deref()
    {
        None | Some("none") | Some("linear") => {}
        Some(other) => {
            return Err(Error::UnsupportedArchitecture(format!(
                "{arch_name} GGUF with rope scaling {other:?}"
            )))
        }
    }
    let rope_scaling = match num("rope.scaling.factor")? {
        Some(f) if f > 1.0 => Some(RopeScaling::Linear { factor: f as f32 }),
        _ => None,
    };
    let head_dim = num("attention.key_length")?.map_or(hidden / heads.max(1), |v| v as usize);
    Ok(ModelConfig {
        architecture,
        hidden_size: hidden,
        num_layers: need("block_count")? as usize,
        num_heads: heads,
        num_kv_heads: num("attention.head_count_kv")?.map_or(heads, |v| v as usize),
        head_dim,
        rope_dims: num("rope.dimension_count")?.map_or(head_dim, |v| v as usize),
        layer_windows: Vec::new(),
        query_pre_attn_scalar: None,
        rope_local_theta: None,
        intermediate_size: need("feed_forward_length")? as usize,
        vocab_size: 0,
        rms_norm_eps: num("attention.layer_norm_rms_epsilon")?.unwrap_or(1e-5) as f32,
        rope_theta: num("rope.freq_base")?.unwrap_or(10000.0) as f32,
        // llama.cpp's converter permutes Llama's q/k rows for the interleaved ("normal")
        // rotary layout; Qwen2's stay as they are, rotated in halves ("neox").
        rope_traditional: architecture == Architecture::Llama,
        rope_scaling,
        max_position_embeddings: num("context_length")?.unwrap_or(4096.0) as usize,
        tie_word_embeddings: false,
    })
}

fn corrupt(path: &Path, reason: String) -> Error {
    Error::CorruptModel {
        path: path.to_owned(),
        reason,
    }
}

/// Typed access to a GGUF file's metadata: MLX's view of a loaded file ([`MlxMetadata`]) or
/// what [`validate_bytes`] collected ([`CollectedMetadata`]). Errors name the file.
pub(crate) trait Metadata {
    /// The file the metadata comes from (for error messages).
    fn path(&self) -> &Path;
    /// A string value; `None` when absent.
    fn string(&self, key: &str) -> Result<Option<String>>;
    /// An array of strings; `None` when absent.
    fn strings(&self, key: &str) -> Result<Option<Vec<String>>>;
    /// A single number (any integer or float type, or a bool as 0/1); `None` when absent.
    fn number(&self, key: &str) -> Result<Option<f64>>;
    /// An array of integers; `None` when absent.
    fn integers(&self, key: &str) -> Result<Option<Vec<i64>>>;
    /// An array of numbers; `None` when absent.
    fn floats(&self, key: &str) -> Result<Option<Vec<f64>>>;
}

/// The metadata of a file MLX loaded.
pub(crate) struct MlxMetadata<'a> {
    pub(crate) file: &'a GgufFile,
    pub(crate) path: &'a Path,
}

impl Metadata for MlxMetadata<'_> {
    fn path(&self) -> &Path {
        self.path
    }
    fn string(&self, key: &str) -> Result<Option<String>> {
        self.file
            .get_metadata_string(key)
            .map_err(|e| corrupt(self.path, format!("{key}: {e}")))
    }
    fn strings(&self, key: &str) -> Result<Option<Vec<String>>> {
        self.file
            .get_metadata_strings(key)
            .map_err(|e| corrupt(self.path, format!("{key}: {e}")))
    }
    fn number(&self, key: &str) -> Result<Option<f64>> {
        self.numbers(key)?
            .map(|v| match v.as_slice() {
                [n] => Ok(n.as_f64()),
                more => Err(corrupt(
                    self.path,
                    format!("{key}: {} values where one number belongs", more.len()),
                )),
            })
            .transpose()
    }
    fn integers(&self, key: &str) -> Result<Option<Vec<i64>>> {
        Ok(self
            .numbers(key)?
            .map(|v| v.into_iter().map(HostNumber::as_i64).collect()))
    }
    fn floats(&self, key: &str) -> Result<Option<Vec<f64>>> {
        Ok(self
            .numbers(key)?
            .map(|v| v.into_iter().map(HostNumber::as_f64).collect()))
    }
}

impl MlxMetadata<'_> {
    /// A numeric value or array as stored; `None` when absent.
    fn numbers(&self, key: &str) -> Result<Option<Vec<HostNumber>>> {
        let bad = |e: String| corrupt(self.path, format!("{key}: {e}"));
        match self.file.get_metadata_array(key) {
            Ok(Some(a)) => host_numbers(&a).map(Some).map_err(bad),
            Ok(None) => Ok(None),
            Err(e) => Err(bad(e.to_string())),
        }
    }
}

/// A numeric metadata value, read in the type it was stored in.
#[derive(Debug, Clone, Copy, PartialEq)]
enum HostNumber {
    Int(i64),
    Uint(u64),
    Float(f64),
}

impl HostNumber {
    fn as_f64(self) -> f64 {
        match self {
            Self::Int(v) => v as f64,
            Self::Uint(v) => v as f64,
            Self::Float(v) => v,
        }
    }
    /// As an integer: floats truncate toward zero (saturating at the ends; NaN gives 0),
    /// unsigned values above `i64::MAX` wrap, as MLX's cast did.
    fn as_i64(self) -> i64 {
        match self {
            Self::Int(v) => v,
            Self::Uint(v) => v as i64,
            Self::Float(v) => v as i64,
        }
    }
}

/// A metadata array's values, converted on the host. MLX's casts (`astype`) run on the default
/// device, and its GPU backends have no float64: on CUDA, casting a metadata value to float64
/// failed for every GGUF file. The arrays MLX's reader returns are already in memory, so they
/// are read in their own type instead.
fn host_numbers(a: &Array) -> std::result::Result<Vec<HostNumber>, String> {
    fn read<T: mlx_rs::ArrayElement + Copy>(
        a: &Array,
        f: impl Fn(T) -> HostNumber,
    ) -> std::result::Result<Vec<HostNumber>, String> {
        Ok(a.try_as_slice::<T>()
            .map_err(|e| e.to_string())?
            .iter()
            .map(|&v| f(v))
            .collect())
    }
    use mlx_rs::Dtype;
    match a.dtype() {
        Dtype::Bool => read(a, |v: bool| HostNumber::Uint(v.into())),
        Dtype::Uint8 => read(a, |v: u8| HostNumber::Uint(v.into())),
        Dtype::Uint16 => read(a, |v: u16| HostNumber::Uint(v.into())),
        Dtype::Uint32 => read(a, |v: u32| HostNumber::Uint(v.into())),
        Dtype::Uint64 => read(a, HostNumber::Uint),
        Dtype::Int8 => read(a, |v: i8| HostNumber::Int(v.into())),
        Dtype::Int16 => read(a, |v: i16| HostNumber::Int(v.into())),
        Dtype::Int32 => read(a, |v: i32| HostNumber::Int(v.into())),
        Dtype::Int64 => read(a, HostNumber::Int),
        Dtype::Float32 => read(a, |v: f32| HostNumber::Float(v.into())),
        Dtype::Float64 => read(a, HostNumber::Float),
        other => Err(format!("a metadata value of type {other:?}, not a number")),
    }
}

/// One metadata value as [`validate_bytes`] collects it, in the shapes MLX exposes.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum MetaValue {
    Number(f64),
    String(String),
    Strings(Vec<String>),
    Numbers(Vec<f64>),
}

/// Metadata and tensor names collected while walking a GGUF file.
#[derive(Debug, Default)]
pub(crate) struct CollectedMetadata {
    pub(crate) path: std::path::PathBuf,
    pub(crate) values: HashMap<String, MetaValue>,
    pub(crate) tensor_names: Vec<String>,
}

impl CollectedMetadata {
    fn get(&self, key: &str) -> Option<&MetaValue> {
        self.values.get(key)
    }
    fn wrong(&self, key: &str, want: &str) -> Error {
        corrupt(&self.path, format!("{key}: not {want}"))
    }
}

impl Metadata for CollectedMetadata {
    fn path(&self) -> &Path {
        &self.path
    }
    fn string(&self, key: &str) -> Result<Option<String>> {
        match self.get(key) {
            None => Ok(None),
            Some(MetaValue::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(self.wrong(key, "a string")),
        }
    }
    fn strings(&self, key: &str) -> Result<Option<Vec<String>>> {
        match self.get(key) {
            None => Ok(None),
            Some(MetaValue::Strings(s)) => Ok(Some(s.clone())),
            Some(_) => Err(self.wrong(key, "an array of strings")),
        }
    }
    fn number(&self, key: &str) -> Result<Option<f64>> {
        match self.get(key) {
            None => Ok(None),
            Some(MetaValue::Number(n)) => Ok(Some(*n)),
            Some(MetaValue::Numbers(v)) if v.len() == 1 => Ok(Some(v[0])),
            Some(_) => Err(self.wrong(key, "a number")),
        }
    }
    fn integers(&self, key: &str) -> Result<Option<Vec<i64>>> {
        match self.get(key) {
            None => Ok(None),
            Some(MetaValue::Number(n)) => Ok(Some(vec![*n as i64])),
            Some(MetaValue::Numbers(v)) => Ok(Some(v.iter().map(|&n| n as i64).collect())),
            Some(_) => Err(self.wrong(key, "an array of integers")),
        }
    }
    fn floats(&self, key: &str) -> Result<Option<Vec<f64>>> {
        match self.get(key) {
            None => Ok(None),
            Some(MetaValue::Number(n)) => Ok(Some(vec![*n])),
            Some(MetaValue::Numbers(v)) => Ok(Some(v.clone())),
            Some(_) => Err(self.wrong(key, "an array of numbers")),
        }
    }
}

/// The metadata of a GGUF file, walked from disk without MLX and without reading the tensors
/// (the structural check of [`validate`] runs on the way).
pub(crate) fn read_metadata(path: &Path) -> Result<CollectedMetadata> {
    let f = File::open(path).map_err(|e| Error::ModelNotFound {
        path: path.to_owned(),
        reason: e.to_string(),
    })?;
    let size = f.metadata().map(|m| m.len()).unwrap_or(0);
    let mut meta = CollectedMetadata {
        path: path.to_owned(),
        ..Default::default()
    };
    validate_reader(BufReader::new(f), size, path, Some(&mut meta))?;
    Ok(meta)
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

/// Reads GGUF's little-endian fields and counts how far it got.
struct Reader<R> {
    r: R,
    /// Bytes consumed so far.
    pos: u64,
    /// The file size: nothing may extend past it.
    size: u64,
}

fn eof(what: &str) -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::UnexpectedEof,
        format!("{what} runs past the end of the file"),
    )
}

/// Byte size of a scalar metadata type; `None` for strings, arrays and unknown types.
fn scalar_size(ty: u32) -> Option<u64> {
    match ty {
        0 | 1 | 7 => Some(1),
        2 | 3 => Some(2),
        4..=6 => Some(4),
        10..=12 => Some(8),
        _ => None,
    }
}

/// Decodes a little-endian scalar metadata value of type `ty` (see [`scalar_size`]) to f64.
/// GGUF bools are one byte, 0 or 1.
fn check_bools(b: &[u8]) -> std::io::Result<()> {
    match b.iter().find(|&&x| x > 1) {
        Some(x) => Err(std::io::Error::other(format!(
            "a bool metadata value of {x} (not 0 or 1)"
        ))),
        None => Ok(()),
    }
}

fn scalar_value(ty: u32, b: &[u8]) -> f64 {
    let mut x = [0u8; 8];
    x[..b.len()].copy_from_slice(b);
    match ty {
        0 => b[0] as f64,
        1 => b[0] as i8 as f64,
        2 => u16::from_le_bytes([b[0], b[1]]) as f64,
        3 => i16::from_le_bytes([b[0], b[1]]) as f64,
        4 => u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f64,
        5 => i32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f64,
        6 => f32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f64,
        7 => (b[0] != 0) as u8 as f64,
        10 => u64::from_le_bytes(x) as f64,
        11 => i64::from_le_bytes(x) as f64,
        _ => f64::from_le_bytes(x),
    }
}

impl<R: Read> Reader<R> {
    fn left(&self) -> u64 {
        self.size.saturating_sub(self.pos)
    }
    fn bytes<const N: usize>(&mut self) -> std::io::Result<[u8; N]> {
        let mut b = [0u8; N];
        self.r.read_exact(&mut b)?;
        self.pos += N as u64;
        Ok(b)
    }
    fn u32(&mut self) -> std::io::Result<u32> {
        Ok(u32::from_le_bytes(self.bytes()?))
    }
    fn u64(&mut self) -> std::io::Result<u64> {
        Ok(u64::from_le_bytes(self.bytes()?))
    }
    fn skip(&mut self, n: u64) -> std::io::Result<()> {
        if n > self.left() {
            return Err(eof("a value"));
        }
        let copied = std::io::copy(&mut (&mut self.r).take(n), &mut std::io::sink())?;
        self.pos += copied;
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
        if n > self.left() {
            return Err(eof(&format!("a string of {n} bytes")));
        }
        let mut s = vec![0u8; n as usize];
        self.r.read_exact(&mut s)?;
        self.pos += n;
        Ok(s)
    }
    /// Reads (`keep`) or skips one metadata value of type `ty`. Returns its u64 value for the
    /// u32 and u64 types, and the value when `keep` is set.
    fn value(
        &mut self,
        ty: u32,
        depth: u32,
        keep: bool,
    ) -> std::io::Result<(Option<u64>, Option<MetaValue>)> {
        match ty {
            // MLX 0.32's GGUF reader crashes (SIGSEGV) on float64 values and arrays.
            12 => Err(std::io::Error::other(
                "a float64 metadata value, which MLX's GGUF reader cannot read",
            )),

            8 => {
                let s = self.string(1 << 24)?;
                Ok((
                    None,
                    keep.then(|| MetaValue::String(String::from_utf8_lossy(&s).into_owned())),
                ))
            }
            9 if depth == 0 => {
                let elem = self.u32()?;
                if elem == 12 {
                    return Err(std::io::Error::other(
                        "an array of float64 metadata values, which MLX's GGUF reader cannot read",
                    ));
                }
                let n = self.u64()?;
                if n > 1 << 26 {
                    return Err(std::io::Error::other(format!("array of {n} elements")));
                }
                // Every element takes at least one byte (a string at least eight).
                let min_size = scalar_size(elem).unwrap_or(if elem == 8 { 8 } else { 1 });
                if n * min_size > self.left() {
                    return Err(eof(&format!("an array of {n} elements")));
                }
                match (scalar_size(elem), keep) {
                    // MLX's reader copies bool bytes as they are: anything but 0 or 1 would be
                    // an invalid `bool` once read back.
                    (Some(_), false) if elem == 7 => {
                        let mut buf = [0u8; 4096];
                        let mut left = n;
                        while left > 0 {
                            let b = &mut buf[..left.min(4096) as usize];
                            self.r.read_exact(b)?;
                            self.pos += b.len() as u64;
                            left -= b.len() as u64;
                            check_bools(b)?;
                        }
                    }
                    (Some(size), false) => self.skip(n * size)?,
                    (Some(size), true) => {
                        let mut v = Vec::with_capacity(n as usize);
                        let mut b = [0u8; 8];
                        for _ in 0..n {
                            let b = &mut b[..size as usize];
                            self.r.read_exact(b)?;
                            self.pos += size;
                            if elem == 7 {
                                check_bools(b)?;
                            }
                            v.push(scalar_value(elem, b));
                        }
                        return Ok((None, Some(MetaValue::Numbers(v))));
                    }
                    (None, _) => {
                        let mut strings = Vec::new();
                        for _ in 0..n {
                            if let (_, Some(MetaValue::String(s))) =
                                self.value(elem, depth + 1, keep)?
                            {
                                strings.push(s);
                            }
                        }
                        if keep && elem == 8 {
                            return Ok((None, Some(MetaValue::Strings(strings))));
                        }
                    }
                }
                Ok((None, None))
            }
            t => match scalar_size(t) {
                Some(size) => {
                    let mut b = [0u8; 8];
                    let b = &mut b[..size as usize];
                    if size > self.left() {
                        return Err(eof("a value"));
                    }
                    self.r.read_exact(b)?;
                    self.pos += size;
                    if t == 7 {
                        check_bools(b)?;
                    }
                    let int = match t {
                        4 => Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as u64),
                        10 => Some(u64::from_le_bytes(b[..8].try_into().unwrap_or([0; 8]))),
                        _ => None,
                    };
                    Ok((int, keep.then(|| MetaValue::Number(scalar_value(t, b)))))
                }
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
    validate_reader(BufReader::new(f), size, path, None)
}

/// [`validate`] on the bytes of a whole GGUF file (`path` only names it in errors). With
/// `collect`, also gathers every metadata value and tensor name, as MLX would expose them.
pub(crate) fn validate_bytes(
    data: &[u8],
    path: &Path,
    collect: Option<&mut CollectedMetadata>,
) -> Result<()> {
    validate_reader(data, data.len() as u64, path, collect)
}

/// The structural check over any reader of a file of `size` bytes.
fn validate_reader(
    r: impl Read,
    size: u64,
    path: &Path,
    mut collect: Option<&mut CollectedMetadata>,
) -> Result<()> {
    let mut r = Reader { r, pos: 0, size };
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
        let (v, value) = r.value(ty, 0, collect.is_some()).map_err(io)?;
        // As MLX's reader does: only a u32 value counts (any other type leaves 32), and it
        // is used as is, power of two or not. Zero would divide by zero there (SIGFPE).
        if key == b"general.alignment" && ty == 4 {
            alignment = v.unwrap_or(32);
            if alignment == 0 {
                return Err(bad("general.alignment is 0".into()));
            }
        }
        if let (Some(c), Some(value)) = (collect.as_deref_mut(), value) {
            c.values
                .insert(String::from_utf8_lossy(&key).into_owned(), value);
        }
    }
    // Each tensor entry takes at least 24 bytes (name length, dimensions, type, offset).
    let mut tensors = Vec::with_capacity(n_tensors.min(r.left() / 24) as usize);
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
    let data_start = r.pos.div_ceil(alignment) * alignment;
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
        if let Some(c) = collect.as_deref_mut() {
            c.tensor_names.push(name);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_numbers_are_read_in_their_stored_type() {
        fn read<T>(a: Array, f: fn(HostNumber) -> T) -> Vec<T> {
            host_numbers(&a).unwrap().into_iter().map(f).collect()
        }
        let ints = |a| read(a, HostNumber::as_i64);
        let floats = |a| read(a, HostNumber::as_f64);
        assert_eq!(
            ints(Array::from_slice(&[1u32, 7, 49152], &[3])),
            [1, 7, 49152]
        );
        assert_eq!(ints(Array::from_slice(&[-3i32, 4], &[2])), [-3, 4]);
        assert_eq!(ints(Array::from_slice(&[u64::MAX >> 1], &[1])), [i64::MAX]);
        assert_eq!(ints(Array::from_slice(&[u64::MAX], &[1])), [-1]);
        assert_eq!(ints(Array::from_slice(&[255u8, 0], &[2])), [255, 0]);
        assert_eq!(ints(Array::from_slice(&[-128i8, 127], &[2])), [-128, 127]);
        assert_eq!(ints(Array::from_slice(&[-32768i16, 7], &[2])), [-32768, 7]);
        assert_eq!(ints(Array::from_slice(&[true, false], &[2])), [1, 0]);
        assert_eq!(ints(Array::from_slice(&[2.9f32, -2.9], &[2])), [2, -2]);
        assert_eq!(
            floats(Array::from_slice(&[1e-5f32], &[1])),
            [1e-5f32 as f64]
        );
        assert_eq!(floats(Array::from_slice(&[100000i64], &[1])), [100000.0]);
        // A scalar (MLX's reader returns single values as 0-d arrays).
        assert_eq!(floats(Array::from_f32(0.5)), [0.5]);
    }

    /// A GGUF header with one metadata key holding `value` (type id `ty`) and no tensors.
    fn header(ty: u32, value: &[u8]) -> Vec<u8> {
        let mut h = b"GGUF".to_vec();
        h.extend(3u32.to_le_bytes());
        h.extend(0u64.to_le_bytes());
        h.extend(1u64.to_le_bytes());
        h.extend(3u64.to_le_bytes());
        h.extend(b"key");
        h.extend(ty.to_le_bytes());
        h.extend(value);
        h
    }

    #[test]
    fn bools_other_than_0_and_1_are_rejected() {
        let path = Path::new("t.gguf");
        let array = |bytes: &[u8]| {
            let mut v = 7u32.to_le_bytes().to_vec();
            v.extend((bytes.len() as u64).to_le_bytes());
            v.extend(bytes);
            header(9, &v)
        };
        assert!(validate_bytes(&header(7, &[1]), path, None).is_ok());
        assert!(validate_bytes(&array(&[0, 1, 1]), path, None).is_ok());
        let mut meta = CollectedMetadata::default();
        assert!(validate_bytes(&array(&[0, 1, 1]), path, Some(&mut meta)).is_ok());
        for bad in [header(7, &[2]), array(&[0, 1, 255])] {
            let e = validate_bytes(&bad, path, None).unwrap_err().to_string();
            assert!(e.contains("bool"), "{e}");
            let mut meta = CollectedMetadata::default();
            assert!(validate_bytes(&bad, path, Some(&mut meta)).is_err());
        }
    }
}

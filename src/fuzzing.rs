//! Byte-level entry points to every parser of untrusted bytes, for the coverage-guided fuzz
//! harnesses in `fuzz/` (and their regression tests). Not a stable API.
//!
//! Each function takes arbitrary bytes, returns a `Result` and must never panic: a panic (or an
//! abort, or a failed invariant check here) is a bug in the code it reaches. Several inputs
//! are split into parts at NUL bytes (see [`parts`]), which JSON and template text do not use.
#![doc(hidden)]
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::model::gguf::{self, CollectedMetadata};
use crate::model::{self, hf, safetensors, LoadOptions, ModelConfig};
use crate::tokenizer::{ChatMessage, ChatTemplate, Tokenizer};

/// Instructions a fuzzed template may execute per rendering. Lower than the engine's
/// [`crate::tokenizer::TEMPLATE_FUEL`] only so that looping templates stay fast to fuzz; the
/// rendering code is the same.
pub const FUZZ_TEMPLATE_FUEL: u64 = 100_000;

/// Splits `data` at NUL bytes into at most `n` parts (the last one keeps any further NULs).
pub fn parts(data: &[u8], n: usize) -> Vec<&[u8]> {
    data.splitn(n, |&b| b == 0).collect()
}

/// A file in a folder of its own in the temporary folder, for the loaders that read paths;
/// the folder is removed when this is dropped (a fuzzer runs millions of inputs).
struct ScratchFile {
    dir: PathBuf,
    path: PathBuf,
}

impl ScratchFile {
    fn new(name: &str, data: &[u8]) -> Result<Self> {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("convoy-fuzz-{}-{n}", std::process::id()));
        let io = |source| Error::Io {
            path: dir.clone(),
            source,
        };
        std::fs::create_dir_all(&dir).map_err(io)?;
        let scratch = Self {
            path: dir.join(name),
            dir: dir.clone(),
        };
        std::fs::write(&scratch.path, data).map_err(io)?;
        Ok(scratch)
    }
}

impl Drop for ScratchFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A GGUF file: our structural check (collecting the metadata as MLX would expose it), then
/// the model config (validated) and the tokenizer built from that metadata. No MLX.
pub fn gguf(data: &[u8]) -> Result<()> {
    let path = Path::new("fuzz.gguf");
    let mut meta = CollectedMetadata {
        path: path.to_owned(),
        ..Default::default()
    };
    gguf::validate_bytes(data, path, Some(&mut meta))?;
    let config = gguf::model_config(&meta);
    let tokenizer = Tokenizer::from_gguf(&meta)?;
    let mut config = config?;
    config.vocab_size = tokenizer.vocab_size();
    config.tie_word_embeddings = !meta.tensor_names.iter().any(|n| n == "output.weight");
    config.validate()?;
    check_config_invariants(&config);
    tokenizer.check_fits(&config)?;
    exercise_tokenizer(&tokenizer)
}

/// [`gguf`], then, if our structural check passed, the real loader ([`model::load`]: MLX reads
/// the bytes from a file, then config, tokenizer and weights are built). A crash inside MLX here
/// means our check let a file through that MLX cannot read safely.
pub fn gguf_mlx(data: &[u8]) -> Result<()> {
    gguf::validate_bytes(data, Path::new("fuzz.gguf"), None)?;
    let pure = gguf(data);
    let file = ScratchFile::new("model.gguf", data)?;
    let loaded = model::load(&file.path, LoadOptions::default()).map(drop);
    pure.and(loaded)
}

/// A `.safetensors` file: our header check.
pub fn safetensors(data: &[u8]) -> Result<()> {
    safetensors::validate_bytes(data, Path::new("fuzz.safetensors"))
}

/// [`safetensors`], then, if the check passed, MLX loads the bytes from a file and evaluates
/// every tensor (a crash there means our check let a bad file through).
pub fn safetensors_mlx(data: &[u8]) -> Result<()> {
    safetensors(data)?;
    let file = ScratchFile::new("model.safetensors", data)?;
    let path = &file.path;
    safetensors::validate(path)?;
    let arrays = mlx_rs::Array::load_safetensors(path).map_err(|e| Error::CorruptModel {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    for a in arrays.values() {
        a.eval()?;
    }
    Ok(())
}

/// `model.safetensors.index.json`: the shard list.
pub fn safetensors_index(data: &[u8]) -> Result<()> {
    let files = hf::parse_index(data, Path::new("model.safetensors.index.json"))?;
    for f in &files {
        // What parse_index promises: names that stay inside the model folder.
        let p = Path::new(f);
        assert!(
            p.components()
                .all(|c| matches!(c, std::path::Component::Normal(_))),
            "{f:?} escapes the model folder"
        );
    }
    Ok(())
}

/// `config.json`: the model config (validated), quantization group size and EOS ids.
pub fn config_json(data: &[u8]) -> Result<()> {
    let (config, group_size, _eos) = hf::parse_config_json(data, Path::new("config.json"))?;
    check_config_invariants(&config);
    assert!(
        [32, 64, 128].contains(&group_size),
        "group size {group_size}"
    );
    Ok(())
}

/// A tokenizer from a model folder. Parts (split at NUL): `tokenizer.json`,
/// `tokenizer_config.json`, `chat_template.jinja`, then a text to encode.
pub fn tokenizer_json(data: &[u8]) -> Result<()> {
    let p = parts(data, 4);
    let text = |i: usize| p.get(i).map(|b| String::from_utf8_lossy(b).into_owned());
    let config = text(1);
    let template = text(2);
    let tokenizer = Tokenizer::from_json_parts(
        p[0],
        Path::new("tokenizer.json"),
        config.as_deref(),
        || template,
        &[2],
    )?;
    exercise_tokenizer(&tokenizer)?;
    if let Some(sample) = text(3) {
        let ids = tokenizer.encode(&sample, true)?;
        tokenizer.decode(&ids)?;
    }
    Ok(())
}

/// A chat template rendered with fuzzed messages. The first byte holds flags (bit 0:
/// add_generation_prompt); the rest splits at NULs into the template, then role, content,
/// role, content, ... (invalid UTF-8 is replaced, as the C API would refuse it).
pub fn chat_template(data: &[u8]) -> Result<()> {
    let Some((&flags, rest)) = data.split_first() else {
        return Ok(());
    };
    let mut it = rest.split(|&b| b == 0);
    let source = String::from_utf8_lossy(it.next().unwrap_or_default()).into_owned();
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    let mut messages = Vec::new();
    while let (Some(role), Some(content)) = (it.next(), it.next()) {
        messages.push(ChatMessage::new(text(role), text(content)));
    }
    let template = ChatTemplate::new(source, FUZZ_TEMPLATE_FUEL)?;
    template.render(&messages, flags & 1 != 0, "<|im_start|>", "<|im_end|>")?;
    Ok(())
}

/// Runs what the engine does with a freshly built tokenizer on a few fixed inputs.
fn exercise_tokenizer(tokenizer: &Tokenizer) -> Result<()> {
    let n = tokenizer.vocab_size();
    let ids = tokenizer.encode("Hello <|im_start|>user 123 wörld 🎉\n", true)?;
    tokenizer.decode(&ids)?;
    let edge = [0, 1, n.saturating_sub(1) as u32, n as u32, u32::MAX];
    tokenizer.decode(&edge)?;
    if tokenizer.has_chat_template() {
        // A template may legitimately fail (raise_exception, missing variables).
        let chat = [
            ChatMessage::new("system", "Be brief."),
            ChatMessage::new("user", "Hi"),
        ];
        if let Ok(ids) = tokenizer.encode_chat(&chat) {
            tokenizer.decode(&ids)?;
        }
    }
    Ok(())
}

/// What the decoder relies on from a config that passed [`ModelConfig::validate`]; panics
/// (a fuzzer finding) if validation let through a config the model code would mishandle.
fn check_config_invariants(c: &ModelConfig) {
    let fits_i32 = |what: &str, v: Option<usize>| {
        assert!(
            v.is_some_and(|v| i32::try_from(v).is_ok()),
            "validated config: {what} overflows i32: {c:?}"
        )
    };
    // Shapes built in Model::forward_last, logits and the KV cache.
    fits_i32("heads x head_dim", c.num_heads.checked_mul(c.head_dim));
    fits_i32(
        "kv heads x head_dim",
        c.num_kv_heads.checked_mul(c.head_dim),
    );
    fits_i32("hidden size", Some(c.hidden_size));
    fits_i32("intermediate size", Some(c.intermediate_size));
    fits_i32("vocabulary", Some(c.vocab_size));
    assert!(c.num_layers > 0 && c.num_layers <= 1 << 12, "layers: {c:?}");
    assert!(
        c.head_dim >= 2 && c.head_dim.is_multiple_of(2),
        "head_dim: {c:?}"
    );
    assert!(c.num_heads.is_multiple_of(c.num_kv_heads), "heads: {c:?}");
    assert!(c.max_position_embeddings > 0, "context: {c:?}");
    assert!(c.rms_norm_eps.is_finite() && c.rope_theta.is_finite() && c.rope_theta > 0.0);
    assert!(
        c.rope_dims >= 2 && c.rope_dims.is_multiple_of(2) && c.rope_dims <= c.head_dim,
        "rope dims: {c:?}"
    );
    assert!(
        c.layer_windows.is_empty() || c.layer_windows.len() == c.num_layers,
        "layer windows: {c:?}"
    );
    assert!(!c.layer_windows.contains(&Some(0)), "windows: {c:?}");
    let mut periods = model::llama3_periods(c.rope_scaling.as_ref(), c.rope_theta, c.rope_dims);
    if let Some(model::RopeScaling::LongRope {
        long_factor,
        mscale,
    }) = &c.rope_scaling
    {
        assert!(mscale.is_finite() && *mscale > 0.0, "mscale: {c:?}");
        assert_eq!(long_factor.len(), c.rope_dims / 2, "long factors: {c:?}");
        periods = model::longrope_periods(long_factor, c.rope_theta, c.rope_dims);
    }
    assert!(
        periods.iter().all(|f| f.is_finite() && *f > 0.0),
        "rope periods {periods:?} from {c:?}"
    );
}

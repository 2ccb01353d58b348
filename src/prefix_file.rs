//! The prefix cache on disk: one `.safetensors` file (MLX writes and reads it) holding every
//! entry's keys and values, with its tokens and what it was made for in the metadata.
//!
//! A file is refused (a clear [`Error::InvalidArgument`]) when it was made by another format
//! version, for another KV layout, or for other weights. Weights are compared by their effect:
//! the file carries the model's hidden state for a fixed probe of tokens, and the engine
//! loading it must reproduce that state (within float noise), so a fine-tune or another
//! quantization of the same architecture is refused too.
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use mlx_rs::Array;

use crate::error::{Error, Result};
use crate::kv_cache::{BatchKvCache, KvLayout};
use crate::model::Model;

/// What the metadata's `format` says.
const FORMAT: &str = "convoy-prefix-cache";
/// Bumped whenever the file's meaning changes.
const VERSION: &str = "1";
/// Largest relative difference between the saved and the reproduced probe state.
const PROBE_TOLERANCE: f32 = 1e-3;

/// One entry read from a file: its tokens and its KV per layer (`[1, kv_heads, len,
/// head_dim]`).
pub struct SavedEntry {
    pub tokens: Vec<u32>,
    pub kv: Vec<(Array, Array)>,
}

/// One entry's keys and values, per layer.
pub type LayerKv<'a> = &'a [(Array, Array)];

fn refuse(path: &Path, why: impl std::fmt::Display) -> Error {
    Error::InvalidArgument(format!("prefix cache file {}: {why}", path.display()))
}

/// The model's final hidden state for a fixed 8-token probe (what the KV of any prompt
/// depends on: every layer's weights but the output head).
pub fn probe(model: &Model, layout: KvLayout) -> Result<Vec<f32>> {
    let vocab = model.config.vocab_size as i32;
    let tokens: Vec<i32> = (0..8).map(|i| (1 + i * 7919) % vocab).collect();
    let mut cache = BatchKvCache::with_padding(layout, vec![0]);
    let hidden = model.forward_last(&Array::from_slice(&tokens, &[1, 8]), &mut cache)?;
    let hidden = hidden.as_dtype(mlx_rs::Dtype::Float32)?;
    hidden.eval()?;
    Ok(hidden
        .try_as_slice::<f32>()
        .map_err(|e| Error::Mlx(format!("reading the probe: {e}")))?
        .to_vec())
}

fn layout_string(l: &KvLayout) -> String {
    format!("{},{},{}", l.layers, l.kv_heads, l.head_dim)
}

/// Prefix-cache files are `.safetensors` files (MLX reads and writes only those).
pub fn check_extension(path: &Path) -> Result<()> {
    if path.extension().and_then(|e| e.to_str()) != Some("safetensors") {
        return Err(refuse(path, "the name must end in .safetensors"));
    }
    Ok(())
}

/// Writes `entries` (tokens and per-layer KV) to `path`, replacing it atomically (a
/// temporary file in the same folder, then a rename), so a crash never leaves half a file.
pub fn save(
    path: &Path,
    layout: KvLayout,
    probe: &[f32],
    entries: &[(&[u32], LayerKv<'_>)],
) -> Result<()> {
    check_extension(path)?;
    let mut arrays: Vec<(String, &Array)> = Vec::new();
    for (i, (_, kv)) in entries.iter().enumerate() {
        for (layer, (k, v)) in kv.iter().enumerate() {
            arrays.push((format!("{i}.{layer}.k"), k));
            arrays.push((format!("{i}.{layer}.v"), v));
        }
    }
    let tokens: Vec<&[u32]> = entries.iter().map(|e| e.0).collect();
    let metadata: HashMap<String, String> = [
        ("format", FORMAT.to_owned()),
        ("version", VERSION.to_owned()),
        ("convoy", env!("CARGO_PKG_VERSION").to_owned()),
        ("layout", layout_string(&layout)),
        (
            "probe",
            serde_json::to_string(probe).expect("floats serialize"),
        ),
        (
            "entries",
            serde_json::to_string(&tokens).expect("ids serialize"),
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    // Unique per process and save, so two engines saving to one path never share it.
    static SAVES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = SAVES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp: PathBuf = path.with_file_name(format!(
        ".{name}.{}-{n}.tmp.safetensors",
        std::process::id()
    ));
    let written = Array::save_safetensors(arrays, &metadata, &tmp)
        .map_err(|e| refuse(path, format!("writing it failed: {e}")));
    // On disk before it replaces the old file (a power loss leaves one or the other).
    let synced = written.and_then(|()| {
        std::fs::File::open(&tmp)
            .and_then(|f| f.sync_all())
            .map_err(|e| refuse(path, format!("writing it failed: {e}")))
    });
    let renamed = synced.and_then(|()| {
        std::fs::rename(&tmp, path).map_err(|e| refuse(path, format!("writing it failed: {e}")))
    });
    if renamed.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    renamed
}

/// Reads the entries of a file written by [`save`] for this model. Checks the file's
/// structure before MLX reads it, then its format, version, layout and probe, then every
/// tensor's shape and dtype and every token id.
pub fn load(
    path: &Path,
    layout: KvLayout,
    probe: &[f32],
    vocab_size: usize,
) -> Result<Vec<SavedEntry>> {
    check_extension(path)?;
    crate::model::safetensors::validate(path).map_err(|e| refuse(path, e))?;
    let (mut arrays, meta) = Array::load_safetensors_with_metadata(path)
        .map_err(|e| refuse(path, format!("cannot read it: {e}")))?;
    let field = |k: &str| {
        meta.get(k)
            .ok_or_else(|| refuse(path, format!("not a convoy prefix cache (no {k:?})")))
    };
    if field("format")? != FORMAT {
        return Err(refuse(path, "not a convoy prefix cache"));
    }
    let version = field("version")?;
    if version != VERSION {
        return Err(refuse(
            path,
            format!(
                "made by a convoy that writes format version {version}; this one reads {VERSION}"
            ),
        ));
    }
    let theirs = field("layout")?;
    if *theirs != layout_string(&layout) {
        return Err(refuse(
            path,
            format!(
                "made for another model (KV layout layers,kv_heads,head_dim {theirs}; this \
                 model's is {})",
                layout_string(&layout)
            ),
        ));
    }
    let saved: Vec<f32> = serde_json::from_str(field("probe")?)
        .map_err(|e| refuse(path, format!("bad probe: {e}")))?;
    // Relative to the state's RMS, not its largest element: hidden states have a few outlier
    // dimensions that would hide changes in all the others.
    let rms = (probe.iter().map(|x| x * x).sum::<f32>() / probe.len().max(1) as f32).sqrt();
    let scale = rms.max(1e-6);
    let diff = if saved.len() == probe.len() {
        saved
            .iter()
            .zip(probe)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()))
            / scale
    } else {
        f32::INFINITY
    };
    // NaN (a corrupt probe) is refused too.
    if diff.is_nan() || diff > PROBE_TOLERANCE {
        return Err(refuse(
            path,
            "made for other weights (another model, fine-tune or quantization): this model's \
             hidden state for a fixed probe differs from the one saved with it",
        ));
    }
    let entries: Vec<Vec<u32>> = serde_json::from_str(field("entries")?)
        .map_err(|e| refuse(path, format!("bad entry list: {e}")))?;
    if arrays.len() != entries.len() * layout.layers * 2 {
        return Err(refuse(path, "its tensors do not match its entry list"));
    }
    let mut out = Vec::with_capacity(entries.len());
    for (i, tokens) in entries.into_iter().enumerate() {
        if tokens.is_empty() || tokens.iter().any(|&t| t as usize >= vocab_size) {
            return Err(refuse(
                path,
                format!("entry {i} has an empty or out-of-vocabulary token list"),
            ));
        }
        let want = [
            1,
            layout.kv_heads as i32,
            tokens.len() as i32,
            layout.head_dim as i32,
        ];
        let mut kv = Vec::with_capacity(layout.layers);
        for layer in 0..layout.layers {
            let mut take = |kind: &str| -> Result<Array> {
                let a = arrays
                    .remove(&format!("{i}.{layer}.{kind}"))
                    .ok_or_else(|| refuse(path, format!("entry {i} lacks layer {layer}")))?;
                if a.shape() != want || a.dtype() != mlx_rs::Dtype::Float32 {
                    return Err(refuse(
                        path,
                        format!(
                            "entry {i} layer {layer}: shape {:?} {:?}, want {want:?} float32",
                            a.shape(),
                            a.dtype()
                        ),
                    ));
                }
                Ok(a)
            };
            kv.push((take("k")?, take("v")?));
        }
        out.push(SavedEntry { tokens, kv });
    }
    Ok(out)
}

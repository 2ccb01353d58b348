//! MLX / Hugging Face model folders: `config.json`, `model.safetensors` (or shards listed in
//! `model.safetensors.index.json`), `tokenizer.json`, `tokenizer_config.json`. Covers
//! mlx-community quantized checkpoints (`quantization` in config.json).
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use mlx_rs::Array;
use serde_json::Value;

use super::{Architecture, LoadOptions, LoadedModel, Model, ModelConfig, RopeScaling};
use crate::error::{Error, Result};
use crate::tokenizer::Tokenizer;

pub(crate) fn load(dir: &Path, options: LoadOptions) -> Result<LoadedModel> {
    let config_path = dir.join("config.json");
    let text = std::fs::read(&config_path).map_err(|e| Error::ModelNotFound {
        path: config_path.clone(),
        reason: format!("{e} (a model folder needs config.json)"),
    })?;
    let (config, group_size, eos) = parse_config_json(&text, &config_path)?;
    // `_name_or_path` is a hub id or a local path: keep its last component.
    let name = serde_json::from_slice::<Value>(&text)
        .ok()
        .and_then(|v| v["_name_or_path"].as_str().map(str::to_owned))
        .and_then(|n| n.rsplit('/').find(|c| !c.is_empty()).map(str::to_owned))
        .unwrap_or_else(|| super::file_name(dir));
    let tokenizer = Tokenizer::from_folder(dir, &eos)?;
    tokenizer.check_fits(&config)?;

    let mut tensors = HashMap::new();
    for file in weight_files(dir)? {
        super::safetensors::validate(&file)?;
        let arrays = Array::load_safetensors(&file).map_err(|e| Error::CorruptModel {
            path: file.clone(),
            reason: e.to_string(),
        })?;
        tensors.extend(arrays.into_iter().map(|(k, v)| (canonical(&k), v)));
    }
    if config.tie_word_embeddings {
        tensors.remove("lm_head.weight");
    }
    let model = Model::from_tensors(config, tensors, group_size, options)?;
    Ok(LoadedModel {
        model,
        tokenizer: std::sync::Arc::new(tokenizer),
        name,
    })
}

/// Parses `config.json` (`path` names it in errors): the model config (checked with
/// [`ModelConfig::validate`]), the quantization group size, and the end-of-sequence ids.
pub(crate) fn parse_config_json(text: &[u8], path: &Path) -> Result<(ModelConfig, i32, Vec<u32>)> {
    let cfg: Value = serde_json::from_slice(text).map_err(|e| Error::CorruptModel {
        path: path.to_owned(),
        reason: e.to_string(),
    })?;
    let (config, group_size) = parse_config(&cfg, path)?;
    config.validate()?;
    let eos: Vec<u32> = match &cfg["eos_token_id"] {
        Value::Number(n) => n.as_u64().and_then(token_id).into_iter().collect(),
        Value::Array(a) => a
            .iter()
            .filter_map(|v| v.as_u64().and_then(token_id))
            .collect(),
        _ => Vec::new(),
    };
    Ok((config, group_size, eos))
}

/// A JSON token id as u32 (`None` when it does not fit: no such token).
fn token_id(v: u64) -> Option<u32> {
    u32::try_from(v).ok()
}

fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    let index_path = dir.join("model.safetensors.index.json");
    let index = std::fs::read(&index_path).map_err(|_| Error::ModelNotFound {
        path: dir.to_owned(),
        reason: "no model.safetensors or model.safetensors.index.json".into(),
    })?;
    parse_index(&index, &index_path)?
        .into_iter()
        .map(|f| {
            let p = dir.join(&f);
            if p.is_file() {
                Ok(p)
            } else {
                Err(Error::ModelNotFound {
                    path: p,
                    reason: "shard listed in the index is missing".into(),
                })
            }
        })
        .collect()
}

/// Parses `model.safetensors.index.json` (`path` names it in errors) into the sorted, distinct
/// shard file names of its `weight_map`. Every name must be a relative path inside the model
/// folder (no `..`, no absolute paths): an index must not make convoy read other files.
pub(crate) fn parse_index(text: &[u8], path: &Path) -> Result<Vec<String>> {
    let bad = |reason: String| Error::CorruptModel {
        path: path.to_owned(),
        reason,
    };
    let index: Value = serde_json::from_slice(text).map_err(|e| bad(e.to_string()))?;
    let mut files: Vec<String> = index["weight_map"]
        .as_object()
        .ok_or_else(|| bad("no weight_map".into()))?
        .values()
        .map(|v| {
            v.as_str()
                .map(str::to_owned)
                .ok_or_else(|| bad(format!("weight_map entry {v} is not a file name")))
        })
        .collect::<Result<_>>()?;
    files.sort();
    files.dedup();
    for f in &files {
        let p = Path::new(f);
        let inside = !f.is_empty()
            && !f.contains('\0')
            && p.components()
                .all(|c| matches!(c, std::path::Component::Normal(_)));
        if !inside {
            return Err(bad(format!(
                "shard {f:?} is not a file name inside the model folder"
            )));
        }
    }
    Ok(files)
}

pub(crate) fn parse_config(cfg: &Value, path: &Path) -> Result<(ModelConfig, i32)> {
    let bad = |reason: String| Error::CorruptModel {
        path: path.to_owned(),
        reason,
    };
    let arch_name = cfg["model_type"]
        .as_str()
        .or_else(|| cfg["architectures"][0].as_str())
        .ok_or_else(|| bad("config.json has no model_type".into()))?;
    let architecture = Architecture::parse(arch_name)?;
    let int = |key: &str| cfg[key].as_u64().map(|v| v as usize);
    let need = |key: &str| int(key).ok_or_else(|| bad(format!("config.json lacks {key}")));
    let hidden = need("hidden_size")?;
    let heads = need("num_attention_heads")?;
    let rope_scaling = match &cfg["rope_scaling"] {
        Value::Object(s) => {
            let f = |k: &str, d: f64| s.get(k).and_then(Value::as_f64).unwrap_or(d) as f32;
            let kind = s
                .get("rope_type")
                .or_else(|| s.get("type"))
                .and_then(Value::as_str);
            match kind {
                Some("llama3") => Some(RopeScaling::Llama3 {
                    factor: f("factor", 8.0),
                    low_freq_factor: f("low_freq_factor", 1.0),
                    high_freq_factor: f("high_freq_factor", 4.0),
                    original_max_position_embeddings: f("original_max_position_embeddings", 8192.0),
                }),
                Some("linear") => Some(RopeScaling::Linear {
                    factor: f("factor", 1.0),
                }),
                Some("default") | None => None,
                Some(other) => {
                    return Err(Error::UnsupportedArchitecture(format!(
                        "{arch_name} with rope scaling {other:?}"
                    )))
                }
            }
        }
        _ => None,
    };
    let group_size = match &cfg["quantization"] {
        Value::Object(q) => {
            let mode = q.get("mode").and_then(Value::as_str).unwrap_or("affine");
            if mode != "affine" {
                return Err(Error::UnsupportedQuantization(format!("mode {mode:?}")));
            }
            // What MLX's affine quantization supports; anything else (0, negative, huge)
            // would reach its kernels or overflow the shape arithmetic.
            match q.get("group_size").map(Value::as_i64) {
                None => 64,
                Some(Some(g @ (32 | 64 | 128))) => g as i32,
                Some(g) => {
                    return Err(Error::UnsupportedQuantization(format!(
                        "group size {g:?} (supported: 32, 64, 128)"
                    )))
                }
            }
        }
        _ => 64,
    };
    let config = ModelConfig {
        architecture,
        hidden_size: hidden,
        num_layers: need("num_hidden_layers")?,
        num_heads: heads,
        num_kv_heads: int("num_key_value_heads").unwrap_or(heads),
        head_dim: int("head_dim").unwrap_or(hidden / heads.max(1)),
        intermediate_size: need("intermediate_size")?,
        vocab_size: need("vocab_size")?,
        rms_norm_eps: cfg["rms_norm_eps"].as_f64().unwrap_or(1e-5) as f32,
        rope_theta: cfg["rope_theta"].as_f64().unwrap_or(10000.0) as f32,
        rope_traditional: cfg["rope_traditional"].as_bool().unwrap_or(false),
        rope_scaling,
        max_position_embeddings: int("max_position_embeddings").unwrap_or(4096),
        tie_word_embeddings: cfg["tie_word_embeddings"].as_bool().unwrap_or(false),
    };
    Ok((config, group_size))
}

/// Hugging Face tensor names -> canonical names (see the module docs of `model`).
fn canonical(name: &str) -> String {
    let name = name.strip_prefix("model.").unwrap_or(name);
    if let Some(rest) = name.strip_prefix("layers.") {
        let (layer, rest) = rest.split_once('.').unwrap_or((rest, ""));
        let (part, suffix) = rest.rsplit_once('.').unwrap_or((rest, "weight"));
        let part = match part {
            "self_attn.q_proj" => "q",
            "self_attn.k_proj" => "k",
            "self_attn.v_proj" => "v",
            "self_attn.o_proj" => "o",
            "mlp.gate_proj" => "gate",
            "mlp.up_proj" => "up",
            "mlp.down_proj" => "down",
            "input_layernorm" => "attn_norm",
            "post_attention_layernorm" => "ffn_norm",
            other => other,
        };
        return format!("l{layer}.{part}.{suffix}");
    }
    if let Some(s) = name.strip_prefix("embed_tokens.") {
        return format!("embed.{s}");
    }
    name.to_owned()
}

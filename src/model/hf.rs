//! MLX / Hugging Face model folders: `config.json`, `model.safetensors` (or shards listed in
//! `model.safetensors.index.json`), `tokenizer.json`, `tokenizer_config.json`. Covers
//! mlx-community quantized checkpoints (`quantization` in config.json).
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use mlx_rs::ops::indexing::TryIndexOp;
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
        // An image-text checkpoint's vision tower and projector are not loaded.
        tensors.extend(
            arrays
                .into_iter()
                .filter(|(k, _)| {
                    let k = k.strip_prefix("model.").unwrap_or(k);
                    !k.starts_with("vision_tower.") && !k.starts_with("multi_modal_projector.")
                })
                .map(|(k, v)| (canonical(&k), v)),
        );
    }
    if config.tie_word_embeddings {
        tensors.remove("lm_head.weight");
    }
    split_fused(&mut tensors, &config)?;
    if config.architecture == Architecture::Gemma3 {
        gemma_norms(&mut tensors, config.num_layers);
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
    let (config, group_size) = parse_config(&text_model_config(&cfg), path)?;
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

/// The config of the text model: the config itself, or for Gemma 3's image-text checkpoints
/// (`model_type = gemma3`, 4B and larger) its `text_config` as mlx-lm reads it (vocabulary
/// size and quantization from the outer config; 8 heads and 4 KV heads unless listed).
fn text_model_config(cfg: &Value) -> Value {
    let Some(text) = cfg["text_config"]
        .as_object()
        .filter(|_| cfg["model_type"] == "gemma3")
    else {
        return cfg.clone();
    };
    let mut text = text.clone();
    text.insert("model_type".into(), "gemma3_text".into());
    text.insert(
        "vocab_size".into(),
        cfg.get("vocab_size").cloned().unwrap_or(262208.into()),
    );
    text.entry("num_attention_heads").or_insert(8.into());
    text.entry("num_key_value_heads").or_insert(4.into());
    for key in ["quantization", "tie_word_embeddings"] {
        if let Some(v) = cfg.get(key) {
            text.entry(key).or_insert(v.clone());
        }
    }
    Value::Object(text)
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
                // Phi-3 as mlx-lm runs it (SuScaledRoPE): the long factors at every length,
                // the input scaled by sqrt(1 + ln(max / original) / ln(original)) when
                // extended. Transformers and llama.cpp use the short factors until the
                // sequence passes original_max_position_embeddings.
                Some("longrope" | "su") if architecture == Architecture::Phi3 => {
                    let long_factor = s
                        .get("long_factor")
                        .and_then(Value::as_array)
                        .ok_or_else(|| bad("longrope rope_scaling without long_factor".into()))?
                        .iter()
                        .map(|v| v.as_f64().map(|f| f as f32))
                        .collect::<Option<Vec<f32>>>()
                        .ok_or_else(|| {
                            bad("longrope long_factor is not a list of numbers".into())
                        })?;
                    let original = cfg["original_max_position_embeddings"]
                        .as_f64()
                        .unwrap_or(4096.0);
                    let max = cfg["max_position_embeddings"].as_f64().unwrap_or(131072.0);
                    let factor = max / original;
                    let mscale = if factor <= 1.0 {
                        1.0
                    } else {
                        (1.0 + factor.ln() / original.ln()).sqrt() as f32
                    };
                    Some(RopeScaling::LongRope {
                        long_factor,
                        mscale,
                    })
                }
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
    let num_layers = need("num_hidden_layers")?;
    // Checked here as well as in `validate`: the per-layer lists below are built first.
    if num_layers > super::MAX_LAYERS {
        return Err(Error::BadWeights(format!(
            "layers {num_layers} exceeds {}",
            super::MAX_LAYERS
        )));
    }
    let gemma = architecture == Architecture::Gemma3;
    if gemma {
        // What Gemma-family configs can ask for that this decoder does not do.
        for key in ["final_logit_softcapping", "attn_logit_softcapping"] {
            if !cfg[key].is_null() {
                return Err(Error::UnsupportedArchitecture(format!(
                    "{arch_name} with {key} {}",
                    cfg[key]
                )));
            }
        }
        if cfg["use_bidirectional_attention"].as_bool() == Some(true) {
            return Err(Error::UnsupportedArchitecture(format!(
                "{arch_name} with bidirectional attention (an embedding model)"
            )));
        }
    }
    // Phi-3 derives the head size from the width (mlx-lm ignores a `head_dim` key there).
    let head_dim = match architecture {
        Architecture::Phi3 => hidden / heads.max(1),
        Architecture::Gemma3 => int("head_dim").unwrap_or(256),
        _ => int("head_dim").unwrap_or(hidden / heads.max(1)),
    };
    let float = |key: &str| cfg[key].as_f64().map(|v| v as f32);
    let rope_dims = match cfg["partial_rotary_factor"].as_f64() {
        Some(f) if f > 0.0 && f <= 1.0 => (head_dim as f64 * f) as usize,
        Some(f) => return Err(bad(format!("partial_rotary_factor {f} is not in (0, 1]"))),
        None => head_dim,
    };
    let layer_windows = layer_windows(cfg, architecture, num_layers, arch_name, path)?;
    let config = ModelConfig {
        architecture,
        hidden_size: hidden,
        num_layers,
        num_heads: heads,
        num_kv_heads: int("num_key_value_heads").unwrap_or(heads),
        head_dim,
        intermediate_size: need("intermediate_size")?,
        vocab_size: need("vocab_size")?,
        // Gemma 3's defaults are Transformers' Gemma3TextConfig's (real 4B+ configs leave
        // many keys out).
        rms_norm_eps: float("rms_norm_eps").unwrap_or(if gemma { 1e-6 } else { 1e-5 }),
        rope_theta: float("rope_theta").unwrap_or(if gemma { 1e6 } else { 1e4 }),
        rope_traditional: cfg["rope_traditional"].as_bool().unwrap_or(false),
        rope_scaling,
        rope_dims,
        max_position_embeddings: int("max_position_embeddings").unwrap_or(if gemma {
            131072
        } else {
            4096
        }),
        tie_word_embeddings: cfg["tie_word_embeddings"].as_bool().unwrap_or(gemma),
        layer_windows,
        query_pre_attn_scalar: if gemma {
            Some(float("query_pre_attn_scalar").unwrap_or(256.0))
        } else {
            None
        },
        rope_local_theta: if gemma {
            Some(float("rope_local_base_freq").unwrap_or(10000.0))
        } else {
            None
        },
    };
    Ok((config, group_size))
}

/// Each layer's sliding attention window, from `config.json`, as Hugging Face Transformers
/// applies it:
/// - `layer_types` (`"sliding_attention"` / `"full_attention"` per layer) with
///   `sliding_window`: the listed layers slide;
/// - otherwise Mistral and Phi-3 apply a set `sliding_window` to every layer;
/// - Qwen2/Qwen3 slide only with `use_sliding_window`, which convoy does not support (an
///   error, not a silent full attention); their `sliding_window` alone means nothing.
///
/// mlx-lm differs for Mistral and Phi-3: it ignores their `sliding_window`. The two agree up
/// to that many tokens.
fn layer_windows(
    cfg: &Value,
    architecture: Architecture,
    num_layers: usize,
    arch_name: &str,
    path: &Path,
) -> Result<Vec<Option<usize>>> {
    let bad = |reason: String| Error::CorruptModel {
        path: path.to_owned(),
        reason,
    };
    let window = match &cfg["sliding_window"] {
        Value::Null if architecture == Architecture::Gemma3 => Some(4096),
        Value::Null => None,
        v => Some(
            v.as_u64()
                .filter(|&w| w > 0)
                .ok_or_else(|| bad(format!("sliding_window {v} is not a positive integer")))?
                as usize,
        ),
    };
    if cfg["use_sliding_window"].as_bool() == Some(true) {
        return Err(Error::UnsupportedArchitecture(format!(
            "{arch_name} with use_sliding_window"
        )));
    }
    if let Some(types) = cfg["layer_types"].as_array() {
        if types.len() != num_layers {
            return Err(bad(format!(
                "layer_types lists {} layers, the model has {num_layers}",
                types.len()
            )));
        }
        return types
            .iter()
            .map(|t| match t.as_str() {
                Some("full_attention") => Ok(None),
                Some("sliding_attention") => window
                    .map(Some)
                    .ok_or_else(|| bad("sliding_attention layers without sliding_window".into())),
                _ => Err(Error::UnsupportedArchitecture(format!(
                    "{arch_name} with layer type {t}"
                ))),
            })
            .collect();
    }
    if architecture == Architecture::Gemma3 {
        // Every `sliding_window_pattern`-th layer is global, the others slide.
        let pattern = match &cfg["sliding_window_pattern"] {
            Value::Null => 6,
            v => v.as_u64().filter(|&p| p > 0).ok_or_else(|| {
                bad(format!(
                    "sliding_window_pattern {v} is not a positive integer"
                ))
            })? as usize,
        };
        return Ok((0..num_layers)
            .map(|i| window.filter(|_| (i + 1) % pattern != 0))
            .collect());
    }
    let slides =
        matches!(architecture, Architecture::Phi3) || cfg["model_type"].as_str() == Some("mistral");
    Ok(match window {
        Some(w) if slides => vec![Some(w); num_layers],
        _ => Vec::new(),
    })
}

/// Gemma's four norms per layer under canonical names (`post_attention_layernorm` is the
/// attention output's norm there, not the MLP input's), and every norm weight `w` as the
/// `1 + w` it scales by.
fn gemma_norms(tensors: &mut HashMap<String, Array>, layers: usize) {
    for i in 0..layers {
        for (from, to) in [
            ("ffn_norm", "post_attn_norm"),
            ("pre_feedforward_layernorm", "ffn_norm"),
            ("post_feedforward_layernorm", "post_ffn_norm"),
        ] {
            if let Some(w) = tensors.remove(&format!("l{i}.{from}.weight")) {
                tensors.insert(format!("l{i}.{to}.weight"), w);
            }
        }
    }
    for (name, w) in tensors.iter_mut() {
        if name.ends_with("norm.weight") {
            // In float32, as Transformers computes it (bfloat16 would round 1 + w).
            if let Ok(plus) = w.as_type::<f32>().and_then(|w| w.add(Array::from_f32(1.0))) {
                *w = plus;
            }
        }
    }
}

/// Phi-3 stores q/k/v as one `qkv` matrix and gate/up as one `gate_up` matrix: split them
/// (by output rows, which also splits quantized weights' scales and biases) into the
/// canonical parts. The model fuses them again when it runs fused.
fn split_fused(tensors: &mut HashMap<String, Array>, config: &ModelConfig) -> Result<()> {
    let (q, kv) = (
        (config.num_heads * config.head_dim) as i32,
        (config.num_kv_heads * config.head_dim) as i32,
    );
    let ff = config.intermediate_size as i32;
    for i in 0..config.num_layers {
        for (fused, parts) in [
            ("qkv", vec![("q", q), ("k", kv), ("v", kv)]),
            ("gate_up", vec![("gate", ff), ("up", ff)]),
        ] {
            for suffix in ["weight", "scales", "biases", "bias"] {
                let Some(a) = tensors.remove(&format!("l{i}.{fused}.{suffix}")) else {
                    continue;
                };
                let rows: i32 = parts.iter().map(|p| p.1).sum();
                if a.shape().first() != Some(&rows) {
                    return Err(Error::BadWeights(format!(
                        "layer {i} {fused}_proj.{suffix} has shape {:?}, expected {rows} rows",
                        a.shape()
                    )));
                }
                let mut start = 0;
                for (part, n) in &parts {
                    let piece = a.try_index(start..start + n)?;
                    tensors.insert(format!("l{i}.{part}.{suffix}"), piece);
                    start += n;
                }
            }
        }
    }
    Ok(())
}

/// Hugging Face tensor names -> canonical names (see the module docs of `model`).
fn canonical(name: &str) -> String {
    // Gemma 3 image-text checkpoints: `language_model.model.*` (older Transformers and
    // mlx-lm) or `model.language_model.*` (Transformers 4.52 and later).
    let name = name.strip_prefix("language_model.").unwrap_or(name);
    let name = name.strip_prefix("model.").unwrap_or(name);
    let name = name.strip_prefix("language_model.").unwrap_or(name);
    if let Some(rest) = name.strip_prefix("layers.") {
        let (layer, rest) = rest.split_once('.').unwrap_or((rest, ""));
        let (part, suffix) = rest.rsplit_once('.').unwrap_or((rest, "weight"));
        let part = match part {
            "self_attn.q_proj" => "q",
            "self_attn.k_proj" => "k",
            "self_attn.v_proj" => "v",
            "self_attn.o_proj" => "o",
            "self_attn.qkv_proj" => "qkv",
            "self_attn.q_norm" => "q_norm",
            "self_attn.k_norm" => "k_norm",
            "mlp.gate_up_proj" => "gate_up",
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(extra: Value) -> Result<ModelConfig> {
        let mut cfg = json!({"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 4, "intermediate_size": 128, "vocab_size": 100});
        cfg.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        let (config, _) = parse_config(&cfg, Path::new("config.json"))?;
        config.validate()?;
        Ok(config)
    }

    #[test]
    fn sliding_windows_as_transformers_applies_them() {
        let windows = |extra| parse(extra).unwrap().layer_windows;
        // Mistral and Phi-3: every layer; Llama and Qwen2 ignore a bare sliding_window.
        let mistral = json!({"model_type": "mistral", "sliding_window": 4096});
        assert_eq!(windows(mistral), vec![Some(4096); 2]);
        let phi3 = json!({"model_type": "phi3", "sliding_window": 2047});
        assert_eq!(windows(phi3), vec![Some(2047); 2]);
        assert!(windows(json!({"sliding_window": 8})).is_empty());
        let qwen = json!({"model_type": "qwen2", "sliding_window": 32768,
            "use_sliding_window": false});
        assert!(windows(qwen).is_empty());
        assert!(windows(json!({"model_type": "mistral", "sliding_window": null})).is_empty());
        let types = json!({"sliding_window": 8,
            "layer_types": ["sliding_attention", "full_attention"]});
        assert_eq!(windows(types), vec![Some(8), None]);
        // Refused, never run with full attention instead.
        let e = parse(json!({"model_type": "qwen2", "use_sliding_window": true})).unwrap_err();
        assert!(matches!(e, Error::UnsupportedArchitecture(_)), "{e}");
        for bad in [
            json!({"layer_types": ["full_attention"]}),
            json!({"layer_types": ["sliding_attention", "full_attention"]}),
            json!({"sliding_window": 0, "model_type": "mistral"}),
            json!({"sliding_window": "8", "model_type": "mistral"}),
        ] {
            let e = parse(bad.clone()).unwrap_err();
            assert!(matches!(e, Error::CorruptModel { .. }), "{bad}: {e}");
        }
        let e = parse(
            json!({"sliding_window": 8, "layer_types": ["chunked_attention",
            "full_attention"]}),
        )
        .unwrap_err();
        assert!(matches!(e, Error::UnsupportedArchitecture(_)), "{e}");
    }

    #[test]
    fn gemma3_layers_and_defaults() {
        let c = parse(json!({"model_type": "gemma3_text", "num_hidden_layers": 7,
            "sliding_window": 512, "sliding_window_pattern": 6}))
        .unwrap();
        let global = [false, false, false, false, false, true, false];
        let want: Vec<Option<usize>> = global.iter().map(|&g| (!g).then_some(512)).collect();
        assert_eq!(c.layer_windows, want);
        assert_eq!(c.architecture, Architecture::Gemma3);
        assert_eq!((c.head_dim, c.query_pre_attn_scalar), (256, Some(256.0)));
        assert_eq!((c.rope_theta, c.rope_local_theta), (1e6, Some(1e4)));
        assert_eq!(c.rms_norm_eps, 1e-6);
        assert!(c.tie_word_embeddings);
        // layer_types, when present, decide.
        let c = parse(json!({"model_type": "gemma3_text", "sliding_window": 4,
            "layer_types": ["full_attention", "sliding_attention"]}))
        .unwrap();
        assert_eq!(c.layer_windows, [None, Some(4)]);
        let e =
            parse(json!({"model_type": "gemma3_text", "sliding_window_pattern": 0})).unwrap_err();
        assert!(matches!(e, Error::CorruptModel { .. }), "{e}");
        let e =
            parse(json!({"model_type": "gemma3_text", "query_pre_attn_scalar": -1.0})).unwrap_err();
        assert!(matches!(e, Error::BadWeights(_)), "{e}");
        // Defaults of Transformers' Gemma3TextConfig where a config is silent.
        let c = parse(json!({"model_type": "gemma3_text"})).unwrap();
        assert_eq!(c.max_position_embeddings, 131072);
        assert_eq!(c.layer_windows, [Some(4096), Some(4096)]);
        // What this decoder does not do is refused, not ignored.
        for bad in [
            json!({"model_type": "gemma3_text", "final_logit_softcapping": 30.0}),
            json!({"model_type": "gemma3_text", "attn_logit_softcapping": 50.0}),
            json!({"model_type": "gemma3_text", "use_bidirectional_attention": true}),
        ] {
            let e = parse(bad.clone()).unwrap_err();
            assert!(matches!(e, Error::UnsupportedArchitecture(_)), "{bad}: {e}");
        }
        let c = parse(json!({"model_type": "gemma3_text", "final_logit_softcapping": null}));
        assert!(c.is_ok());
        // The image-text form: the text model from text_config, as mlx-lm reads it.
        let cfg = json!({"model_type": "gemma3", "vocab_size": 100,
            "text_config": {"hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 128,
                            "head_dim": 16, "sliding_window": 8}});
        let c = parse_config(&text_model_config(&cfg), Path::new("config.json"))
            .unwrap()
            .0;
        assert_eq!(c.architecture, Architecture::Gemma3);
        assert_eq!((c.num_heads, c.num_kv_heads, c.vocab_size), (8, 4, 100));
    }

    /// A layer count far beyond any model is refused before anything is sized by it.
    #[test]
    fn huge_layer_counts_are_refused_before_allocating() {
        for model_type in ["gemma3_text", "mistral", "phi3"] {
            let e = parse(
                json!({"model_type": model_type, "num_hidden_layers": 1u64 << 34,
                "sliding_window": 8}),
            )
            .unwrap_err();
            assert!(matches!(e, Error::BadWeights(_)), "{model_type}: {e}");
        }
    }

    #[test]
    fn phi3_partial_rotary_and_longrope() {
        let c = parse(json!({"model_type": "phi3", "partial_rotary_factor": 0.75,
            "max_position_embeddings": 131072, "original_max_position_embeddings": 4096,
            "rope_scaling": {"type": "longrope", "long_factor": [1.0, 2.0, 3.0, 4.0, 5.0, 6.0],
                             "short_factor": [1.0, 1.0, 1.0, 1.0, 1.0, 1.0]}}))
        .unwrap();
        assert_eq!((c.head_dim, c.rope_dims), (16, 12));
        let Some(RopeScaling::LongRope {
            long_factor,
            mscale,
        }) = c.rope_scaling
        else {
            panic!("{:?}", c.rope_scaling)
        };
        assert_eq!(long_factor, [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        let expected = (1.0 + 32f64.ln() / 4096f64.ln()).sqrt() as f32;
        assert!((mscale - expected).abs() < 1e-6, "{mscale} vs {expected}");
        // Not extended: no scale.
        let c = parse(
            json!({"model_type": "phi3", "max_position_embeddings": 4096,
            "original_max_position_embeddings": 4096,
            "rope_scaling": {"type": "su", "long_factor": vec![1.0; 8]}}),
        )
        .unwrap();
        assert!(
            matches!(c.rope_scaling, Some(RopeScaling::LongRope { mscale, .. }) if mscale == 1.0)
        );
        for bad in [
            json!({"model_type": "phi3", "rope_scaling": {"type": "longrope",
                "long_factor": [1.0, 2.0]}}),
            json!({"model_type": "phi3", "rope_scaling": {"type": "longrope",
                "long_factor": vec![-1.0; 8]}}),
            json!({"model_type": "phi3", "partial_rotary_factor": 0.1}),
        ] {
            let e = parse(bad.clone()).unwrap_err();
            assert!(matches!(e, Error::BadWeights(_)), "{bad}: {e}");
        }
        for bad in [
            json!({"model_type": "phi3", "partial_rotary_factor": 1.5}),
            json!({"model_type": "phi3", "rope_scaling": {"type": "longrope"}}),
        ] {
            let e = parse(bad.clone()).unwrap_err();
            assert!(matches!(e, Error::CorruptModel { .. }), "{bad}: {e}");
        }
        // Longrope is Phi-3's; elsewhere it is refused by name.
        let e =
            parse(json!({"rope_scaling": {"type": "longrope", "long_factor": [1.0]}})).unwrap_err();
        assert!(matches!(e, Error::UnsupportedArchitecture(_)), "{e}");
    }
}

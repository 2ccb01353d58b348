//! Model loading (GGUF and MLX/Hugging Face folders), tokenizer, chat template, greedy
//! generation on the real bundled model, and typed errors for bad model files.
mod common;

use std::collections::HashMap;
use std::path::Path;

use common::*;
use convoy::mlx_rs::{io::GgufFile, Array};
use convoy::model::{self, LoadOptions, WeightsPolicy};
use convoy::runner::generate_greedy;
use convoy::tokenizer::IncrementalDecoder;
use convoy::Error;
use serde_json::json;

fn load(path: &Path, weights: WeightsPolicy) -> convoy::Result<convoy::model::LoadedModel> {
    model::load(
        path,
        LoadOptions {
            weights,
            ..Default::default()
        },
    )
}

fn paris_prompt(lm: &convoy::model::LoadedModel) -> Vec<u32> {
    lm.tokenizer.encode_chat(&chat(QUESTIONS[0])).unwrap()
}

#[test]
fn gguf_known_answer_tokens_text_and_template() {
    let lm = load(&model_path(), WeightsPolicy::Auto).unwrap();
    assert_eq!(convoy::backend(), "cpu");
    assert!(
        !lm.model.is_quantized(),
        "the CPU backend dequantizes by default"
    );
    let text = lm
        .tokenizer
        .apply_chat_template(&chat(QUESTIONS[0]), true)
        .unwrap();
    assert_eq!(
        text,
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
         <|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    );
    let ids = paris_prompt(&lm);
    assert_eq!(ids.len(), 37);
    assert_eq!(ids[..6], PARIS_PROMPT_HEAD);
    assert_eq!(ids[33..], PARIS_PROMPT_TAIL);
    let out = generate_greedy(&lm, &ids, 20).unwrap();
    assert_eq!(out, PARIS_ANSWER);
    assert_eq!(
        lm.tokenizer.decode(&out).unwrap(),
        "The capital of France is Paris."
    );
}

#[test]
fn gguf_quantized_weights_path() {
    let lm = load(&model_path(), WeightsPolicy::KeepQuantized).unwrap();
    assert!(lm.model.is_quantized());
    let out = generate_greedy(&lm, &paris_prompt(&lm), 20).unwrap();
    assert_eq!(
        lm.tokenizer.decode(&out).unwrap(),
        "The capital of France is Paris."
    );
}

#[test]
fn tokenizer_round_trip_and_incremental_utf8() {
    let lm = load(&model_path(), WeightsPolicy::KeepQuantized).unwrap();
    let tok: &convoy::tokenizer::Tokenizer = &lm.tokenizer;
    let text = "Héllo wörld 123 — 世界 🎉 naïve café";
    let ids = tok.encode(text, false).unwrap();
    assert_eq!(tok.decode(&ids).unwrap(), text);
    // Digits are split one per token.
    let digits = tok.encode("12345", false).unwrap();
    assert_eq!(digits.len(), 5);
    let mut dec = IncrementalDecoder::new();
    let mut out = String::new();
    let mut held_back = 0;
    for &id in &ids {
        let delta = dec.push(tok, id).unwrap();
        assert!(!delta.contains('\u{FFFD}'), "half a character was emitted");
        held_back += delta.is_empty() as usize;
        out.push_str(&delta);
    }
    out.push_str(&dec.flush(tok).unwrap());
    assert_eq!(out, text);
    assert!(
        held_back > 0,
        "multi-byte characters span tokens in byte-level BPE"
    );
    // Special tokens are matched as whole tokens in text.
    assert_eq!(tok.encode("<|im_start|>", false).unwrap(), vec![1]);
    assert!(tok.eos_ids().contains(&2));
}

/// GGUF tensor name -> Hugging Face name.
fn hf_name(name: &str) -> String {
    let map = |part: &str| match part {
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        other => panic!("unexpected {other}"),
    };
    if let Some(rest) = name.strip_prefix("blk.") {
        let mut it = rest.splitn(3, '.');
        let (layer, part, suffix) = (it.next().unwrap(), it.next().unwrap(), it.next().unwrap());
        format!("model.layers.{layer}.{}.{suffix}", map(part))
    } else if let Some(s) = name.strip_prefix("token_embd.") {
        format!("model.embed_tokens.{s}")
    } else if let Some(s) = name.strip_prefix("output_norm.") {
        format!("model.norm.{s}")
    } else {
        panic!("unexpected {name}")
    }
}

/// Writes an MLX-style folder from the bundled GGUF: quantized (as MLX affine, group 32) or
/// dequantized float32, in one file or two shards, optionally as qwen2 with zero q/k/v biases.
fn write_folder(dir: &Path, quantized: bool, shards: bool, qwen2: bool) {
    let lm = load(&model_path(), WeightsPolicy::KeepQuantized).unwrap();
    let gguf = GgufFile::load(model_path()).unwrap();
    let mut tensors: HashMap<String, Array> = HashMap::new();
    for (name, a) in gguf.arrays().unwrap() {
        tensors.insert(hf_name(&name), a);
    }
    if !quantized {
        let names: Vec<String> = tensors
            .keys()
            .filter(|k| k.ends_with(".scales"))
            .cloned()
            .collect();
        for s in names {
            let base = s.trim_end_matches(".scales").to_owned();
            let w = tensors.remove(&format!("{base}.weight")).unwrap();
            let scales = tensors.remove(&s).unwrap();
            let biases = tensors.remove(&format!("{base}.biases")).unwrap();
            let bits = w.shape()[1] * 32 / (scales.shape()[1] * 32);
            let d = convoy::mlx_rs::ops::dequantize(&w, &scales, &biases, 32, bits).unwrap();
            tensors.insert(format!("{base}.weight"), d.as_type::<f32>().unwrap());
        }
    }
    if qwen2 {
        for l in 0..30 {
            for (p, n) in [("q", 576), ("k", 192), ("v", 192)] {
                tensors.insert(
                    format!("model.layers.{l}.self_attn.{p}_proj.bias"),
                    Array::from_slice(&vec![0f32; n], &[n as i32]),
                );
            }
        }
    }
    let mut config = json!({
        "model_type": if qwen2 { "qwen2" } else { "llama" },
        "hidden_size": 576, "num_hidden_layers": 30, "num_attention_heads": 9,
        "num_key_value_heads": 3, "intermediate_size": 1536, "vocab_size": 49152,
        "rms_norm_eps": 1e-5, "rope_theta": 100000.0, "max_position_embeddings": 8192,
        "tie_word_embeddings": true, "rope_traditional": true, "eos_token_id": 2
    });
    if quantized {
        config["quantization"] = json!({"group_size": 32, "bits": 4});
    }
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    if shards {
        let mut names: Vec<String> = tensors.keys().cloned().collect();
        names.sort();
        let (a, b) = names.split_at(names.len() / 2);
        let mut weight_map = serde_json::Map::new();
        for (file, part) in [
            ("model-00001-of-00002.safetensors", a),
            ("model-00002-of-00002.safetensors", b),
        ] {
            let subset: Vec<(&String, &Array)> = part.iter().map(|n| (n, &tensors[n])).collect();
            Array::save_safetensors(subset, None, dir.join(file)).unwrap();
            for n in part {
                weight_map.insert(n.clone(), json!(file));
            }
        }
        let index = json!({"metadata": {}, "weight_map": weight_map});
        std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
    } else {
        Array::save_safetensors(&tensors, None, dir.join("model.safetensors")).unwrap();
    }
    std::fs::write(dir.join("tokenizer.json"), lm.tokenizer.to_json().unwrap()).unwrap();
    let template = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";
    let tc = json!({"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "add_bos_token": false, "chat_template": template});
    std::fs::write(dir.join("tokenizer_config.json"), tc.to_string()).unwrap();
}

fn answer(dir: &Path, weights: WeightsPolicy) -> String {
    let lm = load(dir, weights).unwrap();
    let out = generate_greedy(&lm, &paris_prompt(&lm), 20).unwrap();
    lm.tokenizer.decode(&out).unwrap()
}

#[test]
fn hf_folder_quantized_single_file() {
    let dir = tempfile::tempdir().unwrap();
    write_folder(dir.path(), true, false, false);
    assert_eq!(
        answer(dir.path(), WeightsPolicy::Auto),
        "The capital of France is Paris."
    );
    assert_eq!(
        answer(dir.path(), WeightsPolicy::KeepQuantized),
        "The capital of France is Paris."
    );
}

#[test]
fn hf_folder_dense_sharded_and_qwen2_biases() {
    let dir = tempfile::tempdir().unwrap();
    write_folder(dir.path(), false, true, false);
    assert_eq!(
        answer(dir.path(), WeightsPolicy::Auto),
        "The capital of France is Paris."
    );
    let dir = tempfile::tempdir().unwrap();
    write_folder(dir.path(), false, false, true);
    assert_eq!(
        answer(dir.path(), WeightsPolicy::Auto),
        "The capital of France is Paris."
    );
}

fn err(path: &Path) -> Error {
    match load(path, WeightsPolicy::Auto) {
        Ok(_) => panic!("{} loaded", path.display()),
        Err(e) => e,
    }
}

#[test]
fn missing_truncated_and_corrupt_gguf() {
    let dir = tempfile::tempdir().unwrap();
    let e = err(&dir.path().join("nope.gguf"));
    assert!(matches!(e, Error::ModelNotFound { .. }), "{e}");
    let bytes = std::fs::read(model_path()).unwrap();
    for cut in [10, 4096, bytes.len() / 2, bytes.len() - 1] {
        let p = dir.path().join(format!("cut{cut}.gguf"));
        std::fs::write(&p, &bytes[..cut]).unwrap();
        let e = err(&p);
        assert!(matches!(e, Error::CorruptModel { .. }), "cut at {cut}: {e}");
        assert!(e.to_string().contains("Re-download"), "{e}");
    }
    let p = dir.path().join("magic.gguf");
    let mut bad = bytes.clone();
    bad[..4].copy_from_slice(b"GGML");
    std::fs::write(&p, &bad).unwrap();
    assert!(matches!(err(&p), Error::CorruptModel { .. }));
    // A GGUF holding a tensor type MLX cannot load (Q4_K).
    let mut q4k = Vec::new();
    q4k.extend_from_slice(b"GGUF");
    q4k.extend_from_slice(&3u32.to_le_bytes());
    q4k.extend_from_slice(&1u64.to_le_bytes());
    q4k.extend_from_slice(&0u64.to_le_bytes());
    q4k.extend_from_slice(&1u64.to_le_bytes());
    q4k.push(b'x');
    q4k.extend_from_slice(&1u32.to_le_bytes());
    q4k.extend_from_slice(&256u64.to_le_bytes());
    q4k.extend_from_slice(&12u32.to_le_bytes());
    q4k.extend_from_slice(&0u64.to_le_bytes());
    q4k.resize(64 + 144, 0);
    let p = dir.path().join("q4k.gguf");
    std::fs::write(&p, &q4k).unwrap();
    let e = err(&p);
    assert!(matches!(e, Error::UnsupportedQuantization(_)), "{e}");
}

#[test]
fn bad_model_folders() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    assert!(
        matches!(err(d), Error::ModelNotFound { .. }),
        "empty folder"
    );
    let base = json!({"model_type": "llama", "hidden_size": 576, "num_hidden_layers": 30,
        "num_attention_heads": 9, "num_key_value_heads": 3, "intermediate_size": 1536, "vocab_size": 49152});
    let lm = load(&model_path(), WeightsPolicy::KeepQuantized).unwrap();
    std::fs::write(d.join("tokenizer.json"), lm.tokenizer.to_json().unwrap()).unwrap();

    let write =
        |cfg: &serde_json::Value| std::fs::write(d.join("config.json"), cfg.to_string()).unwrap();
    std::fs::write(d.join("config.json"), "{ not json").unwrap();
    assert!(matches!(err(d), Error::CorruptModel { .. }));

    let mut cfg = base.clone();
    cfg["model_type"] = json!("gpt_neox");
    write(&cfg);
    let e = err(d);
    assert!(
        matches!(e, Error::UnsupportedArchitecture(ref a) if a == "gpt_neox"),
        "{e}"
    );

    let mut cfg = base.clone();
    cfg["vocab_size"] = json!(1000);
    write(&cfg);
    let e = err(d);
    assert!(matches!(e, Error::TokenizerMismatch(_)), "{e}");

    let mut cfg = base.clone();
    cfg["quantization"] = json!({"group_size": 32, "bits": 4, "mode": "mxfp4"});
    write(&cfg);
    assert!(matches!(err(d), Error::UnsupportedQuantization(_)));

    write(&base);
    assert!(matches!(err(d), Error::ModelNotFound { .. }), "no weights");
    std::fs::write(
        d.join("model.safetensors"),
        b"\x10\x00\x00\x00\x00\x00\x00\x00garbage!",
    )
    .unwrap();
    let e = err(d);
    assert!(matches!(e, Error::CorruptModel { .. }), "{e}");

    // Valid safetensors without the tensors the architecture needs.
    Array::save_safetensors(
        [("model.norm.weight", Array::from_slice(&[1f32; 576], &[576]))],
        None,
        d.join("model.safetensors"),
    )
    .unwrap();
    let e = err(d);
    assert!(matches!(e, Error::BadWeights(_)), "{e}");
}

/// The performance switches change how a step is computed, not what: the logits of a padded
/// batch (a prefill of prompts of different lengths, then decode steps), of one row
/// prefilled in two chunks and of two long padded rows prefilled at once agree for every combination of fused projections and copy-free
/// decode attention, with the decode steps' matmul rows padded (3 rows to 16) or not, and
/// with softmax and SiLU through convoy's compiled `exp` or MLX's.
#[test]
fn tuning_switches_do_not_change_the_logits() {
    use convoy::kv_cache::BatchKvCache;
    let run = |fuse: bool, copy_free: bool, pad: bool, exp: bool, rows: bool| -> Vec<Vec<f32>> {
        let mut lm = model::load(
            model_path(),
            LoadOptions {
                fuse_projections: fuse,
                ..Default::default()
            },
        )
        .unwrap();
        lm.model.set_copy_free_decode_attention(copy_free);
        lm.model.set_pad_matmul_rows(pad);
        lm.model.set_fast_exp(exp);
        lm.model.set_rows_matmul(rows);
        let prompts: Vec<Vec<u32>> = QUESTIONS
            .iter()
            .take(3)
            .enumerate()
            .map(|(i, q)| {
                let ids = lm.tokenizer.encode_chat(&chat(q)).unwrap();
                ids[..ids.len() - 4 * i].to_vec()
            })
            .collect();
        let width = prompts.iter().map(Vec::len).max().unwrap();
        let pads: Vec<usize> = prompts.iter().map(|p| width - p.len()).collect();
        let mut cache =
            BatchKvCache::with_padding(convoy::runner::kv_layout(&lm.model), pads.clone());
        let ids: Vec<i32> = prompts
            .iter()
            .zip(&pads)
            .flat_map(|(p, &pad)| std::iter::repeat_n(0, pad).chain(p.iter().map(|&t| t as i32)))
            .collect();
        let mut input = Array::from_slice(&ids, &[3, width as i32]);
        let mut out = Vec::new();
        for step in 0..4 {
            let h = lm.model.forward_last(&input, &mut cache).unwrap();
            let logits = lm.model.logits(&h).unwrap();
            logits.eval().unwrap();
            out.push(logits.as_slice::<f32>().to_vec());
            let next: Vec<i32> = (0..3).map(|r| 100 + 7 * r + step).collect();
            input = Array::from_slice(&next, &[3, 1]);
        }
        // One unpadded row prefilled in two chunks (causal attention over cached columns).
        let mut cache = BatchKvCache::with_padding(convoy::runner::kv_layout(&lm.model), vec![0]);
        let row: Vec<i32> = prompts[0].iter().map(|&t| t as i32).collect();
        let half = row.len() / 2;
        for chunk in [&row[..half], &row[half..]] {
            let input = Array::from_slice(chunk, &[1, chunk.len() as i32]);
            let h = lm.model.forward_last(&input, &mut cache).unwrap();
            let logits = lm.model.logits(&h).unwrap();
            logits.eval().unwrap();
            out.push(logits.as_slice::<f32>().to_vec());
        }
        // Two long rows (600 and 530 tokens, left-padded) in one forward pass, then 300 more
        // tokens each: attention takes its queries in blocks of 256.
        let long: Vec<i32> = prompts
            .iter()
            .flatten()
            .cycle()
            .take(600)
            .map(|&t| t as i32)
            .collect();
        let mut cache =
            BatchKvCache::with_padding(convoy::runner::kv_layout(&lm.model), vec![0, 70]);
        let ids: Vec<i32> = long
            .iter()
            .copied()
            .chain(std::iter::repeat_n(0, 70).chain(long[..530].iter().copied()))
            .collect();
        let mut forward = |cache: &mut BatchKvCache, ids: &[i32], rows: i32| {
            let input = Array::from_slice(ids, &[rows, ids.len() as i32 / rows]);
            let h = lm.model.forward_last(&input, cache).unwrap();
            let logits = lm.model.logits(&h).unwrap();
            logits.eval().unwrap();
            out.push(logits.as_slice::<f32>().to_vec());
        };
        forward(&mut cache, &ids, 2);
        // Then 300 more tokens per row over those 600 cached columns.
        let more: Vec<i32> = long[..300].iter().chain(&long[300..600]).copied().collect();
        forward(&mut cache, &more, 2);
        // One unpadded row (causal attention without a padding mask): 300 tokens, then 300.
        let mut cache = BatchKvCache::with_padding(convoy::runner::kv_layout(&lm.model), vec![0]);
        forward(&mut cache, &long[..300], 1);
        forward(&mut cache, &long[300..], 1);
        out
    };
    let base = run(true, true, true, true, true);
    for (fuse, copy_free, pad, exp, rows) in [
        (false, true, true, true, true),
        (true, false, true, true, true),
        (false, false, true, true, true),
        (true, true, false, true, true),
        (true, true, true, false, true),
        (true, false, true, false, true),
        (true, true, true, true, false),
        (true, true, false, true, false),
        (false, false, false, false, false),
    ] {
        let other = run(fuse, copy_free, pad, exp, rows);
        for (step, (a, b)) in base.iter().zip(&other).enumerate() {
            let diff = a
                .iter()
                .zip(b)
                .map(|(x, y)| (x - y).abs())
                .fold(0f32, f32::max);
            assert!(
                diff < 1e-3,
                "fuse={fuse} copy_free={copy_free} pad={pad} exp={exp} rows={rows} step {step}: \
                 logits differ by {diff}"
            );
        }
    }
}

//! Every model family against an independent implementation (issue 12): small random-weight
//! models made by mlx-lm's own model classes (scripts/family-fixtures.sh, run here; float32
//! and 4-bit), and mlx-lm's logits at every step of a greedy run of three prompts. convoy
//! loads the same folders and must give the same logits (within [`TOL`]) and exactly the same
//! tokens:
//! - single sequence ([`generate_greedy_with_logits`]);
//! - batched on the engine's runner: one row alone, two more prefilled as one left-padded
//!   group in small chunks while it decodes and joining mid-decode, the first leaving when its
//!   run ends, and its prompt joining again at another width with the 300-token prompt (whose
//!   chunked prefill and join make sliding-window layers drop the columns their window has
//!   passed; the test checks that they did).
//!
//! The llama3 and qwen2 fixtures are also written as GGUF files the way llama.cpp's converter
//! writes them (Llama's q/k rows permuted for the interleaved rotary layout, Llama 3's rope
//! scaling as `rope_freqs.weight`, the tokenizer as GGUF metadata) and must give the same.
//!
//! The sliding-window fixtures (mistral: every layer; llama-swa: sliding and full layers
//! interleaved) use a window of 8 tokens, so prompts, chunks and generations all cross it.
mod common;
#[path = "common/gguf.rs"]
mod gguf;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::model_path;
use convoy::kv_cache::{self, KvLayout};
use convoy::mlx_rs::Array;
use convoy::model::{self, LoadOptions, LoadedModel, WeightsPolicy};
use convoy::runner::{generate_greedy_with_logits, MlxRunner};
use convoy::sampling::Sampler;
use convoy::scheduler::Runner;

/// Largest |logit difference| allowed. The fixtures' logits have a standard deviation of about
/// 8 (see scripts/family_oracle.py); float32 sums in another order differ by ~1e-5 of that
/// (measured here: at most 6e-5).
const TOL: f32 = 3e-4;

/// Makes (once per process; cached on disk) the fixtures and returns their folder and names.
fn fixtures() -> (PathBuf, Vec<String>) {
    static FIXTURES: std::sync::OnceLock<(PathBuf, Vec<String>)> = std::sync::OnceLock::new();
    FIXTURES.get_or_init(make_fixtures).clone()
}

fn make_fixtures() -> (PathBuf, Vec<String>) {
    let lm = model::load(model_path(), LoadOptions::default()).unwrap();
    // A folder of this process's own: test binaries running at once do not share it.
    let tok_dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("families-tokenizer-{}", std::process::id()));
    std::fs::create_dir_all(&tok_dir).unwrap();
    std::fs::write(
        tok_dir.join("tokenizer.json"),
        lm.tokenizer.to_json().unwrap(),
    )
    .unwrap();
    std::fs::write(
        tok_dir.join("tokenizer_config.json"),
        r#"{"add_bos_token": false}"#,
    )
    .unwrap();
    let eos: Vec<String> = lm.tokenizer.eos_ids().iter().map(u32::to_string).collect();
    let out = Command::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/scripts/family-fixtures.sh"
    ))
    .arg("--tokenizer")
    .arg(&tok_dir)
    .args(["--eos", &eos.join(",")])
    .args(["--vocab", &lm.tokenizer.vocab_size().to_string()])
    .output()
    .unwrap();
    eprintln!("{}", String::from_utf8_lossy(&out.stderr));
    let _ = std::fs::remove_dir_all(&tok_dir);
    assert!(out.status.success(), "scripts/family-fixtures.sh failed");
    let dir = PathBuf::from(String::from_utf8(out.stdout).unwrap().trim());
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("families.json")).unwrap()).unwrap();
    let names = index["fixtures"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_owned())
        .collect();
    (dir, names)
}

/// mlx-lm's run of one prompt: the prompt, the greedy tokens, each step's logits.
struct Reference {
    prompt: Vec<u32>,
    tokens: Vec<u32>,
    logits: Vec<Vec<f32>>,
}

fn references(dir: &Path) -> Vec<Reference> {
    let arrays: HashMap<String, Array> =
        Array::load_safetensors(dir.join("reference.safetensors")).unwrap();
    let ints = |name: &str| -> Vec<u32> {
        arrays[name]
            .as_slice::<i32>()
            .iter()
            .map(|&t| t as u32)
            .collect()
    };
    (0..)
        .take_while(|k| arrays.contains_key(&format!("prompt_{k}")))
        .map(|k| {
            let logits = &arrays[&format!("logits_{k}")];
            let vocab = logits.shape()[1] as usize;
            Reference {
                prompt: ints(&format!("prompt_{k}")),
                tokens: ints(&format!("tokens_{k}")),
                logits: logits
                    .as_slice::<f32>()
                    .chunks(vocab)
                    .map(<[f32]>::to_vec)
                    .collect(),
            }
        })
        .collect()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "vocabulary sizes differ");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max)
}

/// One prompt at a time, as mlx-lm ran them.
fn check_single(name: &str, lm: &LoadedModel, refs: &[Reference]) -> f32 {
    let mut worst = 0f32;
    for (k, r) in refs.iter().enumerate() {
        let (tokens, logits) =
            generate_greedy_with_logits(lm, &r.prompt, r.tokens.len(), true).unwrap();
        for (step, (ours, theirs)) in logits.iter().zip(&r.logits).enumerate() {
            let d = max_diff(ours, theirs);
            worst = worst.max(d);
            assert!(d < TOL, "{name} prompt {k} step {step}: |logit diff| {d}");
        }
        assert_eq!(tokens, r.tokens, "{name} prompt {k}: greedy tokens");
    }
    worst
}

/// A running row: which reference, how many of its steps are checked, its next input.
#[derive(Clone, Copy)]
struct Row {
    k: usize,
    step: usize,
    next: u32,
}

/// The batched schedule of the module docs on the engine's runner (the long prompt joins
/// last, with the first one again).
fn check_batched(name: &str, lm: LoadedModel, refs: &[Reference]) -> f32 {
    assert!(refs.len() >= 3);
    let mut runner = MlxRunner::new(lm);
    runner.keep_logits(true);
    let mut worst = 0f32;
    let mut rows: Vec<Row> = Vec::new();
    let mut samplers: Vec<Sampler> = Vec::new();
    // Checks the last logits of `rows` (all rows after a decode step, the joining rows after a
    // join) against their references, and advances them.
    let mut check = |runner: &MlxRunner, rows: &mut [Row], toks: &[u32]| {
        let logits = runner.last_logits().unwrap().as_slice::<f32>().to_vec();
        let vocab = logits.len() / rows.len();
        for (r, row) in rows.iter_mut().enumerate() {
            let reference = &refs[row.k];
            if row.step < reference.tokens.len() {
                let d = max_diff(
                    &logits[r * vocab..(r + 1) * vocab],
                    &reference.logits[row.step],
                );
                worst = worst.max(d);
                assert!(
                    d < TOL,
                    "{name} batched: prompt {} step {}: |logit diff| {d}",
                    row.k,
                    row.step
                );
                assert_eq!(
                    toks[r], reference.tokens[row.step],
                    "{name} batched: prompt {} step {}",
                    row.k, row.step
                );
            }
            *row = Row {
                step: row.step + 1,
                next: toks[r],
                ..*row
            };
        }
    };
    let decode = |runner: &mut MlxRunner, rows: &[Row], samplers: &mut [Sampler]| {
        let inputs: Vec<u32> = rows.iter().map(|r| r.next).collect();
        let mut s: Vec<&mut Sampler> = samplers.iter_mut().collect();
        runner.decode(&inputs, &mut s, true).unwrap()
    };
    let new_sampler = |k: usize| Sampler::new(Default::default(), &refs[k].prompt);
    let done = |rows: &[Row], k: usize| {
        rows.iter()
            .any(|r| r.k == k && r.step >= refs[k].tokens.len())
    };

    // Prompt 0 alone, two decode steps.
    runner.start_prefill(&[&refs[0].prompt], &[None]).unwrap();
    assert!(runner.prefill_step(1 << 20).unwrap());
    samplers.push(new_sampler(0));
    let toks = runner.join(&mut [&mut samplers[0]], Some(&[])).unwrap();
    rows.push(Row {
        k: 0,
        step: 0,
        next: 0,
    });
    check(&runner, &mut rows, &toks);
    for _ in 0..2 {
        let toks = decode(&mut runner, &rows, &mut samplers);
        check(&runner, &mut rows, &toks);
    }
    // Prompts 1 and 2 (different lengths) prefill as one left-padded group, 5 columns at a
    // time, while row 0 decodes; then they join.
    runner
        .start_prefill(&[&refs[1].prompt, &refs[2].prompt], &[None, None])
        .unwrap();
    while !runner.prefill_step(5).unwrap() {
        let toks = decode(&mut runner, &rows, &mut samplers);
        check(&runner, &mut rows, &toks);
    }
    let mut joining = vec![new_sampler(1), new_sampler(2)];
    let mut s: Vec<&mut Sampler> = joining.iter_mut().collect();
    let running: Vec<u32> = rows.iter().map(|r| r.next).collect();
    let toks = runner.join(&mut s, Some(&running)).unwrap();
    samplers.append(&mut joining);
    let at = rows.len();
    rows.extend([1, 2].map(|k| Row {
        k,
        step: 0,
        next: 0,
    }));
    check(&runner, &mut rows[at..], &toks);
    // Decode until row 0's reference ends, then it leaves.
    while !done(&rows, 0) {
        let toks = decode(&mut runner, &rows, &mut samplers);
        check(&runner, &mut rows, &toks);
    }
    runner.retain(&[1, 2]).unwrap();
    rows.remove(0);
    samplers.remove(0);
    // Prompt 0 again and the long prompt 3, as one group in chunks of 7, joining the two
    // running rows at another width: the long prompt passes a cache step (256 columns), so
    // sliding-window layers drop columns in the group, and again when it joins.
    let long = refs.len() - 1;
    assert!(refs[long].prompt.len() > kv_cache::STEP);
    runner
        .start_prefill(&[&refs[0].prompt, &refs[long].prompt], &[None, None])
        .unwrap();
    while !runner.prefill_step(7).unwrap() {
        let toks = decode(&mut runner, &rows, &mut samplers);
        check(&runner, &mut rows, &toks);
    }
    let mut joining = vec![new_sampler(0), new_sampler(long)];
    let mut s: Vec<&mut Sampler> = joining.iter_mut().collect();
    // Nothing queued at this join: the geometry right after it is checked below (a step
    // queued ahead would already have written its column; the joins above queue one).
    let toks = runner.join(&mut s, None).unwrap();
    samplers.append(&mut joining);
    let at = rows.len();
    rows.extend([0, long].map(|k| Row {
        k,
        step: 0,
        next: 0,
    }));
    check(&runner, &mut rows[at..], &toks);
    // Sliding layers now hold only the columns their window reaches.
    let layout = convoy::runner::kv_layout(&runner.model().model);
    let cache = runner.batch_cache();
    for layer in 0..layout.layers {
        if let Some(w) = layout.window(layer) {
            assert_eq!(
                cache.first_column(layer),
                cache.width() - w,
                "{name} layer {layer}"
            );
        }
    }
    if layout.full_layers() < layout.layers {
        let full = KvLayout {
            windows: Vec::new(),
            ..layout.clone()
        };
        let bound = kv_cache::footprint_bytes(&full, rows.len(), cache.width() + 1, 0);
        assert!(
            cache.allocated_bytes() < bound,
            "{name}: sliding layers hold less"
        );
    }
    while !(0..refs.len()).all(|k| done(&rows, k)) {
        let toks = decode(&mut runner, &rows, &mut samplers);
        check(&runner, &mut rows, &toks);
    }
    worst
}

#[test]
fn every_family_matches_mlx_lm_step_by_step() {
    let (dir, names) = fixtures();
    for family in [
        "llama3",
        "qwen2",
        "qwen3",
        "mistral",
        "llama-swa",
        "phi3",
        "gemma3",
        "gemma3-vlm",
    ] {
        for variant in ["", "-q4"] {
            let name = format!("{family}{variant}");
            assert!(names.contains(&name), "fixture {name} missing");
        }
    }
    for name in &names {
        let folder = dir.join(name);
        let refs = references(&folder);
        // Quantized folders: dequantized at load (the CPU default) and kept quantized (what
        // Metal and CUDA run).
        let policies: &[WeightsPolicy] = if name.ends_with("-q4") {
            &[WeightsPolicy::Auto, WeightsPolicy::KeepQuantized]
        } else {
            &[WeightsPolicy::Auto]
        };
        for &weights in policies {
            let load = || {
                model::load(
                    &folder,
                    LoadOptions {
                        weights,
                        ..Default::default()
                    },
                )
                .unwrap_or_else(|e| panic!("{name}: {e}"))
            };
            let lm = load();
            let label = format!("{name} ({})", lm.model.weight_dtype());
            assert_eq!(
                lm.model.is_quantized(),
                weights == WeightsPolicy::KeepQuantized,
                "{label}"
            );
            let single = check_single(&label, &lm, &refs);
            let batched = check_batched(&label, load(), &refs);
            eprintln!(
                "{label}: {}, max |logit diff| single {single:.1e}, batched {batched:.1e} \
                 (tolerance {TOL:e})",
                lm.model.config.architecture.as_str(),
            );
        }
    }
}

/// llama.cpp's `LlamaModel.permute`: q/k rows reordered so that the interleaved rotary layout
/// of GGUF's "normal" rope computes what the Hugging Face (halves) layout does.
fn permute_rows(w: &[f32], rows: usize, cols: usize, heads: usize) -> Vec<f32> {
    let half = rows / heads / 2;
    let mut out = vec![0f32; w.len()];
    // [heads, 2, half, cols] -> [heads, half, 2, cols]
    for h in 0..heads {
        for two in 0..2 {
            for i in 0..half {
                let src = ((h * 2 + two) * half + i) * cols;
                let dst = ((h * half + i) * 2 + two) * cols;
                out[dst..dst + cols].copy_from_slice(&w[src..src + cols]);
            }
        }
    }
    out
}

/// The float32 fixture `name` as llama.cpp's converter would write it to GGUF.
fn write_gguf(folder: &Path, path: &Path) {
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(folder.join("config.json")).unwrap()).unwrap();
    let arch = config["model_type"].as_str().unwrap();
    let int = |k: &str| config[k].as_u64().unwrap() as usize;
    let (hidden, heads, kv_heads) = (
        int("hidden_size"),
        int("num_attention_heads"),
        int("num_key_value_heads"),
    );
    let head_dim = config["head_dim"]
        .as_u64()
        .map_or(hidden / heads, |v| v as usize);
    let theta = config["rope_theta"].as_f64().unwrap();
    let tok: serde_json::Value =
        serde_json::from_slice(&std::fs::read(folder.join("tokenizer.json")).unwrap()).unwrap();
    let mut g = gguf::gguf_from_tokenizer_json(&tok, &gguf::Kind::ByteLevel(Some("smollm")));
    g.string("general.architecture", arch)
        .u32(
            &format!("{arch}.context_length"),
            int("max_position_embeddings") as u32,
        )
        .u32(&format!("{arch}.embedding_length"), hidden as u32)
        .u32(
            &format!("{arch}.block_count"),
            int("num_hidden_layers") as u32,
        )
        .u32(
            &format!("{arch}.feed_forward_length"),
            int("intermediate_size") as u32,
        )
        .u32(&format!("{arch}.attention.head_count"), heads as u32)
        .u32(&format!("{arch}.attention.head_count_kv"), kv_heads as u32)
        .u32(&format!("{arch}.rope.dimension_count"), head_dim as u32)
        .f32(&format!("{arch}.rope.freq_base"), theta as f32)
        .f32(
            &format!("{arch}.attention.layer_norm_rms_epsilon"),
            config["rms_norm_eps"].as_f64().unwrap() as f32,
        )
        .u32(
            "tokenizer.ggml.eos_token_id",
            config["eos_token_id"][0].as_u64().unwrap() as u32,
        );
    let arrays: HashMap<String, Array> =
        Array::load_safetensors(folder.join("model.safetensors")).unwrap();
    let mut tensors = Vec::new();
    for (name, a) in &arrays {
        let shape: Vec<usize> = a.shape().iter().map(|&d| d as usize).collect();
        let mut values = a.as_slice::<f32>().to_vec();
        let gguf_name = if let Some(rest) = name.strip_prefix("model.layers.") {
            let (layer, part) = rest.split_once('.').unwrap();
            let (part, suffix) = part.rsplit_once('.').unwrap();
            let llama = arch == "llama";
            let part = match part {
                "self_attn.q_proj" if llama => {
                    values = permute_rows(&values, shape[0], shape[1], heads);
                    "attn_q"
                }
                "self_attn.k_proj" if llama => {
                    values = permute_rows(&values, shape[0], shape[1], kv_heads);
                    "attn_k"
                }
                "self_attn.q_proj" => "attn_q",
                "self_attn.k_proj" => "attn_k",
                "self_attn.v_proj" => "attn_v",
                "self_attn.o_proj" => "attn_output",
                "mlp.gate_proj" => "ffn_gate",
                "mlp.up_proj" => "ffn_up",
                "mlp.down_proj" => "ffn_down",
                "input_layernorm" => "attn_norm",
                "post_attention_layernorm" => "ffn_norm",
                other => panic!("{other}"),
            };
            format!("blk.{layer}.{part}.{suffix}")
        } else {
            match name.as_str() {
                "model.embed_tokens.weight" => "token_embd.weight".into(),
                "model.norm.weight" => "output_norm.weight".into(),
                "lm_head.weight" => "output.weight".into(),
                other => panic!("{other}"),
            }
        };
        tensors.push((gguf_name, shape, values));
    }
    // Llama 3 rope scaling: llama.cpp's per-dimension factors.
    if let Some(s) = config["rope_scaling"].as_object() {
        let f = |k: &str| s[k].as_f64().unwrap();
        let (factor, low, high, old) = (
            f("factor"),
            f("low_freq_factor"),
            f("high_freq_factor"),
            f("original_max_position_embeddings"),
        );
        let factors: Vec<f32> = (0..head_dim / 2)
            .map(|i| {
                let freq = 1.0 / theta.powf((2 * i) as f64 / head_dim as f64);
                let wavelen = 2.0 * std::f64::consts::PI / freq;
                (if wavelen < old / high {
                    1.0
                } else if wavelen > old / low {
                    factor
                } else {
                    let smooth = (old / wavelen - low) / (high - low);
                    1.0 / ((1.0 - smooth) / factor + smooth)
                }) as f32
            })
            .collect();
        tensors.push(("rope_freqs.weight".into(), vec![factors.len()], factors));
    }
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    std::fs::write(path, g.with_tensors(&tensors, 32)).unwrap();
}

#[test]
fn gguf_files_match_mlx_lm_step_by_step() {
    let (dir, _) = fixtures();
    let tmp = tempfile::tempdir().unwrap();
    for name in ["llama3", "qwen2"] {
        let folder = dir.join(name);
        let path = tmp.path().join(format!("{name}.gguf"));
        write_gguf(&folder, &path);
        let refs = references(&folder);
        let load =
            || model::load(&path, LoadOptions::default()).unwrap_or_else(|e| panic!("{name}: {e}"));
        let label = format!("{name} (GGUF)");
        let lm = load();
        assert_eq!(lm.model.config.rope_traditional, name == "llama3");
        let single = check_single(&label, &lm, &refs);
        let batched = check_batched(&label, load(), &refs);
        eprintln!("{label}: max |logit diff| single {single:.1e}, batched {batched:.1e}");
    }
}

/// Through the engine, on the model whose layers all slide (mistral, window 8): three rows
/// run to the end of the context at once in a KV budget that holds only a window, a prefill
/// chunk and a cache step per row (full layers would need more than twice that), their
/// first tokens are mlx-lm's, and the cache never allocates past the budget.
#[test]
fn sliding_layers_run_long_rows_in_a_window_sized_budget() {
    let (dir, _) = fixtures();
    let folder = dir.join("mistral");
    let refs = references(&folder);
    let lm = model::load(&folder, LoadOptions::default()).unwrap();
    let layout = convoy::runner::kv_layout(&lm.model);
    assert_eq!(layout.full_layers(), 0);
    drop(lm);
    let chunk = 64;
    let budget = kv_cache::footprint_bytes(&layout, 3, usize::MAX, chunk);
    let full = KvLayout {
        windows: Vec::new(),
        ..layout.clone()
    };
    assert!(kv_cache::footprint_bytes(&full, 3, 512, chunk) > 2 * budget);
    let mut cfg = convoy::EngineConfig::default();
    cfg.scheduler.max_kv_bytes = budget;
    cfg.scheduler.prefill_chunk = chunk;
    cfg.scheduler.prefill_chunk_decoding = chunk;
    let engine = convoy::Engine::new(&folder, cfg).unwrap();
    let context = engine.context_length();
    assert_eq!(context, 512);
    let picks = [0, 1, refs.len() - 1];
    // One batch submit: the rows are grouped the same way on every run.
    let requests = picks
        .iter()
        .map(|&k| {
            let mut r = convoy::Request::new(convoy::Prompt::Tokens(refs[k].prompt.clone()))
                .max_tokens(1000);
            r.stop.ignore_eos = true;
            r
        })
        .collect();
    let ids = engine.submit_batch(requests).unwrap();
    for (&k, id) in picks.iter().zip(ids) {
        let mut tokens = Vec::new();
        loop {
            match engine
                .poll(id, std::time::Duration::from_secs(600))
                .unwrap()
            {
                Some(convoy::Event::Token { token, .. }) => tokens.push(token),
                Some(convoy::Event::Finished { reason, error, .. }) => {
                    assert_eq!(reason, convoy::FinishReason::Length, "{error:?}");
                    break;
                }
                None => panic!("no event in 10 minutes"),
            }
        }
        // Generation runs to the context's end.
        assert_eq!(tokens.len(), context - refs[k].prompt.len(), "prompt {k}");
        let n = refs[k].tokens.len();
        assert_eq!(tokens[..n], refs[k].tokens[..], "prompt {k}");
    }
    let stats = engine.stats();
    assert!(stats.peak_kv_bytes > 0 && stats.peak_kv_bytes <= budget);
}

/// The prefix cache on a model with sliding and full layers (llama-swa, window 8): a second
/// turn (the first turn's prompt and answer, then more) reuses the first turn's KV, which
/// the sliding layers take only the last window of, and answers exactly as without the
/// cache.
#[test]
fn prefix_cache_reuse_on_sliding_layers_answers_as_without_it() {
    let (dir, _) = fixtures();
    let folder = dir.join("llama-swa");
    let refs = references(&folder);
    let turn = |engine: &convoy::Engine, prompt: Vec<u32>| {
        let mut r = convoy::Request::new(convoy::Prompt::Tokens(prompt)).max_tokens(16);
        r.stop.ignore_eos = true;
        engine.generate(r).unwrap()
    };
    let run = |prefix_cache_bytes: usize| {
        let mut cfg = convoy::EngineConfig::default();
        cfg.scheduler.prefix_cache_bytes = prefix_cache_bytes;
        let engine = convoy::Engine::new(&folder, cfg).unwrap();
        let first = turn(&engine, refs[2].prompt.clone());
        let mut next = refs[2].prompt.clone();
        next.extend(&first.tokens);
        next.extend(&refs[1].prompt);
        let second = turn(&engine, next);
        (first.tokens, second.tokens, second.stats.cached_tokens)
    };
    let (a, b, cached) = run(64 << 20);
    let (a0, b0, cached0) = run(0);
    assert_eq!(cached0, 0);
    assert!(
        cached > 8 + 16,
        "the first turn's KV was reused: {cached} tokens"
    );
    assert_eq!(a, a0);
    assert_eq!(b, b0);
}

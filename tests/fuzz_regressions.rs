//! Regression tests for defects found by fuzzing (scripts/fuzz.sh) and while writing the
//! byte-level entry points in `convoy::fuzzing`. Inputs that came from the fuzzer are committed
//! under tests/data/fuzz/<target>/; each test says what used to go wrong.
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use convoy::fuzzing;
use convoy::model::{self, LoadOptions};
use convoy::Error;

#[path = "common/gguf.rs"]
mod gguf;
use gguf::Gguf;

type Entry = fn(&[u8]) -> convoy::Result<()>;

/// Every committed fuzzer finding under tests/data/fuzz/<target>/ must now run clean: no
/// panic (the test would fail), whatever Result the entry point returns.
#[test]
fn all_committed_findings_run_clean() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/fuzz");
    let entries: [(&str, Entry); 8] = [
        ("gguf", fuzzing::gguf),
        ("gguf", fuzzing::gguf_mlx),
        ("safetensors", fuzzing::safetensors),
        ("safetensors", fuzzing::safetensors_mlx),
        ("st_index", fuzzing::safetensors_index),
        ("config_json", fuzzing::config_json),
        ("tokenizer_json", fuzzing::tokenizer_json),
        ("chat_template", fuzzing::chat_template),
    ];
    for (target, entry) in entries {
        let Ok(dir) = std::fs::read_dir(root.join(target)) else {
            continue;
        };
        for f in dir {
            let path = f.unwrap().path();
            let _ = entry(&std::fs::read(&path).unwrap());
        }
    }
}

fn write_temp(dir: &tempfile::TempDir, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.path().join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

/// A GGUF metadata error used to report the metadata key where the file path belongs
/// (`model file general.architecture is corrupt ...`).
#[test]
fn gguf_metadata_errors_name_the_file_not_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = Gguf::default().u32("general.architecture", 7).bytes();
    let p = write_temp(&dir, "arch_is_a_number.gguf", &bytes);
    let e = match model::load(&p, LoadOptions::default()) {
        Ok(_) => panic!("loaded"),
        Err(e) => e,
    };
    match &e {
        Error::CorruptModel { path, reason } => {
            assert_eq!(path, &p, "{e}");
            assert!(reason.contains("general.architecture"), "{e}");
        }
        other => panic!("{other}"),
    }
}

/// `tokenizer.ggml.token_type` longer than `tokenizer.ggml.tokens` indexed past the token
/// list (index out of bounds panic) when a type past the end was a control token.
#[test]
fn gguf_token_types_longer_than_tokens() {
    let bytes = Gguf::default()
        .string("general.architecture", "llama")
        .u32("llama.embedding_length", 8)
        .u32("llama.attention.head_count", 2)
        .u32("llama.block_count", 1)
        .u32("llama.feed_forward_length", 16)
        .string("tokenizer.ggml.model", "gpt2")
        .string("tokenizer.ggml.pre", "gpt2")
        .strings("tokenizer.ggml.tokens", &["a", "b"])
        .i32s("tokenizer.ggml.token_type", &[1, 1, 3, 3])
        .bytes();
    // The pure path (metadata as our walk collects it) and the real loader (MLX's view).
    let _ = fuzzing::gguf(&bytes);
    let dir = tempfile::tempdir().unwrap();
    let p = write_temp(&dir, "types.gguf", &bytes);
    let e = model::load(&p, LoadOptions::default()).err().unwrap();
    assert!(matches!(e, Error::BadWeights(_)), "{e}"); // got past the tokenizer: no tensors
}

/// A shard index could make the loader open any file (`../x`, `/etc/x`).
#[test]
fn shard_index_cannot_leave_the_model_folder() {
    for bad in ["../x.safetensors", "/etc/passwd", "a/../../b", "", "."] {
        let index = serde_json::json!({"weight_map": {"w": bad}}).to_string();
        let e = fuzzing::safetensors_index(index.as_bytes()).unwrap_err();
        assert!(matches!(e, Error::CorruptModel { .. }), "{bad:?}: {e}");
    }
    let ok = r#"{"weight_map": {"a": "model-1.safetensors", "b": "shards/model-2.safetensors"}}"#;
    fuzzing::safetensors_index(ok.as_bytes()).unwrap();
}

/// Chat templates run with fuel and a recursion limit: a template that loops for ever (or
/// recurses without end) fails quickly instead of hanging the submitting thread.
#[test]
fn chat_template_cannot_hang() {
    let templates = [
        "{% for a in range(100000) %}{% for b in range(100000) %}{{ a }}{% endfor %}{% endfor %}",
        "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
        "{% set s = 'x' * 10000000 %}{% for i in range(100000) %}{{ s }}{% endfor %}",
    ];
    for t in templates {
        let mut input = vec![1u8];
        input.extend_from_slice(t.as_bytes());
        let start = Instant::now();
        let e = fuzzing::chat_template(&input).unwrap_err();
        assert!(matches!(e, Error::Template(_)), "{e}");
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "{t}: {:?}",
            start.elapsed()
        );
    }
}

/// The same protection with the engine's own (larger) fuel, through a real tokenizer.
#[test]
fn chat_template_fuel_applies_to_model_templates() {
    let tj = std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/tokenizer_json/bpe_only.bin"),
    )
    .unwrap();
    let looping =
        "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}";
    let mut input = tj.clone();
    input.extend_from_slice(b"\0{}\0");
    input.extend_from_slice(looping.as_bytes());
    let start = Instant::now();
    // The template fails at render time; building and encoding still work.
    fuzzing::tokenizer_json(&input).unwrap();
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "{:?}",
        start.elapsed()
    );
}

/// A float64 metadata value (scalar or array) crashed the process (SIGSEGV in MLX's GGUF
/// reader, which does not know the type and loses its place in the file). Found by the `gguf`
/// target; now our structural check rejects the file first.
#[test]
fn gguf_float64_metadata_is_rejected_before_mlx() {
    for name in ["float64_metadata.gguf", "float64_array_metadata.gguf"] {
        let p = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/data/fuzz/gguf")
            .join(name);
        let e = match model::load(&p, LoadOptions::default()) {
            Ok(_) => panic!("{name} loaded"),
            Err(e) => e,
        };
        assert!(
            matches!(&e, Error::CorruptModel { reason, .. } if reason.contains("float64")),
            "{name}: {e}"
        );
    }
}

/// Our check assumes the data section starts at `general.alignment`; make sure MLX reads the
/// tensor data from the same place (otherwise the bounds we check are not the ones it reads).
#[test]
fn gguf_alignment_agrees_with_mlx() {
    let values: Vec<f32> = (0..8).map(|i| i as f32 + 0.5).collect();
    let dir = tempfile::tempdir().unwrap();
    for align in [32u32, 64, 256] {
        for pad_key in ["a", "ab", "abcdefghijklmnopqrstuvwxyz0123456789"] {
            let bytes = Gguf::default()
                .u32("general.alignment", align)
                .string(pad_key, "x")
                .with_tensor(&values, align as usize);
            let p = write_temp(&dir, "aligned.gguf", &bytes);
            let file = convoy::mlx_rs::io::GgufFile::load(&p).unwrap();
            let t = file.arrays().unwrap().remove("t").unwrap();
            assert_eq!(
                t.as_slice::<f32>(),
                &values[..],
                "alignment {align}, key {pad_key}"
            );
        }
    }
}

/// `general.alignment = 0` (u32) passed our check (we fell back to 32) and then killed the
/// process with SIGFPE (a division by zero in MLX's reader).
#[test]
fn gguf_zero_alignment_is_rejected_before_mlx() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = Gguf::default()
        .u32("general.alignment", 0)
        .with_tensor(&[1.0; 8], 32);
    let p = write_temp(&dir, "align0.gguf", &bytes);
    let e = model::load(&p, LoadOptions::default()).err().unwrap();
    assert!(
        matches!(&e, Error::CorruptModel { reason, .. } if reason.contains("alignment")),
        "{e}"
    );
    assert!(fuzzing::gguf_mlx(&bytes).is_err());
}

/// MLX uses any non-zero u32 alignment as is (48 included), while our check used 32 for
/// values that are not powers of two: MLX then read the tensor from a later offset than the
/// one checked, past the end of the file.
#[test]
fn gguf_alignment_is_checked_as_mlx_applies_it() {
    let dir = tempfile::tempdir().unwrap();
    let values = [2.0f32; 8];
    let mut tested = 0;
    for n in 1..48 {
        let key = "k".repeat(n);
        let unpadded = Gguf::default()
            .u32("general.alignment", 48)
            .string(&key, "")
            .with_tensor(&values, 1);
        let pos = unpadded.len() - 32;
        if pos.div_ceil(48) * 48 <= pos.div_ceil(32) * 32 {
            continue;
        }
        // Data placed at the 32-byte boundary: MLX would read from the 48-byte one.
        let bytes = Gguf::default()
            .u32("general.alignment", 48)
            .string(&key, "")
            .with_tensor(&values, 32);
        let p = write_temp(&dir, "align48.gguf", &bytes);
        let e = model::load(&p, LoadOptions::default()).err().unwrap();
        assert!(matches!(e, Error::CorruptModel { .. }), "{e}");
        tested += 1;
    }
    assert!(tested > 0);
}

/// A 1-D `token_embd.weight` panicked (index out of bounds in `Embedding::shape`) while the
/// model was built; a 1-D projection or a 2-D norm slipped through to fail inside MLX at the
/// first request. Every tensor's rank and shape is now checked at load.
#[test]
fn gguf_tensor_ranks_and_shapes_are_checked_at_load() {
    for name in ["embedding_1d.gguf", "q_proj_1d.gguf", "norm_2d.gguf"] {
        let p = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/data/fuzz/gguf")
            .join(name);
        let e = match model::load(&p, LoadOptions::default()) {
            Ok(_) => panic!("{name} loaded"),
            Err(e) => e,
        };
        assert!(matches!(e, Error::BadWeights(_)), "{name}: {e}");
    }
}

/// minijinja built-ins that crashed the process through a chat template: `is divisibleby 0`
/// panicked (remainder by zero; found by the `chat_template` target, committed as
/// tests/data/fuzz/chat_template/divisibleby_zero.bin), and `slice(n)` / `batch(n)` with a huge
/// `n` aborted on a failed allocation. Our environment replaces them with checked versions.
#[test]
fn chat_template_builtins_cannot_crash() {
    let found = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/fuzz/chat_template/divisibleby_zero.bin");
    let _ = fuzzing::chat_template(&std::fs::read(found).unwrap());
    let render = |t: &str| {
        let mut input = vec![1u8];
        input.extend_from_slice(t.as_bytes());
        fuzzing::chat_template(&input)
    };
    render("{{ 5 is divisibleby 0 }}{{ 5.0 is divisibleby 0.0 }}").unwrap();
    render("{% if 6 is divisibleby 3 and not 7 is divisibleby 2 %}ok{% endif %}").unwrap();
    for t in [
        "{{ [1] | slice(100000000000000) }}",
        "{{ [1, 2] | batch(3000000000) }}",
    ] {
        assert!(matches!(render(t), Err(Error::Template(_))), "{t}");
    }
    render("{{ [1, 2, 3] | slice(2) | list }}{{ [1, 2, 3] | batch(2) | list }}").unwrap();
}

/// `{% set ns.n = ns %}` made a namespace contain itself; printing it recursed until the
/// stack overflowed and the process aborted (found by the `chat_template` target, committed
/// as tests/data/fuzz/chat_template/self_referential_namespace.bin). Printed and serialized
/// values are now checked for cycles and depth.
#[test]
fn chat_template_self_referential_namespace() {
    let found = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/fuzz/chat_template/self_referential_namespace.bin");
    assert!(fuzzing::chat_template(&std::fs::read(found).unwrap()).is_err());
    let cycle = "{% set ns = namespace(a=1) %}{% set ns.a = ns %}";
    for use_it in [
        "{{ ns }}",
        "{{ ns | tojson }}",
        "{{ ns | string }}",
        "{{ [ns] }}",
    ] {
        let mut input = vec![1u8];
        input.extend_from_slice(format!("{cycle}{use_it}").as_bytes());
        let e = fuzzing::chat_template(&input).unwrap_err();
        assert!(matches!(e, Error::Template(_)), "{use_it}: {e}");
    }
    // Deep but finite values still render.
    let mut input = vec![1u8];
    input.extend_from_slice(
        b"{% set ns = namespace(a=[[1, {'b': 2}]]) %}{{ ns.a }}{{ ns.a | tojson }}",
    );
    fuzzing::chat_template(&input).unwrap();
}

/// A tokenizer.json whose `"decoder"` object is malformed JSON (as in a truncated download, or
/// with a lone surrogate `\ud800` escape) panicked inside tokenizers 0.22 (`expect("Helper")`);
/// found by the `tokenizer_json` target.
/// The JSON syntax is now checked first and the folder load fails with CorruptModel.
#[test]
fn malformed_tokenizer_json_is_an_error() {
    for name in ["decoder_syntax_error.bin", "decoder_lone_surrogate.bin"] {
        let found = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/data/fuzz/tokenizer_json")
            .join(name);
        let bytes = std::fs::read(found).unwrap();
        let e = fuzzing::tokenizer_json(&bytes).unwrap_err();
        assert!(matches!(e, Error::CorruptModel { .. }), "{name}: {e}");
    }
    // Every truncation of a valid tokenizer.json, as a partial download would leave it.
    let tj = std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/tokenizer_json/bpe_only.bin"),
    )
    .unwrap();
    for cut in (0..tj.len()).step_by(7) {
        assert!(fuzzing::tokenizer_json(&tj[..cut]).is_err(), "cut {cut}");
    }
}

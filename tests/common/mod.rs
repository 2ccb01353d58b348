//! Shared helpers for the integration tests: where the bundled test model lives.
#![allow(dead_code)]
use std::path::PathBuf;

use convoy::ChatMessage;

/// The cache directory `make` fills (same rule as mlx-sys/build.rs and scripts/setup.sh).
pub fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("CONVOY_CACHE_DIR") {
        return d.into();
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(d).join("convoy");
    }
    PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache/convoy")
}

/// The bundled SmolLM2-135M-Instruct GGUF. Fails loudly (never skips) when absent.
pub fn model_path() -> PathBuf {
    if let Some(p) = std::env::var_os("CONVOY_MODEL") {
        return p.into();
    }
    let p = cache_dir().join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        p.is_file(),
        "test model missing at {}: run `make model` (or `make test`)",
        p.display()
    );
    p
}

/// target/<profile>, where cargo put libconvoy.{so,a} for this test run (`cargo test` builds
/// only the rlib: `cargo build --lib` with the same profile and features builds those).
pub fn lib_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.parent().unwrap().parent().unwrap().to_owned()
}

pub const SYSTEM: &str = "You are a helpful AI assistant named SmolLM, trained by Hugging Face";

pub fn chat(user: &str) -> Vec<ChatMessage> {
    vec![
        ChatMessage::new("system", SYSTEM),
        ChatMessage::new("user", user),
    ]
}

/// Known answer from shared/docs/test-model.md.
pub const PARIS_PROMPT_HEAD: [u32; 6] = [1, 9690, 198, 2683, 359, 253];
pub const PARIS_PROMPT_TAIL: [u32; 4] = [1, 520, 9531, 198];
pub const PARIS_ANSWER: [u32; 8] = [504, 3575, 282, 4649, 314, 7042, 30, 2];

/// Eight user questions of clearly different lengths.
pub const QUESTIONS: [&str; 8] = [
    "What is the capital of France?",
    "Hi",
    "Name three colors.",
    "Explain in one sentence why the sky is blue, and mention the scientist who first described the effect.",
    "What is 12 plus 30?",
    "Write a haiku about the sea.",
    "List the planets of the solar system in order from the sun, separated by commas, and say which one is largest.",
    "Who wrote Hamlet?",
];

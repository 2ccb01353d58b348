//! GGUF tokenizers against the models' own Hugging Face tokenizers (issue 12).
//!
//! A GGUF file carries a tokenizer as a vocabulary, merges or SentencePiece scores, token
//! types and, for byte-level BPE, the name of its pre-tokenizer (`tokenizer.ggml.pre`). For
//! Llama 3 (`llama-bpe`), Qwen2.5 (`qwen2`), GPT-2 (`gpt-2`) and Llama 2 (SentencePiece,
//! `tokenizer.ggml.model = llama`), this test writes that metadata from the model's own
//! `tokenizer.json` (scripts/tokenizer-fixtures.sh fetches them, pinned) the way llama.cpp's
//! converter does, loads it with [`Tokenizer::from_gguf_file`], and compares the ids and the
//! decoded text with Hugging Face `tokenizers` (the Python package, pinned; scripts/
//! hf-tokenize.sh) on the same `tokenizer.json` over [`TEXTS`]: numbers, whitespace runs,
//! contractions, code, accents in both Unicode forms, non-Latin scripts, emoji, special
//! tokens in the text. SmolLM2's own GGUF (`smollm`) is checked by its known answers in
//! tests/model.rs.
#[path = "common/gguf.rs"]
mod gguf;

use std::path::{Path, PathBuf};
use std::process::Command;

use convoy::tokenizer::Tokenizer;
use convoy::Error;
use gguf::{gguf_from_tokenizer_json, Gguf, Kind};
use serde_json::Value;

const TEXTS: &[&str] = &[
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "1234567890 3.14159 -42 1,000,000 2026-11-26 0x1F 007",
    "12345678901234567890",
    "a  b   c    d\t\te\n\nf\n\n\n   g   ",
    "   leading spaces and trailing   ",
    "\n\n\nnewlines first",
    "tabs\tand\r\nwindows\r\nline ends",
    "I'm sure you're right, they've said it's what we'd've done. DON'T SHOUT, I'LL",
    "fn main() {\n    let x: Vec<u32> = (0..10).map(|i| i * 2).collect();\n}",
    "def f(a, b):\n\treturn a ** b  # power\n",
    "<html><body class=\"x\">&amp; &lt;tag&gt;</body></html>",
    "caf\u{e9} na\u{ef}ve r\u{e9}sum\u{e9} \u{c5}ngstr\u{f6}m",
    "cafe\u{301} nai\u{308}ve (combining accents)",
    "\u{4f60}\u{597d}\u{ff0c}\u{4e16}\u{754c}\u{ff01}\u{4eca}\u{5929}\u{5929}\u{6c14}\u{5f88}\u{597d}\u{3002}",
    "\u{65e5}\u{672c}\u{8a9e}\u{306e}\u{6587}\u{7ae0}\u{3068}\u{30ab}\u{30bf}\u{30ab}\u{30ca}",
    "\u{c548}\u{b155}\u{d558}\u{c138}\u{c694} \u{d55c}\u{ad6d}\u{c5b4}",
    "\u{41f}\u{440}\u{438}\u{432}\u{435}\u{442}, \u{43c}\u{438}\u{440}! \u{42d}\u{442}\u{43e} \u{442}\u{435}\u{441}\u{442}.",
    "\u{645}\u{631}\u{62d}\u{628}\u{627} \u{628}\u{627}\u{644}\u{639}\u{627}\u{644}\u{645}",
    "\u{928}\u{92e}\u{938}\u{94d}\u{924}\u{947} \u{926}\u{941}\u{928}\u{93f}\u{92f}\u{93e}",
    "\u{5e9}\u{5dc}\u{5d5}\u{5dd} \u{e2a}\u{e27}\u{e31}\u{e2a}\u{e14}\u{e35} \u{3b3}\u{3b5}\u{3b9}\u{3ac}",
    "emoji \u{1f600}\u{1f680}\u{2728} family \u{1f468}\u{200d}\u{1f469}\u{200d}\u{1f467} flag \u{1f1eb}\u{1f1f7} skin \u{1f44d}\u{1f3fd}",
    "\u{1f9d1}\u{200d}\u{1f4bb} wrote 100\u{20ac} \u{2192} \u{221e} \u{2264} \u{3c0}",
    // Words Llama 3's merges cannot build but its vocabulary has whole (`ignore_merges`).
    "Vi\u{1ec7}t Nam c\u{f3} nhi\u{1ec1}u \u{111}i\u{1ec1}u h\u{1ee3}p l\u{fd}, vi\u{1ec7}c n\u{e0}y \u{1edf} ngo\u{e0}i; jeho; \u{627}\u{6cc}\u{631}\u{627}\u{646}",
    "mixed\u{4e2d}\u{6587}English123\u{6570}\u{5b57}",
    "<|im_start|>user\nHi<|im_end|>\n<|begin_of_text|><s></s><|endoftext|>",
    "!!!??? ... --- ___ *** ~~~ ```code``` $$$ %%%",
    "URLs: https://example.com/path?q=1&r=2#frag and emails a.b@c.de",
    "\u{0}\u{1}\u{7f} control characters \u{feff}",
    "",
    " ",
    "a",
    "   ",
];

fn run(cmd: &mut Command) -> Vec<u8> {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

fn fixtures() -> PathBuf {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/tokenizer-fixtures.sh");
    let out = run(&mut Command::new(script));
    PathBuf::from(String::from_utf8(out).unwrap().trim())
}

/// Hugging Face's ids and decoded texts for [`TEXTS`].
fn reference(tokenizer_json: &Path, dir: &Path) -> (Vec<Vec<u32>>, Vec<String>) {
    let texts = dir.join("texts.json");
    std::fs::write(&texts, serde_json::to_string(TEXTS).unwrap()).unwrap();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/hf-tokenize.sh");
    let out = run(Command::new(script).arg(tokenizer_json).arg(&texts));
    let v: Value = serde_json::from_slice(&out).unwrap();
    let ids = v["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            a.as_array()
                .unwrap()
                .iter()
                .map(|i| i.as_u64().unwrap() as u32)
                .collect()
        })
        .collect();
    let decoded = v["decoded"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_owned())
        .collect();
    (ids, decoded)
}

fn load(dir: &Path, name: &str, g: &Gguf) -> convoy::Result<Tokenizer> {
    let path = dir.join(format!("{name}.gguf"));
    std::fs::write(&path, g.bytes()).unwrap();
    Tokenizer::from_gguf_file(&path)
}

#[test]
fn gguf_tokenizers_match_the_models_own_tokenizers() {
    let fixtures = fixtures();
    let tmp = tempfile::tempdir().unwrap();
    let cases = [
        ("llama3", Kind::ByteLevel(Some("llama-bpe"))),
        ("qwen2_5", Kind::ByteLevel(Some("qwen2"))),
        ("gpt2", Kind::ByteLevel(Some("gpt-2"))),
        ("gpt2", Kind::ByteLevel(Some("gpt2"))),
        ("llama2", Kind::SentencePiece),
    ];
    for (name, kind) in &cases {
        let json_path = fixtures.join(name).join("tokenizer.json");
        let json: Value = serde_json::from_slice(&std::fs::read(&json_path).unwrap()).unwrap();
        let ours = load(tmp.path(), name, &gguf_from_tokenizer_json(&json, kind))
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let (ids, decoded) = reference(&json_path, tmp.path());
        let mut tokens = 0;
        for (k, text) in TEXTS.iter().enumerate() {
            let got = ours.encode(text, false).unwrap();
            assert_eq!(got, ids[k], "{name}: ids of {text:?}");
            assert_eq!(
                ours.decode_with(&got, false).unwrap(),
                decoded[k],
                "{name}: decoded {text:?}"
            );
            tokens += got.len();
        }
        eprintln!("{name}: {} texts, {tokens} tokens, all equal", TEXTS.len());
    }
}

/// A pre-tokenizer convoy does not know (or none at all) is an error, never another model's
/// rules; so are vocabularies of other kinds.
#[test]
fn unknown_gguf_tokenizers_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let base = || {
        let mut g = Gguf::default();
        g.string("general.architecture", "llama")
            .strings("tokenizer.ggml.tokens", &["a", "b", "ab"])
            .strings("tokenizer.ggml.merges", &["a b"]);
        g
    };
    let mut known = base();
    known
        .string("tokenizer.ggml.model", "gpt2")
        .string("tokenizer.ggml.pre", "llama-bpe");
    assert_eq!(
        load(tmp.path(), "known", &known)
            .unwrap()
            .encode("ab", false)
            .unwrap(),
        [2]
    );
    for (name, model, pre) in [
        ("unknown-pre", "gpt2", Some("deepseek-coder")),
        ("no-pre", "gpt2", None),
        ("bert", "bert", Some("default")),
        ("no-model", "", None),
    ] {
        let mut g = base();
        if !model.is_empty() {
            g.string("tokenizer.ggml.model", model);
        }
        if let Some(pre) = pre {
            g.string("tokenizer.ggml.pre", pre);
        }
        let e = load(tmp.path(), name, &g).err().unwrap();
        assert!(matches!(e, Error::UnsupportedTokenizer(_)), "{name}: {e}");
        eprintln!("{name}: {e}");
    }
    // Every prefix of a long run of one letter: millions of SentencePiece merges from a small
    // file. Refused before it takes the memory.
    let run: Vec<String> = (1..=3000).map(|n| "a".repeat(n)).collect();
    let refs: Vec<&str> = run.iter().map(String::as_str).collect();
    let scores: Vec<f32> = (0..run.len()).map(|i| -(i as f32)).collect();
    let mut blowup = Gguf::default();
    blowup
        .string("tokenizer.ggml.model", "llama")
        .strings("tokenizer.ggml.tokens", &refs)
        .f32s("tokenizer.ggml.scores", &scores);
    let e = load(tmp.path(), "blowup", &blowup).err().unwrap();
    assert!(matches!(e, Error::CorruptModel { .. }), "{e}");
    let mut no_scores = base();
    no_scores.string("tokenizer.ggml.model", "llama");
    let e = load(tmp.path(), "no-scores", &no_scores).err().unwrap();
    assert!(matches!(e, Error::CorruptModel { .. }), "{e}");
}

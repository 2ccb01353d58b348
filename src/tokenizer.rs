//! Tokenizing (HF `tokenizers`), chat templates (`minijinja`), and incremental detokenizing.
//!
//! A tokenizer comes from `tokenizer.json` (+ `tokenizer_config.json`) in a model folder, or is
//! rebuilt from GGUF metadata as the `tokenizer.json` the model's Hugging Face tokenizer has:
//! a byte-level BPE over `tokenizer.ggml.tokens`/`merges` with the pre-tokenizer that
//! `tokenizer.ggml.pre` names, or a SentencePiece BPE from the tokens' scores; special tokens
//! from the token types. Rendering a chat uses the model's own Jinja template.
use std::path::Path;

use minijinja::{context, Environment, Value as JinjaValue};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::error::{Error, Result};
use crate::model::gguf::Metadata;
use crate::model::ModelConfig;

/// One chat message (`role` is usually "system", "user" or "assistant").
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// A model's tokenizer plus its special tokens and chat template.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    bos: Option<u32>,
    eos: Vec<u32>,
    add_bos: bool,
    bos_text: String,
    eos_text: String,
    template: Option<ChatTemplate>,
}

/// Template instructions one rendering may execute (minijinja's fuel): a chat template spends
/// tens per message, so this allows very long chats yet stops a looping template in well under
/// a second.
pub(crate) const TEMPLATE_FUEL: u64 = 5_000_000;
/// Nesting depth of loops, conditions, macros and includes while rendering.
const TEMPLATE_RECURSION_LIMIT: usize = 100;
/// Most bytes a rendered chat may have: far beyond any context window, small enough that a
/// hostile template cannot exhaust memory through its output.
pub(crate) const TEMPLATE_MAX_OUTPUT: usize = 16 << 20;

/// A compiled chat template (Jinja, rendered with minijinja plus Python string methods), with
/// bounded work, recursion and output.
pub(crate) struct ChatTemplate {
    env: Environment<'static>,
}

impl ChatTemplate {
    /// Compiles `source`; each rendering may spend `fuel` instructions.
    pub(crate) fn new(source: String, fuel: u64) -> Result<Self> {
        let mut env = Environment::new();
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    msg,
                ))
            },
        );
        // Built-ins that crash the process on hostile arguments in minijinja 2.24, replaced by
        // checked versions (found by fuzzing): `x is divisibleby 0` panics (remainder by
        // zero); `slice(n)` and `batch(n)` allocate `n` slots up front, so a huge `n` aborts
        // on allocation failure.
        env.add_test("divisibleby", divisible_by);
        env.add_filter(
            "slice",
            |state: &minijinja::State,
             value: JinjaValue,
             count: usize,
             fill: Option<JinjaValue>| {
                minijinja::filters::slice(state, value, bounded_count(count)?, fill)
            },
        );
        env.add_filter(
            "batch",
            |state: &minijinja::State,
             value: JinjaValue,
             count: usize,
             fill: Option<JinjaValue>| {
                minijinja::filters::batch(state, value, bounded_count(count)?, fill)
            },
        );
        // `{% set ns.x = ns %}` makes a namespace contain itself, and minijinja then recurses
        // for ever printing or serializing it (a stack overflow aborts the process; found by
        // fuzzing). Values are checked for depth and cycles before they are printed or
        // serialized.
        env.set_formatter(|out, state, value| {
            check_nesting(value)?;
            minijinja::escape_formatter(out, state, value)
        });
        env.add_filter(
            "tojson",
            |value: &JinjaValue, indent: Option<JinjaValue>, args: minijinja::value::Kwargs| {
                check_nesting(value)?;
                minijinja::filters::tojson(value, indent, args)
            },
        );
        env.add_filter("string", |state: &minijinja::State, value: &JinjaValue| {
            check_nesting(value)?;
            minijinja::filters::string(state, value)
        });
        env.set_fuel(Some(fuel));
        env.set_recursion_limit(TEMPLATE_RECURSION_LIMIT);
        env.add_template_owned("chat", source)
            .map_err(|e| Error::Template(e.to_string()))?;
        Ok(Self { env })
    }

    /// Renders `messages` (the template's `messages`, `add_generation_prompt`, `bos_token`
    /// and `eos_token` variables).
    pub(crate) fn render(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
        bos_token: &str,
        eos_token: &str,
    ) -> Result<String> {
        let tmpl = self
            .env
            .get_template("chat")
            .map_err(|e| Error::Template(e.to_string()))?;
        let mut out = BoundedWriter(Vec::new());
        tmpl.render_captured_to(
            context! {
                messages => messages,
                add_generation_prompt => add_generation_prompt,
                bos_token => bos_token,
                eos_token => eos_token,
            },
            &mut out,
        )
        .map_err(|e| Error::Template(e.to_string()))?;
        String::from_utf8(out.0).map_err(|e| Error::Template(e.to_string()))
    }
}

/// `a is divisibleby b` without minijinja's panic on `b == 0` (or `i128::MIN % -1`).
fn divisible_by(a: &JinjaValue, b: &JinjaValue) -> bool {
    let int = |v: &JinjaValue| i128::try_from(v.clone()).ok();
    let float = |v: &JinjaValue| f64::try_from(v.clone()).ok();
    match (int(a), int(b)) {
        (Some(a), Some(b)) => a.checked_rem(b) == Some(0),
        _ => match (float(a), float(b)) {
            (Some(a), Some(b)) => b != 0.0 && a % b == 0.0,
            _ => false,
        },
    }
}

/// Fails for a value nested deeper than 64 levels, with more than a million parts, or that
/// contains itself (which minijinja would print or serialize for ever).
fn check_nesting(value: &JinjaValue) -> std::result::Result<(), minijinja::Error> {
    use minijinja::value::ValueKind;
    fn walk(v: &JinjaValue, depth: usize, budget: &mut usize) -> bool {
        if depth > 64 || *budget == 0 {
            return false;
        }
        *budget -= 1;
        match v.kind() {
            ValueKind::Seq => v
                .try_iter()
                .map_or(true, |mut it| it.all(|x| walk(&x, depth + 1, budget))),
            ValueKind::Map => v.try_iter().map_or(true, |mut keys| {
                keys.all(|k| v.get_item(&k).map_or(true, |x| walk(&x, depth + 1, budget)))
            }),
            _ => true,
        }
    }
    if walk(value, 0, &mut 1_000_000) {
        Ok(())
    } else {
        Err(minijinja::Error::new(
            minijinja::ErrorKind::InvalidOperation,
            "value nests too deeply or contains itself",
        ))
    }
}

/// Most slots `slice` and `batch` may be asked for (they allocate them up front).
const MAX_TEMPLATE_GROUPS: usize = 100_000;

fn bounded_count(count: usize) -> std::result::Result<usize, minijinja::Error> {
    if count > MAX_TEMPLATE_GROUPS {
        Err(minijinja::Error::new(
            minijinja::ErrorKind::InvalidOperation,
            format!("slice/batch count {count} exceeds {MAX_TEMPLATE_GROUPS}"),
        ))
    } else {
        Ok(count)
    }
}

/// Collects rendered output, failing once it would exceed [`TEMPLATE_MAX_OUTPUT`].
struct BoundedWriter(Vec<u8>);

impl std::io::Write for BoundedWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.0.len().saturating_add(buf.len()) > TEMPLATE_MAX_OUTPUT {
            return Err(std::io::Error::other(format!(
                "the rendered chat exceeds {TEMPLATE_MAX_OUTPUT} bytes"
            )));
        }
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn tok_err(e: impl std::fmt::Display) -> Error {
    Error::Tokenizer(e.to_string())
}

/// `tokenizers::Tokenizer::from_bytes`, after checking the text is JSON (strings included:
/// escapes must be valid code points). tokenizers 0.22 panics (`expect("Helper")` in its
/// decoder deserializer) on malformed JSON inside `"decoder"`, e.g. a truncated object or a
/// lone surrogate escape (found by fuzzing).
fn tokenizer_from_json(json: &[u8]) -> Result<tokenizers::Tokenizer> {
    serde_json::from_slice::<Value>(json).map_err(tok_err)?;
    tokenizers::Tokenizer::from_bytes(json).map_err(tok_err)
}

/// The Llama 3 pre-tokenizer's split (also Qwen2's with `\p{N}` in place of `\p{N}{1,3}`).
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The normalizer, pre-tokenizer and BPE `ignore_merges` of the Hugging Face `tokenizer.json`
/// of the models whose GGUF `tokenizer.ggml.pre` (llama.cpp's name) is `pre`. `None`: a name
/// convoy does not know, which must not fall back to some other model's rules (the text
/// would tokenize differently from how the model was trained, without any error).
fn byte_level_pre(pre: &str) -> Option<(Value, Value, bool)> {
    let byte_level = |use_regex: bool| {
        json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true,
               "use_regex": use_regex})
    };
    let split = |regex: &str| {
        json!({"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated",
               "invert": false})
    };
    let sequence = |parts: Vec<Value>| json!({"type": "Sequence", "pretokenizers": parts});
    Some(match pre {
        // SmolLM/SmolLM2: single digits, then GPT-2's split.
        "smollm" => (
            Value::Null,
            sequence(vec![
                json!({"type": "Digits", "individual_digits": true}),
                byte_level(true),
            ]),
            false,
        ),
        // GPT-2's split inside the byte-level step.
        "gpt2" | "gpt-2" => (Value::Null, byte_level(true), false),
        // Llama 3.x: numbers in groups of up to 3; a word in the vocabulary is one token
        // whatever the merges say.
        "llama-bpe" | "llama3" | "llama-v3" => (
            Value::Null,
            sequence(vec![split(LLAMA3_SPLIT), byte_level(false)]),
            true,
        ),
        // Qwen2, Qwen2.5, Qwen3: NFC first, single digits.
        "qwen2" => (
            json!({"type": "NFC"}),
            sequence(vec![split(QWEN2_SPLIT), byte_level(false)]),
            false,
        ),
        _ => return None,
    })
}

/// The `tokenizer.json` of a byte-level BPE GGUF vocabulary (`tokenizer.ggml.model = gpt2`).
/// Control (3) and user-defined (4) tokens become added tokens, matched whole in the text.
fn byte_level_spec(
    pre: Option<&str>,
    tokens: &[String],
    types: &[i64],
    merges: Vec<String>,
) -> Result<Value> {
    let (normalizer, pre_tokenizer, ignore_merges) =
        byte_level_pre(pre.unwrap_or("")).ok_or_else(|| {
            Error::UnsupportedTokenizer(match pre {
                Some(p) => format!(
                    "GGUF pre-tokenizer tokenizer.ggml.pre = {p:?} (convoy knows smollm, gpt2, \
                     llama-bpe and qwen2; use the model's folder with tokenizer.json instead)"
                ),
                None => "a byte-level BPE GGUF without tokenizer.ggml.pre (convert the model \
                         again with a recent llama.cpp, or use its folder with tokenizer.json)"
                    .into(),
            })
        })?;
    let vocab: serde_json::Map<String, Value> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), json!(i)))
        .collect();
    Ok(json!({
        "version": "1.0",
        "added_tokens": added_tokens(tokens, types, &[3, 4]),
        "normalizer": normalizer,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null,
                  "continuing_subword_prefix": null, "end_of_word_suffix": null,
                  "fuse_unk": false, "byte_fallback": false, "ignore_merges": ignore_merges,
                  "vocab": vocab, "merges": merges}
    }))
}

/// The added tokens of a GGUF vocabulary: the tokens whose type is in `kinds` (2 unknown,
/// 3 control, 4 user-defined), special unless user-defined. A type list longer than the
/// token list describes no tokens beyond it.
fn added_tokens(tokens: &[String], types: &[i64], kinds: &[i64]) -> Vec<Value> {
    types
        .iter()
        .zip(tokens)
        .enumerate()
        .filter(|(_, (t, _))| kinds.contains(t))
        .map(|(i, (&t, content))| {
            json!({"id": i, "content": content, "single_word": false, "lstrip": false,
                   "rstrip": false, "normalized": false, "special": t != 4})
        })
        .collect()
}

/// The `tokenizer.json` of a SentencePiece BPE GGUF vocabulary (`tokenizer.ggml.model =
/// llama`: Llama 2, Mistral v0.1-v0.3, ...), as Hugging Face's converter writes it: spaces as
/// `▁` (and one in front, with `add_space_prefix`), unknown bytes as `<0xNN>` tokens, and BPE
/// merges derived from the pieces' scores ([`sentencepiece_merges`]).
fn sentencepiece_spec(
    tokens: &[String],
    scores: &[f64],
    types: &[i64],
    unk: Option<String>,
    add_space_prefix: bool,
) -> std::result::Result<Value, String> {
    let vocab: serde_json::Map<String, Value> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), json!(i)))
        .collect();
    let replace = json!({"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"});
    let (normalizer, strip) = if add_space_prefix {
        (
            json!({"type": "Sequence", "normalizers": [
                {"type": "Prepend", "prepend": "\u{2581}"}, replace]}),
            vec![json!({"type": "Strip", "content": " ", "start": 1, "stop": 0})],
        )
    } else {
        (replace, vec![])
    };
    let mut decoders = vec![
        json!({"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "}),
        json!({"type": "ByteFallback"}),
        json!({"type": "Fuse"}),
    ];
    decoders.extend(strip);
    let merges: Vec<String> = sentencepiece_merges(tokens, scores)?
        .into_iter()
        .map(|(l, r)| format!("{l} {r}"))
        .collect();
    Ok(json!({
        "version": "1.0",
        "added_tokens": added_tokens(tokens, types, &[2, 3, 4]),
        "normalizer": normalizer,
        "pre_tokenizer": null,
        "post_processor": null,
        "decoder": {"type": "Sequence", "decoders": decoders},
        "model": {"type": "BPE", "dropout": null, "unk_token": unk,
                  "continuing_subword_prefix": null, "end_of_word_suffix": null,
                  "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
                  "vocab": vocab, "merges": merges}
    }))
}

/// At most this many merges per token, and bytes of merges in all, from a SentencePiece
/// vocabulary. Real ones have about two merges per token (Llama 2: 59k for 32k pieces); a
/// vocabulary of every prefix of one long run ("a", "aa", ...) would have millions of merges
/// and gigabytes of text from a file of a few megabytes.
const MAX_MERGES_PER_TOKEN: usize = 16;
const MAX_MERGE_BYTES: usize = 256 << 20;

/// BPE merges equivalent to a SentencePiece BPE model, as Hugging Face's
/// `SentencePieceExtractor` derives them: every split of every piece into two pieces of the
/// vocabulary, ranked by the merged piece's score (highest first; ties keep vocabulary
/// order), the splits of one piece by their parts' ids.
fn sentencepiece_merges(
    tokens: &[String],
    scores: &[f64],
) -> std::result::Result<Vec<(String, String)>, String> {
    let (max_merges, mut bytes) = (MAX_MERGES_PER_TOKEN * tokens.len().max(64), 0usize);
    let ids: std::collections::HashMap<&str, usize> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.as_str(), i))
        .collect();
    let mut merges: Vec<(&str, &str, f64)> = Vec::new();
    for (piece, &score) in tokens.iter().zip(scores) {
        let mut local: Vec<(&str, &str)> = piece
            .char_indices()
            .skip(1)
            .map(|(at, _)| piece.split_at(at))
            .filter(|(l, r)| ids.contains_key(l) && ids.contains_key(r))
            .collect();
        local.sort_by_key(|(l, r)| (ids[l], ids[r]));
        bytes += local.len() * (piece.len() + 1);
        merges.extend(local.into_iter().map(|(l, r)| (l, r, score)));
        if merges.len() > max_merges || bytes > MAX_MERGE_BYTES {
            return Err(format!(
                "a SentencePiece vocabulary of {} pieces that splits into more than {} merges \
                 ({} bytes): not a real tokenizer",
                tokens.len(),
                merges.len(),
                bytes
            ));
        }
    }
    // Stable: equal scores keep their order.
    merges.sort_by(|a, b| b.2.total_cmp(&a.2));
    Ok(merges
        .into_iter()
        .map(|(l, r, _)| (l.to_owned(), r.to_owned()))
        .collect())
}

impl Tokenizer {
    /// The tokenizer a GGUF file describes, read without MLX and without the weights (a
    /// llama.cpp vocab-only file is enough). The file's structure is checked first.
    pub fn from_gguf_file(path: impl AsRef<Path>) -> Result<Self> {
        Self::from_gguf(&crate::model::gguf::read_metadata(path.as_ref())?)
    }

    /// Builds the tokenizer described by a GGUF file's metadata: the `tokenizer.json` the
    /// model's own Hugging Face tokenizer has, rebuilt from the vocabulary, merges (or
    /// SentencePiece scores) and token types, with the pre-tokenizer that
    /// `tokenizer.ggml.pre` names (see [`byte_level_pre`]).
    pub(crate) fn from_gguf(meta: &impl Metadata) -> Result<Self> {
        let corrupt = |reason: String| Error::CorruptModel {
            path: meta.path().to_owned(),
            reason,
        };
        let model = meta.string("tokenizer.ggml.model")?;
        let tokens = meta
            .strings("tokenizer.ggml.tokens")?
            .ok_or_else(|| corrupt("no tokenizer.ggml.tokens".into()))?;
        // A missing or unreadable type list means every token is a normal one.
        let types = meta
            .integers("tokenizer.ggml.token_type")
            .ok()
            .flatten()
            .unwrap_or_default();
        let id = |key: &str| -> Result<Option<u32>> {
            match meta.number(key)? {
                // -1 or other non-ids mean "none".
                Some(v) if (0.0..=u32::MAX as f64).contains(&v) && v.fract() == 0.0 => {
                    Ok(Some(v as u32))
                }
                _ => Ok(None),
            }
        };
        let spec = match model.as_deref() {
            Some("gpt2") => {
                let pre = meta.string("tokenizer.ggml.pre")?;
                let merges = meta.strings("tokenizer.ggml.merges")?.unwrap_or_default();
                byte_level_spec(pre.as_deref(), &tokens, &types, merges)?
            }
            Some("llama") => {
                let scores = meta
                    .floats("tokenizer.ggml.scores")?
                    .ok_or_else(|| corrupt("a SentencePiece vocabulary without scores".into()))?;
                if scores.len() != tokens.len() {
                    return Err(corrupt(format!(
                        "{} scores for {} tokens",
                        scores.len(),
                        tokens.len()
                    )));
                }
                let add_space_prefix = meta
                    .number("tokenizer.ggml.add_space_prefix")
                    .ok()
                    .flatten()
                    .is_none_or(|v| v != 0.0);
                let unk = id("tokenizer.ggml.unknown_token_id")?
                    .and_then(|i| tokens.get(i as usize).cloned());
                sentencepiece_spec(&tokens, &scores, &types, unk, add_space_prefix)
                    .map_err(corrupt)?
            }
            other => {
                return Err(Error::UnsupportedTokenizer(format!(
                    "GGUF tokenizer model {other:?} (convoy builds byte-level BPE \"gpt2\" and \
                     SentencePiece \"llama\" tokenizers from GGUF; use the model's folder with \
                     tokenizer.json instead)"
                )))
            }
        };
        let inner = tokenizer_from_json(spec.to_string().as_bytes())?;
        let bos = id("tokenizer.ggml.bos_token_id")?;
        let eos = id("tokenizer.ggml.eos_token_id")?;
        let add_bos = meta
            .number("tokenizer.ggml.add_bos_token")
            .ok()
            .flatten()
            .is_some_and(|v| v != 0.0);
        let template = meta.string("tokenizer.chat_template")?;
        let text = |id: Option<u32>| {
            id.and_then(|i| tokens.get(i as usize).cloned())
                .unwrap_or_default()
        };
        let mut eos_ids: Vec<u32> = eos.into_iter().collect();
        // ChatML models end a turn with <|im_end|>; treat it as end of sequence too.
        if let Some(im_end) = inner.token_to_id("<|im_end|>") {
            if !eos_ids.contains(&im_end) {
                eos_ids.push(im_end);
            }
        }
        Self::new(inner, bos, eos_ids, add_bos, text(bos), text(eos), template)
    }

    /// Loads `tokenizer.json` and `tokenizer_config.json` from a model folder.
    pub(crate) fn from_folder(dir: &Path, config_eos: &[u32]) -> Result<Self> {
        let tj = dir.join("tokenizer.json");
        let json = std::fs::read(&tj).map_err(|e| {
            if tj.exists() {
                Error::CorruptModel {
                    path: tj.clone(),
                    reason: e.to_string(),
                }
            } else {
                Error::ModelNotFound {
                    path: tj.clone(),
                    reason: "no tokenizer.json in the model folder".into(),
                }
            }
        })?;
        let config = std::fs::read_to_string(dir.join("tokenizer_config.json")).ok();
        let template_file = || std::fs::read_to_string(dir.join("chat_template.jinja")).ok();
        Self::from_json_parts(&json, &tj, config.as_deref(), template_file, config_eos)
    }

    /// Builds a tokenizer from the contents of `tokenizer.json` (`tj_path` names it in errors),
    /// of `tokenizer_config.json` if there is one, and of `chat_template.jinja` (asked for only
    /// when the config has no template).
    pub(crate) fn from_json_parts(
        json: &[u8],
        tj_path: &Path,
        config: Option<&str>,
        template_file: impl FnOnce() -> Option<String>,
        config_eos: &[u32],
    ) -> Result<Self> {
        let inner = tokenizer_from_json(json).map_err(|e| Error::CorruptModel {
            path: tj_path.to_owned(),
            reason: e.to_string(),
        })?;
        let cfg: Value = config
            .and_then(|s| serde_json::from_str(s).ok())
            .unwrap_or(Value::Null);
        let token_text = |v: &Value| -> Option<String> {
            match v {
                Value::String(s) => Some(s.clone()),
                Value::Object(o) => o.get("content").and_then(|c| c.as_str()).map(str::to_owned),
                _ => None,
            }
        };
        let bos_text = token_text(&cfg["bos_token"]).unwrap_or_default();
        let eos_text = token_text(&cfg["eos_token"]).unwrap_or_default();
        let bos = inner.token_to_id(&bos_text);
        let mut eos: Vec<u32> = config_eos.to_vec();
        if let Some(e) = inner.token_to_id(&eos_text) {
            if !eos.contains(&e) {
                eos.push(e);
            }
        }
        let add_bos = cfg["add_bos_token"].as_bool().unwrap_or(false);
        let template = match &cfg["chat_template"] {
            Value::String(s) => Some(s.clone()),
            // A list of named templates: take "default".
            Value::Array(list) => list
                .iter()
                .find(|t| t["name"] == "default")
                .and_then(|t| t["template"].as_str())
                .map(str::to_owned),
            _ => template_file(),
        };
        // Encoding is done explicitly (BOS per add_bos_token), so drop any post-processor
        // special tokens only by passing add_special_tokens = false when encoding.
        Self::new(inner, bos, eos, add_bos, bos_text, eos_text, template)
    }

    fn new(
        inner: tokenizers::Tokenizer,
        bos: Option<u32>,
        eos: Vec<u32>,
        add_bos: bool,
        bos_text: String,
        eos_text: String,
        template: Option<String>,
    ) -> Result<Self> {
        let template = template
            .map(|source| ChatTemplate::new(source, TEMPLATE_FUEL))
            .transpose()?;
        Ok(Self {
            inner,
            bos,
            eos,
            add_bos,
            bos_text,
            eos_text,
            template,
        })
    }

    /// The tokenizer as `tokenizer.json` text (e.g. to write a model folder).
    pub fn to_json(&self) -> Result<String> {
        self.inner.to_string(false).map_err(tok_err)
    }

    /// Number of token ids, including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Token ids that end generation (EOS and end-of-turn).
    pub fn eos_ids(&self) -> &[u32] {
        &self.eos
    }

    /// Whether the model has a chat template.
    pub fn has_chat_template(&self) -> bool {
        self.template.is_some()
    }

    /// Encodes text; special-token text such as `<|im_start|>` maps to its id. A BOS token is
    /// prepended when the model asks for one and `add_bos` is true.
    pub fn encode(&self, text: &str, add_bos: bool) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, false).map_err(tok_err)?;
        let mut ids = Vec::with_capacity(enc.len() + 1);
        if add_bos && self.add_bos {
            if let Some(b) = self.bos {
                if enc.get_ids().first() != Some(&b) {
                    ids.push(b);
                }
            }
        }
        ids.extend_from_slice(enc.get_ids());
        Ok(ids)
    }

    /// Decodes ids to text, skipping special tokens.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, true).map_err(tok_err)
    }

    /// Decodes ids to text; special tokens (such as `<|im_end|>`) are written out unless
    /// `skip_special`. Ids outside the vocabulary are an `InvalidArgument` error.
    pub fn decode_with(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        let vocab = self.vocab_size() as u32;
        if let Some(bad) = ids.iter().find(|&&t| t >= vocab) {
            return Err(Error::InvalidArgument(format!(
                "token id {bad} is outside the vocabulary of {vocab}"
            )));
        }
        self.inner.decode(ids, skip_special).map_err(tok_err)
    }

    /// The beginning-of-sequence token, if the model has one.
    pub fn bos_id(&self) -> Option<u32> {
        self.bos
    }

    /// Renders `messages` with the model's chat template.
    pub fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String> {
        let template = self.template.as_ref().ok_or_else(|| {
            Error::Template("this model has no chat template; submit a plain prompt".into())
        })?;
        template.render(
            messages,
            add_generation_prompt,
            &self.bos_text,
            &self.eos_text,
        )
    }

    /// Renders and encodes a chat in one go (the template supplies BOS where the model wants it).
    pub fn encode_chat(&self, messages: &[ChatMessage]) -> Result<Vec<u32>> {
        let text = self.apply_chat_template(messages, true)?;
        self.encode(&text, false)
    }

    /// Checks that this tokenizer can drive a model with `config`.
    pub(crate) fn check_fits(&self, config: &ModelConfig) -> Result<()> {
        let n = self.vocab_size();
        if n > config.vocab_size {
            return Err(Error::TokenizerMismatch(format!(
                "the tokenizer has {n} tokens but the model's vocabulary has {}; use the \
                 tokenizer that ships with this model",
                config.vocab_size
            )));
        }
        if let Some(bos) = self.bos.filter(|&b| b as usize >= config.vocab_size) {
            return Err(Error::TokenizerMismatch(format!(
                "beginning-of-sequence id {bos} is outside the model's vocabulary of {}",
                config.vocab_size
            )));
        }
        if let Some(bad) = self.eos.iter().find(|&&e| e as usize >= config.vocab_size) {
            return Err(Error::TokenizerMismatch(format!(
                "end-of-sequence id {bad} is outside the model's vocabulary of {}",
                config.vocab_size
            )));
        }
        Ok(())
    }
}

/// Decodes token ids to text; what [`IncrementalDecoder`] needs (lets the scheduler be tested
/// without a model).
pub trait TextDecoder {
    fn decode_ids(&self, ids: &[u32]) -> Result<String>;
}

impl TextDecoder for Tokenizer {
    fn decode_ids(&self, ids: &[u32]) -> Result<String> {
        self.decode(ids)
    }
}

/// Most ids the incremental decoder's window holds: one token of context plus up to 4
/// byte-level tokens of one UTF-8 character, with room to spare.
pub const MAX_PENDING: usize = 8;

/// Turns a stream of token ids into text deltas that never split a UTF-8 character.
///
/// Keeps a short window of ids: decoding `window` and `window + new` and emitting the
/// difference handles byte-level tokens that carry part of a character, and tokenizers whose
/// decoding of a token depends on its neighbour (leading-space handling).
#[derive(Debug, Default, Clone)]
pub struct IncrementalDecoder {
    ids: Vec<u32>,
    /// How many of `ids` are context only (already emitted): 0 or 1.
    context: usize,
    /// What the context decodes to.
    prefix: String,
}

impl IncrementalDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds one token and returns the text it completes (possibly empty). Work per token is
    /// bounded: the window never holds more than [`MAX_PENDING`] ids.
    pub fn push(&mut self, tokenizer: &dyn TextDecoder, id: u32) -> Result<String> {
        self.ids.push(id);
        let mut text = tokenizer.decode_ids(&self.ids)?;
        if !text.starts_with(self.prefix.as_str()) {
            // The context decodes differently once extended: start over without it.
            self.ids = vec![id];
            self.context = 0;
            self.prefix.clear();
            text = tokenizer.decode_ids(&self.ids)?;
        }
        let delta = &text[self.prefix.len()..];
        if delta.is_empty() {
            if self.context > 0 {
                // No text after context that has text: a special token (skipped when
                // decoding). Drop it, or every later token would re-decode it.
                self.ids.pop();
            } else if self.ids.len() >= MAX_PENDING {
                // Nothing to show for a whole window (e.g. specials at the very start).
                self.ids.clear();
            }
            // Otherwise hold: at the start, a piece may only show with what follows it
            // (SentencePiece drops the leading space of the first piece it decodes).
            return Ok(String::new());
        }
        let incomplete = delta.ends_with('\u{FFFD}');
        if incomplete && self.ids.len() < MAX_PENDING {
            // Part of a multi-byte character: hold it until the character completes.
            return Ok(String::new());
        }
        let delta = delta.to_owned();
        if incomplete {
            // A window this long that still ends in U+FFFD is not going to complete (a UTF-8
            // character has at most 4 bytes): it went out lossily; start afresh.
            self.ids.clear();
            self.context = 0;
            self.prefix.clear();
        } else {
            // Keep the last token as context for the next one.
            self.ids.drain(..self.ids.len() - 1);
            self.context = 1;
            self.prefix = tokenizer.decode_ids(&self.ids)?;
        }
        Ok(delta)
    }

    /// Text still held back (an incomplete character at the end), lossily decoded.
    pub fn flush(&mut self, tokenizer: &dyn TextDecoder) -> Result<String> {
        let text = tokenizer.decode_ids(&self.ids)?;
        let rest = match text.strip_prefix(self.prefix.as_str()) {
            Some(rest) => rest.to_owned(),
            None => tokenizer.decode_ids(&self.ids[self.context.min(self.ids.len())..])?,
        };
        self.ids.clear();
        self.context = 0;
        self.prefix.clear();
        Ok(rest)
    }
}

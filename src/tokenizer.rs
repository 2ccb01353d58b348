//! Tokenizing (HF `tokenizers`), chat templates (`minijinja`), and incremental detokenizing.
//!
//! A tokenizer comes from `tokenizer.json` (+ `tokenizer_config.json`) in a model folder, or is
//! built from GGUF metadata: a byte-level BPE over `tokenizer.ggml.tokens`/`merges` with the
//! digit-splitting pre-tokenizer SmolLM/Llama-3 style models use, special tokens from the
//! token types. Rendering a chat uses the model's own Jinja template.
use std::path::Path;

use minijinja::{context, Environment};
use mlx_rs::io::GgufFile;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::error::{Error, Result};
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
    template: Option<Environment<'static>>,
}

fn tok_err(e: impl std::fmt::Display) -> Error {
    Error::Tokenizer(e.to_string())
}

impl Tokenizer {
    /// Builds the tokenizer described by a GGUF file's metadata.
    pub(crate) fn from_gguf(file: &GgufFile, path: &Path) -> Result<Self> {
        let corrupt = |reason: String| Error::CorruptModel {
            path: path.to_owned(),
            reason,
        };
        let strings = |key: &str| {
            file.get_metadata_strings(key)
                .map_err(|e| corrupt(format!("{key}: {e}")))
        };
        let number = |key: &str| -> Result<Option<i64>> {
            match file.get_metadata_array(key) {
                Ok(Some(a)) => Ok(Some(
                    a.try_item_cast::<i64>()
                        .map_err(|e| Error::Mlx(e.to_string()))?,
                )),
                Ok(None) => Ok(None),
                Err(e) => Err(corrupt(format!("{key}: {e}"))),
            }
        };
        let model = crate::model::gguf::meta_string(file, "tokenizer.ggml.model")?;
        if model.as_deref() != Some("gpt2") {
            return Err(Error::Tokenizer(format!(
                "GGUF tokenizer model {model:?} is not supported (convoy builds byte-level BPE \
                 'gpt2' tokenizers from GGUF; use the model's folder with tokenizer.json instead)"
            )));
        }
        let tokens = strings("tokenizer.ggml.tokens")?
            .ok_or_else(|| corrupt("no tokenizer.ggml.tokens".into()))?;
        let merges = strings("tokenizer.ggml.merges")?.unwrap_or_default();
        let types: Vec<i32> = match file.get_metadata_array("tokenizer.ggml.token_type") {
            Ok(Some(a)) => a.as_type::<i32>()?.as_slice::<i32>().to_vec(),
            _ => vec![1; tokens.len()],
        };
        let vocab: serde_json::Map<String, Value> = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), json!(i)))
            .collect();
        // Control (3) and user-defined (4) tokens are matched whole in the input text.
        let added: Vec<Value> = types
            .iter()
            .enumerate()
            .filter(|(_, &t)| t == 3 || t == 4)
            .map(|(i, &t)| {
                json!({"id": i, "content": tokens[i], "single_word": false, "lstrip": false,
                       "rstrip": false, "normalized": false, "special": t == 3})
            })
            .collect();
        let spec = json!({
            "version": "1.0",
            "added_tokens": added,
            "normalizer": null,
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                {"type": "Digits", "individual_digits": true},
                {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}
            ]},
            "post_processor": null,
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
            "model": {"type": "BPE", "dropout": null, "unk_token": null,
                      "continuing_subword_prefix": null, "end_of_word_suffix": null,
                      "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                      "vocab": vocab, "merges": merges}
        });
        let inner =
            tokenizers::Tokenizer::from_bytes(spec.to_string().as_bytes()).map_err(tok_err)?;
        let id = |key: &str| -> Result<Option<u32>> { Ok(number(key)?.map(|v| v as u32)) };
        let bos = id("tokenizer.ggml.bos_token_id")?;
        let eos = id("tokenizer.ggml.eos_token_id")?;
        let add_bos = match file.get_metadata_array("tokenizer.ggml.add_bos_token") {
            Ok(Some(a)) => {
                a.try_item_cast::<i32>()
                    .map_err(|e| Error::Mlx(e.to_string()))?
                    != 0
            }
            _ => false,
        };
        let template = crate::model::gguf::meta_string(file, "tokenizer.chat_template")?;
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
        let inner = tokenizers::Tokenizer::from_file(&tj).map_err(|e| {
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
        let cfg: Value = std::fs::read_to_string(dir.join("tokenizer_config.json"))
            .ok()
            .and_then(|s| serde_json::from_str(&s).ok())
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
            _ => std::fs::read_to_string(dir.join("chat_template.jinja")).ok(),
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
        let template = match template {
            Some(source) => {
                let mut env = Environment::new();
                minijinja_contrib::add_to_environment(&mut env);
                env.set_unknown_method_callback(
                    minijinja_contrib::pycompat::unknown_method_callback,
                );
                env.add_function(
                    "raise_exception",
                    |msg: String| -> std::result::Result<String, minijinja::Error> {
                        Err(minijinja::Error::new(
                            minijinja::ErrorKind::InvalidOperation,
                            msg,
                        ))
                    },
                );
                env.add_template_owned("chat", source)
                    .map_err(|e| Error::Template(e.to_string()))?;
                Some(env)
            }
            None => None,
        };
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

    /// Renders `messages` with the model's chat template.
    pub fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String> {
        let env = self.template.as_ref().ok_or_else(|| {
            Error::Template("this model has no chat template; submit a plain prompt".into())
        })?;
        let tmpl = env
            .get_template("chat")
            .map_err(|e| Error::Template(e.to_string()))?;
        tmpl.render(context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => &self.bos_text,
            eos_token => &self.eos_text,
        })
        .map_err(|e| Error::Template(e.to_string()))
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

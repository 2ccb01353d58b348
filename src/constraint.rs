//! Structured output: a request may constrain what it generates to a JSON schema, a regular
//! expression or a Lark grammar. [llguidance](https://github.com/guidance-ai/llguidance)
//! (the constraint engine llama.cpp, vLLM, SGLang and mistral.rs use) compiles the constraint
//! into a parser over the model's token bytes and, at each step, answers which tokens may come
//! next; the runner masks the others out of that row's logits before choosing.
//!
//! Why llguidance rather than our own automaton: it covers JSON Schema (with `$ref`),
//! regexes and full Lark grammars, computes a 49k-token mask in tens of microseconds
//! (its token trie walks only prefixes the lexer can still accept), bounds the work a
//! pathological grammar may cost (`ParserLimits`), and is maintained by the people who
//! wrote the approach. We use only its Rust API (no FFI, no thread pool of its own).
//!
//! Each row owns its [`RowConstraint`]: there is no shared mutable state between requests,
//! so one request's constraint cannot leak into another's (a bug other servers shipped).
use std::sync::Arc;

use llguidance::api::TopLevelGrammar;
use llguidance::{Matcher, ParserFactory};
use toktrie::{TokEnv, TokRxInfo, TokTrie, TokenId, TokenizerEnv};

use crate::error::{Error, Result};
use crate::tokenizer::Tokenizer;

/// What a constrained request's output must match.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Constraint {
    /// A JSON Schema (as JSON text). The output is one JSON value valid under it, on one
    /// line with `", "` and `": "` separators (llguidance's `x-guidance` options in the
    /// schema override that); `{}` asks for any JSON value, `{"type": "object"}` any object.
    JsonSchema(String),
    /// A regular expression the whole output must match (Rust `regex` syntax, anchored at
    /// both ends).
    Regex(String),
    /// A grammar in llguidance's Lark dialect (`start:` is the top rule; `%json {...}`
    /// embeds a JSON schema, `/.../` a regex).
    Lark(String),
}

impl Constraint {
    fn grammar(&self) -> Result<TopLevelGrammar> {
        Ok(match self {
            Self::JsonSchema(text) => {
                let mut schema: serde_json::Value = serde_json::from_str(text).map_err(|e| {
                    Error::InvalidArgument(format!("the JSON schema is not valid JSON: {e}"))
                })?;
                // One line, separators as Python's json.dumps writes them (what models saw
                // most): llguidance's default lets whitespace run between any two tokens, and
                // small models then emit newlines until max_tokens. A schema's own
                // `x-guidance` options win.
                if let Some(map) = schema.as_object_mut() {
                    map.entry("x-guidance").or_insert_with(|| {
                        serde_json::json!({
                            "whitespace_flexible": false,
                            "item_separator": ", ",
                            "key_separator": ": ",
                        })
                    });
                }
                TopLevelGrammar::from_json_schema(schema)
            }
            Self::Regex(rx) => TopLevelGrammar::from_regex(rx),
            Self::Lark(lark) => TopLevelGrammar::from_lark(lark.clone()),
        })
    }

    fn kind(&self) -> &'static str {
        match self {
            Self::JsonSchema(_) => "JSON schema",
            Self::Regex(_) => "regex",
            Self::Lark(_) => "grammar",
        }
    }
}

/// The model's tokens as llguidance sees them: each id's bytes (special tokens marked so no
/// text can produce them), the end-of-sequence ids, and the tokenizer for forced text.
struct TokenizerBytes {
    trie: TokTrie,
    tokenizer: Arc<Tokenizer>,
}

impl TokenizerEnv for TokenizerBytes {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        // The HF encoder where it gives back exactly these bytes; SentencePiece tokenizers
        // prepend a space (and text like `<|x|>` may become a special token), so otherwise
        // the trie's greedy tokenization.
        if let Ok(text) = std::str::from_utf8(s) {
            if let Ok(ids) = self.tokenizer.encode(text, false) {
                let vocab = self.trie.vocab_size() as u32;
                if ids.iter().all(|&t| t < vocab) && self.trie.decode_raw(&ids) == s {
                    return ids;
                }
            }
        }
        self.trie.greedy_tokenize(s)
    }
}

/// Compiles constraints for one model (its tokenizer). Building it walks the vocabulary once
/// (about 0.2 s for 49k tokens), so an engine builds it at the first constrained request.
pub struct Grammars {
    factory: ParserFactory,
}

impl Grammars {
    pub fn new(tokenizer: Arc<Tokenizer>) -> Result<Self> {
        // toktrie asserts on inconsistent vocabularies: an error, never a panic in the host.
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| Self::build(tokenizer)))
            .unwrap_or_else(|_| {
                Err(Error::InvalidArgument(
                    "constrained output is not available for this model's tokenizer: \
                     its token table is inconsistent"
                        .into(),
                ))
            })
    }

    fn build(tokenizer: Arc<Tokenizer>) -> Result<Self> {
        let fail = |e: &dyn std::fmt::Display| {
            Error::InvalidArgument(format!(
                "constrained output is not available for this model's tokenizer: {e}"
            ))
        };
        let eos = tokenizer.eos_ids().to_vec();
        let Some(&first_eos) = eos.first() else {
            return Err(fail(&"it has no end-of-sequence token"));
        };
        if let Some(bad) = eos.iter().find(|&&e| e as usize >= tokenizer.vocab_size()) {
            return Err(fail(&format!(
                "its end-of-sequence id {bad} is not a token"
            )));
        }
        let json: serde_json::Value =
            serde_json::from_str(&tokenizer.to_json()?).map_err(|e| fail(&e))?;
        let mut bytes = llguidance::token_bytes_from_tokenizer_json(&json).map_err(|e| fail(&e))?;
        let vocab = bytes.len().max(tokenizer.vocab_size());
        bytes.resize(vocab, Vec::new());
        let trie =
            TokTrie::from(&TokRxInfo::new(vocab as u32, first_eos), &bytes).with_eos_tokens(&eos);
        let env: TokEnv = Arc::new(TokenizerBytes { trie, tokenizer });
        let mut factory = ParserFactory::new_simple(&env).map_err(|e| fail(&e))?;
        // Errors come back as values; nothing is printed into the host's stderr.
        factory.quiet();
        Ok(Self { factory })
    }

    /// A fresh parser state for one request; an invalid constraint is `InvalidArgument` with
    /// the parser's message.
    pub fn compile(&self, constraint: &Constraint) -> Result<RowConstraint> {
        let grammar = constraint.grammar()?;
        let parser = self
            .factory
            .create_parser(grammar)
            .map_err(|e| Error::InvalidArgument(format!("invalid {}: {e}", constraint.kind())))?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(e) = matcher.get_error() {
            return Err(Error::InvalidArgument(format!(
                "invalid {}: {e}",
                constraint.kind()
            )));
        }
        let trie = self.factory.tok_env().tok_trie();
        let eos = trie.eos_tokens().to_vec();
        Ok(RowConstraint {
            matcher,
            vocab: trie.vocab_size(),
            eos,
            state: ConstraintState::Open,
        })
    }
}

/// Where a row's constraint stands after the tokens it consumed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConstraintState {
    /// More output is needed or allowed.
    Open,
    /// The output is complete: nothing more may follow (the request ends with `Stop`).
    Complete,
    /// The parser failed (a limit reached, an internal error); the request ends with
    /// `Error` and this message.
    Failed(String),
}

/// One request's constraint state: which tokens may come next.
pub struct RowConstraint {
    matcher: Matcher,
    /// The tokenizer's ids (the trie's size); the logits may be wider.
    vocab: usize,
    eos: Vec<u32>,
    state: ConstraintState,
}

impl std::fmt::Debug for RowConstraint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RowConstraint")
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

impl RowConstraint {
    /// The tokens allowed next, as one flag per id of a `vocab`-wide logits row (ids past
    /// the tokenizer's vocabulary are never allowed). Once the constraint is complete or
    /// failed, only end-of-sequence tokens are allowed (the scheduler ends the row first).
    pub fn mask(&mut self, vocab: usize) -> Vec<bool> {
        let mut flags = vec![false; vocab];
        if self.state == ConstraintState::Open {
            match self.matcher.compute_mask() {
                Ok(set) if set.num_set() > 0 => {
                    // The mask covers the tokenizer's ids; logits may be wider (Qwen, Phi-3,
                    // Gemma pad their embedding) or narrower.
                    let n = vocab.min(set.len()).min(self.vocab);
                    for (id, flag) in flags[..n].iter_mut().enumerate() {
                        *flag = set.is_allowed(id as TokenId);
                    }
                    return flags;
                }
                Ok(_) => self.fail("the constraint allows no next token".into()),
                Err(e) => self.fail(e.to_string()),
            }
        }
        for &e in &self.eos {
            if let Some(flag) = flags.get_mut(e as usize) {
                *flag = true;
            }
        }
        flags
    }

    /// Advances past a generated token.
    pub fn consume(&mut self, token: u32) {
        if self.state != ConstraintState::Open {
            return;
        }
        if let Err(e) = self.matcher.consume_token(token) {
            self.fail(e.to_string());
        } else if self.matcher.is_stopped() {
            self.state = ConstraintState::Complete;
        }
    }

    pub fn state(&self) -> &ConstraintState {
        &self.state
    }

    fn fail(&mut self, message: String) {
        // The first line: llguidance appends its parser state on later ones.
        let first = message.lines().next().unwrap_or_default().trim().to_owned();
        self.state = ConstraintState::Failed(format!("constrained output failed: {first}"));
    }
}

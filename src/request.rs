//! What a caller submits and what it gets back: requests, events, finish reasons, stats.
use crate::constraint::Constraint;
use crate::sampling::SamplingParams;
use crate::tokenizer::ChatMessage;

/// Identifies a request within one engine; never reused (ids start at 1).
pub type RequestId = u64;

/// The prompt of a request.
#[derive(Debug, Clone, PartialEq)]
pub enum Prompt {
    /// Raw text, tokenized as is (BOS added when the model asks for one).
    Text(String),
    /// Token ids, used as is.
    Tokens(Vec<u32>),
    /// Chat messages, rendered with the model's chat template plus the generation prompt.
    Chat(Vec<ChatMessage>),
}

/// When generation stops (besides cancellation and the context limit).
#[derive(Debug, Clone, PartialEq)]
pub struct StopConditions {
    /// Most tokens to generate (at least 1).
    pub max_tokens: usize,
    /// Do not stop at the model's end-of-sequence tokens (benchmarks).
    pub ignore_eos: bool,
    /// Extra token ids that end generation (the token is reported, as EOS is).
    pub stop_token_ids: Vec<u32>,
    /// Strings that end generation when they appear in the output text; not emitted.
    pub stop_strings: Vec<String>,
}

impl Default for StopConditions {
    fn default() -> Self {
        Self {
            max_tokens: 256,
            ignore_eos: false,
            stop_token_ids: Vec::new(),
            stop_strings: Vec::new(),
        }
    }
}

/// A generation request.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    pub prompt: Prompt,
    pub sampling: SamplingParams,
    pub stop: StopConditions,
    /// Structured output: what the generated text must match (JSON schema, regex or Lark
    /// grammar), checked at submit (`InvalidArgument` with the parser's message). The
    /// request ends with `Stop` once the output is complete: at the end-of-sequence token
    /// the constraint allowed (reported as usual), or at the last token when nothing may
    /// follow it; with `Length` if `max_tokens` comes first.
    pub constraint: Option<Constraint>,
}

impl Request {
    /// A greedy request for `prompt` with default limits.
    pub fn new(prompt: Prompt) -> Self {
        Self {
            prompt,
            sampling: SamplingParams::default(),
            stop: StopConditions::default(),
            constraint: None,
        }
    }

    /// Sets the output constraint.
    pub fn constrained(mut self, constraint: Constraint) -> Self {
        self.constraint = Some(constraint);
        self
    }

    /// Sets `max_tokens`.
    pub fn max_tokens(mut self, n: usize) -> Self {
        self.stop.max_tokens = n;
        self
    }
}

/// Why a request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum FinishReason {
    /// `max_tokens` or the context limit was reached.
    Length = 1,
    /// An end-of-sequence token, a stop token or a stop string.
    Stop = 2,
    /// Cancelled by the caller or by engine shutdown.
    Cancelled = 3,
    /// The engine failed while running the request.
    Error = 4,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Length => "length",
            Self::Stop => "stop",
            Self::Cancelled => "cancelled",
            Self::Error => "error",
        }
    }
}

/// Per-request timing and counts, reported with the terminal event.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct RequestStats {
    pub prompt_tokens: usize,
    /// Prompt tokens whose KV came from the prefix cache instead of being computed.
    pub cached_tokens: usize,
    pub generated_tokens: usize,
    /// Submit to first generated token, seconds (0 if none was generated).
    pub time_to_first_token: f64,
    /// Seconds spent waiting before admission into a batch.
    pub queue_time: f64,
    /// Prompt tokens computed per second of prefill (admission to first token); tokens taken
    /// from the prefix cache are not counted.
    pub prompt_tps: f64,
    /// Generated tokens per second after the first one.
    pub generation_tps: f64,
    /// Submit to finish, seconds.
    pub total_latency: f64,
}

/// What poll returns for a request.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// One generated token, with the text it completes (may be empty while a multi-byte
    /// character or a possible stop string is held back).
    Token {
        id: RequestId,
        token: u32,
        text: String,
        /// The token's log-probability and the most likely alternatives, when the request
        /// asked for them ([`SamplingParams::logprobs`](crate::sampling::SamplingParams)).
        logprobs: Option<TokenLogprobs>,
    },
    /// The request ended; always the last event of a request, exactly once.
    Finished {
        id: RequestId,
        reason: FinishReason,
        /// Text held back until the end (e.g. an incomplete character), if any.
        text: String,
        stats: RequestStats,
        /// Set when `reason` is `Error`.
        error: Option<String>,
    },
}

/// Log-probabilities of one generated token under the model's distribution for that step
/// (the log-softmax of its raw logits: before temperature, penalties or truncation).
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprobs {
    /// The chosen token's log-probability.
    pub logprob: f32,
    /// The most likely tokens and their log-probabilities, most likely first (as many as
    /// asked for, at most the vocabulary; ties in any order).
    pub top: Vec<(u32, f32)>,
}

impl Event {
    pub fn request_id(&self) -> RequestId {
        match self {
            Self::Token { id, .. } | Self::Finished { id, .. } => *id,
        }
    }
}

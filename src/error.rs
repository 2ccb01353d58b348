//! The crate's error type. Every variant says what went wrong and, where the caller can act,
//! what to do; the C ABI maps each variant to one `convoy_status` value.
use std::path::PathBuf;

/// Result alias used throughout convoy.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in convoy.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The model path does not exist or cannot be read.
    #[error("model not found at {path}: {reason}")]
    ModelNotFound { path: PathBuf, reason: String },
    /// The model files exist but are damaged or incomplete.
    #[error("model file {path} is corrupt or truncated: {reason}. Re-download it.")]
    CorruptModel { path: PathBuf, reason: String },
    /// The model uses an architecture convoy does not implement.
    #[error("unsupported architecture {0:?}: convoy supports llama (Llama 2/3.x, SmolLM2), mistral, qwen2, qwen3, phi3 (Phi-3, Phi-4) and gemma3 (text)")]
    UnsupportedArchitecture(String),
    /// The model's tokenizer is of a kind convoy cannot reproduce faithfully (e.g. a GGUF
    /// pre-tokenizer it does not know).
    #[error("unsupported tokenizer: {0}")]
    UnsupportedTokenizer(String),
    /// The weights use a quantization convoy cannot run.
    #[error("unsupported quantization: {0}")]
    UnsupportedQuantization(String),
    /// A tensor that the architecture needs is absent or has the wrong shape.
    #[error("bad weights: {0}")]
    BadWeights(String),
    /// The tokenizer does not fit the model (vocabulary size, special tokens).
    #[error("tokenizer does not match the model: {0}")]
    TokenizerMismatch(String),
    /// The tokenizer could not be built or failed to encode/decode.
    #[error("tokenizer error: {0}")]
    Tokenizer(String),
    /// The chat template could not be parsed or rendered.
    #[error("chat template error: {0}")]
    Template(String),
    /// MLX raised an error while computing.
    #[error("MLX error: {0}")]
    Mlx(String),
    /// An argument is outside what convoy accepts.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The waiting queue is full; try again later.
    #[error("engine busy: {0} requests are already waiting")]
    Busy(usize),
    /// The prompt does not fit in the context window.
    #[error("prompt of {prompt} tokens does not fit the context of {context} tokens (with at least one token to generate)")]
    PromptTooLong { prompt: usize, context: usize },
    /// No request with this id is known to the engine.
    #[error("unknown request id {0}")]
    UnknownRequest(u64),
    /// The engine thread died (a panic or an unrecoverable MLX error); the engine must be recreated.
    #[error("engine failed: {0}")]
    EngineFailed(String),
    /// The engine is shutting down or shut down.
    #[error("engine is shut down")]
    ShutDown,
    /// Reading a file failed.
    #[error("I/O error on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    /// The same error, naming request `i` of a batch where the message allows.
    pub(crate) fn in_batch(self, i: usize) -> Self {
        let tag = |m: String| format!("request {i} of the batch: {m}");
        match self {
            Error::InvalidArgument(m) => Error::InvalidArgument(tag(m)),
            Error::Tokenizer(m) => Error::Tokenizer(tag(m)),
            Error::Template(m) => Error::Template(tag(m)),
            other => other,
        }
    }
}

impl From<mlx_rs::error::Exception> for Error {
    fn from(e: mlx_rs::error::Exception) -> Self {
        Error::Mlx(e.what().to_owned())
    }
}

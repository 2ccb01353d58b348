//! convoy: in-process LLM inference with continuous batching on MLX, behind a C ABI.
//!
//! Data flow: [`engine`] (public API, background thread) -> [`scheduler`] (what runs each
//! step; pure CPU) -> [`runner`] (executes a step on MLX) -> [`model`] + [`kv_cache`];
//! [`tokenizer`] turns text into ids and back; [`ffi`] is the C ABI over [`engine`].
pub mod constraint;
pub mod engine;
pub mod error;
pub mod ffi;
pub mod fuzzing;
pub mod kv_cache;
pub mod model;
pub mod prefix_cache;
pub mod prefix_file;
pub mod request;
pub mod runner;
pub mod sampling;
pub mod scheduler;
pub(crate) mod stream;
pub mod tokenizer;

pub use constraint::Constraint;
pub use engine::{Completion, Engine, EngineConfig, EngineStats, ModelInfo, Tuning};
pub use error::{Error, Result};
pub use mlx_rs;
pub use request::{Event, FinishReason, Prompt, Request, RequestId, RequestStats, StopConditions};
pub use sampling::SamplingParams;
pub use scheduler::BatchMode;
pub use tokenizer::ChatMessage;

/// The MLX backend this build links: "cpu", "metal" or "cuda".
pub fn backend() -> &'static str {
    env!("CONVOY_MLX_BACKEND")
}

/// convoy's version (the crate version).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

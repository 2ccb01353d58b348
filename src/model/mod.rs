//! Model architectures and weight loading.
//!
//! One decoder implementation covers the Llama family (Llama 2/3.x with rope scaling, SmolLM2,
//! Mistral with its sliding window, layers of mixed sliding and full attention), Qwen2 (q/k/v
//! biases), Qwen3 (per-head q/k norms) and Phi-3/Phi-4 (fused q/k/v and gate/up in the file,
//! partial rotary embeddings, "longrope" scaling). Weights come from a GGUF file ([`gguf`]) or an
//! MLX/Hugging Face folder ([`hf`]); both loaders translate tensor names to one canonical
//! scheme (`embed`, `norm`, `lm_head`, `l{i}.{q,k,v,o,gate,up,down,attn_norm,ffn_norm}`).
//!
//! The forward pass takes a batch `[B, L]` with per-row positions (from the [`BatchKvCache`])
//! and an optional mask, so the same code serves single-sequence generation, batched prefill
//! and continuous-batching decode. All arrays live on the engine thread (MLX arrays are not Send).

mod fast_math;
pub mod gguf;

/// Creates the static objects of MLX's compiler (tracing, the CPU JIT and its kernel cache)
/// by running convoy's compiled `exp` once; see [`fast_math::available`].
pub(crate) fn warm_up_compiler() {
    fast_math::available();
}

/// Frees this thread's compiled functions (see [`fast_math::release_thread_state`]).
pub(crate) fn release_compiled_state() {
    fast_math::release_thread_state();
}
pub mod hf;
pub(crate) mod safetensors;
mod weights;

use std::collections::HashMap;
use std::path::Path;

use mlx_rs::fast::{self, ScaledDotProductAttentionMask};
use mlx_rs::ops::indexing::TryIndexOp;
use mlx_rs::Array;

use crate::error::{Error, Result};
use crate::kv_cache::BatchKvCache;
use crate::tokenizer::Tokenizer;
use weights::Projections;
pub use weights::{Embedding, Linear, WeightsPolicy};

/// Which decoder variant the weights describe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    /// Llama 2/3.x, SmolLM2, Mistral-style decoders.
    Llama,
    /// Qwen2: Llama layout with biases on the q/k/v projections.
    Qwen2,
    /// Qwen3: Llama layout with an RMS norm over each head of the queries and keys.
    Qwen3,
    /// Phi-3 and Phi-4: Llama layout with q/k/v and gate/up stored fused.
    Phi3,
    /// Gemma 3 (text): q/k head norms, norms after attention and MLP too, all scaling by
    /// `1 + weight`; embeddings scaled by sqrt(hidden); GELU (tanh) gate; sliding-window
    /// layers with their own rope base between global ones.
    Gemma3,
}

impl Architecture {
    /// The family name, as in GGUF's `general.architecture` ("llama", "qwen2").
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Llama => "llama",
            Self::Qwen2 => "qwen2",
            Self::Qwen3 => "qwen3",
            Self::Phi3 => "phi3",
            Self::Gemma3 => "gemma3_text",
        }
    }

    pub(crate) fn parse(name: &str) -> Result<Self> {
        match name {
            "llama" | "mistral" | "LlamaForCausalLM" | "MistralForCausalLM" => Ok(Self::Llama),
            "qwen2" | "Qwen2ForCausalLM" => Ok(Self::Qwen2),
            "qwen3" | "Qwen3ForCausalLM" => Ok(Self::Qwen3),
            "phi3" | "Phi3ForCausalLM" => Ok(Self::Phi3),
            "gemma3_text" | "Gemma3ForCausalLM" => Ok(Self::Gemma3),
            other => Err(Error::UnsupportedArchitecture(other.to_owned())),
        }
    }
}

/// Llama 3.x style frequency scaling of rotary embeddings.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// `rope_type = "linear"`: positions divided by `factor`.
    Linear { factor: f32 },
    /// `rope_type = "llama3"`.
    Llama3 {
        factor: f32,
        low_freq_factor: f32,
        high_freq_factor: f32,
        original_max_position_embeddings: f32,
    },
    /// Phi-3's `"longrope"` (or `"su"`) scaling as mlx-lm applies it: every rotated
    /// dimension's period multiplied by its `long_factor`, and the rotated part of queries and
    /// keys multiplied by `mscale` (sqrt(1 + ln(max / original) / ln(original)) when the
    /// context was extended, else 1). Also a GGUF's `rope_freqs.weight` (llama.cpp's Llama 3
    /// scaling), with `mscale` 1.
    LongRope { long_factor: Vec<f32>, mscale: f32 },
}

/// Hyper-parameters of a decoder-only transformer.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub architecture: Architecture,
    pub hidden_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub intermediate_size: usize,
    pub vocab_size: usize,
    pub rms_norm_eps: f32,
    pub rope_theta: f32,
    /// GGUF stores Q/K permuted for the interleaved ("traditional") rotary layout.
    pub rope_traditional: bool,
    pub rope_scaling: Option<RopeScaling>,
    /// Dimensions of each head that rotary embeddings rotate (the first ones; Phi's
    /// `partial_rotary_factor`). Equal to `head_dim` for most models.
    pub rope_dims: usize,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// Per layer, the sliding window of its attention (a query sees the keys of at most this
    /// many positions, its own included), or `None` for full attention. Empty: every layer
    /// attends fully.
    pub layer_windows: Vec<Option<usize>>,
    /// Attention scores are scaled by `1 / sqrt(this)` (Gemma's `query_pre_attn_scalar`);
    /// `None`: by `1 / sqrt(head_dim)`.
    pub query_pre_attn_scalar: Option<f32>,
    /// The rope base of sliding-window layers, which then rotate without `rope_scaling`
    /// (Gemma 3's `rope_local_base_freq`); `None`: every layer uses `rope_theta`.
    pub rope_local_theta: Option<f32>,
}

/// Largest values [`ModelConfig::validate`] accepts: far above any real model, low enough that
/// sizes and products computed from them fit MLX's 32-bit shapes.
pub(crate) const MAX_LAYERS: usize = 1 << 12;
const MAX_HEADS: usize = 1 << 12;
const MAX_HEAD_DIM: usize = 1 << 12;
const MAX_WIDTH: usize = 1 << 20;
const MAX_VOCAB: usize = 1 << 24;
const MAX_CONTEXT: usize = 1 << 30;

impl ModelConfig {
    /// Checks that the numbers describe a model the decoder can run: nothing zero, heads that
    /// group evenly, sizes within bounds (so no shape overflows), finite positive norms and rope
    /// parameters.
    pub(crate) fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::BadWeights(m));
        if self.num_layers == 0 || self.hidden_size == 0 || self.vocab_size == 0 {
            return bad(format!("degenerate config: {self:?}"));
        }
        if self.num_heads == 0
            || self.num_kv_heads == 0
            || !self.num_heads.is_multiple_of(self.num_kv_heads)
        {
            return bad(format!(
                "{} attention heads are not a multiple of {} KV heads",
                self.num_heads, self.num_kv_heads
            ));
        }
        let limits = [
            ("layers", self.num_layers, MAX_LAYERS),
            ("attention heads", self.num_heads, MAX_HEADS),
            ("head dimension", self.head_dim, MAX_HEAD_DIM),
            ("hidden size", self.hidden_size, MAX_WIDTH),
            ("intermediate size", self.intermediate_size, MAX_WIDTH),
            ("vocabulary size", self.vocab_size, MAX_VOCAB),
            ("context length", self.max_position_embeddings, MAX_CONTEXT),
        ];
        for (what, value, max) in limits {
            if value > max {
                return bad(format!("{what} {value} exceeds {max}"));
            }
        }
        if self.head_dim < 2 || !self.head_dim.is_multiple_of(2) {
            return bad(format!(
                "head dimension {} is not a positive even number (rotary embeddings rotate pairs)",
                self.head_dim
            ));
        }
        if self.intermediate_size == 0 || self.max_position_embeddings == 0 {
            return bad(format!("degenerate config: {self:?}"));
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps >= 0.0) {
            return bad(format!(
                "RMS norm epsilon {} is not finite",
                self.rms_norm_eps
            ));
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 0.0) {
            return bad(format!(
                "rope base {} is not a positive number",
                self.rope_theta
            ));
        }
        if self.rope_dims < 2 || !self.rope_dims.is_multiple_of(2) || self.rope_dims > self.head_dim
        {
            return bad(format!(
                "{} rotary dimensions for a head dimension of {} (a positive even number, at \
                 most the head dimension)",
                self.rope_dims, self.head_dim
            ));
        }
        if !self.layer_windows.is_empty() && self.layer_windows.len() != self.num_layers {
            return bad(format!(
                "{} layer attention types for {} layers",
                self.layer_windows.len(),
                self.num_layers
            ));
        }
        for (what, v) in [
            ("query_pre_attn_scalar", self.query_pre_attn_scalar),
            ("rope_local_base_freq", self.rope_local_theta),
        ] {
            if let Some(v) = v.filter(|v| !(v.is_finite() && *v > 0.0)) {
                return bad(format!("{what} {v} is not a positive number"));
            }
        }
        if self.layer_windows.contains(&Some(0)) {
            return bad("a sliding window of 0 tokens".into());
        }
        let positive = |x: f32| x.is_finite() && x > 0.0;
        match &self.rope_scaling {
            Some(RopeScaling::Linear { factor }) if !positive(*factor) => {
                return bad(format!("linear rope scaling factor {factor}"));
            }
            None | Some(RopeScaling::Linear { .. }) => {}
            Some(RopeScaling::LongRope {
                long_factor,
                mscale,
            }) => {
                if long_factor.len() != self.rope_dims / 2
                    || !long_factor.iter().all(|&f| positive(f))
                    || !positive(*mscale)
                {
                    return bad(format!(
                        "longrope scaling needs {} positive factors (one per rotated pair) and \
                         a positive scale: {} factors, scale {mscale}",
                        self.rope_dims / 2,
                        long_factor.len()
                    ));
                }
                if let Some(f) = longrope_periods(long_factor, self.rope_theta, self.rope_dims)
                    .into_iter()
                    .find(|f| !positive(*f))
                {
                    return bad(format!("longrope scaling gives a period of {f}"));
                }
            }
            Some(RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            }) => {
                let ok = positive(*factor)
                    && positive(*low_freq_factor)
                    && positive(*high_freq_factor)
                    && positive(*original_max_position_embeddings)
                    && high_freq_factor > low_freq_factor;
                if !ok {
                    return bad(format!(
                        "llama3 rope scaling needs positive factors with high_freq_factor > \
                         low_freq_factor: {:?}",
                        self.rope_scaling
                    ));
                }
                if let Some(f) =
                    llama3_periods(self.rope_scaling.as_ref(), self.rope_theta, self.rope_dims)
                        .into_iter()
                        .find(|f| !positive(*f))
                {
                    return bad(format!("llama3 rope scaling gives a period of {f}"));
                }
            }
        }
        Ok(())
    }
}

struct Layer {
    attn_norm: Array,
    ffn_norm: Array,
    /// q, k, v (one matrix when fused).
    qkv: Projections,
    o: Linear,
    /// gate, up (one matrix when fused).
    gate_up: Projections,
    down: Linear,
    /// Qwen3's RMS norms over each query and key head (`[head_dim]`), before rotary embeddings.
    q_norm: Option<Array>,
    k_norm: Option<Array>,
    /// The layer's sliding attention window, if any.
    window: Option<usize>,
    /// Gemma's norms of the attention and MLP outputs, before they join the residual.
    post_attn_norm: Option<Array>,
    post_ffn_norm: Option<Array>,
}

/// A loaded model: weights on the MLX device plus its tokenizer and chat template.
pub struct Model {
    pub config: ModelConfig,
    embed: Embedding,
    norm: Array,
    lm_head: Option<Linear>,
    layers: Vec<Layer>,
    rope_freqs: Option<Array>,
    rope_scale: f32,
    /// Multiplies queries and keys before rotary embeddings (longrope's `mscale`, on the
    /// rotated dimensions only): a scalar, or `[head_dim]` with partial rotary embeddings.
    rope_input_scale: Option<Array>,
    copy_free_decode_attention: bool,
    pad_matmul_rows: bool,
    rows_matmul: bool,
    fast_exp: bool,
    quantized: bool,
}

/// A model together with the tokenizer that belongs to it.
pub struct LoadedModel {
    pub model: Model,
    /// Shared with the host side of the engine (tokenizing happens on callers' threads).
    pub tokenizer: std::sync::Arc<Tokenizer>,
    /// A human-readable model name: GGUF `general.name`, a folder's `_name_or_path`, or the
    /// file or folder name.
    pub name: String,
}

/// Options for [`load`].
#[derive(Debug, Clone, Copy)]
pub struct LoadOptions {
    pub weights: WeightsPolicy,
    /// Store q/k/v and gate/up as one matrix each (one matmul per step instead of three
    /// and two; default true). Off only to measure what it buys.
    pub fuse_projections: bool,
    /// On the CPU backend, use convoy's compiled `exp` where it pays (default true; see
    /// `Tuning::fast_exp`). Off, loading never runs MLX's run-time compiler check.
    pub fast_exp: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            weights: WeightsPolicy::default(),
            fuse_projections: true,
            fast_exp: true,
        }
    }
}

/// The last component of `path` without a `.gguf` extension (a model's fallback name).
pub(crate) fn file_name(path: &Path) -> String {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    name.strip_suffix(".gguf")
        .map(str::to_owned)
        .unwrap_or(name)
}

/// Loads a model from a `.gguf` file or an MLX/Hugging Face folder.
pub fn load(path: impl AsRef<Path>, options: LoadOptions) -> Result<LoadedModel> {
    let path = path.as_ref();
    let meta = std::fs::metadata(path).map_err(|e| Error::ModelNotFound {
        path: path.to_owned(),
        reason: e.to_string(),
    })?;
    if meta.is_dir() {
        hf::load(path, options)
    } else {
        gguf::load(path, options)
    }
}

impl Model {
    /// Builds the model from canonical tensors (see the module docs).
    pub(crate) fn from_tensors(
        config: ModelConfig,
        mut tensors: HashMap<String, Array>,
        group_size: i32,
        options: LoadOptions,
    ) -> Result<Self> {
        config.validate()?;
        let dequantize = options.weights.dequantize();
        let fuse = options.fuse_projections;
        let t = &mut tensors;
        let mut layers = Vec::with_capacity(config.num_layers);
        for i in 0..config.num_layers {
            let mut lin =
                |part: &str| Linear::take(t, &format!("l{i}.{part}"), group_size, dequantize);
            let group = |parts: Vec<Linear>| {
                if fuse {
                    Projections::new(parts)
                } else {
                    Ok(Projections::Separate(parts))
                }
            };
            let (qkv, o) = (group(vec![lin("q")?, lin("k")?, lin("v")?])?, lin("o")?);
            let (gate_up, down) = (group(vec![lin("gate")?, lin("up")?])?, lin("down")?);
            let gemma = config.architecture == Architecture::Gemma3;
            let qk_norms = gemma || config.architecture == Architecture::Qwen3;
            let norm = |t: &mut HashMap<String, Array>, part: &str| {
                take_tensor(t, &format!("l{i}.{part}.weight"))
            };
            layers.push(Layer {
                qkv,
                o,
                gate_up,
                down,
                attn_norm: norm(t, "attn_norm")?,
                ffn_norm: norm(t, "ffn_norm")?,
                q_norm: qk_norms.then(|| norm(t, "q_norm")).transpose()?,
                k_norm: qk_norms.then(|| norm(t, "k_norm")).transpose()?,
                window: config.layer_windows.get(i).copied().flatten(),
                post_attn_norm: gemma.then(|| norm(t, "post_attn_norm")).transpose()?,
                post_ffn_norm: gemma.then(|| norm(t, "post_ffn_norm")).transpose()?,
            });
        }
        let lm_head = if t.contains_key("lm_head.weight") && !config.tie_word_embeddings {
            Some(Linear::take(t, "lm_head", group_size, dequantize)?)
        } else {
            None
        };
        let embed = Embedding::take(t, "embed", group_size, dequantize)?;
        let norm = take_tensor(t, "norm.weight")?;

        let rope_dims = config.rope_dims as i32;
        let (rope_freqs, rope_scale) = match &config.rope_scaling {
            None => (None, 1.0),
            Some(RopeScaling::Linear { factor }) => (None, 1.0 / factor),
            Some(s @ RopeScaling::Llama3 { .. }) => {
                (Some(llama3_freqs(s, config.rope_theta, rope_dims)), 1.0)
            }
            Some(RopeScaling::LongRope { long_factor, .. }) => {
                let periods = longrope_periods(long_factor, config.rope_theta, config.rope_dims);
                (Some(Array::from_slice(&periods, &[rope_dims / 2])), 1.0)
            }
        };
        let rope_input_scale = match &config.rope_scaling {
            Some(RopeScaling::LongRope { mscale, .. }) if *mscale != 1.0 => {
                Some(if config.rope_dims == config.head_dim {
                    Array::from_f32(*mscale)
                } else {
                    let v: Vec<f32> = (0..config.head_dim)
                        .map(|d| if d < config.rope_dims { *mscale } else { 1.0 })
                        .collect();
                    Array::from_slice(&v, &[config.head_dim as i32])
                })
            }
            _ => None,
        };
        let quantized = layers.iter().any(|l| l.qkv.is_quantized());
        let model = Self {
            config,
            embed,
            norm,
            lm_head,
            layers,
            rope_freqs,
            rope_scale,
            rope_input_scale,
            copy_free_decode_attention: true,
            pad_matmul_rows: pads_matmul_rows_by_default(),
            rows_matmul: weights::rows_matmul_available(),
            // Checked once per process: a missing or broken run-time compiler costs speed.
            fast_exp: options.fast_exp && crate::backend() == "cpu" && fast_math::available(),
            quantized,
        };
        model.check_shapes()?;
        model.eval_weights()?;
        Ok(model)
    }

    fn check_shapes(&self) -> Result<()> {
        let c = &self.config;
        let (vocab, hidden) = self.embed.shape();
        if hidden != c.hidden_size {
            return Err(Error::BadWeights(format!(
                "embedding width {hidden} != hidden size {}",
                c.hidden_size
            )));
        }
        if vocab < c.vocab_size {
            return Err(Error::BadWeights(format!(
                "embedding has {vocab} rows but the vocabulary has {} tokens",
                c.vocab_size
            )));
        }
        let q_out = self.layers[0].qkv.part_shapes()[0].0;
        if q_out != c.num_heads * c.head_dim {
            return Err(Error::BadWeights(format!(
                "q projection has {q_out} outputs, expected {} heads x {}",
                c.num_heads, c.head_dim
            )));
        }
        // Every matrix [out, in] and norm [hidden], so that a bad file fails here with a
        // typed error rather than inside MLX at the first request.
        let (q, kv, h, ff) = (
            c.num_heads * c.head_dim,
            c.num_kv_heads * c.head_dim,
            c.hidden_size,
            c.intermediate_size,
        );
        let norm_ok = |a: &Array| a.shape() == [h as i32];
        if !norm_ok(&self.norm) {
            return Err(Error::BadWeights(format!(
                "final norm has shape {:?}, expected [{h}]",
                self.norm.shape()
            )));
        }
        if let Some(head) = &self.lm_head {
            if head.in_features() != h || head.out_features() < c.vocab_size {
                return Err(Error::BadWeights(format!(
                    "lm_head is [{}, {}], expected at least [{}, {h}]",
                    head.out_features(),
                    head.in_features(),
                    c.vocab_size
                )));
            }
        }
        for (i, l) in self.layers.iter().enumerate() {
            let (qkv, gate_up) = (l.qkv.part_shapes(), l.gate_up.part_shapes());
            let shape = |lin: &Linear| (lin.out_features(), lin.in_features());
            let parts = [
                ("q", qkv[0], q, h),
                ("k", qkv[1], kv, h),
                ("v", qkv[2], kv, h),
                ("o", shape(&l.o), h, q),
                ("gate", gate_up[0], ff, h),
                ("up", gate_up[1], ff, h),
                ("down", shape(&l.down), h, ff),
            ];
            for (part, (o, i_), out, inp) in parts {
                if (o, i_) != (out, inp) {
                    return Err(Error::BadWeights(format!(
                        "layer {i} {part} projection is [{o}, {i_}], expected [{out}, {inp}]"
                    )));
                }
            }
            let post = l.post_attn_norm.iter().chain(&l.post_ffn_norm);
            if !norm_ok(&l.attn_norm) || !norm_ok(&l.ffn_norm) || !post.clone().all(norm_ok) {
                return Err(Error::BadWeights(format!(
                    "layer {i} norms have shapes {:?}, {:?} and {:?}, expected [{h}]",
                    l.attn_norm.shape(),
                    l.ffn_norm.shape(),
                    post.map(Array::shape).collect::<Vec<_>>()
                )));
            }
            for (part, n) in [("q", &l.q_norm), ("k", &l.k_norm)] {
                if let Some(n) = n.as_ref().filter(|n| n.shape() != [c.head_dim as i32]) {
                    return Err(Error::BadWeights(format!(
                        "layer {i} {part} norm has shape {:?}, expected [{}]",
                        n.shape(),
                        c.head_dim
                    )));
                }
            }
        }
        Ok(())
    }

    fn eval_weights(&self) -> Result<()> {
        let mut all: Vec<&Array> = vec![&self.norm];
        self.embed.collect(&mut all);
        if let Some(h) = &self.lm_head {
            h.collect(&mut all);
        }
        for l in &self.layers {
            all.extend([&l.attn_norm, &l.ffn_norm]);
            all.extend(l.q_norm.iter().chain(&l.k_norm));
            all.extend(l.post_attn_norm.iter().chain(&l.post_ffn_norm));
            l.qkv.collect(&mut all);
            l.gate_up.collect(&mut all);
            for lin in [&l.o, &l.down] {
                lin.collect(&mut all);
            }
        }
        mlx_rs::transforms::eval(all)?;
        Ok(())
    }

    /// Benchmark switch: decode steps (and, with [`set_fast_exp`](Self::set_fast_exp),
    /// prefill chunks) use MLX's fused attention op instead of [`attention`] (to measure what
    /// the copy-free form buys).
    #[doc(hidden)]
    pub fn set_copy_free_decode_attention(&mut self, on: bool) {
        self.copy_free_decode_attention = on;
    }

    /// Benchmark switch: dense float32 matmuls with a few rows are zero-padded to the row
    /// count a multi-threaded OpenBLAS runs fastest at ([`weights::padded_rows`]). On by
    /// default on the CPU backend over OpenBLAS with more than one thread only.
    #[doc(hidden)]
    pub fn set_pad_matmul_rows(&mut self, on: bool) {
        self.pad_matmul_rows = on;
    }

    /// Benchmark switch: attention softmax and the MLP's SiLU use [`fast_math`]'s `exp`
    /// (float32 only) instead of MLX's, whose CPU kernel calls libm for every `fma`. Prefill
    /// chunks then also take the matmul form of attention ([`attention`]), the only one that
    /// can use it; off, they take MLX's fused op. On by default on the CPU backend only.
    #[doc(hidden)]
    pub fn set_fast_exp(&mut self, on: bool) {
        self.fast_exp = on;
    }

    /// Benchmark switch: dense float32 matmuls of at most [`weights::ROWS_MATMUL_MAX`] rows
    /// (a decode step's batch) run convoy's kernel ([`weights::MatmulPlan::Rows`]) instead
    /// of MLX's. On by default where the kernel runs (the CPU backend on x86-64 with AVX2 and
    /// FMA); switching it on elsewhere has no effect.
    #[doc(hidden)]
    pub fn set_rows_matmul(&mut self, on: bool) {
        self.rows_matmul = on && weights::rows_matmul_available();
    }

    fn matmul_pad(&self, rows: i32) -> weights::MatmulPlan {
        use weights::MatmulPlan;
        if self.rows_matmul && rows <= weights::ROWS_MATMUL_MAX {
            MatmulPlan::Rows
        } else if let Some(p) = self
            .pad_matmul_rows
            .then(|| weights::padded_rows(rows))
            .flatten()
        {
            MatmulPlan::Pad(p)
        } else {
            MatmulPlan::Plain
        }
    }

    /// Whether the matmul weights are kept quantized.
    pub fn is_quantized(&self) -> bool {
        self.quantized
    }

    /// How the matmul weights are held in memory: "float32", "float16", "bfloat16", or
    /// "q<bits>_g<group>" for MLX affine quantization (e.g. "q4_g32").
    pub fn weight_dtype(&self) -> String {
        self.layers
            .first()
            .map_or_else(|| "none".into(), |l| l.qkv.dtype_name())
    }

    /// Runs the decoder over `tokens` (`[B, L]` int32), appending keys/values to `cache`, and
    /// returns the final hidden states of the last position of every row (`[B, hidden]`).
    ///
    /// Row `r` sits at position `cache.offset(r)`; rows with left padding get a mask so their
    /// padding is never attended to.
    pub fn forward_last(&self, tokens: &Array, cache: &mut BatchKvCache) -> Result<Array> {
        let shape = tokens.shape();
        let (b, l) = (shape[0], shape[1]);
        let c = &self.config;
        let (h, kvh, hd) = (c.num_heads as i32, c.num_kv_heads as i32, c.head_dim as i32);
        let offsets = Array::from_slice(&cache.offsets(), &[b]);
        let full_mask = cache.mask(l as usize);
        // Sliding-window layers: one mask per distinct window, built on first use.
        let mut window_masks: Vec<(usize, Option<(usize, AttentionMask)>)> = Vec::new();
        let mut causal: Option<AttentionMask> = None;
        let scale = 1.0 / c.query_pre_attn_scalar.unwrap_or(hd as f32).sqrt();
        let pad = self.matmul_pad(b * l);
        let gemma = c.architecture == Architecture::Gemma3;

        let mut x = self.embed.lookup(tokens)?;
        if gemma {
            // sqrt(hidden) rounded to bfloat16, as Gemma's reference code and mlx-lm compute it.
            let s = Array::from_f32(round_to_bf16((c.hidden_size as f32).sqrt()));
            x = x.multiply(s.as_dtype(x.dtype())?)?;
        }
        for (i, layer) in self.layers.iter().enumerate() {
            let y = fast::rms_norm(&x, Some(&layer.attn_norm), c.rms_norm_eps)?;
            let [q, k, v]: [Array; 3] = layer
                .qkv
                .forward(&y, pad)?
                .try_into()
                .map_err(|_| Error::Mlx("q/k/v split".into()))?;
            let (q, k) = (q.reshape(&[b, l, h, hd])?, k.reshape(&[b, l, kvh, hd])?);
            let (q, k) = match (&layer.q_norm, &layer.k_norm) {
                (Some(qn), Some(kn)) => (
                    fast::rms_norm(&q, Some(qn), c.rms_norm_eps)?,
                    fast::rms_norm(&k, Some(kn), c.rms_norm_eps)?,
                ),
                _ => (q, k),
            };
            let q = q.transpose_axes(&[0, 2, 1, 3])?;
            let k = k.transpose_axes(&[0, 2, 1, 3])?;
            let v = v.reshape(&[b, l, kvh, hd])?.transpose_axes(&[0, 2, 1, 3])?;
            let local = layer.window.is_some() && c.rope_local_theta.is_some();
            let q = self.rope(&q, &offsets, local)?;
            let k = self.rope(&k, &offsets, local)?;
            let (mut keys, mut values) = cache.update(i, &k, &v)?;
            let mask = match layer.window {
                None => &full_mask,
                Some(w) => {
                    let at = match window_masks.iter().position(|(x, _)| *x == w) {
                        Some(at) => at,
                        None => {
                            window_masks.push((w, cache.window_mask(l as usize, w)));
                            window_masks.len() - 1
                        }
                    };
                    // The cache returns this layer's columns from `first` on (a sliding
                    // layer drops what no later pass can see).
                    let first = cache.first_column(i);
                    let (lo, mask) = match &window_masks[at].1 {
                        // Every column is within the window.
                        None => (0, &full_mask),
                        Some((lo, m)) => (*lo, m),
                    };
                    if lo < first {
                        return Err(Error::EngineFailed(format!(
                            "layer {i} needs column {lo}, its cache starts at {first}"
                        )));
                    }
                    // No query of this pass sees the columns before `lo`: attend over the
                    // window's columns only (views, no copy).
                    let skip = (lo - first) as i32;
                    if skip > 0 {
                        keys = keys.try_index((.., .., skip.., ..))?;
                        values = values.try_index((.., .., skip.., ..))?;
                    }
                    mask
                }
            };
            // Decode steps: the copy-free matmul form. Prefill chunks: MLX's fused op, except
            // where convoy's own `exp` applies (CPU, float32), which only the matmul form can
            // use (the fused op's softmax is MLX's).
            let fast_exp = self.fast_exp
                && q.dtype() == mlx_rs::Dtype::Float32
                && fast_math::pays_off(&[b, h, l, keys.shape()[2]]);
            let own = self.copy_free_decode_attention && (l == 1 || fast_exp);
            let attn = if own {
                if l > 1 && matches!(mask, AttentionMask::Causal) {
                    // Built once per forward pass, on first use.
                    causal.get_or_insert_with(|| {
                        AttentionMask::Array(causal_mask(l, keys.shape()[2]))
                    });
                }
                let mask = match (mask, &causal) {
                    (AttentionMask::Causal, Some(m)) if l > 1 => m,
                    _ => mask,
                };
                attention(&q, &keys, &values, scale, mask, kvh, fast_exp)?
            } else {
                let attn = match mask {
                    AttentionMask::None => {
                        fast::scaled_dot_product_attention(&q, &keys, &values, scale, None, None)?
                    }
                    AttentionMask::Causal => fast::scaled_dot_product_attention(
                        &q,
                        &keys,
                        &values,
                        scale,
                        ScaledDotProductAttentionMask::Causal,
                        None,
                    )?,
                    AttentionMask::Array(m) => {
                        fast::scaled_dot_product_attention(&q, &keys, &values, scale, m, None)?
                    }
                };
                attn.transpose_axes(&[0, 2, 1, 3])?
                    .reshape(&[b, l, h * hd])?
            };
            let out = layer.o.forward(&attn, pad)?;
            x = match &layer.post_attn_norm {
                Some(n) => x.add(fast::rms_norm(&out, Some(n), c.rms_norm_eps)?)?,
                None => x.add(out)?,
            };
            let y = fast::rms_norm(&x, Some(&layer.ffn_norm), c.rms_norm_eps)?;
            let [gate, up]: [Array; 2] = layer
                .gate_up
                .forward(&y, pad)?
                .try_into()
                .map_err(|_| Error::Mlx("gate/up split".into()))?;
            let act = if gemma {
                gelu_tanh(&gate)?.multiply(up)?
            } else if self.fast_exp
                && gate.dtype() == mlx_rs::Dtype::Float32
                && fast_math::pays_off(gate.shape())
            {
                fast_math::swiglu(&gate, &up)?
            } else {
                mlx_rs::nn::silu(gate)?.multiply(up)?
            };
            let ff = layer.down.forward(&act, pad)?;
            x = match &layer.post_ffn_norm {
                Some(n) => x.add(fast::rms_norm(&ff, Some(n), c.rms_norm_eps)?)?,
                None => x.add(ff)?,
            };
        }
        cache.advance(l as usize);
        let last = x.try_index((.., l - 1, ..))?;
        Ok(fast::rms_norm(&last, Some(&self.norm), c.rms_norm_eps)?)
    }

    /// Projects hidden states to vocabulary logits (float32).
    pub fn logits(&self, hidden: &Array) -> Result<Array> {
        let shape = hidden.shape();
        let pad = self.matmul_pad(shape[..shape.len() - 1].iter().product());
        let out = match &self.lm_head {
            Some(head) => head.forward(hidden, pad)?,
            None => self.embed.as_linear(hidden, pad)?,
        };
        let out = if out.dtype() != mlx_rs::Dtype::Float32 {
            out.as_type::<f32>()?
        } else {
            out
        };
        // Some checkpoints pad the embedding beyond the tokenizer's vocabulary.
        let v = self.config.vocab_size as i32;
        if out.shape()[out.ndim() - 1] > v {
            Ok(out.try_index((.., ..v))?)
        } else {
            Ok(out)
        }
    }

    /// Rotary embeddings; `local`: a sliding-window layer's own base, without scaling.
    fn rope(&self, x: &Array, offsets: &Array, local: bool) -> Result<Array> {
        let c = &self.config;
        if local {
            return Ok(fast::rope_dynamic(
                x,
                c.rope_dims as i32,
                c.rope_traditional,
                c.rope_local_theta,
                1.0,
                offsets,
                None,
            )?);
        }
        let base = if self.rope_freqs.is_some() {
            None
        } else {
            Some(c.rope_theta)
        };
        let scaled;
        let x = match &self.rope_input_scale {
            Some(s) => {
                scaled = x.multiply(s)?;
                &scaled
            }
            None => x,
        };
        Ok(fast::rope_dynamic(
            x,
            c.rope_dims as i32,
            c.rope_traditional,
            base,
            self.rope_scale,
            offsets,
            self.rope_freqs.as_ref(),
        )?)
    }
}

/// `x` rounded to the nearest bfloat16 (ties to even), as a float32.
fn round_to_bf16(x: f32) -> f32 {
    let b = x.to_bits();
    f32::from_bits(((b + 0x7fff + ((b >> 16) & 1)) >> 16) << 16)
}

/// GELU with the tanh approximation (`gelu_pytorch_tanh`, MLX's `gelu_approx`):
/// `0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3)))`.
fn gelu_tanh(x: &Array) -> Result<Array> {
    let c = (2.0 / std::f32::consts::PI).sqrt();
    let cube = x.multiply(x)?.multiply(x)?;
    let inner = x
        .add(cube.multiply(Array::from_f32(0.044715))?)?
        .multiply(Array::from_f32(c))?;
    let t = mlx_rs::ops::tanh(&inner)?.add(Array::from_f32(1.0))?;
    Ok(x.multiply(Array::from_f32(0.5))?.multiply(t)?)
}

/// Whether padding matmul rows ([`weights::padded_rows`]) pays here: the CPU backend over a
/// multi-threaded OpenBLAS. (Without OpenBLAS, MLX's reference BLAS runs on one thread and
/// padding would only add work.)
fn pads_matmul_rows_by_default() -> bool {
    let single = |var: &str| std::env::var(var).is_ok_and(|v| v.trim() == "1");
    crate::backend() == "cpu"
        && option_env!("CONVOY_OPENBLAS_DIR").is_some()
        && std::thread::available_parallelism().is_ok_and(|n| n.get() > 1)
        && !single("OPENBLAS_NUM_THREADS")
        && !single("OMP_NUM_THREADS")
}

/// Attention of `L` new queries per row (`q`: `[B, H, L, D]`, at the last `L` of the `T`
/// positions) over the cached keys and values (`[B, KVH, T, D]`, views into the cache's
/// buffers), returned as `[B, L, H * D]`.
///
/// The same computation as MLX's `scaled_dot_product_attention`, written so that no operand
/// is copied: each key/value head's query group becomes the rows of one matmul (q reshaped
/// to `[B, KVH, H / KVH * L, D]`) against the cache views as they are, where the fused op on
/// the CPU backend copies the keys and values of every layer at every step. With `fast_exp`
/// the softmax is [`fast_math::softmax_parts`], normalized after the product with the values
/// (`[.., L, D]` rather than `[.., L, T]`).
fn attention(
    q: &Array,
    keys: &Array,
    values: &Array,
    scale: f32,
    mask: &AttentionMask,
    kv_heads: i32,
    fast_exp: bool,
) -> Result<Array> {
    let l = q.shape()[2];
    if l <= QUERY_BLOCK {
        return attention_block(q, keys, values, scale, mask, kv_heads, fast_exp);
    }
    // Long prefills (static batches take a whole prompt at once) go QUERY_BLOCK queries at a
    // time, so the scores are [B, H, block, T] rather than [B, H, L, T]; and since every mask
    // here is causal (no query sees a key after its own position), each block reads only the
    // keys up to its last query.
    let t = keys.shape()[2];
    let causal = !matches!(mask, AttentionMask::None);
    let mut outs = Vec::new();
    for start in (0..l).step_by(QUERY_BLOCK as usize) {
        let end = (start + QUERY_BLOCK).min(l);
        let seen = if causal { t - l + end } else { t };
        let qb = q.try_index((.., .., start..end, ..))?;
        let kb = keys.try_index((.., .., ..seen, ..))?;
        let vb = values.try_index((.., .., ..seen, ..))?;
        let mb = match mask {
            AttentionMask::Array(m) => {
                AttentionMask::Array(m.try_index((.., .., start..end, ..seen))?)
            }
            // Block queries sit at the last positions of the keys they see, as a chunk's do.
            AttentionMask::Causal => AttentionMask::Causal,
            AttentionMask::None => AttentionMask::None,
        };
        outs.push(attention_block(
            &qb, &kb, &vb, scale, &mb, kv_heads, fast_exp,
        )?);
    }
    Ok(mlx_rs::ops::concatenate(&outs, 1)?)
}

/// Queries per block of [`attention`].
const QUERY_BLOCK: i32 = 256;

/// [`attention`] of at most [`QUERY_BLOCK`] queries.
fn attention_block(
    q: &Array,
    keys: &Array,
    values: &Array,
    scale: f32,
    mask: &AttentionMask,
    kv_heads: i32,
    fast_exp: bool,
) -> Result<Array> {
    let s = q.shape();
    let (b, h, l, d) = (s[0], s[1], s[2], s[3]);
    let t = keys.shape()[2];
    let group = h / kv_heads;
    let grouped = q
        .reshape(&[b, kv_heads, group * l, d])?
        .multiply(Array::from_f32(scale))?;
    let scores = mlx_rs::ops::matmul(&grouped, keys.swap_axes(-1, -2)?)?;
    let hide = |scores: Array, visible: &Array| -> Result<Array> {
        // [B, KVH, G, L, T] against the [B or 1, 1, L, T] mask as [B or 1, 1, 1, L, T].
        let s5 = scores.reshape(&[b, kv_heads, group, l, t])?;
        let m = visible.reshape(&[visible.shape()[0], 1, 1, l, t])?;
        let s5 = mlx_rs::ops::select(&m, &s5, Array::from_f32(f32::NEG_INFINITY))?;
        Ok(s5.reshape(&[b, kv_heads, group * l, t])?)
    };
    let scores = match mask {
        AttentionMask::Array(m) => hide(scores, m)?,
        AttentionMask::Causal if l > 1 => hide(scores, &causal_mask(l, t))?,
        AttentionMask::None | AttentionMask::Causal => scores,
    };
    let out = if fast_exp {
        let (weights, sum) = fast_math::softmax_parts(&scores)?;
        mlx_rs::ops::matmul(&weights, values)?.divide(&sum)?
    } else {
        let weights = mlx_rs::ops::softmax_axis(&scores, -1, true)?;
        mlx_rs::ops::matmul(&weights, values)?
    };
    // [B, KVH, G * L, D] -> [B, H, L, D] -> [B, L, H * D].
    let out = out.reshape(&[b, h, l, d])?;
    let out = if l == 1 {
        out
    } else {
        out.transpose_axes(&[0, 2, 1, 3])?
    };
    Ok(out.reshape(&[b, l, h * d])?)
}

/// `[1, 1, L, T]` booleans (the shape of [`AttentionMask::Array`] for every row): query `i`,
/// at position `T - L + i`, sees keys `0..=T - L + i`.
fn causal_mask(l: i32, t: i32) -> Array {
    let (lu, tu) = (l as usize, t as usize);
    let m: Vec<bool> = (0..lu)
        .flat_map(|i| (0..tu).map(move |j| j <= tu - lu + i))
        .collect();
    Array::from_slice(&m, &[1, 1, l, t])
}

fn take_tensor(t: &mut HashMap<String, Array>, name: &str) -> Result<Array> {
    t.remove(name)
        .ok_or_else(|| Error::BadWeights(format!("missing tensor {name}")))
}

/// The attention mask a forward pass needs, chosen by the cache.
pub(crate) enum AttentionMask {
    /// Every cached column is visible to every query (decode without padding).
    None,
    /// Plain causal attention (one unpadded row or equal rows).
    Causal,
    /// An explicit boolean mask `[B, 1, L, T]`.
    Array(Array),
}

/// Llama 3 rope scaling: per-dimension periods passed to MLX's rope as `freqs`.
fn llama3_freqs(s: &RopeScaling, theta: f32, dims: i32) -> Array {
    let freqs = llama3_periods(Some(s), theta, dims as usize);
    Array::from_slice(&freqs, &[dims / 2])
}

/// The `dims / 2` periods of longrope scaling: `long_factor[i] * theta^(2i / dims)`.
pub(crate) fn longrope_periods(long_factor: &[f32], theta: f32, dims: usize) -> Vec<f32> {
    long_factor
        .iter()
        .enumerate()
        .map(|(i, f)| f * theta.powf((2 * i) as f32 / dims as f32))
        .collect()
}

/// The `dims / 2` periods of Llama 3 rope scaling (empty for other scalings).
pub(crate) fn llama3_periods(s: Option<&RopeScaling>, theta: f32, dims: usize) -> Vec<f32> {
    let Some(&RopeScaling::Llama3 {
        factor,
        low_freq_factor,
        high_freq_factor,
        original_max_position_embeddings: old,
    }) = s
    else {
        return Vec::new();
    };
    let low_wavelen = old / low_freq_factor;
    let high_wavelen = old / high_freq_factor;
    (0..dims / 2)
        .map(|i| {
            let f = theta.powf((2 * i) as f32 / dims as f32);
            let wavelen = 2.0 * std::f32::consts::PI * f;
            if wavelen > low_wavelen {
                f * factor
            } else if wavelen > high_wavelen {
                let smooth =
                    (old / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                f / ((1.0 - smooth) / factor + smooth)
            } else {
                f
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::round_to_bf16;

    #[test]
    fn bf16_rounding_of_gemma_embedding_scales() {
        assert_eq!(round_to_bf16(128f32.sqrt()), 11.3125);
        assert_eq!(round_to_bf16(1152f32.sqrt()), 34.0); // Gemma 3 1B
        assert_eq!(round_to_bf16(2560f32.sqrt()), 50.5); // Gemma 3 4B: 50.596
        assert_eq!(round_to_bf16(64.0), 64.0);
        // Ties go to the even mantissa.
        assert_eq!(round_to_bf16(f32::from_bits(0x3f80_8000)), 1.0);
        assert_eq!(
            round_to_bf16(f32::from_bits(0x3f81_8000)),
            f32::from_bits(0x3f82_0000)
        );
    }
}

//! Executes model work on MLX. Everything here runs on the engine thread.
use mlx_rs::Array;

use crate::error::Result;
use crate::kv_cache::{BatchKvCache, KvLayout};
use crate::model::{LoadedModel, Model};

/// The KV layout a model needs.
pub fn kv_layout(model: &Model) -> KvLayout {
    KvLayout {
        layers: model.config.num_layers,
        kv_heads: model.config.num_kv_heads,
        head_dim: model.config.head_dim,
    }
}

/// Greedy decoding of one sequence: returns the generated ids, stopping after `max_tokens` or
/// at (and including) an end-of-sequence token.
pub fn generate_greedy(lm: &LoadedModel, prompt: &[u32], max_tokens: usize) -> Result<Vec<u32>> {
    let model = &lm.model;
    let mut cache = BatchKvCache::new(kv_layout(model));
    cache = BatchKvCache::with_padding(kv_layout(model), vec![0]);
    let _ = &mut cache;
    let ids: Vec<i32> = prompt.iter().map(|&t| t as i32).collect();
    let mut input = Array::from_slice(&ids, &[1, ids.len() as i32]);
    let mut out = Vec::new();
    while out.len() < max_tokens {
        let h = model.forward_last(&input, &mut cache)?;
        let logits = model.logits(&h)?;
        let next = mlx_rs::ops::indexing::argmax_axis(&logits, -1, None)?;
        next.eval()?;
        let tok = next.as_slice::<u32>()[0];
        out.push(tok);
        if lm.tokenizer.eos_ids().contains(&tok) {
            break;
        }
        input = Array::from_slice(&[tok as i32], &[1, 1]);
    }
    Ok(out)
}

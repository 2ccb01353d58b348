"""Random-weight models of each family convoy runs, and mlx-lm's greedy logits on them (issue 12).

For each family: builds mlx-lm's own model class (`mlx_lm.models.<family>.Model`) from a small
config, fills it with seeded random weights, saves config.json + model.safetensors with the
tokenizer given, and a 4-bit quantized copy (`<family>-q4`). Then loads each folder back with
mlx-lm and records, for a few prompts, every step of a single-sequence greedy run: the logits
(float32) and the chosen tokens. convoy's test (tests/families.rs) runs the same folders, alone
and batched with rows joining mid-decode, and compares.

    python family_oracle.py --tokenizer DIR --eos 2 --out DIR

Writes OUT/<name>/{config.json, model.safetensors, tokenizer*.json, reference.safetensors} and
OUT/families.json (the names, the tolerance notes). No network: the weights are made here.
"""

import argparse
import json
import shutil
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.utils import _get_classes, load_model, quantize_model, save_config, save_model

STEPS = 10
PROMPT_LENGTHS = (5, 19, 34, 300)  # the last one: attention in query blocks of 256
WINDOW = 8  # small, so that prompts and generations run past it

BASE = dict(
    hidden_size=64,
    num_hidden_layers=2,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    rms_norm_eps=1e-5,
    max_position_embeddings=512,
    rope_theta=10000.0,
    tie_word_embeddings=False,
    torch_dtype="float32",
)

# name -> (config.json convoy reads, overrides for mlx-lm's reading of the same folder).
# Mistral applies its sliding window to every layer (as Hugging Face Transformers does).
# mlx-lm's llama ignores a bare `sliding_window` and needs one full-attention layer among
# explicit layer types, so its reading of the mistral folder lists layer 0 as full and then
# switches it to sliding (`all_sliding`): every layer then takes mlx-lm's sliding-window mask
# and rotating cache.
FAMILIES = {
    "llama3": (
        dict(
            model_type="llama",
            architectures=["LlamaForCausalLM"],
            rope_scaling=dict(
                rope_type="llama3",
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=64,
            ),
        ),
        {},
    ),
    "qwen2": (
        dict(
            model_type="qwen2",
            architectures=["Qwen2ForCausalLM"],
            rope_theta=1000000.0,
            tie_word_embeddings=True,
            sliding_window=32768,
            use_sliding_window=False,
        ),
        {},
    ),
    "qwen3": (
        dict(
            model_type="qwen3",
            architectures=["Qwen3ForCausalLM"],
            head_dim=32,
            rope_theta=1000000.0,
            tie_word_embeddings=True,
        ),
        {},
    ),
    "mistral": (
        dict(
            model_type="mistral",
            architectures=["MistralForCausalLM"],
            sliding_window=WINDOW,
        ),
        dict(layer_types=["full_attention"] + ["sliding_attention"] * (BASE["num_hidden_layers"] - 1)),
    ),
    "llama-swa": (
        dict(
            model_type="llama",
            architectures=["LlamaForCausalLM"],
            num_hidden_layers=3,
            sliding_window=WINDOW,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        ),
        {},
    ),
    "phi3": (
        dict(
            model_type="phi3",
            architectures=["Phi3ForCausalLM"],
            partial_rotary_factor=0.75,
            max_position_embeddings=1024,
            original_max_position_embeddings=256,
            rope_scaling=dict(
                type="longrope",
                long_factor=[1.0, 1.5, 2.0, 3.0, 5.0, 8.0],
                short_factor=[1.0] * 6,
            ),
        ),
        {},
    ),
    # Gemma 3: layers 0 and 2 slide (own rope base, no scaling), layer 1 is global (linear
    # scaling); hidden 128, whose sqrt rounds differently in bfloat16; tied embeddings.
    "gemma3": (
        dict(
            model_type="gemma3_text",
            architectures=["Gemma3ForCausalLM"],
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=3,
            head_dim=32,
            query_pre_attn_scalar=24,
            rope_theta=1000000.0,
            rope_local_base_freq=10000.0,
            rope_scaling=dict(rope_type="linear", factor=8.0),
            sliding_window=WINDOW,
            sliding_window_pattern=2,
            rms_norm_eps=1e-6,
            tie_word_embeddings=True,
        ),
        {},
    ),
}


def random_weights(model, seed, norm_base=1.0, embed_std=1.0):
    """Seeded weights with well separated logits: embeddings and lm_head N(0, 1) (logits of
    standard deviation ~sqrt(hidden)), other matrices N(0, 1/fan_in), norms 1 + N(0, 0.1^2),
    biases N(0, 0.1^2)."""
    params = []
    for i, (name, p) in enumerate(sorted(tree_flatten(model.parameters()))):
        z = mx.random.normal(p.shape, key=mx.random.key(seed * 1000 + i))
        if "norm" in name:
            v = norm_base + 0.1 * z
        elif name.endswith("bias"):
            v = 0.1 * z
        elif "embed_tokens" in name:
            v = embed_std * z
        elif "lm_head" in name:
            v = z
        elif "o_proj" in name or "down_proj" in name:
            # Layers that write to the residual stream strongly enough that a tied
            # embedding's logits do not just repeat the input token.
            v = 4.0 * z / (p.shape[-1] ** 0.5)
        else:
            v = z / (p.shape[-1] ** 0.5)
        params.append((name, v.astype(mx.float32)))
    model.update(tree_unflatten(params))
    mx.eval(model.parameters())


def all_sliding(model):
    for layer in model.model.layers:
        layer.use_sliding = True
    model.model.swa_idx = 0


PATCHES = {"mistral": all_sliding}


def greedy(model, prompt, eos):
    cache = make_prompt_cache(model)
    logits = model(mx.array(prompt)[None], cache=cache)[0, -1]
    out_logits, tokens = [], []
    for _ in range(STEPS):
        logits = logits.astype(mx.float32)
        tok = int(mx.argmax(logits).item())
        out_logits.append(logits)
        tokens.append(tok)
        if tok in eos:
            break
        logits = model(mx.array([[tok]]), cache=cache)[0, -1]
    return mx.stack(out_logits), tokens


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer", required=True, type=Path)
    ap.add_argument("--eos", required=True, type=int, nargs="+")
    ap.add_argument("--vocab", required=True, type=int)
    ap.add_argument("--out", required=True, type=Path)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    vocab = args.vocab

    prompts = [
        mx.random.randint(3, vocab, (n,), key=mx.random.key(12 + i)).tolist()
        for i, n in enumerate(PROMPT_LENGTHS)
    ]
    names = []
    families = dict(FAMILIES)
    # Gemma 3's image-text form (4B and larger), text model only: the gemma3 text config
    # inside, without the head counts its real configs leave out (8 and 4 by default).
    text = dict(BASE, **FAMILIES["gemma3"][0])
    for key in ("num_attention_heads", "num_key_value_heads", "architectures", "torch_dtype"):
        text.pop(key)
    families["gemma3-vlm"] = (
        dict(
            model_type="gemma3",
            architectures=["Gemma3ForConditionalGeneration"],
            text_config=text,
        ),
        {},
    )
    for seed, (name, (cfg, mlx_override)) in enumerate(families.items()):
        if cfg["model_type"] == "gemma3":
            config = dict(cfg, vocab_size=vocab, eos_token_id=args.eos, torch_dtype="float32")
        else:
            config = dict(BASE, vocab_size=vocab, eos_token_id=args.eos, **cfg)
        model_cls, args_cls = _get_classes(config)
        model = model_cls(args_cls.from_dict(dict(config, **mlx_override)))
        gemma = name.startswith("gemma3")
        if gemma:
            # No lm_head: tied, as Gemma 3 checkpoints are.
            (model.language_model if name == "gemma3-vlm" else model).sanitize({})
        if gemma:
            # Norms scale by 1 + weight. The embeddings are scaled up by sqrt(hidden) and tied:
            # small enough that the layers' (normed) outputs move the residual stream.
            random_weights(model, 100 + seed, 0.0, 0.5 / text["hidden_size"] ** 0.5)
        else:
            random_weights(model, 100 + seed)
        for variant in ("", "-q4"):
            folder = args.out / f"{name}{variant}"
            conf = dict(config)
            if variant:
                model, conf = quantize_model(model, conf, 64, 4)
            shutil.rmtree(folder, ignore_errors=True)
            save_model(folder, model)
            (folder / "model.safetensors.index.json").unlink()
            if name == "gemma3-vlm":
                # What a real image-text checkpoint also holds; both loaders leave it out.
                w = mx.load(str(folder / "model.safetensors"))
                w["vision_tower.vision_model.embeddings.patch_embedding.weight"] = mx.ones((8, 3, 2, 2))
                w["multi_modal_projector.mm_input_projection_weight"] = mx.ones((4, 8))
                mx.save_safetensors(str(folder / "extended.safetensors"), w, metadata={"format": "mlx"})
                (folder / "extended.safetensors").replace(folder / "model.safetensors")
            save_config(conf, folder / "config.json")
            for f in ("tokenizer.json", "tokenizer_config.json"):
                shutil.copy(args.tokenizer / f, folder / f)
            # The reference reads the folder back, as a user of mlx-lm would.
            ref_model, _ = load_model(folder, model_config=mlx_override)
            PATCHES.get(name, lambda m: None)(ref_model)
            ref = {}
            for k, p in enumerate(prompts):
                logits, tokens = greedy(ref_model, p, set(args.eos))
                ref[f"prompt_{k}"] = mx.array(p, dtype=mx.int32)
                ref[f"tokens_{k}"] = mx.array(tokens, dtype=mx.int32)
                ref[f"logits_{k}"] = logits
            mx.save_safetensors(str(folder / "reference.safetensors"), ref)
            names.append(folder.name)
            print(f"{folder.name}: tokens {[ref[f'tokens_{k}'].tolist() for k in range(len(prompts))]}")
    (args.out / "families.json").write_text(json.dumps({"fixtures": names, "steps": STEPS}))


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Writes the seed corpora under fuzz/corpus/<target>/ (each file < 64 KB).

Run from anywhere: `python3 fuzz/make_seeds.py [model.gguf]`. The SmolLM2 chat template and a
truncated header are taken from the real test model when it is present (default: the path
scripts/setup.sh uses); everything else is synthetic. The output is deterministic.
"""
import json
import os
import struct
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
CORPUS = os.path.join(HERE, "corpus")
CACHE = os.environ.get("CONVOY_CACHE_DIR") or os.path.join(
    os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "convoy")
MODEL = sys.argv[1] if len(sys.argv) > 1 else os.path.join(
    CACHE, "models", "SmolLM2-135M-Instruct.Q4_1.gguf")

LLAMA3_TEMPLATE = (
    "{{- bos_token }}\n"
    "{%- if messages[0]['role'] == 'system' %}\n"
    "    {%- set system_message = messages[0]['content']|trim %}\n"
    "    {%- set messages = messages[1:] %}\n"
    "{%- else %}\n"
    "    {%- set system_message = \"\" %}\n"
    "{%- endif %}\n"
    "{{- \"<|start_header_id|>system<|end_header_id|>\\n\\n\" }}\n"
    "{{- \"Cutting Knowledge Date: December 2023\\n\" }}\n"
    "{{- system_message }}\n"
    "{{- \"<|eot_id|>\" }}\n"
    "{%- for message in messages %}\n"
    "    {%- if not (message.role in ['user', 'assistant', 'system']) %}\n"
    "        {{- raise_exception('Unknown role: ' ~ message.role) }}\n"
    "    {%- endif %}\n"
    "    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + message['content'] | trim + '<|eot_id|>' }}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}\n"
    "{%- endif %}\n"
)

# Exercises what real templates use: namespace, loop variables, macros, filters, Python string
# methods (minijinja-contrib pycompat), slicing, tojson.
FANCY_TEMPLATE = (
    "{%- macro render(m) -%}<|{{ m.role | upper }}|>{{ m.content.strip() }}{%- endmacro -%}\n"
    "{%- set ns = namespace(n=0, last='') -%}\n"
    "{%- for m in messages -%}\n"
    "{%- if m.content.startswith('/') %}{{ m.content.split(' ')[0][1:] | tojson }}"
    "{%- elif loop.index is divisibleby 2 %}{{ render(m) }}{% else %}{{ m.content | replace('a', 'b') }}"
    "{%- endif -%}{%- set ns.n = ns.n + m.content | length -%}{%- set ns.last = m.role -%}\n"
    "{%- endfor -%}\n"
    "{{ ns.n }} {{ ns.last.title() }} {{ messages | length }} {{ (messages | map(attribute='role') | join(',')) }}\n"
    "{%- if add_generation_prompt %}{{ eos_token ~ '\\nassistant:' }}{% endif -%}\n"
)


def gguf_str(s):
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(b)) + b


def kv(key, ty, value):
    out = gguf_str(key) + struct.pack("<I", ty)
    scalar = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
    if ty in scalar:
        return out + struct.pack("<" + scalar[ty], value)
    if ty == 8:
        return out + gguf_str(value)
    elem, items = value
    out += struct.pack("<IQ", elem, len(items))
    for it in items:
        out += gguf_str(it) if elem == 8 else struct.pack("<" + scalar[elem], it)
    return out


def byte_level_alphabet():
    """GPT-2's byte -> printable character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for _, c in sorted(zip(bs, cs))]


def half(x):
    return struct.pack("<e", x)


def tensor_data(ty, rows, cols, seed):
    """`rows` x `cols` values (cols innermost) in GGUF type `ty`."""
    vals = [((i * 7 + seed * 13) % 17 - 8) / 16.0 for i in range(rows * cols)]
    if ty == 0:
        return b"".join(struct.pack("<f", v) for v in vals)
    if ty == 1:
        return b"".join(half(v) for v in vals)
    if ty == 30:
        return b"".join(struct.pack("<f", v)[2:] for v in vals)
    out = b""
    for blk in range(0, len(vals), 32):
        q = [(blk + i + seed) % 16 for i in range(32)]
        if ty == 2:  # Q4_0: f16 scale, 16 bytes of nibbles
            out += half(0.01) + bytes(q[i] | (q[i + 16] << 4) for i in range(16))
        elif ty == 3:  # Q4_1: f16 scale, f16 min, 16 bytes
            out += half(0.01) + half(-0.05) + bytes(q[i] | (q[i + 16] << 4) for i in range(16))
        elif ty == 8:  # Q8_0: f16 scale, 32 int8
            out += half(0.01) + bytes((v * 9 - 64) & 0xFF for v in q)
    return out


def tiny_gguf(template, quantized=True, version=3, extra_kv=(), align=32, small_vocab=False,
              override=None):
    """A complete, loadable llama GGUF: 1 layer, hidden 32, 4 heads of 8 (2 KV heads)."""
    alphabet = byte_level_alphabet()
    tokens = alphabet + ["<|im_start|>", "<|im_end|>", "Ġt", "he", "Ġthe"]
    types = [1] * 256 + [3, 3, 1, 1, 1]
    merges = ["Ġ t", "h e", "Ġt he"]
    bos = 256
    if small_vocab:
        tokens = ["<|im_start|>", "<|im_end|>", "a", "b", "ab", "Ġ"]
        types = [3, 3, 1, 1, 1, 1]
        merges = ["a b"]
        bos = 0
    hidden, heads, kv_heads, hd, ffn = 32, 4, 2, 8, 64
    vocab = len(tokens)
    meta = [
        kv("general.architecture", 8, "llama"),
        kv("general.name", 8, "tiny"),
        kv("general.alignment", 4, align),
        kv("llama.block_count", 4, 1),
        kv("llama.context_length", 4, 256),
        kv("llama.embedding_length", 4, hidden),
        kv("llama.feed_forward_length", 4, ffn),
        kv("llama.attention.head_count", 4, heads),
        kv("llama.attention.head_count_kv", 4, kv_heads),
        kv("llama.rope.freq_base", 6, 10000.0),
        kv("llama.attention.layer_norm_rms_epsilon", 6, 1e-5),
        kv("tokenizer.ggml.model", 8, "gpt2"),
        kv("tokenizer.ggml.pre", 8, "smollm"),
        kv("tokenizer.ggml.tokens", 9, (8, tokens)),
        kv("tokenizer.ggml.token_type", 9, (5, types)),
        kv("tokenizer.ggml.merges", 9, (8, merges)),
        kv("tokenizer.ggml.bos_token_id", 4, bos),
        kv("tokenizer.ggml.eos_token_id", 4, bos + 1),
        kv("tokenizer.ggml.add_bos_token", 7, False),
    ] + list(extra_kv)
    if template is not None:
        meta.append(kv("tokenizer.chat_template", 8, template))
    q = (lambda t: t) if quantized else (lambda t: 0 if t in (2, 3, 8) else t)
    # (name, type, ne0 = columns, ne1 = rows)
    tensors = [
        ("token_embd.weight", 1, hidden, vocab),
        ("output_norm.weight", 0, hidden, 1),
        ("blk.0.attn_norm.weight", 0, hidden, 1),
        ("blk.0.ffn_norm.weight", 0, hidden, 1),
        ("blk.0.attn_q.weight", q(8), hidden, heads * hd),
        ("blk.0.attn_k.weight", q(2), hidden, kv_heads * hd),
        ("blk.0.attn_v.weight", q(3), hidden, kv_heads * hd),
        ("blk.0.attn_output.weight", 30, heads * hd, hidden),
        ("blk.0.ffn_gate.weight", q(3), hidden, ffn),
        ("blk.0.ffn_up.weight", 1, hidden, ffn),
        ("blk.0.ffn_down.weight", q(8), ffn, hidden),
    ]
    tensors = [(n, *(override or {}).get(n, (t, c, r))) for n, t, c, r in tensors]
    infos, blobs, offset = b"", [], 0
    for i, (name, ty, cols, rows) in enumerate(tensors):
        data = tensor_data(ty, rows, cols, i)
        dims = [cols] if rows == 1 else [cols, rows]
        infos += gguf_str(name) + struct.pack("<I", len(dims)) + \
            b"".join(struct.pack("<Q", d) for d in dims) + struct.pack("<IQ", ty, offset)
        pad = (-len(data)) % align
        blobs.append(data + b"\0" * pad)
        offset += len(data) + pad
    head = b"GGUF" + struct.pack("<IQQ", version, len(tensors), len(meta)) + b"".join(meta) + infos
    head += b"\0" * ((-len(head)) % align)
    return head + b"".join(blobs)


def real_template():
    """tokenizer.chat_template from the real model's metadata, or None."""
    try:
        with open(MODEL, "rb") as f:
            d = f.read(4 << 20)
    except OSError:
        return None
    pos = 24
    n_kv = struct.unpack_from("<Q", d, 16)[0]
    sizes = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}

    def string(p):
        n = struct.unpack_from("<Q", d, p)[0]
        return d[p + 8:p + 8 + n], p + 8 + n

    for _ in range(n_kv):
        key, pos = string(pos)
        ty = struct.unpack_from("<I", d, pos)[0]
        pos += 4
        if ty == 8:
            val, pos = string(pos)
            if key == b"tokenizer.chat_template":
                return val.decode()
        elif ty == 9:
            et, n = struct.unpack_from("<IQ", d, pos)
            pos += 12
            if et == 8:
                for _ in range(n):
                    _, pos = string(pos)
            else:
                pos += n * sizes[et]
        else:
            pos += sizes[ty]
    return None


def safetensors_file(tensors, metadata=None):
    header, data = {}, b""
    if metadata is not None:
        header["__metadata__"] = metadata
    for name, dtype, shape, raw in tensors:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * ((-len(h)) % 8)
    return struct.pack("<Q", len(h)) + h + data


def tokenizer_json():
    alphabet = byte_level_alphabet()
    vocab = {t: i for i, t in enumerate(alphabet + ["Ġt", "he", "Ġthe"])}
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {"id": 259, "content": "<|im_start|>", "single_word": False, "lstrip": False,
             "rstrip": False, "normalized": False, "special": True},
            {"id": 260, "content": "<|im_end|>", "single_word": False, "lstrip": False,
             "rstrip": False, "normalized": False, "special": True},
        ],
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": True},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
        ]},
        "post_processor": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False,
                           "use_regex": True},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True,
                    "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None,
                  "continuing_subword_prefix": None, "end_of_word_suffix": None,
                  "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": vocab, "merges": ["Ġ t", "h e", "Ġt he"]},
    }


def write(target, name, data):
    d = os.path.join(CORPUS, target)
    os.makedirs(d, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    assert len(data) < 64 * 1024, (target, name, len(data))
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def main():
    smol = real_template() or (
        "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
        "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
        "Face<|im_end|>\\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + "
        "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}"
        "{{ '<|im_start|>assistant\\n' }}{% endif %}")

    # gguf
    write("gguf", "tiny_llama_q.gguf", tiny_gguf(smol))
    write("gguf", "small_vocab_f32.gguf", tiny_gguf("{{ messages[0].content }}", quantized=False,
                                                     small_vocab=True))
    write("gguf", "tiny_llama_f32_v2.gguf", tiny_gguf(None, quantized=False, version=2))
    write("gguf", "tiny_llama3_tmpl_align64.gguf",
          tiny_gguf(LLAMA3_TEMPLATE, align=64, extra_kv=[
              kv("llama.rope.scaling.factor", 6, 2.0),
              kv("llama.attention.key_length", 4, 8),
              kv("general.tags", 9, (8, ["a", "b"])),
              kv("general.flags", 9, (7, [True, False])),
              kv("general.i64", 11, -5), kv("general.i8", 1, -1),
              kv("general.u16", 2, 7), kv("general.i16", 3, -7), kv("general.u8", 0, 1),
              kv("general.i32", 5, -3), kv("general.u64", 10, 1 << 40)]))
    header_only = b"GGUF" + struct.pack("<IQQ", 3, 0, 2) + kv("general.architecture", 8, "llama") + \
        kv("general.alignment", 4, 32)
    write("gguf", "header_only.gguf", header_only)
    q4k = b"GGUF" + struct.pack("<IQQ", 3, 1, 0) + gguf_str("x") + struct.pack("<IQIQ", 1, 256, 12, 0)
    write("gguf", "q4k_tensor.gguf", q4k + b"\0" * (64 + 144 - len(q4k)))
    try:
        with open(MODEL, "rb") as f:
            write("gguf", "smollm2_first_16k.gguf", f.read(16 * 1024))
    except OSError:
        pass

    # safetensors
    f32 = b"".join(struct.pack("<f", i / 4) for i in range(6))
    write("safetensors", "small.safetensors", safetensors_file([
        ("model.norm.weight", "F32", [2, 3], f32),
        ("model.embed_tokens.weight", "F16", [2, 2], b"".join(half(x) for x in (1, 2, 3, 4))),
        ("model.layers.0.self_attn.q_proj.weight", "U32", [1, 2], struct.pack("<II", 7, 9)),
        ("model.layers.0.self_attn.q_proj.scales", "BF16", [1, 1], b"\x80\x3f"),
        ("ids", "I64", [2], struct.pack("<qq", -1, 5)),
        ("flags", "BOOL", [3], b"\x01\x00\x01"),
        ("bytes", "U8", [0], b""),
    ], metadata={"format": "mlx"}))
    write("safetensors", "scalar.safetensors", safetensors_file([("s", "F32", [], struct.pack("<f", 1.5))]))
    write("safetensors", "empty_header.safetensors", safetensors_file([]))

    # st_index
    write("st_index", "two_shards.json", json.dumps({
        "metadata": {"total_size": 1234},
        "weight_map": {"model.embed_tokens.weight": "model-00001-of-00002.safetensors",
                       "model.norm.weight": "model-00002-of-00002.safetensors",
                       "lm_head.weight": "model-00002-of-00002.safetensors"}}, indent=2))
    write("st_index", "subdir_and_escape.json", json.dumps({
        "weight_map": {"a": "shards/a.safetensors", "b": "../b.safetensors", "c": "/abs.safetensors"}}))
    write("st_index", "no_weight_map.json", '{"metadata": {}}')

    # config_json
    llama = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 576,
             "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
             "intermediate_size": 1536, "vocab_size": 49152, "rms_norm_eps": 1e-05,
             "rope_theta": 100000.0, "max_position_embeddings": 8192, "tie_word_embeddings": True,
             "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "bfloat16"}
    write("config_json", "smollm2_llama.json", json.dumps(llama, indent=2))
    llama3 = dict(llama, hidden_size=2048, num_hidden_layers=16, num_attention_heads=32,
                  num_key_value_heads=8, intermediate_size=8192, vocab_size=128256, head_dim=64,
                  rope_theta=500000.0, max_position_embeddings=131072,
                  eos_token_id=[128001, 128008, 128009],
                  rope_scaling={"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                                "original_max_position_embeddings": 8192, "rope_type": "llama3"},
                  quantization={"group_size": 64, "bits": 4})
    write("config_json", "llama3_2_1b_mlx_4bit.json", json.dumps(llama3, indent=2))
    qwen2 = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 896,
             "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
             "intermediate_size": 4864, "vocab_size": 151936, "rms_norm_eps": 1e-06,
             "rope_theta": 1000000.0, "max_position_embeddings": 32768, "tie_word_embeddings": True,
             "eos_token_id": 151645, "use_sliding_window": False, "sliding_window": 32768,
             "quantization": {"group_size": 64, "bits": 8, "mode": "affine"}}
    write("config_json", "qwen2_5_0_5b_8bit.json", json.dumps(qwen2, indent=2))
    mistral = {"architectures": ["MistralForCausalLM"], "hidden_size": 4096, "num_hidden_layers": 32,
               "num_attention_heads": 32, "num_key_value_heads": 8, "intermediate_size": 14336,
               "vocab_size": 32768, "rope_theta": 1000000.0, "rope_traditional": False,
               "rope_scaling": {"type": "linear", "factor": 2.0}}
    write("config_json", "mistral_linear_rope.json", json.dumps(mistral))

    # tokenizer_json: tokenizer.json NUL tokenizer_config.json NUL chat_template.jinja NUL text
    tj = json.dumps(tokenizer_json(), ensure_ascii=False)
    cfg = json.dumps({"bos_token": "<|im_start|>", "eos_token": {"content": "<|im_end|>"},
                      "add_bos_token": True, "chat_template": smol})
    write("tokenizer_json", "bpe_full.bin", "\0".join([tj, cfg, "", "the 123 wörld <|im_end|>"]))
    write("tokenizer_json", "bpe_only.bin", tj)
    cfg_list = json.dumps({"eos_token": "<|im_end|>", "chat_template": [
        {"name": "default", "template": LLAMA3_TEMPLATE}, {"name": "tool_use", "template": "x"}]})
    write("tokenizer_json", "bpe_named_templates.bin", "\0".join([tj, cfg_list]))
    wordlevel = {"version": "1.0", "added_tokens": [], "normalizer": {"type": "Lowercase"},
                 "pre_tokenizer": {"type": "Whitespace"}, "post_processor": None,
                 "decoder": None, "model": {"type": "WordLevel", "vocab": {"[UNK]": 0, "hello": 1,
                                                                          "world": 2},
                                            "unk_token": "[UNK]"}}
    write("tokenizer_json", "wordlevel_template_file.bin",
          "\0".join([json.dumps(wordlevel), "{}", FANCY_TEMPLATE, "Hello WORLD !"]))

    # chat_template: flags byte, template NUL role NUL content ...
    chat = ["system", "You are a helpful AI assistant named SmolLM, trained by Hugging Face",
            "user", "What is the capital of France?", "assistant", "Paris.", "user", " /cmd arg "]
    write("chat_template", "smollm2.bin", "\x01" + "\0".join([smol] + chat))
    write("chat_template", "llama3.bin", "\x01" + "\0".join([LLAMA3_TEMPLATE] + chat))
    write("chat_template", "llama3_bad_role.bin", "\x00" + "\0".join([LLAMA3_TEMPLATE, "tool", "x"]))
    write("chat_template", "fancy.bin", "\x01" + "\0".join([FANCY_TEMPLATE] + chat))

    # c_api: programs for fuzz_targets/c_api.rs (op byte % 14, then its arguments)
    text = lambda s: bytes([len(s)]) + s
    write("c_api", "submit_text_poll.bin",
          b"\x00" + text(b"Hello") + b"\x01\x03"      # submit_text "Hello", params: 3+1? tokens
          + b"\x01" + b"\x06\x00\x00" * 6)           # prompt pointer set; six polls of our id
    write("c_api", "submit_chat.bin",
          b"\x04\x02" + b"\x01" + text(b"Hi!") + b"\x00" + text(b"Be brief.")
          + b"\x05" + b"\x00" + b"\x06\x00\x00\x0d\x03\x06\x00\x00")
    write("c_api", "submit_tokens_sampling.bin",
          b"\x02\x03\x04\x05\x06\x01\x01" + b"\x35\x03" + b"\x07\x00\x09\x09\x09\x09\x09\x09\x09"
          + b"\x01\x01\x02\x03\x04\x05\x06\x07\x08" + b"\x05" + b"\x08\x00\x06\x00\x00")
    write("c_api", "stop_strings_and_nulls.bin",
          b"\x00" + text(b"Count: 1 2 3") + b"\x21\x04" + b"\x02" + text(b"3") + text(b"\xff\xfe")
          + b"\x01\x05\x01" + b"\x0c\x00\x0c\x01\x0c\x02\x0c\x03\x0c\x04\x0c\x05"
          + b"\x0b\x03\x0b\x00\x00\x0a\x10\x00\x00\x00\x09\x02\x06\x00\x00")
    # submit_text "Hello" (params: 4 tokens), submit_chat (temperature sampling, a stop
    # string), submit_tokens; then sleep and poll until tokens arrive.
    wait = (b"\x0d\x03" + b"\x06\x00\xff" + b"\x06\x01\xff" + b"\x06\x02\xff") * 12
    write("c_api", "generate_three.bin",
          b"\x00" + text(b"Hello") + b"\x01\x03" + b"\x01"
          + b"\x04\x01\x01" + text(b"Name a color.") + b"\x05"
          + b"\x25\x03" + b"\x08\x08\x08\x08\x08\x08\x08\x08" + b"\x01" + b"\x00" * 8
          + b"\x01" + text(b"\n") + b"\x02\x01"
          + b"\x02\x03\x07\x01\x02\x07\x03\x04\x01\x01\x03\x05" + wait)
    write("c_api", "bad_params.bin",
          b"\x00" + text(b"x") + b"\x05\x01\x00\x01\x02\x00\x00\x00\x00\x00\x00\x01" + b"\x01"
          + b"\x02\x00\x05\x00" + b"\x08\xff" + b"\x01\x02\x03\x04\x05\x06\x07\x08")


if __name__ == "__main__":
    main()

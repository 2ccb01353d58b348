//! A minimal GGUF writer for hand-made inputs (shared by the tests that build GGUF files).
#![allow(dead_code)]

use serde_json::Value;

/// A minimal GGUF writer for hand-made inputs.
#[derive(Default)]
pub struct Gguf {
    kvs: Vec<u8>,
    n_kv: u64,
}

impl Gguf {
    fn key(&mut self, key: &str, ty: u32) -> &mut Vec<u8> {
        self.n_kv += 1;
        self.kvs.extend((key.len() as u64).to_le_bytes());
        self.kvs.extend(key.as_bytes());
        self.kvs.extend(ty.to_le_bytes());
        &mut self.kvs
    }
    pub fn u32(&mut self, key: &str, v: u32) -> &mut Self {
        self.key(key, 4).extend(v.to_le_bytes());
        self
    }
    pub fn string(&mut self, key: &str, v: &str) -> &mut Self {
        let out = self.key(key, 8);
        out.extend((v.len() as u64).to_le_bytes());
        out.extend(v.as_bytes());
        self
    }
    pub fn strings(&mut self, key: &str, v: &[&str]) -> &mut Self {
        let out = self.key(key, 9);
        out.extend(8u32.to_le_bytes());
        out.extend((v.len() as u64).to_le_bytes());
        for s in v {
            out.extend((s.len() as u64).to_le_bytes());
            out.extend(s.as_bytes());
        }
        self
    }
    pub fn f32s(&mut self, key: &str, v: &[f32]) -> &mut Self {
        let out = self.key(key, 9);
        out.extend(6u32.to_le_bytes());
        out.extend((v.len() as u64).to_le_bytes());
        for x in v {
            out.extend(x.to_le_bytes());
        }
        self
    }
    pub fn bool(&mut self, key: &str, v: bool) -> &mut Self {
        self.key(key, 7).push(v as u8);
        self
    }
    pub fn f32(&mut self, key: &str, v: f32) -> &mut Self {
        self.key(key, 6).extend(v.to_le_bytes());
        self
    }
    pub fn i32s(&mut self, key: &str, v: &[i32]) -> &mut Self {
        let out = self.key(key, 9);
        out.extend(5u32.to_le_bytes());
        out.extend((v.len() as u64).to_le_bytes());
        for x in v {
            out.extend(x.to_le_bytes());
        }
        self
    }
    /// The file, with no tensors.
    pub fn bytes(&self) -> Vec<u8> {
        let mut b = b"GGUF".to_vec();
        b.extend(3u32.to_le_bytes());
        b.extend(0u64.to_le_bytes());
        b.extend(self.n_kv.to_le_bytes());
        b.extend(&self.kvs);
        b
    }
    /// The file with these F32 tensors (name, shape as MLX and PyTorch write it, values in
    /// row-major order); GGUF lists dimensions fastest first, so the shape goes in reversed.
    pub fn with_tensors(
        &self,
        tensors: &[(String, Vec<usize>, Vec<f32>)],
        align: usize,
    ) -> Vec<u8> {
        let mut b = b"GGUF".to_vec();
        b.extend(3u32.to_le_bytes());
        b.extend((tensors.len() as u64).to_le_bytes());
        b.extend(self.n_kv.to_le_bytes());
        b.extend(&self.kvs);
        let mut offset = 0u64;
        for (name, shape, values) in tensors {
            assert_eq!(shape.iter().product::<usize>(), values.len(), "{name}");
            b.extend((name.len() as u64).to_le_bytes());
            b.extend(name.as_bytes());
            b.extend((shape.len() as u32).to_le_bytes());
            for d in shape.iter().rev() {
                b.extend((*d as u64).to_le_bytes());
            }
            b.extend(0u32.to_le_bytes()); // F32
            b.extend(offset.to_le_bytes());
            offset += (values.len() as u64 * 4).div_ceil(align as u64) * align as u64;
        }
        b.resize(b.len().div_ceil(align) * align, 0);
        for (_, _, values) in tensors {
            for v in values {
                b.extend(v.to_le_bytes());
            }
            b.resize(b.len().div_ceil(align) * align, 0);
        }
        b
    }
    /// The file with one F32 tensor `t` holding `values`, its data aligned to `align`.
    pub fn with_tensor(&self, values: &[f32], align: usize) -> Vec<u8> {
        let mut b = b"GGUF".to_vec();
        b.extend(3u32.to_le_bytes());
        b.extend(1u64.to_le_bytes());
        b.extend(self.n_kv.to_le_bytes());
        b.extend(&self.kvs);
        b.extend(1u64.to_le_bytes());
        b.push(b't');
        b.extend(1u32.to_le_bytes());
        b.extend((values.len() as u64).to_le_bytes());
        b.extend(0u32.to_le_bytes()); // F32
        b.extend(0u64.to_le_bytes()); // offset
        b.resize(b.len().div_ceil(align) * align, 0);
        for v in values {
            b.extend(v.to_le_bytes());
        }
        b
    }
}

/// How llama.cpp's converter (convert_hf_to_gguf.py) stores the vocabulary.
pub enum Kind {
    /// Byte-level BPE with this `tokenizer.ggml.pre` (None: left out).
    ByteLevel(Option<&'static str>),
    /// SentencePiece BPE (Llama 2).
    SentencePiece,
}

/// The GGUF tokenizer metadata of a `tokenizer.json`, as llama.cpp writes it: every id's
/// token (`[PADn]` for unused ids), types (1 normal, 2 unknown, 3 control = special added
/// token, 4 user-defined = other added token, 5 unused, 6 byte), merges as "a b", and for
/// SentencePiece scores. The Hugging Face file has no scores (llama.cpp reads them from
/// `tokenizer.model`), but its merges were derived from them, ranked by the merged piece's
/// score: so a piece's score here is minus the rank of the first merge that makes it (pieces
/// no merge makes come last), which orders the pieces as the real scores do.
pub fn gguf_from_tokenizer_json(json: &Value, kind: &Kind) -> Gguf {
    let model = &json["model"];
    let mut tokens: Vec<Option<String>> = Vec::new();
    let mut types: Vec<i32> = Vec::new();
    let mut put = |id: usize, piece: &str, ty: i32| {
        if tokens.len() <= id {
            tokens.resize(id + 1, None);
            types.resize(id + 1, 5);
        }
        tokens[id] = Some(piece.to_owned());
        types[id] = ty;
    };
    for (piece, id) in model["vocab"].as_object().unwrap() {
        let id = id.as_u64().unwrap() as usize;
        let byte = piece.len() == 6 && piece.starts_with("<0x") && piece.ends_with('>');
        let ty = if matches!(kind, Kind::SentencePiece) && byte {
            6
        } else {
            1
        };
        put(id, piece, ty);
    }
    let unk = model["unk_token"].as_str();
    for added in json["added_tokens"].as_array().unwrap() {
        let content = added["content"].as_str().unwrap();
        let ty = if Some(content) == unk {
            2
        } else if added["special"].as_bool().unwrap() {
            3
        } else {
            4
        };
        put(added["id"].as_u64().unwrap() as usize, content, ty);
    }
    let tokens: Vec<String> = tokens
        .into_iter()
        .enumerate()
        .map(|(i, t)| t.unwrap_or_else(|| format!("[PAD{i}]")))
        .collect();
    let token_refs: Vec<&str> = tokens.iter().map(String::as_str).collect();
    let mut g = Gguf::default();
    g.string("general.architecture", "llama")
        .strings("tokenizer.ggml.tokens", &token_refs)
        .i32s("tokenizer.ggml.token_type", &types);
    match kind {
        Kind::ByteLevel(pre) => {
            let merges: Vec<String> = model["merges"]
                .as_array()
                .unwrap()
                .iter()
                .map(|m| match m {
                    Value::String(s) => s.clone(),
                    Value::Array(p) => {
                        format!("{} {}", p[0].as_str().unwrap(), p[1].as_str().unwrap())
                    }
                    other => panic!("merge {other}"),
                })
                .collect();
            let merge_refs: Vec<&str> = merges.iter().map(String::as_str).collect();
            g.string("tokenizer.ggml.model", "gpt2")
                .strings("tokenizer.ggml.merges", &merge_refs);
            if let Some(pre) = pre {
                g.string("tokenizer.ggml.pre", pre);
            }
        }
        Kind::SentencePiece => {
            let mut rank: std::collections::HashMap<String, usize> = Default::default();
            let merges = model["merges"].as_array().unwrap();
            for (r, m) in merges.iter().enumerate() {
                let (l, rt) = match m {
                    Value::String(s) => s.split_once(' ').unwrap(),
                    Value::Array(p) => (p[0].as_str().unwrap(), p[1].as_str().unwrap()),
                    other => panic!("merge {other}"),
                };
                rank.entry(format!("{l}{rt}")).or_insert(r);
            }
            let scores: Vec<f32> = tokens
                .iter()
                .enumerate()
                .map(|(i, t)| -(rank.get(t).copied().unwrap_or(merges.len() + i) as f32))
                .collect();
            g.string("tokenizer.ggml.model", "llama")
                .f32s("tokenizer.ggml.scores", &scores)
                .bool("tokenizer.ggml.add_space_prefix", true);
            if let Some(unk) = unk {
                let id = tokens.iter().position(|t| t == unk).unwrap();
                g.u32("tokenizer.ggml.unknown_token_id", id as u32);
            }
        }
    }
    g
}

//! A minimal GGUF writer for hand-made inputs (shared by the tests that build GGUF files).
#![allow(dead_code)]

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

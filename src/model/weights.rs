//! Dense and affine-quantized weights, and the policy that picks between them.
use std::collections::HashMap;

use mlx_rs::ops::{dequantize, matmul, quantized_matmul};
use mlx_rs::Array;

use crate::error::{Error, Result};

/// Whether quantized weights are dequantized at load.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum WeightsPolicy {
    /// Dequantize to float32 on the CPU backend (MLX's CPU quantized matmul is several times
    /// slower than an OpenBLAS sgemm), keep quantized on Metal and CUDA.
    #[default]
    Auto,
    /// Always dequantize to float32.
    Dequantize,
    /// Always keep quantized weights quantized.
    KeepQuantized,
}

impl WeightsPolicy {
    pub(crate) fn dequantize(self) -> bool {
        match self {
            Self::Auto => crate::backend() == "cpu",
            Self::Dequantize => true,
            Self::KeepQuantized => false,
        }
    }
}

/// An affine-quantized matrix `[out, in]` in MLX's packed layout.
pub(crate) struct Quantized {
    w: Array,
    scales: Array,
    biases: Array,
    group_size: i32,
    bits: i32,
}

impl Quantized {
    fn take(t: &mut HashMap<String, Array>, name: &str, w: Array, group_size: i32) -> Result<Self> {
        let (Some(scales), Some(biases)) = (
            t.remove(&format!("{name}.scales")),
            t.remove(&format!("{name}.biases")),
        ) else {
            return Err(Error::UnsupportedQuantization(format!(
                "{name}: packed weight without affine scales and biases"
            )));
        };
        let rows = w.shape()[0];
        let groups_shape = scales.shape().get(1).copied().unwrap_or(0);
        if scales.ndim() != 2
            || scales.shape() != biases.shape()
            || scales.shape()[0] != rows
            || groups_shape <= 0
        {
            return Err(Error::BadWeights(format!(
                "{name}: scales {:?} and biases {:?} do not match the packed weight {:?}",
                scales.shape(),
                biases.shape(),
                w.shape()
            )));
        }
        let packed_cols = *w.shape().last().unwrap_or(&0) as i64;
        let groups = *scales.shape().last().unwrap_or(&0) as i64;
        let in_features = groups * group_size as i64;
        if in_features <= 0 || packed_cols <= 0 || (packed_cols * 32) % in_features != 0 {
            return Err(Error::BadWeights(format!(
                "{name}: {packed_cols} packed columns do not fit {groups} groups of {group_size}"
            )));
        }
        let bits = i32::try_from(packed_cols * 32 / in_features).unwrap_or(0);
        if ![2, 3, 4, 5, 6, 8].contains(&bits) {
            return Err(Error::UnsupportedQuantization(format!(
                "{name}: {bits}-bit weights (supported: 2, 3, 4, 5, 6, 8)"
            )));
        }
        Ok(Self {
            w,
            scales,
            biases,
            group_size,
            bits,
        })
    }

    fn dequantized(&self) -> Result<Array> {
        let d = dequantize(
            &self.w,
            &self.scales,
            &self.biases,
            self.group_size,
            self.bits,
        )?;
        Ok(d.as_type::<f32>()?)
    }
}

fn take_weight(t: &mut HashMap<String, Array>, name: &str) -> Result<Array> {
    t.remove(&format!("{name}.weight"))
        .ok_or_else(|| Error::BadWeights(format!("missing tensor {name}.weight")))
}

/// A linear layer `y = x W^T (+ b)`.
pub enum Linear {
    Dense {
        w: Array,
        b: Option<Array>,
    },
    #[allow(private_interfaces)]
    Quantized {
        q: Quantized,
        b: Option<Array>,
    },
}

impl Linear {
    /// The in-memory format of the weight (see [`super::Model::weight_dtype`]).
    pub(crate) fn dtype_name(&self) -> String {
        match self {
            Self::Dense { w, .. } => match w.dtype() {
                mlx_rs::Dtype::Float32 => "float32".into(),
                mlx_rs::Dtype::Float16 => "float16".into(),
                mlx_rs::Dtype::Bfloat16 => "bfloat16".into(),
                other => format!("{other:?}").to_lowercase(),
            },
            Self::Quantized { q, .. } => format!("q{}_g{}", q.bits, q.group_size),
        }
    }

    pub(crate) fn take(
        t: &mut HashMap<String, Array>,
        name: &str,
        group_size: i32,
        dequantize: bool,
    ) -> Result<Self> {
        let w = take_weight(t, name)?;
        if w.ndim() != 2 {
            return Err(Error::BadWeights(format!(
                "{name}.weight has shape {:?}; expected a matrix",
                w.shape()
            )));
        }
        let b = t.remove(&format!("{name}.bias"));
        if let Some(b) = &b {
            if b.shape() != [w.shape()[0]] {
                return Err(Error::BadWeights(format!(
                    "{name}.bias has shape {:?}; expected [{}]",
                    b.shape(),
                    w.shape()[0]
                )));
            }
        }
        if w.dtype() == mlx_rs::Dtype::Uint32 {
            let q = Quantized::take(t, name, w, group_size)?;
            if dequantize {
                Ok(Self::Dense {
                    w: q.dequantized()?,
                    b,
                })
            } else {
                Ok(Self::Quantized { q, b })
            }
        } else {
            let w = if w.dtype() == mlx_rs::Dtype::Float32 || !dequantize {
                w
            } else {
                w.as_type::<f32>()?
            };
            Ok(Self::Dense { w, b })
        }
    }

    pub(crate) fn forward(&self, x: &Array) -> Result<Array> {
        let (y, b) = match self {
            Self::Dense { w, b } => (matmul(x, w.transpose_axes(&[1, 0])?)?, b),
            Self::Quantized { q, b } => (
                quantized_matmul(x, &q.w, &q.scales, &q.biases, true, q.group_size, q.bits)?,
                b,
            ),
        };
        Ok(match b {
            Some(b) => y.add(b)?,
            None => y,
        })
    }

    pub(crate) fn is_quantized(&self) -> bool {
        matches!(self, Self::Quantized { .. })
    }

    pub(crate) fn out_features(&self) -> usize {
        match self {
            Self::Dense { w, .. } => w.shape()[0] as usize,
            Self::Quantized { q, .. } => q.w.shape()[0] as usize,
        }
    }

    /// Input width of the logical (dequantized) matrix.
    pub(crate) fn in_features(&self) -> usize {
        match self {
            Self::Dense { w, .. } => w.shape()[1] as usize,
            Self::Quantized { q, .. } => (q.scales.shape()[1] * q.group_size) as usize,
        }
    }

    pub(crate) fn collect<'a>(&'a self, out: &mut Vec<&'a Array>) {
        match self {
            Self::Dense { w, b } => out.extend(std::iter::once(w).chain(b)),
            Self::Quantized { q, b } => {
                out.extend([&q.w, &q.scales, &q.biases].into_iter().chain(b))
            }
        }
    }
}

/// The token embedding table, also used as the output projection when tied.
pub enum Embedding {
    Dense(Array),
    #[allow(private_interfaces)]
    Quantized(Quantized),
}

impl Embedding {
    pub(crate) fn take(
        t: &mut HashMap<String, Array>,
        name: &str,
        group_size: i32,
        dequantize: bool,
    ) -> Result<Self> {
        match Linear::take(t, name, group_size, dequantize)? {
            Linear::Dense { w, .. } => Ok(Self::Dense(w)),
            Linear::Quantized { q, .. } => Ok(Self::Quantized(q)),
        }
    }

    /// `(rows, width)` of the logical (dequantized) table.
    pub(crate) fn shape(&self) -> (usize, usize) {
        match self {
            Self::Dense(w) => (w.shape()[0] as usize, w.shape()[1] as usize),
            Self::Quantized(q) => (
                q.w.shape()[0] as usize,
                (q.scales.shape()[1] * q.group_size) as usize,
            ),
        }
    }

    pub(crate) fn lookup(&self, ids: &Array) -> Result<Array> {
        match self {
            Self::Dense(w) => Ok(w.take_axis(ids, 0)?),
            Self::Quantized(q) => {
                let rows = |a: &Array| a.take_axis(ids, 0);
                let d = dequantize(
                    rows(&q.w)?,
                    rows(&q.scales)?,
                    &rows(&q.biases)?,
                    q.group_size,
                    q.bits,
                )?;
                Ok(d)
            }
        }
    }

    pub(crate) fn as_linear(&self, x: &Array) -> Result<Array> {
        match self {
            Self::Dense(w) => Ok(matmul(x, w.transpose_axes(&[1, 0])?)?),
            Self::Quantized(q) => Ok(quantized_matmul(
                x,
                &q.w,
                &q.scales,
                &q.biases,
                true,
                q.group_size,
                q.bits,
            )?),
        }
    }

    pub(crate) fn collect<'a>(&'a self, out: &mut Vec<&'a Array>) {
        match self {
            Self::Dense(w) => out.push(w),
            Self::Quantized(q) => out.extend([&q.w, &q.scales, &q.biases]),
        }
    }
}

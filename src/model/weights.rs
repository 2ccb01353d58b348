//! Dense and affine-quantized weights, and the policy that picks between them.
use std::collections::HashMap;

use mlx_rs::ops::indexing::TryIndexOp;
use mlx_rs::ops::{concatenate, dequantize, matmul, quantized_matmul, zeros_dtype};
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

    /// `x @ w.T (+ b)`, a dense matmul done as `plan` says.
    pub(crate) fn forward(&self, x: &Array, pad: MatmulPlan) -> Result<Array> {
        let (y, b) = match self {
            Self::Dense { w, b } => (dense_matmul(x, w, pad)?, b),
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

    pub(crate) fn as_linear(&self, x: &Array, pad: MatmulPlan) -> Result<Array> {
        match self {
            Self::Dense(w) => dense_matmul(x, w, pad),
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

/// The row count a dense float32 matmul of `rows` rows runs fastest at with a multi-threaded
/// OpenBLAS.
///
/// OpenBLAS (MLX's BLAS on Linux) splits an sgemm's rows between its threads in blocks of its
/// kernel's row tile, so with a few rows that are not near a multiple of 16 it runs about as
/// slowly as on one thread. On the project's 2-core machine the 121 matmuls of a SmolLM2-135M
/// decode step took 97-165 ms at 8-12 rows and 81-86 ms at 16; padded to 16 rows they took
/// 81-91 ms (docs/benchmarks.md). At 72 and 100 rows padding gained nothing, and 1, 2 or
/// 16k + 1-2 rows are fast as they are.
pub(crate) fn padded_rows(rows: i32) -> Option<i32> {
    let rem = rows % 16;
    (rows <= 64 && rem >= 3).then_some(rows - rem + 16)
}

/// How a dense float32 matmul with the weights (`x @ w.T`) is computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum MatmulPlan {
    /// MLX's matmul as it is.
    Plain,
    /// MLX's matmul with the rows of `x` (all axes but the last, flattened) zero-padded to
    /// this many and the padded rows' outputs dropped (see [`padded_rows`]).
    Pad(i32),
    /// convoy's kernel for a few rows ([`rows_matmul`]).
    Rows,
}

/// `x @ w.T` as `plan` says (a plan that does not apply to these operands, e.g. to float16
/// weights, falls back to MLX's matmul). Each output row depends only on its own input row,
/// so every plan computes the same product (rounded differently: the sums run in another
/// order).
fn dense_matmul(x: &Array, w: &Array, plan: MatmulPlan) -> Result<Array> {
    let shape = x.shape();
    let width = shape[shape.len() - 1];
    let rows: i32 = shape[..shape.len() - 1].iter().product();
    let float32 = w.dtype() == mlx_rs::Dtype::Float32 && x.dtype() == mlx_rs::Dtype::Float32;
    let mut out = shape[..shape.len() - 1].to_vec();
    out.push(w.shape()[0]);
    match plan {
        MatmulPlan::Rows if float32 && rows >= 1 => {
            let y = rows_matmul(&x.reshape(&[rows, width])?, w)?;
            Ok(y.reshape(&out)?)
        }
        MatmulPlan::Pad(p) if p > rows && shape.len() >= 2 && float32 => {
            let wt = w.transpose_axes(&[1, 0])?;
            let flat = x.reshape(&[rows, width])?;
            let zeros = zeros_dtype(&[p - rows, width], x.dtype())?;
            let y = matmul(&concatenate(&[flat, zeros], 0)?, &wt)?;
            Ok(y.try_index((..rows, ..))?.reshape(&out)?)
        }
        _ => Ok(matmul(x, &w.transpose_axes(&[1, 0])?)?),
    }
}

/// The most rows [`MatmulPlan::Rows`] is used for. The kernel reads each weight row once
/// for all rows of `x`, so it is bound by memory traffic up to about 16 rows and by
/// arithmetic beyond (where OpenBLAS's packed kernels win). On the project's 2-core EPYC,
/// against OpenBLAS (rows padded as [`padded_rows`] pads them), a [3072, 576] weight
/// streamed from memory: 0.4 against 1.0 ms at 1 row, 0.5 against 1.3 ms at 8, 1.0 against
/// 1.3-1.5 ms at 16, about equal at 24-32 (docs/benchmarks.md).
pub(crate) const ROWS_MATMUL_MAX: i32 = 16;

#[cfg(convoy_rows_matmul)]
mod rows_ffi {
    use std::ffi::{c_char, c_int, c_void};
    extern "C" {
        pub fn convoy_internal_rows_matmul_supported() -> c_int;
        pub fn convoy_internal_rows_matmul(
            out: *mut *mut c_void,
            x: *const c_void,
            w: *const c_void,
            err: *mut c_char,
            err_len: usize,
        ) -> c_int;
    }
}

/// Whether [`rows_matmul`] can run here: built (the CPU backend on x86-64) and a CPU with
/// AVX2 and FMA. Checked once.
pub(crate) fn rows_matmul_available() -> bool {
    #[cfg(convoy_rows_matmul)]
    {
        static SUPPORTED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        crate::backend() == "cpu"
            && *SUPPORTED
                .get_or_init(|| unsafe { rows_ffi::convoy_internal_rows_matmul_supported() } != 0)
    }
    #[cfg(not(convoy_rows_matmul))]
    {
        false
    }
}

/// `x @ w.T` for `x` [M, K] and `w` [N, K], both float32, by convoy's CPU kernel
/// (`rows_matmul.cc`): an MLX primitive on the default (CPU) stream whose kernel streams
/// each weight row from memory once, without the packing copy OpenBLAS makes of both
/// operands, and splits the output columns between the threads of the calling thread's
/// OpenMP team (with OpenBLAS's OpenMP build, the team its sgemm uses). For a decode step's
/// few rows that copy is most of OpenBLAS's time: the step is bound by reading the weights.
/// A row's output is bit-identical whatever other rows share the call. Only called when
/// [`rows_matmul_available`].
#[cfg(convoy_rows_matmul)]
fn rows_matmul(x: &Array, w: &Array) -> Result<Array> {
    let mut out: *mut std::ffi::c_void = std::ptr::null_mut();
    let mut err = [0 as std::ffi::c_char; 256];
    // SAFETY: the two pointers are the `mlx::core::array*` inside live mlx-rs arrays; the
    // function only reads them, and on success hands back a new heap array, which mlx-rs's
    // `Array` owns and frees (mlx-c's `mlx_array.ctx` is exactly such a pointer).
    let rc = unsafe {
        rows_ffi::convoy_internal_rows_matmul(
            &mut out,
            x.as_ptr().ctx,
            w.as_ptr().ctx,
            err.as_mut_ptr(),
            err.len(),
        )
    };
    if rc != 0 || out.is_null() {
        // SAFETY: the C side always NUL-terminates within the buffer.
        let msg = unsafe { std::ffi::CStr::from_ptr(err.as_ptr()) };
        return Err(Error::Mlx(msg.to_string_lossy().into_owned()));
    }
    // SAFETY: see above.
    Ok(unsafe { Array::from_ptr(mlx_sys::mlx_array { ctx: out }) })
}

#[cfg(not(convoy_rows_matmul))]
fn rows_matmul(x: &Array, w: &Array) -> Result<Array> {
    Ok(matmul(x, &w.transpose_axes(&[1, 0])?)?)
}

/// Projections that read the same input (q, k, v; gate, up), stored as one matrix when they
/// can be (same format, same input width, biases on all or none), so a step runs one matmul
/// instead of several: fewer BLAS calls and graph nodes, the input read once. The outputs are
/// split back apart (views).
pub(crate) enum Projections {
    Fused {
        lin: Linear,
        /// Output width of each part.
        sizes: Vec<usize>,
    },
    Separate(Vec<Linear>),
}

impl Projections {
    /// Fuses `parts` when their formats allow it, evaluating the fused matrix (so the parts'
    /// memory is freed here rather than held until the whole model is evaluated).
    pub(crate) fn new(parts: Vec<Linear>) -> Result<Self> {
        let sizes: Vec<usize> = parts.iter().map(Linear::out_features).collect();
        let same_in = parts
            .windows(2)
            .all(|w| w[0].in_features() == w[1].in_features());
        let cat =
            |arrays: Vec<&Array>| -> Result<Array> { Ok(mlx_rs::ops::concatenate(&arrays, 0)?) };
        let fused = match parts.first() {
            _ if !same_in || parts.len() < 2 => None,
            Some(Linear::Dense { w: w0, b: b0 }) => {
                let mut ws = Vec::new();
                let mut bs = Vec::new();
                let mut ok = true;
                for p in &parts {
                    match p {
                        Linear::Dense { w, b }
                            if w.dtype() == w0.dtype()
                                && b.as_ref().map(Array::dtype)
                                    == b0.as_ref().map(Array::dtype) =>
                        {
                            ws.push(w);
                            if let Some(b) = b {
                                bs.push(b);
                            }
                        }
                        _ => ok = false,
                    }
                }
                let bias = b0.is_some();
                if ok && (bs.len() == parts.len() || (!bias && bs.is_empty())) {
                    let b = if bias { Some(cat(bs)?) } else { None };
                    Some(Linear::Dense { w: cat(ws)?, b })
                } else {
                    None
                }
            }
            Some(Linear::Quantized { q: q0, b: b0 }) => {
                let qs: Vec<&Quantized> = parts
                    .iter()
                    .filter_map(|p| match p {
                        Linear::Quantized { q, b }
                            if q.bits == q0.bits
                                && q.group_size == q0.group_size
                                && q.scales.dtype() == q0.scales.dtype()
                                && q.biases.dtype() == q0.biases.dtype()
                                && b.as_ref().map(Array::dtype)
                                    == b0.as_ref().map(Array::dtype) =>
                        {
                            Some(q)
                        }
                        _ => None,
                    })
                    .collect();
                if qs.len() == parts.len() {
                    let b = match b0 {
                        Some(_) => Some(cat(parts
                            .iter()
                            .filter_map(|p| match p {
                                Linear::Quantized { b, .. } => b.as_ref(),
                                Linear::Dense { .. } => None,
                            })
                            .collect())?),
                        None => None,
                    };
                    Some(Linear::Quantized {
                        q: Quantized {
                            w: cat(qs.iter().map(|q| &q.w).collect())?,
                            scales: cat(qs.iter().map(|q| &q.scales).collect())?,
                            biases: cat(qs.iter().map(|q| &q.biases).collect())?,
                            group_size: q0.group_size,
                            bits: q0.bits,
                        },
                        b,
                    })
                } else {
                    None
                }
            }
            None => None,
        };
        match fused {
            Some(lin) => {
                let mut all = Vec::new();
                lin.collect(&mut all);
                mlx_rs::transforms::eval(all)?;
                Ok(Self::Fused { lin, sizes })
            }
            None => Ok(Self::Separate(parts)),
        }
    }

    /// Each part's output for `x` (`[..., in]` to `[..., out_i]`).
    pub(crate) fn forward(&self, x: &Array, pad: MatmulPlan) -> Result<Vec<Array>> {
        match self {
            Self::Fused { lin, sizes } => {
                let y = lin.forward(x, pad)?;
                let mut at = Vec::with_capacity(sizes.len() - 1);
                let mut end = 0;
                for s in &sizes[..sizes.len() - 1] {
                    end += *s as i32;
                    at.push(end);
                }
                Ok(y.split_at_indices(&at, -1)?)
            }
            Self::Separate(parts) => parts.iter().map(|p| p.forward(x, pad)).collect(),
        }
    }

    /// (output, input) width of each part.
    pub(crate) fn part_shapes(&self) -> Vec<(usize, usize)> {
        match self {
            Self::Fused { lin, sizes } => sizes.iter().map(|&s| (s, lin.in_features())).collect(),
            Self::Separate(parts) => parts
                .iter()
                .map(|p| (p.out_features(), p.in_features()))
                .collect(),
        }
    }

    pub(crate) fn is_quantized(&self) -> bool {
        match self {
            Self::Fused { lin, .. } => lin.is_quantized(),
            Self::Separate(parts) => parts.iter().any(Linear::is_quantized),
        }
    }

    pub(crate) fn dtype_name(&self) -> String {
        match self {
            Self::Fused { lin, .. } => lin.dtype_name(),
            Self::Separate(parts) => parts.first().map_or("none".into(), Linear::dtype_name),
        }
    }

    pub(crate) fn collect<'a>(&'a self, out: &mut Vec<&'a Array>) {
        match self {
            Self::Fused { lin, .. } => lin.collect(out),
            Self::Separate(parts) => parts.iter().for_each(|p| p.collect(out)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(a: &Array) -> Vec<f32> {
        a.eval().unwrap();
        a.as_slice::<f32>().to_vec()
    }

    /// Deterministic values in [-1, 1).
    fn values(n: usize, seed: u32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                (s >> 8) as f32 / (1u32 << 23) as f32 - 1.0
            })
            .collect()
    }

    #[test]
    fn rows_matmul_matches_mlx_and_is_independent_of_the_other_rows() {
        if !rows_matmul_available() {
            eprintln!("convoy's rows kernel does not run here; skipped");
            return;
        }
        // Widths with and without a tail past the 8 lanes; N below and above the columns one
        // thread takes alone; every row count up to the plan's limit.
        for (k, n) in [(576, 960), (37, 130), (8, 1), (1536, 64), (20, 3)] {
            let w = Array::from_slice(&values(n * k, 7 + k as u32), &[n as i32, k as i32]);
            let all = values(ROWS_MATMUL_MAX as usize * k, 3);
            let alone: Vec<Vec<f32>> = (0..ROWS_MATMUL_MAX as usize)
                .map(|r| {
                    let x = Array::from_slice(&all[r * k..(r + 1) * k], &[1, k as i32]);
                    host(&rows_matmul(&x, &w).unwrap())
                })
                .collect();
            for m in 1..=ROWS_MATMUL_MAX as usize {
                let x = Array::from_slice(&all[..m * k], &[m as i32, k as i32]);
                let got = host(&rows_matmul(&x, &w).unwrap());
                let want = host(&matmul(&x, w.transpose_axes(&[1, 0]).unwrap()).unwrap());
                assert_eq!(got.len(), m * n);
                for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                    let tol = 1e-5 * (k as f32).sqrt() * (1.0 + b.abs());
                    assert!((a - b).abs() <= tol, "k={k} n={n} m={m} [{i}]: {a} vs {b}");
                }
                // Bit for bit what each row gets alone.
                for r in 0..m {
                    assert_eq!(
                        got[r * n..(r + 1) * n],
                        alone[r][..],
                        "k={k} n={n} m={m} row {r}"
                    );
                }
            }
        }
        // Operands that are views: a transposed x, a column slice of the weights, and a
        // [M, 1]-shaped x whose strides are those of a transposed row.
        let (k, n) = (40, 70);
        let w = Array::from_slice(&values(n * k, 11), &[n as i32, k as i32]);
        let xt = Array::from_slice(&values(k * 5, 12), &[k as i32, 5]);
        let x = xt.transpose_axes(&[1, 0]).unwrap();
        let want = host(&matmul(&x, w.transpose_axes(&[1, 0]).unwrap()).unwrap());
        assert_eq!(host(&rows_matmul(&x, &w).unwrap()).len(), want.len());
        for (a, b) in host(&rows_matmul(&x, &w).unwrap()).iter().zip(&want) {
            assert!((a - b).abs() <= 1e-4, "{a} vs {b}");
        }
        let wide = Array::from_slice(&values(n * 2 * k, 13), &[n as i32, 2 * k as i32]);
        let wv = wide.try_index((.., ..k as i32)).unwrap();
        let x = Array::from_slice(&values(3 * k, 14), &[3, k as i32]);
        let want = host(&matmul(&x, wv.transpose_axes(&[1, 0]).unwrap()).unwrap());
        for (a, b) in host(&rows_matmul(&x, &wv).unwrap()).iter().zip(&want) {
            assert!((a - b).abs() <= 1e-4, "{a} vs {b}");
        }
        let row = Array::from_slice(&values(6, 17), &[1, 6]);
        let col = row.transpose_axes(&[1, 0]).unwrap();
        let w1 = Array::from_slice(&values(9, 18), &[9, 1]);
        let want = host(&matmul(&col, w1.transpose_axes(&[1, 0]).unwrap()).unwrap());
        for (a, b) in host(&rows_matmul(&col, &w1).unwrap()).iter().zip(&want) {
            assert!((a - b).abs() <= 1e-5, "{a} vs {b}");
        }
        // The plan reshapes leading axes and keeps them.
        let x3 = Array::from_slice(&values(2 * 3 * k, 15), &[2, 3, k as i32]);
        let y = dense_matmul(&x3, &w, MatmulPlan::Rows).unwrap();
        assert_eq!(y.shape(), &[2, 3, n as i32]);
        let want = host(&dense_matmul(&x3, &w, MatmulPlan::Plain).unwrap());
        for (a, b) in host(&y).iter().zip(&want) {
            assert!((a - b).abs() <= 1e-4, "{a} vs {b}");
        }
        // Bad operands are an error, not a crash.
        let bad = Array::from_slice(&values(3 * (k + 1), 16), &[3, k as i32 + 1]);
        assert!(rows_matmul(&bad, &w).is_err());
    }
}

//! `exp` for the CPU backend, rebuilt from operations MLX runs fast there, and the softmax and
//! SwiGLU built on it.
//!
//! MLX's CPU kernels evaluate `exp` (and with it softmax, sigmoid and SiLU) one element at a
//! time through a polynomial whose `fma` steps are calls into libm: the official Linux wheel
//! is built for baseline x86-64, so neither its kernels nor its JIT (`g++ -O3`, no `-march`)
//! may emit FMA instructions. On the project's machine that is about 15 ns per element, where
//! an add is 0.3 ns, and it made the attention softmax and the MLP's SiLU a large part of every
//! prefill chunk.
//!
//! [`exp_parts`] computes the same Cephes polynomial for `2^frac` with plain multiplies and
//! adds in compiled MLX code (`mlx::compile`: MLX fuses the graph into a few elementwise
//! kernels, split where its fuser's depth limit and shared intermediates require), rounds
//! with the float32 magic-number trick instead of `floor` (another libm call), and returns
//! the power of two `2^int` as its IEEE-754 bit pattern, which a free `view` turns into a
//! float. About 4-5 ns per element here against MLX's 15. Relative error against MLX's `exp`
//! is about 1.2e-7 (an ulp). Inputs are clamped to [-87, 88], so `exp(-inf)` (a masked score)
//! is 1.6e-38 rather than 0, which a softmax cannot tell apart (every row's maximum
//! contributes 1); a NaN input gives NaN.
//!
//! The compiled functions are kept per thread (MLX's compile cache is per thread, and compiled
//! state is not `Send`). MLX's CPU compile needs a C++ compiler at run time (`g++`; kernels
//! are built into and loaded from `$TMPDIR/mlx/<version>/cpu`). [`available`] checks both
//! once; without them convoy uses MLX's `exp`.

use std::cell::RefCell;

use mlx_rs::error::Exception;
use mlx_rs::ops;
use mlx_rs::Array;

use crate::error::{Error, Result};

/// Below this many elements MLX's own `exp` is faster: the compiled form is several kernels
/// and a view, whose fixed cost per call (a few microseconds each) outweighs 15 ns per
/// element. Measured on the decode step (`convoy-bench --profile-decode B --ablate exp
/// --interleave`): 4-5% slower at batch 1-2 (2-4 thousand elements per softmax or SiLU),
/// even at 4, 5% faster at 8.
pub(crate) const MIN_ELEMENTS: usize = 8192;

/// Whether [`exp`] pays for an operand of this shape.
pub(crate) fn pays_off(shape: &[i32]) -> bool {
    shape.iter().map(|&d| d.max(0) as usize).product::<usize>() >= MIN_ELEMENTS
}

type CompiledFn = Box<dyn FnMut(&[Array]) -> std::result::Result<Vec<Array>, Exception>>;

thread_local! {
    static EXP_PARTS: RefCell<Option<CompiledFn>> = const { RefCell::new(None) };
    static SWIGLU_FINISH: RefCell<Option<CompiledFn>> = const { RefCell::new(None) };
}

/// log2(e).
const LOG2E: f32 = std::f32::consts::LOG2_E;
/// 1.5 * 2^23: adding and subtracting it rounds a float32 of magnitude < 2^22 to an integer.
/// (MLX's JIT prints it as 1.258291e+07, i.e. 12582910: any integer within 2^23 + 128 ..
/// 2^24 - 128 rounds the same way for |t| <= 128, so the trick survives the printing.)
const ROUND: f32 = 12_582_912.0;
/// Cephes' polynomial for 2^f on [-0.5, 0.5], highest degree first (as in MLX's `simd::exp`).
const POLY: [f32; 7] = [
    1.535_336_2e-4,
    1.339_887_4e-3,
    9.618_437e-3,
    5.550_332_5e-2,
    2.402_264_8e-1,
    6.931_472e-1,
    1.0,
];

fn f(v: f32) -> Array {
    Array::from_f32(v)
}

/// The traced graph: `x` -> [`2^frac(x log2 e)` as f32, `2^int(x log2 e)` as i32 bits].
fn exp_parts_graph(args: &[Array]) -> std::result::Result<Vec<Array>, Exception> {
    let x = ops::minimum(ops::maximum(&args[0], f(-87.0))?, f(88.0))?;
    let t = x.multiply(f(LOG2E))?;
    let whole = t.add(f(ROUND))?.subtract(f(ROUND))?;
    let frac = t.subtract(&whole)?;
    let mut p = f(POLY[0]);
    for &c in &POLY[1..] {
        p = p.multiply(&frac)?.add(f(c))?;
    }
    // (whole + 127) << 23 as an integer multiply (fusable; no overflow for whole in [-126, 127]).
    let bits = whole
        .as_type::<i32>()?
        .add(Array::from_int(127))?
        .multiply(Array::from_int(1 << 23))?;
    Ok(vec![p, bits])
}

fn swiglu_finish_graph(args: &[Array]) -> std::result::Result<Vec<Array>, Exception> {
    // gate * up * sigmoid(gate) = gate * up / (1 + exp(-gate)), exp(-gate) = p * scale.
    let (gate, up, p, scale) = (&args[0], &args[1], &args[2], &args[3]);
    let denom = p.multiply(scale)?.add(f(1.0))?;
    Ok(vec![gate.multiply(up)?.divide(&denom)?])
}

fn call(
    slot: &'static std::thread::LocalKey<RefCell<Option<CompiledFn>>>,
    graph: fn(&[Array]) -> std::result::Result<Vec<Array>, Exception>,
    args: &[Array],
) -> Result<Vec<Array>> {
    slot.with(|cell| {
        let mut cell = cell.borrow_mut();
        let compiled = cell.get_or_insert_with(|| {
            Box::new(mlx_rs::transforms::compile::compile(graph, true)) as CompiledFn
        });
        compiled(args).map_err(|e| Error::Mlx(format!("compiled exp: {e}")))
    })
}

/// `exp(x)` as two factors (float32 `x` only): `exp(x) = p * scale`, where `scale` is a power
/// of two. Callers fold the product into their next operation.
pub(crate) fn exp_parts(x: &Array) -> Result<(Array, Array)> {
    let mut out = call(&EXP_PARTS, exp_parts_graph, std::slice::from_ref(x))?;
    let bits = out.pop().expect("two outputs");
    let p = out.pop().expect("two outputs");
    Ok((p, bits.view::<f32>()?))
}

/// `exp(x)` for float32 `x` (see the module docs for range and accuracy).
pub(crate) fn exp(x: &Array) -> Result<Array> {
    let (p, scale) = exp_parts(x)?;
    Ok(p.multiply(&scale)?)
}

/// Drops this thread's compiled functions. MLX frees them through its compiler's static
/// objects, so an engine thread calls this before it reports itself finished to the exit
/// hook: a thread-local destructor would run after that, possibly while the exiting process
/// destroys those objects.
pub(crate) fn release_thread_state() {
    for slot in [&EXP_PARTS, &SWIGLU_FINISH] {
        let _ = slot.try_with(|cell| cell.borrow_mut().take());
    }
}

/// Whether convoy's `exp` is used here, decided once per process: MLX's CPU compiler must be
/// there (MLX runs `g++ --version` once and, without it, runs compiled graphs op by op, which
/// would be slower than its own `exp`), and [`self_check`] must pass. The engine thread calls
/// it before it registers its exit hook, so the static objects MLX's compiler creates on
/// first use are destroyed after the hook has stopped engine threads.
pub(crate) fn available() -> bool {
    static WORKS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *WORKS.get_or_init(|| compiler_runs() && self_check())
}

/// `g++ --version` succeeds within 10 s (the check MLX makes, bounded: a compiler that hangs
/// turns convoy's `exp` off rather than hanging the engine).
fn compiler_runs() -> bool {
    use std::process::{Command, Stdio};
    let Ok(mut child) = Command::new("g++")
        .arg("--version")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
    else {
        return false;
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return status.success(),
            Ok(None) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return false;
            }
        }
    }
}

/// Whether [`exp`] runs and agrees with MLX's here: evaluated on contiguous and strided
/// inputs, which compile to different kernels. (A compiler that fails, or a temporary
/// directory MLX cannot write its kernels to, is caught here at load; one that breaks later
/// fails MLX's evaluations, as it would for every compiled MLX op.)
pub(crate) fn self_check() -> bool {
    let check = || -> Result<bool> {
        let xs: Vec<f32> = (0..64).map(|i| i as f32 * 0.75 - 30.0).collect();
        let x = Array::from_slice(&xs, &[8, 8]);
        let strided = x.transpose_axes(&[1, 0])?;
        let mut ok = true;
        for input in [&x, &strided] {
            let got = exp(input)?;
            let sw = swiglu(input, input)?;
            let want = input.exp()?;
            let want_sw = mlx_rs::nn::silu(input)?.multiply(input)?;
            mlx_rs::transforms::eval([&got, &want, &sw, &want_sw])?;
            // |a - b| <= tol * (1 + |b|) everywhere (compared by MLX: layouts may differ).
            let close = |a: &Array, b: &Array, tol: f32| -> Result<bool> {
                let bound = b.abs()?.add(f(1.0))?.multiply(f(tol))?;
                let all = a.subtract(b)?.abs()?.le(&bound)?.all(None)?;
                all.eval()?;
                Ok(all.try_item_exact::<bool>().unwrap_or(false))
            };
            ok &= close(&got, &want, 1e-6)? && close(&sw, &want_sw, 1e-5)?;
        }
        Ok(ok)
    };
    check().unwrap_or(false)
}

/// `silu(gate) * up`, the SwiGLU MLP's activation, for float32 inputs.
pub(crate) fn swiglu(gate: &Array, up: &Array) -> Result<Array> {
    let (p, scale) = exp_parts(&gate.negative()?)?;
    let mut out = call(
        &SWIGLU_FINISH,
        swiglu_finish_graph,
        &[gate.clone(), up.clone(), p, scale],
    )?;
    Ok(out.pop().expect("one output"))
}

/// Softmax over the last axis of float32 `scores`, left unnormalized: returns
/// `(exp(scores - max), sum)` with `sum` keeping the reduced axis, so a caller that multiplies
/// the weights by a matrix divides the (smaller) product by `sum` instead.
pub(crate) fn softmax_parts(scores: &Array) -> Result<(Array, Array)> {
    let max = scores.max_axis(-1, true)?;
    let weights = exp(&scores.subtract(&max)?)?;
    let sum = weights.sum_axis(-1, true)?;
    Ok((weights, sum))
}

#[cfg(test)]
mod tests {
    use super::*;
    use mlx_rs::ops::indexing::TryIndexOp;

    fn host(a: &Array) -> Vec<f32> {
        a.eval().unwrap();
        a.as_slice::<f32>().to_vec()
    }

    #[test]
    fn exp_matches_mlx_within_an_ulp_or_two() {
        let xs: Vec<f32> = (0..20_001)
            .map(|i| -90.0 + i as f32 * (180.0 / 20_000.0))
            .chain([0.0, -0.0, 1e-30, -1e-30, 0.5, -0.5, 88.0, -87.0])
            .collect();
        let x = Array::from_slice(&xs, &[xs.len() as i32]);
        let got = host(&exp(&x).unwrap());
        let want = host(&x.exp().unwrap());
        for ((&x, &g), &w) in xs.iter().zip(&got).zip(&want) {
            if x > 88.0 {
                assert!(g.is_finite() && g > 1e38, "exp({x}) = {g}");
            } else if x < -87.0 {
                assert!((0.0..1e-37).contains(&g), "exp({x}) = {g}");
            } else {
                let rel = ((g - w) / w).abs();
                assert!(rel < 3e-7, "exp({x}): {g} vs {w} (rel {rel})");
            }
        }
        // -inf (a masked score) is tiny and finite; the JIT kernel and the view agree on shape.
        let inf = Array::from_slice(&[f32::NEG_INFINITY, 0.0], &[2]);
        let got = host(&exp(&inf).unwrap());
        assert!(got[0] < 1e-37 && got[0] >= 0.0 && got[1] == 1.0, "{got:?}");
    }

    #[test]
    fn swiglu_and_softmax_match_their_definitions() {
        let g: Vec<f32> = (0..3 * 97)
            .map(|i| (i as f32 * 0.37).sin() * 12.0)
            .collect();
        let u: Vec<f32> = (0..3 * 97).map(|i| (i as f32 * 0.11).cos() * 3.0).collect();
        let (ga, ua) = (
            Array::from_slice(&g, &[3, 97]),
            Array::from_slice(&u, &[3, 97]),
        );
        let got = host(&swiglu(&ga, &ua).unwrap());
        let want = host(&mlx_rs::nn::silu(&ga).unwrap().multiply(&ua).unwrap());
        for (a, b) in got.iter().zip(&want) {
            assert!((a - b).abs() <= 1e-6 * (1.0 + b.abs()), "{a} vs {b}");
        }
        // Strided views (the fused gate/up matmul's halves) take the same path.
        let both = ops::concatenate(&[&ga, &ua], 1).unwrap();
        let gv = both.try_index((.., ..97)).unwrap();
        let uv = both.try_index((.., 97..)).unwrap();
        assert_eq!(host(&swiglu(&gv, &uv).unwrap()), got);

        let (w, s) = softmax_parts(&ga).unwrap();
        let got = host(&w.divide(&s).unwrap());
        let want = host(&ops::softmax_axis(&ga, -1, true).unwrap());
        for (a, b) in got.iter().zip(&want) {
            assert!((a - b).abs() <= 1e-6, "{a} vs {b}");
        }
    }
}

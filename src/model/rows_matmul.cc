// convoy's matmul for a few rows against a float32 weight matrix on MLX's CPU backend: an MLX
// primitive (so it sits in the graph like any op) whose CPU kernel streams the weights once,
// row by row, without packing them. See `weights::rows_matmul` in weights.rs for why.
//
// y[m, n] = sum_k x[m, k] * w[n, k]   (x: [M, K], w: [N, K], y: [M, N], all float32)
//
// Every output element is accumulated in the same order whatever M is, whichever rows share
// a call and however many threads run (8 lanes over k, then the same horizontal sum, then
// the k tail), so this matmul's output for a row is bit-identical in any batch it runs in.

#include <immintrin.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "mlx/allocator.h"
#include "mlx/array.h"
#include "mlx/backend/cpu/encoder.h"
#include "mlx/ops.h"
#include "mlx/primitives.h"
#include "mlx/stream.h"

namespace mx = mlx::core;

namespace {

// How far ahead of the current position the weight stream is prefetched, in floats (4 KB):
// measured on a 2-core AMD EPYC, where the hardware prefetcher alone left the 8-row kernel
// at ~60% of the memory bandwidth the 1-row one reaches.
constexpr int kPrefetch = 1024;

// Output columns per thread below which a second thread is not worth waking.
constexpr int kMinColumnsPerThread = 64;

__attribute__((target("avx2,fma"))) inline float hsum(__m256 v) {
  __m128 lo = _mm256_castps256_ps128(v);
  __m128 hi = _mm256_extractf128_ps(v, 1);
  lo = _mm_add_ps(lo, hi);
  __m128 sh = _mm_movehdup_ps(lo);
  __m128 s = _mm_add_ps(lo, sh);
  sh = _mm_movehl_ps(sh, s);
  s = _mm_add_ss(s, sh);
  return _mm_cvtss_f32(s);
}

// One weight row `w` (K floats) against MR rows of x (row stride ldx); results to y[m * ldy].
template <int MR>
__attribute__((target("avx2,fma"))) inline void
dot_rows(const float* x, size_t ldx, const float* w, int k, float* y, size_t ldy) {
  __m256 acc[MR];
  for (int m = 0; m < MR; m++) {
    acc[m] = _mm256_setzero_ps();
  }
  int i = 0;
  for (; i + 8 <= k; i += 8) {
    if ((i & 15) == 0) {
      // A prefetch never faults, so an address past the matrix's end is harmless (formed
      // as an integer: a pointer past the end of the allocation would not be valid C++).
      auto ahead = reinterpret_cast<std::uintptr_t>(w + i) + kPrefetch * sizeof(float);
      _mm_prefetch(reinterpret_cast<const char*>(ahead), _MM_HINT_T0);
    }
    __m256 wv = _mm256_loadu_ps(w + i);
    for (int m = 0; m < MR; m++) {
      acc[m] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + m * ldx + i), acc[m]);
    }
  }
  for (int m = 0; m < MR; m++) {
    float s = hsum(acc[m]);
    for (int j = i; j < k; j++) {
      s += w[j] * x[m * ldx + j];
    }
    y[m * ldy] = s;
  }
}

// One product y = x @ w.T: x [m, k] and y [m, n] dense row-major, w [n, k] row-major.
struct Product {
  const float* x;
  const float* w;
  float* y;
  int m;
  int n;
  int k;
};

// Output columns [n0, n1): each weight row is read from memory once and used for all m rows
// of x (in groups of 8, then 4, 2, 1) while it is in L1.
__attribute__((target("avx2,fma"))) void columns(const Product& p, int n0, int n1) {
  const size_t k = static_cast<size_t>(p.k);
  const size_t n = static_cast<size_t>(p.n);
  for (int c = n0; c < n1; c++) {
    const float* wr = p.w + c * k;
    int m = 0;
    for (; m + 8 <= p.m; m += 8) {
      dot_rows<8>(p.x + m * k, k, wr, p.k, p.y + m * n + c, n);
    }
    if (p.m - m >= 4) {
      dot_rows<4>(p.x + m * k, k, wr, p.k, p.y + m * n + c, n);
      m += 4;
    }
    if (p.m - m >= 2) {
      dot_rows<2>(p.x + m * k, k, wr, p.k, p.y + m * n + c, n);
      m += 2;
    }
    if (p.m - m == 1) {
      dot_rows<1>(p.x + m * k, k, wr, p.k, p.y + m * n + c, n);
    }
  }
}

// Threads for the kernel: OpenMP's count (OMP_NUM_THREADS or the cores), capped by
// OPENBLAS_NUM_THREADS when that is set, so a host that limits its BLAS threads limits these
// too.
int max_threads() {
#ifdef _OPENMP
  static const int cap = [] {
    const char* v = std::getenv("OPENBLAS_NUM_THREADS");
    int n = v != nullptr ? std::atoi(v) : 0;
    return n > 0 ? n : 0;
  }();
  int n = omp_get_max_threads();
  return cap > 0 ? std::min(n, cap) : n;
#else
  return 1;
#endif
}

// The columns split between the threads of this thread's OpenMP team. With OpenBLAS's OpenMP
// build (the one convoy links when it is installed), that is the team OpenBLAS runs its sgemm
// threads in, from the same MLX stream thread, so the two never compete for cores.
void rows_matmul_kernel(const Product& p) {
#ifdef _OPENMP
  int threads = std::max(1, std::min(max_threads(), p.n / kMinColumnsPerThread));
#pragma omp parallel num_threads(threads)
  {
    int t = omp_get_thread_num();
    int nt = omp_get_num_threads();
    int per = (p.n + nt - 1) / nt;
    int n0 = std::min(p.n, t * per);
    int n1 = std::min(p.n, n0 + per);
    columns(p, n0, n1);
  }
#else
  columns(p, 0, p.n);
#endif
}

class RowsMatmul : public mx::UnaryPrimitive {
 public:
  explicit RowsMatmul(mx::Stream stream) : mx::UnaryPrimitive(stream) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override {
    const mx::array& x = inputs[0];
    const mx::array& w = inputs[1];
    // Both operands come through `contiguous` (or are row-contiguous already), so x is
    // dense row-major: its row stride is k (whatever strides MLX keeps for size-1 axes).
    if (!x.flags().row_contiguous || !w.flags().row_contiguous) {
      throw std::runtime_error("convoy rows_matmul: operands must be row-contiguous");
    }
    out.set_data(mx::allocator::malloc(out.nbytes()));
    auto& encoder = mx::cpu::get_command_encoder(stream());
    encoder.set_input_array(x);
    encoder.set_input_array(w);
    encoder.set_output_array(out);
    Product p{
        x.data<float>(),
        w.data<float>(),
        out.data<float>(),
        static_cast<int>(x.shape(0)),
        static_cast<int>(w.shape(0)),
        static_cast<int>(w.shape(1))};
    encoder.dispatch([p]() { rows_matmul_kernel(p); });
  }

  void eval_gpu(const std::vector<mx::array>&, mx::array&) override {
    throw std::runtime_error("convoy rows_matmul runs on the CPU backend only");
  }

  const char* name() const override {
    return "ConvoyRowsMatmul";
  }

  bool is_equivalent(const mx::Primitive& other) const override {
    return dynamic_cast<const RowsMatmul*>(&other) != nullptr;
  }

  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override {
    return {{inputs[0].shape(0), inputs[1].shape(0)}};
  }
};

void write_error(char* buf, size_t len, const char* what) {
  if (buf != nullptr && len > 0) {
    std::strncpy(buf, what, len - 1);
    buf[len - 1] = '\0';
  }
}

} // namespace

extern "C" {

// Whether this CPU runs the kernel (AVX2 and FMA).
int convoy_internal_rows_matmul_supported(void) {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}

// `*out` = x @ w.T as a new `mlx::core::array*` (what mlx-c's `mlx_array.ctx` holds), on the
// default stream of the default device, which must be the CPU. x: [M, K] float32, w: [N, K]
// float32. Returns 0, or 1 with a message in `err` and `*out` untouched.
int convoy_internal_rows_matmul(
    void** out,
    const void* x,
    const void* w,
    char* err,
    size_t err_len) {
  try {
    if (out == nullptr || x == nullptr || w == nullptr) {
      throw std::invalid_argument("convoy rows_matmul: null argument");
    }
    if (!convoy_internal_rows_matmul_supported()) {
      throw std::invalid_argument("convoy rows_matmul: this CPU lacks AVX2 or FMA");
    }
    const auto& xa = *static_cast<const mx::array*>(x);
    const auto& wa = *static_cast<const mx::array*>(w);
    if (xa.ndim() != 2 || wa.ndim() != 2 || xa.shape(1) != wa.shape(1)) {
      throw std::invalid_argument("convoy rows_matmul: expected x [M, K] and w [N, K]");
    }
    if (xa.dtype() != mx::float32 || wa.dtype() != mx::float32) {
      throw std::invalid_argument("convoy rows_matmul: float32 operands only");
    }
    mx::Stream s = mx::default_stream(mx::default_device());
    if (s.device.type != mx::Device::DeviceType::cpu) {
      throw std::invalid_argument("convoy rows_matmul: the default device is not the CPU");
    }
    mx::array xc = mx::contiguous(xa, false, s);
    // Weights are evaluated and row-contiguous: no `contiguous` node for them every step
    // (it would copy a view of a larger buffer each time).
    mx::array wc =
        wa.is_available() && wa.flags().row_contiguous ? wa : mx::contiguous(wa, false, s);
    mx::Shape shape = {xa.shape(0), wa.shape(0)};
    auto result = mx::array(
        std::move(shape),
        mx::float32,
        std::make_shared<RowsMatmul>(s),
        {std::move(xc), std::move(wc)});
    *out = new mx::array(std::move(result));
    return 0;
  } catch (const std::exception& e) {
    write_error(err, err_len, e.what());
    return 1;
  } catch (...) {
    write_error(err, err_len, "convoy rows_matmul: unknown C++ exception");
    return 1;
  }
}

} // extern "C"

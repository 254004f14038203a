// CPU kernels of genfast::lstm_cell and genfast::lstm_cell_backward (formulas and gate order: genfast/ops/lstm.py).
//
// The work is cut into blocks of kBlock columns of one row. A block's four gate pre-activations (x_gates +
// h_gates, converted to the compute type) and its cell state are gathered into small aligned buffers that stay in
// L1; the activations and the cell update then run over those buffers, eight lanes at a time with AVX2 + SLEEF's
// expf/tanhf (1.0 ULP) where the CPU and this torch have them, else scalar libm. fp64 inputs compute in fp64
// (scalar), everything else in fp32. Blocks run on torch's intra-op threads once there are enough of them.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <tuple>
#include <type_traits>

#if defined(__x86_64__) && defined(__GNUC__)
#define GENFAST_LSTM_AVX2 1
#include <immintrin.h>
#pragma GCC push_options
#pragma GCC target("avx2,fma")
// SLEEF's 8-lane expf and tanhf, exported by libtorch_cpu. Weak, so that a torch built without them still loads
// this library; the scalar path runs then.
extern "C" {
__m256 Sleef_expf8_u10avx2(__m256) __attribute__((weak));
__m256 Sleef_tanhf8_u10avx2(__m256) __attribute__((weak));
}
#pragma GCC pop_options
#endif

namespace {

// Columns per block: 4 gates + state + outputs of one block in the compute type are < 3 KiB (fp32).
constexpr int64_t kBlock = 64;
// Below this many columns (summed over rows) in all, one thread is faster than waking the pool.
constexpr int64_t kParallelColumns = 32768;

template <typename T>
using acc_of = std::conditional_t<std::is_same_v<T, double>, double, float>;

template <typename A>
inline A sigmoid(A x) {
  return A(1) / (A(1) + std::exp(-x));  // exp(-x) = inf for very negative x gives 0 exactly
}

// The block's buffers: pre-activations a[gate][j] (gate order i, f, g, o) and the cell state c[j].
template <typename A>
struct Block {
  alignas(32) A a[4][kBlock];
  alignas(32) A c[kBlock];
  alignas(32) A out0[kBlock];  // forward: h; backward: the gradient of c
  alignas(32) A grad_h[kBlock];
  alignas(32) A grad_c[kBlock];
  alignas(32) A d[4][kBlock];  // backward: the gradients of the pre-activations
};

template <typename A>
void forward_scalar(Block<A>& b, int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    const A i = sigmoid(b.a[0][j]), f = sigmoid(b.a[1][j]), g = std::tanh(b.a[2][j]), o = sigmoid(b.a[3][j]);
    const A c_new = f * b.c[j] + i * g;
    b.out0[j] = o * std::tanh(c_new);
    b.c[j] = c_new;
  }
}

template <typename A>
void backward_scalar(Block<A>& b, int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    const A i = sigmoid(b.a[0][j]), f = sigmoid(b.a[1][j]), g = std::tanh(b.a[2][j]), o = sigmoid(b.a[3][j]);
    const A t = std::tanh(f * b.c[j] + i * g);
    const A dc = b.grad_c[j] + b.grad_h[j] * o * (A(1) - t * t);
    b.d[0][j] = dc * g * i * (A(1) - i);
    b.d[1][j] = dc * b.c[j] * f * (A(1) - f);
    b.d[2][j] = dc * i * (A(1) - g * g);
    b.d[3][j] = b.grad_h[j] * t * o * (A(1) - o);
    b.out0[j] = dc * f;
  }
}

#ifdef GENFAST_LSTM_AVX2
#pragma GCC push_options
#pragma GCC target("avx2,fma")

inline __m256 sigmoid8(__m256 x) {
  const __m256 one = _mm256_set1_ps(1.0f);
  return _mm256_div_ps(one, _mm256_add_ps(one, Sleef_expf8_u10avx2(_mm256_sub_ps(_mm256_setzero_ps(), x))));
}

// Over the whole padded block (n rounded up to 8; the padding lanes hold zeros and are never stored).
void forward_avx2(Block<float>& b, int64_t n) {
  for (int64_t j = 0; j < n; j += 8) {
    const __m256 i = sigmoid8(_mm256_load_ps(b.a[0] + j)), f = sigmoid8(_mm256_load_ps(b.a[1] + j));
    const __m256 g = Sleef_tanhf8_u10avx2(_mm256_load_ps(b.a[2] + j)), o = sigmoid8(_mm256_load_ps(b.a[3] + j));
    const __m256 c_new = _mm256_fmadd_ps(f, _mm256_load_ps(b.c + j), _mm256_mul_ps(i, g));
    _mm256_store_ps(b.out0 + j, _mm256_mul_ps(o, Sleef_tanhf8_u10avx2(c_new)));
    _mm256_store_ps(b.c + j, c_new);
  }
}

void backward_avx2(Block<float>& b, int64_t n) {
  const __m256 one = _mm256_set1_ps(1.0f);
  for (int64_t j = 0; j < n; j += 8) {
    const __m256 i = sigmoid8(_mm256_load_ps(b.a[0] + j)), f = sigmoid8(_mm256_load_ps(b.a[1] + j));
    const __m256 g = Sleef_tanhf8_u10avx2(_mm256_load_ps(b.a[2] + j)), o = sigmoid8(_mm256_load_ps(b.a[3] + j));
    const __m256 c = _mm256_load_ps(b.c + j), grad_h = _mm256_load_ps(b.grad_h + j);
    const __m256 t = Sleef_tanhf8_u10avx2(_mm256_fmadd_ps(f, c, _mm256_mul_ps(i, g)));
    const __m256 dc = _mm256_fmadd_ps(_mm256_mul_ps(grad_h, o), _mm256_fnmadd_ps(t, t, one),
                                      _mm256_load_ps(b.grad_c + j));
    _mm256_store_ps(b.d[0] + j, _mm256_mul_ps(_mm256_mul_ps(dc, g), _mm256_mul_ps(i, _mm256_sub_ps(one, i))));
    _mm256_store_ps(b.d[1] + j, _mm256_mul_ps(_mm256_mul_ps(dc, c), _mm256_mul_ps(f, _mm256_sub_ps(one, f))));
    _mm256_store_ps(b.d[2] + j, _mm256_mul_ps(_mm256_mul_ps(dc, i), _mm256_fnmadd_ps(g, g, one)));
    _mm256_store_ps(b.d[3] + j, _mm256_mul_ps(_mm256_mul_ps(grad_h, t), _mm256_mul_ps(o, _mm256_sub_ps(one, o))));
    _mm256_store_ps(b.out0 + j, _mm256_mul_ps(dc, f));
  }
}
#pragma GCC pop_options

// AVX2 where this CPU, this torch's SLEEF and torch's own CPU capability allow (ATEN_CPU_CAPABILITY=default
// selects the scalar path, which is how the tests reach both).
bool use_avx2() {
  static const bool yes = at::get_cpu_capability() != "DEFAULT" && __builtin_cpu_supports("avx2") &&
                          __builtin_cpu_supports("fma") && Sleef_expf8_u10avx2 != nullptr &&
                          Sleef_tanhf8_u10avx2 != nullptr;
  return yes;
}
#endif

template <typename A>
void forward_block(Block<A>& b, int64_t n) {
#ifdef GENFAST_LSTM_AVX2
  if constexpr (std::is_same_v<A, float>) {
    if (use_avx2()) return forward_avx2(b, n);
  }
#endif
  forward_scalar(b, n);
}

template <typename A>
void backward_block(Block<A>& b, int64_t n) {
#ifdef GENFAST_LSTM_AVX2
  if constexpr (std::is_same_v<A, float>) {
    if (use_avx2()) return backward_avx2(b, n);
  }
#endif
  backward_scalar(b, n);
}

// Runs f(row, col0, n) over every block of kBlock columns of a [rows, hidden] problem.
template <typename F>
void for_each_block(int64_t rows, int64_t hidden, const F& f) {
  const int64_t per_row = (hidden + kBlock - 1) / kBlock;
  const int64_t grain = std::max<int64_t>(1, kParallelColumns / kBlock);
  at::parallel_for(0, rows * per_row, grain, [&](int64_t begin, int64_t end) {
    for (int64_t u = begin; u < end; ++u) {
      const int64_t row = u / per_row, col0 = (u % per_row) * kBlock;
      f(row, col0, std::min(kBlock, hidden - col0));
    }
  });
}

// Gathers a block's pre-activations (x_gates + h_gates) and cell state; zero padding up to a multiple of 8.
template <typename T, typename C, typename A>
void gather(Block<A>& b, const T* xg, const T* hg, const C* c, int64_t hidden, int64_t n) {
  const int64_t padded = (n + 7) / 8 * 8;
  for (int gate = 0; gate < 4; ++gate) {
    const T* x = xg + gate * hidden;
    const T* h = hg + gate * hidden;
    for (int64_t j = 0; j < n; ++j) b.a[gate][j] = static_cast<A>(x[j]) + static_cast<A>(h[j]);
    std::fill(b.a[gate] + n, b.a[gate] + padded, A(0));
  }
  for (int64_t j = 0; j < n; ++j) b.c[j] = static_cast<A>(c[j]);
  std::fill(b.c + n, b.c + padded, A(0));
}

template <typename T, typename C>
void forward_typed(const at::Tensor& xg, const at::Tensor& hg, const at::Tensor& c, at::Tensor& h_out,
                   at::Tensor& c_out) {
  using A = acc_of<T>;
  const int64_t rows = c.size(0), hidden = c.size(1);
  const T* xp = xg.data_ptr<T>();
  const T* hp = hg.data_ptr<T>();
  const C* cp = c.data_ptr<C>();
  T* hop = h_out.data_ptr<T>();
  C* cop = c_out.data_ptr<C>();
  for_each_block(rows, hidden, [&](int64_t row, int64_t col0, int64_t n) {
    Block<A> b;
    const int64_t g0 = row * 4 * hidden + col0, s0 = row * hidden + col0;
    gather(b, xp + g0, hp + g0, cp + s0, hidden, n);
    forward_block(b, n);
    for (int64_t j = 0; j < n; ++j) {
      hop[s0 + j] = static_cast<T>(b.out0[j]);
      cop[s0 + j] = static_cast<C>(b.c[j]);
    }
  });
}

template <typename T, typename C>
void backward_typed(const at::Tensor& gh, const at::Tensor& gc, const at::Tensor& xg, const at::Tensor& hg,
                    const at::Tensor& c, at::Tensor& d_gates, at::Tensor& d_c) {
  using A = acc_of<T>;
  const int64_t rows = c.size(0), hidden = c.size(1);
  const T* ghp = gh.data_ptr<T>();
  const C* gcp = gc.data_ptr<C>();
  const T* xp = xg.data_ptr<T>();
  const T* hp = hg.data_ptr<T>();
  const C* cp = c.data_ptr<C>();
  T* dgp = d_gates.data_ptr<T>();
  C* dcp = d_c.data_ptr<C>();
  for_each_block(rows, hidden, [&](int64_t row, int64_t col0, int64_t n) {
    Block<A> b;
    const int64_t g0 = row * 4 * hidden + col0, s0 = row * hidden + col0;
    gather(b, xp + g0, hp + g0, cp + s0, hidden, n);
    const int64_t padded = (n + 7) / 8 * 8;
    for (int64_t j = 0; j < n; ++j) {
      b.grad_h[j] = static_cast<A>(ghp[s0 + j]);
      b.grad_c[j] = static_cast<A>(gcp[s0 + j]);
    }
    std::fill(b.grad_h + n, b.grad_h + padded, A(0));
    std::fill(b.grad_c + n, b.grad_c + padded, A(0));
    backward_block(b, n);
    for (int gate = 0; gate < 4; ++gate) {
      for (int64_t j = 0; j < n; ++j) dgp[g0 + gate * hidden + j] = static_cast<T>(b.d[gate][j]);
    }
    for (int64_t j = 0; j < n; ++j) dcp[s0 + j] = static_cast<C>(b.out0[j]);
  });
}

bool is_gate_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble;
}

// x_gates, h_gates [B, 4H] of one float dtype; c [B, H] in that dtype or float32; all on the CPU.
void check_cell_args(const char* op, const at::Tensor& xg, const at::Tensor& hg, const at::Tensor& c) {
  TORCH_CHECK(xg.dim() == 2 && xg.size(1) % 4 == 0, op, ": x_gates must be [B, 4H], got ", xg.sizes());
  TORCH_CHECK(hg.sizes() == xg.sizes(), op, ": h_gates has shape ", hg.sizes(), " but x_gates has ", xg.sizes());
  TORCH_CHECK(c.dim() == 2 && c.size(0) == xg.size(0) && c.size(1) == xg.size(1) / 4, op, ": c must be [B, H] = [",
              xg.size(0), ", ", xg.size(1) / 4, "], got ", c.sizes());
  TORCH_CHECK(is_gate_dtype(xg.scalar_type()), op, ": x_gates must be float32, float16, bfloat16 or float64, got ",
              xg.scalar_type());
  TORCH_CHECK(hg.scalar_type() == xg.scalar_type(), op, ": h_gates and x_gates must share a dtype");
  TORCH_CHECK(c.scalar_type() == xg.scalar_type() || c.scalar_type() == at::kFloat, op,
              ": c must have the gates' dtype or float32, got ", c.scalar_type());
  TORCH_CHECK(xg.device().is_cpu() && hg.device().is_cpu() && c.device().is_cpu(), op,
              ": every tensor must be on the CPU");
}

std::tuple<at::Tensor, at::Tensor> lstm_cell_cpu(const at::Tensor& x_gates, const at::Tensor& h_gates,
                                                 const at::Tensor& c) {
  check_cell_args("lstm_cell", x_gates, h_gates, c);
  const at::Tensor xg = x_gates.contiguous(), hg = h_gates.contiguous(), cc = c.contiguous();
  at::Tensor h_out = at::empty(c.sizes(), x_gates.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor c_out = at::empty(c.sizes(), c.options().memory_format(at::MemoryFormat::Contiguous));
  // c is in the gates' dtype, or float32 beside half-precision gates.
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xg.scalar_type(), "lstm_cell_cpu", [&] {
    if (cc.scalar_type() == xg.scalar_type()) {
      forward_typed<scalar_t, scalar_t>(xg, hg, cc, h_out, c_out);
    } else {
      forward_typed<scalar_t, float>(xg, hg, cc, h_out, c_out);
    }
  });
  return {h_out, c_out};
}

std::tuple<at::Tensor, at::Tensor> lstm_cell_backward_cpu(const at::Tensor& grad_h, const at::Tensor& grad_c,
                                                          const at::Tensor& x_gates, const at::Tensor& h_gates,
                                                          const at::Tensor& c) {
  check_cell_args("lstm_cell_backward", x_gates, h_gates, c);
  TORCH_CHECK(grad_h.sizes() == c.sizes() && grad_h.scalar_type() == x_gates.scalar_type() &&
                  grad_h.device().is_cpu(),
              "lstm_cell_backward: grad_h must be [B, H] in the gates' dtype on the CPU");
  TORCH_CHECK(grad_c.sizes() == c.sizes() && grad_c.scalar_type() == c.scalar_type() && grad_c.device().is_cpu(),
              "lstm_cell_backward: grad_c must be [B, H] in c's dtype on the CPU");
  const at::Tensor xg = x_gates.contiguous(), hg = h_gates.contiguous(), cc = c.contiguous();
  const at::Tensor gh = grad_h.contiguous(), gc = grad_c.contiguous();
  at::Tensor d_gates = at::empty(x_gates.sizes(), x_gates.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor d_c = at::empty(c.sizes(), c.options().memory_format(at::MemoryFormat::Contiguous));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xg.scalar_type(), "lstm_cell_backward_cpu", [&] {
    if (cc.scalar_type() == xg.scalar_type()) {
      backward_typed<scalar_t, scalar_t>(gh, gc, xg, hg, cc, d_gates, d_c);
    } else {
      backward_typed<scalar_t, float>(gh, gc, xg, hg, cc, d_gates, d_c);
    }
  });
  return {d_gates, d_c};
}

}  // namespace

TORCH_LIBRARY_IMPL(genfast, CPU, m) {
  m.impl("lstm_cell", &lstm_cell_cpu);
  m.impl("lstm_cell_backward", &lstm_cell_backward_cpu);
}

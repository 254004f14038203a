// CPU kernels of genfast::attention_decode and genfast::kv_cache_append (semantics: genfast/ops/attention_decode.py).
//
// Decode is memory bound: each step reads every visible key and value once for a handful of query rows. So one
// task per (sequence, kv head) reads that head's cache once for all Hq / Hk query heads of its GQA group and all
// Nq new tokens, and only the slots the sequence can see (torch's SDPA over the same cache reads all Nmax slots and
// needs the unfilled ones zeroed first). Two passes over the visible range [lo, hi):
//   1. scores s[r][j] = scale * q_r . k_j (fp32 accumulation), then per row its max m_r and sum l_r of exp(s - m_r);
//   2. out_r = sum_j exp(s[r][j] - m_r) v_j / l_r.
// With several rows per task (GQA, or Nq > 1) in fp32, both passes are small GEMMs (BLAS, as SDPA's own math) over
// views of the cache, not row-by-row dot products. Rows that see no key give out 0 and lse -inf, as the reference
// does. Lengths are clamped to [0, Nmax], so a bad
// cache_seqlens (possible only with validate=False) never indexes outside the cache.
//
// kv_cache_append is an in-place row copy (memcpy of D elements per (b, h, t)): no allocation, any dtype.
#include <ATen/Dispatch.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

std::vector<int64_t> read_lengths(const at::Tensor& seqlens, int64_t nmax) {
  const at::Tensor lengths = seqlens.to(at::kLong).contiguous();
  const int64_t* p = lengths.data_ptr<int64_t>();
  std::vector<int64_t> out(p, p + lengths.numel());
  for (auto& n : out) n = std::clamp<int64_t>(n, 0, nmax);
  return out;
}

void check_decode_args(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                       const at::Tensor& seqlens) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, op, ": q, k_cache and v_cache must be 4-D");
  TORCH_CHECK(k.sizes() == v.sizes(), op, ": k_cache and v_cache must have one shape");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && k.scalar_type() == v.scalar_type(), op,
              ": q, k_cache and v_cache must share a dtype");
  TORCH_CHECK(q.size(0) == k.size(0) && q.size(3) == k.size(3), op, ": q and the caches disagree in B or D");
  TORCH_CHECK(k.size(1) > 0 && q.size(1) % k.size(1) == 0, op, ": Hk must divide Hq");
  TORCH_CHECK(seqlens.dim() == 1 && seqlens.size(0) == q.size(0) &&
                  (seqlens.scalar_type() == at::kInt || seqlens.scalar_type() == at::kLong),
              op, ": cache_seqlens must be int32/int64 [B]");
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu() && seqlens.device().is_cpu(), op,
              ": every tensor must be on the CPU");
}

template <typename T>
inline float dot(const float* a, const T* b, int64_t n) {
  float acc = 0.f;
#pragma omp simd reduction(+ : acc)
  for (int64_t d = 0; d < n; ++d) acc += a[d] * static_cast<float>(b[d]);
  return acc;
}

template <typename T>
inline void axpy(float* y, float a, const T* x, int64_t n) {
#pragma omp simd
  for (int64_t d = 0; d < n; ++d) y[d] += a * static_cast<float>(x[d]);
}

template <typename T>
void decode_kernel(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::vector<int64_t>& lengths,
                   bool causal, double scale, int64_t left, int64_t right, at::Tensor& out, at::Tensor& lse) {
  const int64_t B = q.size(0), Hq = q.size(1), Nq = q.size(2), D = q.size(3);
  const int64_t Hk = k.size(1), G = Hq / Hk, R = G * Nq;
  const T* qp = q.data_ptr<T>();  // contiguous [B, Hq, Nq, D]
  const T* kp = k.data_ptr<T>();
  const T* vp = v.data_ptr<T>();
  const int64_t ksb = k.stride(0), ksh = k.stride(1), ksn = k.stride(2);
  const int64_t vsb = v.stride(0), vsh = v.stride(1), vsn = v.stride(2);
  T* op = out.data_ptr<T>();  // contiguous, q's shape
  float* lp = lse.data_ptr<float>();  // contiguous [B, Hq, Nq]

  // Threads only where each gets a few hundred KiB of cache to read: waking a thread costs more than a short
  // decode (and on a loaded machine it can cost a scheduling period).
  const int64_t longest = *std::max_element(lengths.begin(), lengths.end());
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 17) / std::max<int64_t>(1, 2 * longest * D));
  at::parallel_for(0, B * Hk, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(R * D), acc(R * D), scores;
    std::vector<int64_t> lo(R), hi(R);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / Hk, h = task % Hk, L = lengths[b];
      // Row r = g * Nq + i: query head h * G + g, new token i at position L - Nq + i.
      int64_t span_lo = L, span_hi = 0;
      for (int64_t r = 0; r < R; ++r) {
        const int64_t pos = L - Nq + r % Nq;
        int64_t a = 0, z = L;  // visible keys [a, z)
        if (causal) z = std::min(z, pos + 1);
        if (left >= 0) a = std::max<int64_t>(a, pos - left);
        if (right >= 0) z = std::min(z, pos + right + 1);
        a = std::max<int64_t>(a, 0);
        lo[r] = a;
        hi[r] = std::max(a, z);
        if (hi[r] > a) {
          span_lo = std::min(span_lo, a);
          span_hi = std::max(span_hi, hi[r]);
        }
        const T* src = qp + ((b * Hq + h * G + r / Nq) * Nq + r % Nq) * D;
        for (int64_t d = 0; d < D; ++d) qf[r * D + d] = static_cast<float>(src[d]) * static_cast<float>(scale);
      }
      const int64_t span = std::max<int64_t>(span_hi - span_lo, 0);
      scores.assign(R * span, kNegInf);
      const T* kh = kp + b * ksb + h * ksh;
      const T* vh = vp + b * vsb + h * vsh;
      const bool gemm = std::is_same_v<T, float> && R > 1 && span > 0;
      const auto f32 = at::TensorOptions().dtype(at::kFloat);
      if (gemm) {
        at::Tensor s_view = at::from_blob(scores.data(), {R, span}, f32);
        at::Tensor k_view = at::from_blob(const_cast<T*>(kh + span_lo * ksn), {span, D}, {ksn, 1}, f32);
        at::mm_out(s_view, at::from_blob(qf.data(), {R, D}, f32), k_view.t());
        for (int64_t r = 0; r < R; ++r) {  // keys outside the row's range are not seen
          float* s = &scores[r * span];
          for (int64_t j = 0; j < span; ++j) {
            if (j + span_lo < lo[r] || j + span_lo >= hi[r]) s[j] = kNegInf;
          }
        }
      } else {
        for (int64_t j = span_lo; j < span_hi; ++j) {
          const T* kj = kh + j * ksn;
          for (int64_t r = 0; r < R; ++r) {
            if (j >= lo[r] && j < hi[r]) scores[r * span + (j - span_lo)] = dot(&qf[r * D], kj, D);
          }
        }
      }
      std::vector<float> inv(R, 0.f);
      for (int64_t r = 0; r < R; ++r) {
        float* s = &scores[r * span];
        float m = kNegInf;
        for (int64_t j = lo[r] - span_lo; j < hi[r] - span_lo; ++j) m = std::max(m, s[j]);
        float l = 0.f;
        for (int64_t j = 0; j < span; ++j) {  // exp(-inf - m) = 0 outside the row's range
          s[j] = hi[r] > lo[r] ? std::exp(s[j] - m) : 0.f;
          l += s[j];
        }
        const int64_t row = (b * Hq + h * G + r / Nq) * Nq + r % Nq;
        lp[row] = hi[r] > lo[r] ? m + std::log(l) : kNegInf;
        inv[r] = hi[r] > lo[r] ? 1.f / l : 0.f;
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      if (gemm) {
        at::Tensor acc_view = at::from_blob(acc.data(), {R, D}, f32);
        at::Tensor v_view = at::from_blob(const_cast<T*>(vh + span_lo * vsn), {span, D}, {vsn, 1}, f32);
        at::mm_out(acc_view, at::from_blob(scores.data(), {R, span}, f32), v_view);
      } else {
        for (int64_t j = span_lo; j < span_hi; ++j) {
          const T* vj = vh + j * vsn;
          for (int64_t r = 0; r < R; ++r) {
            if (j >= lo[r] && j < hi[r]) axpy(&acc[r * D], scores[r * span + (j - span_lo)], vj, D);
          }
        }
      }
      for (int64_t r = 0; r < R; ++r) {
        T* dst = op + ((b * Hq + h * G + r / Nq) * Nq + r % Nq) * D;
        for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<T>(acc[r * D + d] * inv[r]);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> attention_decode_cpu(const at::Tensor& q, const at::Tensor& k_cache,
                                                        const at::Tensor& v_cache, const at::Tensor& cache_seqlens,
                                                        bool causal, double scale, int64_t window_left,
                                                        int64_t window_right, int64_t num_splits) {
  (void)num_splits;  // split-K is a GPU occupancy knob; the CPU runs one task per (sequence, kv head)
  constexpr const char* op = "attention_decode";
  check_decode_args(op, q, k_cache, v_cache, cache_seqlens);
  const at::Tensor qc = q.contiguous();
  // The kernel walks keys by row stride; only a cache whose rows are not contiguous is copied.
  const at::Tensor k = k_cache.stride(3) == 1 ? k_cache : k_cache.contiguous();
  const at::Tensor v = v_cache.stride(3) == 1 ? v_cache : v_cache.contiguous();
  at::Tensor out = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
  if (q.numel() == 0) return {out, lse};
  const std::vector<int64_t> lengths = read_lengths(cache_seqlens, k_cache.size(2));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "attention_decode_cpu", [&] {
    decode_kernel<scalar_t>(qc, k, v, lengths, causal, scale, window_left, window_right, out, lse);
  });
  return {out, lse};
}

void kv_cache_append_cpu(const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& k_new,
                         const at::Tensor& v_new, const at::Tensor& cache_seqlens) {
  constexpr const char* op = "kv_cache_append";
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes(), op,
              ": k_cache and v_cache must be 4-D of one shape");
  TORCH_CHECK(k_new.dim() == 4 && k_new.sizes() == v_new.sizes(), op, ": k_new and v_new must be 4-D of one shape");
  TORCH_CHECK(k_new.size(0) == k_cache.size(0) && k_new.size(1) == k_cache.size(1) && k_new.size(3) == k_cache.size(3),
              op, ": k_new must be [B, Hk, Nnew, D] with the caches' B, Hk and D");
  const at::ScalarType dtype = k_cache.scalar_type();
  TORCH_CHECK(v_cache.scalar_type() == dtype && k_new.scalar_type() == dtype && v_new.scalar_type() == dtype, op,
              ": the caches and the new keys/values must share a dtype");
  TORCH_CHECK(cache_seqlens.dim() == 1 && cache_seqlens.size(0) == k_cache.size(0) &&
                  (cache_seqlens.scalar_type() == at::kInt || cache_seqlens.scalar_type() == at::kLong),
              op, ": cache_seqlens must be int32/int64 [B]");
  // Writes into overlapping rows, or a key cache that is the value cache, would land on each other.
  at::assert_no_internal_overlap(k_cache);
  at::assert_no_internal_overlap(v_cache);
  at::assert_no_partial_overlap(k_cache, v_cache);
  TORCH_CHECK(k_cache.data_ptr() != v_cache.data_ptr() || k_cache.numel() == 0, op,
              ": k_cache and v_cache must not be the same memory");
  const int64_t B = k_cache.size(0), H = k_cache.size(1), Nmax = k_cache.size(2), D = k_cache.size(3);
  const int64_t T = k_new.size(2);
  if (B * H * T * D == 0) return;
  const std::vector<int64_t> lengths = read_lengths(cache_seqlens, std::numeric_limits<int64_t>::max());
  const int64_t item = k_cache.element_size();
  for (int which = 0; which < 2; ++which) {
    const at::Tensor& cache = which == 0 ? k_cache : v_cache;
    const at::Tensor& src = which == 0 ? k_new : v_new;
    char* cp = static_cast<char*>(cache.data_ptr());
    const char* sp = static_cast<const char*>(src.data_ptr());
    const int64_t cb = cache.stride(0), ch = cache.stride(1), cn = cache.stride(2), cd = cache.stride(3);
    const int64_t sb = src.stride(0), sh = src.stride(1), sn = src.stride(2), sd = src.stride(3);
    const bool rows_contiguous = cd == 1 && sd == 1;
    // Decode appends a few bytes per (b, h): threads pay off only for long appends (a prefill).
    const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, T * D * item));
    at::parallel_for(0, B * H, grain, [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / H, h = task % H;
        for (int64_t t = 0; t < T; ++t) {
          const int64_t dest = lengths[b] + t;
          if (dest < 0 || dest >= Nmax) continue;  // dropped, as documented for validate=False
          char* d0 = cp + (b * cb + h * ch + dest * cn) * item;
          const char* s0 = sp + (b * sb + h * sh + t * sn) * item;
          if (rows_contiguous) {
            std::memcpy(d0, s0, D * item);
          } else {
            for (int64_t d = 0; d < D; ++d) std::memcpy(d0 + d * cd * item, s0 + d * sd * item, item);
          }
        }
      }
    });
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(genfast, CPU, m) {
  m.impl("attention_decode", &attention_decode_cpu);
  m.impl("kv_cache_append", &kv_cache_append_cpu);
}

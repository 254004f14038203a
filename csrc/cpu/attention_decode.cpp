// CPU kernels of genfast::attention_decode and genfast::kv_cache_append (semantics: genfast/ops/attention_decode.py).
//
// Decode is memory bound: each step reads every visible key and value once for a handful of query rows. So a task
// is one (sequence, kv head, split of the keys): it reads that head's cache once for all Hq / Hk query heads of its
// GQA group and all Nq new tokens (its R = G * Nq rows), and only the slots the sequence can see (torch's SDPA over
// the same cache reads all Nmax slots, and a mask costs it another pass). Keys go by blocks of kBlock, one pass
// with an online softmax (flash-decoding on a CPU): per block, scores s = scale * q . k for every row (fp32
// accumulation), the row's running max and sum rescaled when the max grows, then acc += exp(s - max) v, with the
// K and V rows of the block still in L1/L2. Splits (by default only when B * Hk tasks cannot keep the threads busy;
// with num_splits < 0 a count fixed by Nmax, D and the dtype: batch invariance) each keep (max, sum, acc) and are
// merged at the end, the log-sum-exp way, in split order. A task's arithmetic depends only on its own sequence's
// length and data and on the split count, never on which thread runs it, so with a fixed split count a row's output
// is bitwise the same whatever else is in the batch.
//
// The inner loops (dot products, exp, axpy) have an AVX2+FMA path (exp from SLEEF: csrc/cpu/simd.h), chosen at run
// time because the extension is built for the baseline x86-64; the scalar path is the same algorithm. Half and
// bfloat16 caches are widened to fp32 a block at a time. Rows that see no key give out 0 and lse -inf, as the
// reference does; NaN in a query row or in a visible key or value makes that row NaN. Lengths are clamped to
// [0, Nmax], so a bad cache_seqlens (possible only with validate=False) never indexes outside the cache.
//
// kv_cache_append is an in-place row copy (memcpy of D elements per (b, h, t)): no allocation, any dtype. Slots
// L + t outside [0, Nmax) are dropped, as by every other backend (the lengths are not clamped there).
//
// Paged caches (block_table given; layout in csrc/genfast.cpp): the tasks, splits and key blocks are those of the
// dense cache over the logical slots, so the arithmetic is the dense path's bit for bit. A key block that lies in
// one page is read in place (as a dense one); one that crosses pages (block_size < kBlock, or a window's unaligned
// start) is first copied into the task's fp32 buffer a page run at a time. Decode clamps a block entry into
// [0, num_blocks); the append drops a token whose entry is outside it.
#include <ATen/Dispatch.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include "simd.h"

namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
// Keys per block: the block's fp32 scores for 16 rows (4 KiB) and its K and V rows (32 KiB each at D 128) stay in
// cache between the scores, the exp and the accumulation.
constexpr int64_t kBlock = 64;
// A task reads at least this many bytes of cache before a split or a thread is worth its start.
constexpr int64_t kMinTaskBytes = 128 * 1024;
constexpr int64_t kMaxSplits = 8;

// cache_seqlens[b] as int64, clamped to [lo, hi], read in place (int32 or int64, any stride).
std::vector<int64_t> read_lengths(const at::Tensor& seqlens, int64_t lo, int64_t hi) {
  std::vector<int64_t> out(seqlens.size(0));
  const int64_t stride = seqlens.stride(0);
  if (seqlens.scalar_type() == at::kInt) {
    const int32_t* p = seqlens.data_ptr<int32_t>();
    for (size_t b = 0; b < out.size(); ++b) out[b] = p[b * stride];
  } else {
    const int64_t* p = seqlens.data_ptr<int64_t>();
    for (size_t b = 0; b < out.size(); ++b) out[b] = p[b * stride];
  }
  for (auto& n : out) n = std::clamp<int64_t>(n, lo, hi);
  return out;
}

// A paged cache's block table: the row of sequence b is table + b * row_stride (entries col_stride apart); block
// entries are clamped to [0, blocks) by decode (`page_of`) and checked by the append. table == nullptr: dense.
struct Paging {
  const int32_t* table = nullptr;
  int64_t row_stride = 0, col_stride = 0, page = 0, blocks = 0;
  int64_t shift = 0;  // log2(page)
  int64_t entry(int64_t b, int64_t j) const { return table[b * row_stride + j * col_stride]; }
  int64_t page_of(int64_t b, int64_t j) const { return std::clamp<int64_t>(entry(b, j), 0, blocks - 1); }
};

// Checks the block table (int32 [B, max_blocks], on the CPU, block_size a power of two) and describes it; the
// logical capacity is then max_blocks * block_size.
Paging paging_of(const char* op, const std::optional<at::Tensor>& block_table, const at::Tensor& cache,
                 int64_t batch) {
  Paging p;
  if (!block_table.has_value()) return p;
  const at::Tensor& t = *block_table;
  TORCH_CHECK(t.dim() == 2 && t.size(0) == batch && t.size(1) > 0 && t.scalar_type() == at::kInt, op,
              ": block_table must be int32 [B, max_blocks_per_seq]");
  TORCH_CHECK(t.device().is_cpu(), op, ": block_table must be on the CPU");
  const int64_t page = cache.size(2);
  TORCH_CHECK(page >= 16 && page <= 256 && (page & (page - 1)) == 0, op,
              ": a paged cache's block size (dim 2) must be a power of two from 16 to 256");
  TORCH_CHECK(cache.size(0) > 0, op, ": a paged cache must hold at least one block");
  p.table = t.data_ptr<int32_t>();
  p.row_stride = t.stride(0);
  p.col_stride = t.stride(1);
  p.page = page;
  p.blocks = cache.size(0);
  while ((int64_t{1} << p.shift) < page) ++p.shift;
  return p;
}

void check_decode_args(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                       const at::Tensor& seqlens, bool paged) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, op, ": q, k_cache and v_cache must be 4-D");
  TORCH_CHECK(k.sizes() == v.sizes(), op, ": k_cache and v_cache must have one shape");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && k.scalar_type() == v.scalar_type(), op,
              ": q, k_cache and v_cache must share a dtype");
  TORCH_CHECK((paged || q.size(0) == k.size(0)) && q.size(3) == k.size(3), op,
              ": q and the caches disagree in B or D");
  TORCH_CHECK(k.size(1) > 0 && q.size(1) % k.size(1) == 0, op, ": Hk must divide Hq");
  TORCH_CHECK(seqlens.dim() == 1 && seqlens.size(0) == q.size(0) &&
                  (seqlens.scalar_type() == at::kInt || seqlens.scalar_type() == at::kLong),
              op, ": cache_seqlens must be int32/int64 [B]");
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu() && seqlens.device().is_cpu(), op,
              ": every tensor must be on the CPU");
}

// ----------------------------------------------------------------------------------------------- block math
// What a task does to one row and one block of keys [a, z), on fp32 rows of length D (K and V rows `ks` / `vs`
// apart): scores s[j] = q . k_j, p[j] = exp(s[j] - m) with their sum, acc += sum_j p[j] v_j. Scalar, and AVX2+FMA
// with the row's accumulator held in registers across the keys (DV = D / 8 known at compile time for the common
// head dims; DV = 0 takes any D).
struct ScalarMath {
  static void scores(const float* q, const float* k, int64_t ks, int64_t a, int64_t z, int64_t D, float* s) {
    for (int64_t j = a; j < z; ++j) {
      float acc = 0.f;
#pragma omp simd reduction(+ : acc)
      for (int64_t d = 0; d < D; ++d) acc += q[d] * k[j * ks + d];
      s[j] = acc;
    }
  }
  static float exp_sum(float* s, int64_t n, float m) {
    float sum = 0.f;
    for (int64_t j = 0; j < n; ++j) {
      s[j] = std::exp(s[j] - m);
      sum += s[j];
    }
    return sum;
  }
  static void accumulate(float* acc, const float* p, const float* v, int64_t vs, int64_t a, int64_t z, int64_t D) {
    for (int64_t j = a; j < z; ++j) {
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) acc[d] += p[j] * v[j * vs + d];
    }
  }
};

#ifdef GENFAST_CPU_X86
#define GENFAST_AVX2 __attribute__((target("avx2,fma"))) static inline

template <int DV>
struct Avx2Math {
  GENFAST_AVX2 float hsum(__m256 v) {
    const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(t, _mm_movehdup_ps(t)));
  }
  GENFAST_AVX2 void scores(const float* q, const float* k, int64_t ks, int64_t a, int64_t z, int64_t D, float* s) {
    const int64_t dv = DV > 0 ? DV : D / 8;
    for (int64_t j = a; j < z; ++j) {
      const float* kj = k + j * ks;
      __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();  // two chains: half the FMA latency
      int64_t i = 0;
      for (; i + 2 <= dv; i += 2) {
        acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + 8 * i), _mm256_loadu_ps(kj + 8 * i), acc0);
        acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(q + 8 * i + 8), _mm256_loadu_ps(kj + 8 * i + 8), acc1);
      }
      if (i < dv) acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + 8 * i), _mm256_loadu_ps(kj + 8 * i), acc0);
      float dot = hsum(_mm256_add_ps(acc0, acc1));
      if constexpr (DV == 0) {
        for (int64_t d = 8 * dv; d < D; ++d) dot += q[d] * kj[d];
      }
      s[j] = dot;
    }
  }
  GENFAST_AVX2 float exp_sum(float* s, int64_t n, float m) {
    const __m256 mv = _mm256_set1_ps(m);
    __m256 sum = _mm256_setzero_ps();
    int64_t j = 0;
    for (; j + 8 <= n; j += 8) {
      const __m256 e = Sleef_expf8_u10avx2(_mm256_sub_ps(_mm256_loadu_ps(s + j), mv));
      _mm256_storeu_ps(s + j, e);
      sum = _mm256_add_ps(sum, e);
    }
    if (j < n) {  // the tail through one padded vector (exp(-inf) = 0 in the unused lanes)
      alignas(32) float tail[8];
      for (int l = 0; l < 8; ++l) tail[l] = j + l < n ? s[j + l] - m : kNegInf;
      const __m256 e = Sleef_expf8_u10avx2(_mm256_load_ps(tail));
      _mm256_store_ps(tail, e);
      sum = _mm256_add_ps(sum, e);
      for (int64_t l = 0; j + l < n; ++l) s[j + l] = tail[l];
    }
    return hsum(sum);
  }
  GENFAST_AVX2 void accumulate(float* acc, const float* p, const float* v, int64_t vs, int64_t a, int64_t z,
                               int64_t D) {
    if constexpr (DV > 0) {  // the row's D accumulators stay in registers for the whole block
      __m256 r[DV];
      for (int i = 0; i < DV; ++i) r[i] = _mm256_loadu_ps(acc + 8 * i);
      for (int64_t j = a; j < z; ++j) {
        const __m256 pj = _mm256_set1_ps(p[j]);
        for (int i = 0; i < DV; ++i) r[i] = _mm256_fmadd_ps(pj, _mm256_loadu_ps(v + j * vs + 8 * i), r[i]);
      }
      for (int i = 0; i < DV; ++i) _mm256_storeu_ps(acc + 8 * i, r[i]);
    } else {
      for (int64_t j = a; j < z; ++j) {
        const __m256 pj = _mm256_set1_ps(p[j]);
        int64_t d = 0;
        for (; d + 8 <= D; d += 8) {
          _mm256_storeu_ps(acc + d, _mm256_fmadd_ps(pj, _mm256_loadu_ps(v + j * vs + d), _mm256_loadu_ps(acc + d)));
        }
        for (; d < D; ++d) acc[d] += p[j] * v[j * vs + d];
      }
    }
  }
};
#undef GENFAST_AVX2
#endif

// ----------------------------------------------------------------------------------------------- decode
struct DecodeGeometry {
  int64_t B, Hq, Hk, G, Nq, D, R, splits;
  // Batch-invariant splits cover fixed key ranges [split * chunk, (split + 1) * chunk) of the cache (chunk from Nmax,
  // a multiple of kBlock), so a short sequence touches only the splits its keys fall in; 0: the default, splits cut
  // the visible span of each sequence evenly.
  int64_t chunk;
  // The resolved window bounds (csrc/genfast.cpp, attention_decode): the row at position pos sees keys
  // [pos - left, pos + right], causal already folded in as right = 0.
  int64_t left, right;
};

// Visible keys [lo, hi) of row r (query head h * G + r / Nq, new token r % Nq at position L - Nq + r % Nq).
inline void row_range(const DecodeGeometry& g, int64_t L, int64_t r, int64_t& lo, int64_t& hi) {
  const int64_t pos = L - g.Nq + r % g.Nq;
  lo = std::max<int64_t>(pos - g.left, 0);
  hi = std::max(lo, std::min(L, pos + g.right + 1));
}

// Widens n rows of D elements (row stride `stride`) to fp32 rows of stride D.
template <typename T>
inline void widen(const T* src, int64_t stride, int64_t n, int64_t D, float* dst) {
  for (int64_t j = 0; j < n; ++j) {
    for (int64_t d = 0; d < D; ++d) dst[j * D + d] = static_cast<float>(src[j * stride + d]);
  }
}

// One task: rows of (b, kv head h) over keys [k0, k1). On return m[r], l[r] and acc[r * D ..] hold the row's max,
// sum of exp(s - max) and unnormalised output over those keys (m = -inf, l = 0, acc = 0 where it saw none).
struct TaskArgs {
  const float* qf;  // [R, D], scaled
  const void* kh;   // this head's K rows, ksn elements apart (paged: the head's rows of block 0)
  const void* vh;
  int64_t ksn, vsn;
  const Paging* paging;  // dense: table == nullptr
  int64_t b, ksb, vsb;   // paged: the sequence, and the block strides of K and V
  const int64_t *lo, *hi;  // each row's visible keys
  int64_t k0, k1;
  float *m, *l, *acc;        // outputs
  float *s, *kbuf, *vbuf;    // scratch: R x kBlock scores, kBlock x D widened K and V (half types, or paged)
};

// Keys [j0, j0 + n) of one head as fp32 rows: returns the first row and sets `stride` (elements between rows).
// Dense fp32 rows are read in place; half types are widened into `buf`. Paged, the keys of one page are as dense
// (their block's rows); keys spread over pages are copied (widened) into `buf` page run by page run.
template <typename T>
inline const float* key_rows(const T* head, int64_t sn, int64_t sblk, const Paging& pg, int64_t b, int64_t j0,
                             int64_t n, int64_t D, float* buf, int64_t& stride) {
  const T* src = head + j0 * sn;
  if (pg.table != nullptr) {
    const int64_t first = j0 >> pg.shift, last = (j0 + n - 1) >> pg.shift;
    if (first != last) {
      for (int64_t j = j0; j < j0 + n;) {
        const int64_t run = std::min(j0 + n - j, pg.page - (j & (pg.page - 1)));
        widen(head + pg.page_of(b, j >> pg.shift) * sblk + (j & (pg.page - 1)) * sn, sn, run, D, buf + (j - j0) * D);
        j += run;
      }
      stride = D;
      return buf;
    }
    src = head + pg.page_of(b, first) * sblk + (j0 & (pg.page - 1)) * sn;
  }
  if constexpr (std::is_same_v<T, float>) {
    stride = sn;
    return src;
  } else {
    widen(src, sn, n, D, buf);
    stride = D;
    return buf;
  }
}

template <typename T, typename Math>
__attribute__((always_inline)) inline void decode_task_body(const DecodeGeometry& g, const TaskArgs& t) {
  const int64_t R = g.R, D = g.D;
  const T* kh = static_cast<const T*>(t.kh);
  const T* vh = static_cast<const T*>(t.vh);
  float *m = t.m, *l = t.l, *acc = t.acc;
  std::fill(m, m + R, kNegInf);
  std::fill(l, l + R, 0.f);
  std::fill(acc, acc + R * D, 0.f);
  for (int64_t j0 = t.k0; j0 < t.k1; j0 += kBlock) {
    const int64_t n = std::min(kBlock, t.k1 - j0);
    int64_t kstride, vstride;
    const float* kb = key_rows(kh, t.ksn, t.ksb, *t.paging, t.b, j0, n, D, t.kbuf, kstride);
    const float* vb = key_rows(vh, t.vsn, t.vsb, *t.paging, t.b, j0, n, D, t.vbuf, vstride);
    for (int64_t r = 0; r < R; ++r) {
      const int64_t a = std::max(t.lo[r] - j0, int64_t{0}), z = std::min(t.hi[r] - j0, n);
      if (a >= z) continue;  // the row sees no key of this block
      float* sr = t.s + r * kBlock;
      Math::scores(t.qf + r * D, kb, kstride, a, z, D, sr);
      float bmax = kNegInf;
      for (int64_t j = a; j < z; ++j) bmax = sr[j] > bmax || std::isnan(sr[j]) ? sr[j] : bmax;  // NaN sticks
      const float mnew = std::isnan(bmax) ? bmax : std::max(m[r], bmax);
      if (mnew == kNegInf) continue;  // every score -inf: nothing to add yet (l stays 0)
      if (mnew != m[r] && l[r] != 0.f) {  // the running max grew: rescale what was summed under the old one
        const float alpha = std::exp(m[r] - mnew);
        l[r] *= alpha;
        for (int64_t d = 0; d < D; ++d) acc[r * D + d] *= alpha;
      }
      m[r] = mnew;
      l[r] += Math::exp_sum(sr + a, z - a, mnew);
      Math::accumulate(acc + r * D, sr, vb, vstride, a, z, D);
    }
  }
}

using TaskFn = void (*)(const DecodeGeometry&, const TaskArgs&);

template <typename T>
void decode_task_scalar(const DecodeGeometry& g, const TaskArgs& t) {
  decode_task_body<T, ScalarMath>(g, t);
}

#ifdef GENFAST_CPU_X86
template <typename T, int DV>
__attribute__((target("avx2,fma"))) void decode_task_avx2(const DecodeGeometry& g, const TaskArgs& t) {
  decode_task_body<T, Avx2Math<DV>>(g, t);
}
#endif

// The task for this CPU and head dim: AVX2 with D / 8 fixed for D 64 and 128, any D otherwise.
template <typename T>
TaskFn choose_task(int64_t D) {
#ifdef GENFAST_CPU_X86
  if (genfast::cpu::simd_isa() != genfast::cpu::Isa::kScalar) {
    if (D == 64) return decode_task_avx2<T, 8>;
    if (D == 128) return decode_task_avx2<T, 16>;
    return decode_task_avx2<T, 0>;
  }
#endif
  return decode_task_scalar<T>;
}

template <typename T>
void decode_kernel(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::vector<int64_t>& lengths,
                   const DecodeGeometry& g, const Paging& paging, double scale, at::Tensor& out, at::Tensor& lse) {
  const int64_t Hq = g.Hq, Hk = g.Hk, G = g.G, Nq = g.Nq, D = g.D, R = g.R, S = g.splits;
  const T* qp = q.data_ptr<T>();  // contiguous [B, Hq, Nq, D]
  const T* kp = k.data_ptr<T>();
  const T* vp = v.data_ptr<T>();
  const int64_t ksb = k.stride(0), ksh = k.stride(1), ksn = k.stride(2);
  const int64_t vsb = v.stride(0), vsh = v.stride(1), vsn = v.stride(2);
  T* op = out.data_ptr<T>();  // contiguous, q's shape
  float* lp = lse.data_ptr<float>();  // contiguous [B, Hq, Nq]
  const int64_t tasks = g.B * Hk * S;
  const TaskFn task_fn = choose_task<T>(D);
  // Split partials (max, sum, acc per row): small (no cache-sized buffer), and none without splits.
  std::vector<float> part(S > 1 ? tasks * R * (D + 2) : 0);
  const int64_t longest = *std::max_element(lengths.begin(), lengths.end());
  const int64_t task_bytes = 2 * (longest / S + 1) * D * static_cast<int64_t>(sizeof(T));
  const int64_t grain = std::max<int64_t>(1, kMinTaskBytes / task_bytes);
  const auto row_index = [&](int64_t b, int64_t h, int64_t r) { return (b * Hq + h * G + r / Nq) * Nq + r % Nq; };
  const auto finish = [&](int64_t row, float mr, float lr, const float* accr) {
    T* dst = op + row * D;
    const float inv = lr > 0.f ? 1.f / lr : 0.f;  // no key (or underflow): 0, as the reference; NaN stays NaN
    const bool nan = std::isnan(lr) || std::isnan(mr);
    for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<T>(nan ? accr[d] * lr : accr[d] * inv);
    lp[row] = lr > 0.f || nan ? mr + std::log(lr) : kNegInf;
  };
  // Merges the splits of one (sequence, kv head), in split order: rescale each to the largest max, add. Run by the
  // thread that finishes the group's last split (no second pass over the tasks, whose barrier costs a scheduler
  // quantum whenever a thread is descheduled); which thread that is changes nothing in the arithmetic.
  const auto merge = [&](int64_t bh, float* acc) {
    for (int64_t r = 0; r < R; ++r) {
      float M = kNegInf;
      bool nan = false;
      for (int64_t sp = 0; sp < S; ++sp) {
        const float ms = part[(bh * S + sp) * R * (D + 2) + r];
        nan |= std::isnan(ms);
        M = std::max(M, ms);
      }
      float L = 0.f;
      std::fill(acc, acc + D, 0.f);
      for (int64_t sp = 0; sp < S; ++sp) {
        const float* base = &part[(bh * S + sp) * R * (D + 2)];
        const float ls = base[R + r];
        if (ls == 0.f && !std::isnan(ls)) continue;  // the split saw no key for this row
        const float w = nan ? std::numeric_limits<float>::quiet_NaN() : std::exp(base[r] - M);
        L += ls * w;
        for (int64_t d = 0; d < D; ++d) acc[d] += base[2 * R + r * D + d] * w;
      }
      finish(row_index(bh / Hk, bh % Hk, r), nan ? std::numeric_limits<float>::quiet_NaN() : M, L, acc);
    }
  };
  // Splits done per (sequence, kv head); the acq_rel increment makes the other splits' partials visible to the
  // thread that merges.
  std::unique_ptr<std::atomic<int64_t>[]> done(S > 1 ? new std::atomic<int64_t>[g.B * Hk] : nullptr);
  for (int64_t i = 0; S > 1 && i < g.B * Hk; ++i) done[i].store(0, std::memory_order_relaxed);
  at::parallel_for(0, tasks, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(R * D), s(R * kBlock), mine(S > 1 ? 0 : R * (D + 2)), macc(S > 1 ? D : 0);
    std::vector<float> kbuf(std::is_same_v<T, float> && paging.table == nullptr ? 0 : kBlock * D), vbuf(kbuf.size());
    std::vector<int64_t> lo(R), hi(R);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bh = task / S, split = task % S, b = bh / Hk, h = bh % Hk, L = lengths[b];
      int64_t span_lo = L, span_hi = 0;
      for (int64_t r = 0; r < R; ++r) {
        row_range(g, L, r, lo[r], hi[r]);
        if (hi[r] > lo[r]) span_lo = std::min(span_lo, lo[r]), span_hi = std::max(span_hi, hi[r]);
        const T* src = qp + row_index(b, h, r) * D;
        for (int64_t d = 0; d < D; ++d) qf[r * D + d] = static_cast<float>(src[d]) * static_cast<float>(scale);
      }
      // This split's keys: its fixed range of the cache (batch invariance), or an equal share of the visible span
      // cut at block boundaries.
      const int64_t span = std::max<int64_t>(span_hi - span_lo, 0);
      int64_t k0, k1;
      if (g.chunk > 0) {
        k0 = std::clamp(split * g.chunk, span_lo, span_lo + span);
        k1 = std::clamp((split + 1) * g.chunk, k0, span_lo + span);
      } else {
        const int64_t per = (span / kBlock + S) / S * kBlock;
        k0 = std::min(span_lo + split * per, span_lo + span), k1 = std::min(k0 + per, span_lo + span);
      }
      float* base = S > 1 ? &part[task * R * (D + 2)] : mine.data();
      float *m = base, *l = base + R, *acc = base + 2 * R;
      // Paged: the head's rows of block 0, to which key_rows adds each page's block offset.
      const int64_t bo = paging.table == nullptr ? b : 0;
      task_fn(g, TaskArgs{qf.data(), kp + bo * ksb + h * ksh, vp + bo * vsb + h * vsh, ksn, vsn, &paging, b, ksb, vsb,
                          lo.data(), hi.data(), k0, k1, m, l, acc, s.data(), kbuf.data(), vbuf.data()});
      if (S == 1) {
        for (int64_t r = 0; r < R; ++r) finish(row_index(b, h, r), m[r], l[r], acc + r * D);
      } else if (done[bh].fetch_add(1, std::memory_order_acq_rel) == S - 1) {
        merge(bh, macc.data());
      }
    }
  });
}

// Splits per (sequence, kv head) when batch invariance is asked for (num_splits < 0): a function of the cache capacity Nmax and the bytes per key row (head dim x
// dtype) only: never of B, of the true lengths or of the thread count, so a row's merge order, hence its output
// bit for bit, does not depend on the rest of the batch (batch invariance). Each split of a full cache reads
// about kMinTaskBytes, at most kMaxSplits of them: enough tasks to keep the threads busy for one sequence and one
// kv head, few enough that the merge stays a small part of a step when B * Hk alone fills the threads.
// Splits per (sequence, kv head) by default: one unless B * Hk tasks would leave threads idle and the caches are
// long enough that each split still reads kMinTaskBytes. Fastest, but a row's merge order then depends on B, on the
// longest length in the batch and on the thread count.
int64_t choose_splits(int64_t tasks, int64_t longest, int64_t row_bytes) {
  const int64_t threads = at::get_num_threads();
  if (tasks >= 2 * threads) return 1;
  const int64_t wanted = (2 * threads + tasks - 1) / tasks;
  const int64_t affordable = std::max<int64_t>(1, 2 * longest * row_bytes / kMinTaskBytes);
  return std::clamp<int64_t>(std::min(wanted, affordable), 1, std::max<int64_t>(1, longest / kBlock));
}

int64_t invariant_splits(int64_t nmax, int64_t row_bytes) {
  const int64_t affordable = std::max<int64_t>(1, 2 * nmax * row_bytes / kMinTaskBytes);
  return std::clamp<int64_t>(affordable, 1, std::max<int64_t>(1, std::min(kMaxSplits, nmax / kBlock)));
}

std::tuple<at::Tensor, at::Tensor> attention_decode_cpu(const at::Tensor& q, const at::Tensor& k_cache,
                                                        const at::Tensor& v_cache, const at::Tensor& cache_seqlens,
                                                        bool causal, double scale, int64_t window_left,
                                                        int64_t window_right, int64_t num_splits,
                                                        const std::optional<at::Tensor>& block_table) {
  // num_splits > 0 is a GPU occupancy knob, ignored here: the CPU splits the keys only to keep its threads busy
  // (choose_splits). num_splits < 0 asks for batch invariance: splits from Nmax and the key row's bytes alone.
  constexpr const char* op = "attention_decode";
  check_decode_args(op, q, k_cache, v_cache, cache_seqlens, block_table.has_value());
  const Paging paging = paging_of(op, block_table, k_cache, q.size(0));
  // The logical capacity: the lengths, the splits and the key ranges are those of the dense cache it stands for.
  const int64_t nmax = paging.table == nullptr ? k_cache.size(2) : block_table->size(1) * paging.page;
  TORCH_CHECK(window_left >= 0 && window_right >= 0 && (!causal || window_right == 0), op,
              ": window bounds must come resolved (>= 0, right = 0 when causal; "
              "genfast/ops/_attention_common.py window_bounds), got (", window_left, ", ", window_right, ")");
  const at::Tensor qc = q.contiguous();
  // The kernel walks keys by row stride; only a cache whose rows are not contiguous is copied.
  const at::Tensor k = k_cache.stride(3) == 1 ? k_cache : k_cache.contiguous();
  const at::Tensor v = v_cache.stride(3) == 1 ? v_cache : v_cache.contiguous();
  at::Tensor out = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
  if (q.numel() == 0) return {out, lse};
  const std::vector<int64_t> lengths = read_lengths(cache_seqlens, 0, nmax);
  DecodeGeometry g{q.size(0), q.size(1), k.size(1), q.size(1) / k.size(1), q.size(2), q.size(3),
                   q.size(1) / k.size(1) * q.size(2), 1, 0, window_left, window_right};
  const int64_t row_bytes = g.D * static_cast<int64_t>(q.element_size());
  g.splits = num_splits < 0 ? invariant_splits(nmax, row_bytes)
                            : choose_splits(g.B * g.Hk, *std::max_element(lengths.begin(), lengths.end()), row_bytes);
  if (num_splits < 0) {
    // The cache's blocks dealt into at most `splits` chunks of whole blocks; the count of chunks then covers Nmax.
    const int64_t blocks = (nmax + kBlock - 1) / kBlock;
    g.chunk = (blocks + g.splits - 1) / g.splits * kBlock;
    g.splits = (nmax + g.chunk - 1) / g.chunk;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "attention_decode_cpu", [&] {
    decode_kernel<scalar_t>(qc, k, v, lengths, g, paging, scale, out, lse);
  });
  return {out, lse};
}

void kv_cache_append_cpu(const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& k_new,
                         const at::Tensor& v_new, const at::Tensor& cache_seqlens,
                         const std::optional<at::Tensor>& block_table) {
  constexpr const char* op = "kv_cache_append";
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes(), op,
              ": k_cache and v_cache must be 4-D of one shape");
  TORCH_CHECK(k_new.dim() == 4 && k_new.sizes() == v_new.sizes(), op, ": k_new and v_new must be 4-D of one shape");
  const bool paged = block_table.has_value();
  TORCH_CHECK((paged || k_new.size(0) == k_cache.size(0)) && k_new.size(1) == k_cache.size(1) &&
                  k_new.size(3) == k_cache.size(3),
              op, ": k_new must be [B, Hk, Nnew, D] with the caches' B, Hk and D");
  const at::ScalarType dtype = k_cache.scalar_type();
  TORCH_CHECK(v_cache.scalar_type() == dtype && k_new.scalar_type() == dtype && v_new.scalar_type() == dtype, op,
              ": the caches and the new keys/values must share a dtype");
  TORCH_CHECK(cache_seqlens.dim() == 1 && cache_seqlens.size(0) == k_new.size(0) &&
                  (cache_seqlens.scalar_type() == at::kInt || cache_seqlens.scalar_type() == at::kLong),
              op, ": cache_seqlens must be int32/int64 [B]");
  // Writes into overlapping rows, or a key cache that is the value cache, would land on each other.
  at::assert_no_internal_overlap(k_cache);
  at::assert_no_internal_overlap(v_cache);
  at::assert_no_partial_overlap(k_cache, v_cache);
  TORCH_CHECK(k_cache.data_ptr() != v_cache.data_ptr() || k_cache.numel() == 0, op,
              ": k_cache and v_cache must not be the same memory");
  const Paging paging = paging_of(op, block_table, k_cache, k_new.size(0));
  const int64_t B = k_new.size(0), H = k_cache.size(1), D = k_cache.size(3);
  const int64_t Nmax = paged ? block_table->size(1) * paging.page : k_cache.size(2);
  const int64_t T = k_new.size(2);
  if (B * H * T * D == 0) return;
  // Clamped only to [-T, Nmax], where every slot L + t is still dropped as it would be (clamping L to 0 would move
  // the tokens instead), so L + t cannot overflow.
  const std::vector<int64_t> lengths = read_lengths(cache_seqlens, -T, Nmax);
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
          // Paged: block and offset of the logical slot; a block entry outside the pool drops the token.
          int64_t row = b, slot = dest;
          if (paged) {
            row = paging.entry(b, dest >> paging.shift);
            if (row < 0 || row >= paging.blocks) continue;
            slot = dest & (paging.page - 1);
          }
          char* d0 = cp + (row * cb + h * ch + slot * cn) * item;
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

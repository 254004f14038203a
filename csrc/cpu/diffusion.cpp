// CPU kernels of genfast::scheduler_step and genfast::cfg_combine (formulas and the coefficient
// layout: genfast/ops/diffusion.py).
//
// Each thread walks its range in chunks of kChunk elements: when the noise is drawn inside, the
// chunk's normals are generated first into an L1-resident buffer (four normals per Philox call, eight
// calls side by side with AVX2 where the CPU has it), then one loop, compiled twice (AVX2+FMA and
// baseline, chosen at run time), computes the step. The normals are the Philox stream of
// csrc/philox.h at the output's flat index, like every other backend.
//
// Threads: the flat output is split through TensorIterator::for_each, which runs on torch's intra-op
// thread pool (so torch.set_num_threads applies) and hands each thread contiguous ranges.
#include <ATen/Dispatch.h>
#include <ATen/TensorIterator.h>
#include <ATen/Version.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <string>

#include "../philox.h"

#if defined(__x86_64__) && defined(__GNUC__)
#define GENFAST_DIFFUSION_AVX2 1
#include <immintrin.h>
#pragma GCC push_options
#pragma GCC target("avx2,fma")
// SLEEF's 8-lane log and sincos (1.0 ULP), exported by libtorch_cpu. Declared weak so that a torch
// built without them still loads this library; the scalar path is used then.
// The layout of SLEEF's Sleef___m256_2 as sincos returns it: sines first, then cosines.
struct SleefFloat8x2 {
  __m256 sin, cos;
};
extern "C" {
__m256 Sleef_logf8_u10avx2(__m256) __attribute__((weak));
SleefFloat8x2 Sleef_sincosf8_u10avx2(__m256) __attribute__((weak));
}
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx512f")
// Their 16-lane AVX-512F twins (Sleef___m512_2 likewise holds sines, then cosines).
struct SleefFloat16x2 {
  __m512 sin, cos;
};
extern "C" {
__m512 Sleef_logf16_u10avx512f(__m512) __attribute__((weak));
SleefFloat16x2 Sleef_sincosf16_u10avx512f(__m512) __attribute__((weak));
}
#pragma GCC pop_options
#endif

namespace {

// Coefficient indices (genfast.ops.diffusion.COEFS).
enum Coef { AX, AM, CLIP_LO, CLIP_HI, EX, EM, E0, P0, PE, PX, SIGMA, NUM_COEFS };

// Small enough that one chunk's noise (2 KiB) stays in L1 between generation and use.
constexpr int64_t kChunk = 512;
// Below this many elements per thread, threading costs more than it saves.
constexpr int64_t kGrain = 32768;

void normals_scalar(uint64_t seed, int64_t start, int64_t n, float* out) {
  genfast::philox_normal_range(seed, static_cast<uint64_t>(start), n, out);
}

#ifdef GENFAST_DIFFUSION_AVX2
#pragma GCC push_options
#pragma GCC target("avx2,fma")

// 32x32 -> 64-bit products of eight lanes: high and low words, lane for lane.
inline void mul_wide(__m256i a, __m256i m, __m256i& hi, __m256i& lo) {
  const __m256i even = _mm256_mul_epu32(a, m);
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), m);
  lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
  hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
}

inline __m256 unit_open(__m256i bits) {  // == genfast::uint_to_unit_open, lane for lane (exact)
  const __m256 f = _mm256_cvtepi32_ps(_mm256_srli_epi32(bits, 8));
  return _mm256_mul_ps(_mm256_add_ps(f, _mm256_set1_ps(0.5f)), _mm256_set1_ps(1.0f / 16777216.0f));
}

// Pairs of floats as one 64-bit unit: (p0 p1 q0 q1 | p4 p5 q4 q5) and (p2 p3 q2 q3 | p6 p7 q6 q7).
inline __m256 pairs_lo(__m256 p, __m256 q) {
  return _mm256_castpd_ps(_mm256_unpacklo_pd(_mm256_castps_pd(p), _mm256_castps_pd(q)));
}
inline __m256 pairs_hi(__m256 p, __m256 q) {
  return _mm256_castpd_ps(_mm256_unpackhi_pd(_mm256_castps_pd(p), _mm256_castps_pd(q)));
}

// 4x8 -> 8x4: from a, b, c, d (eight lanes each) store a0 b0 c0 d0 a1 b1 c1 d1 ... a7 b7 c7 d7.
inline void store_interleaved4(float* out, __m256 a, __m256 b, __m256 c, __m256 d) {
  const __m256 ab_lo = _mm256_unpacklo_ps(a, b), ab_hi = _mm256_unpackhi_ps(a, b);  // a0 b0 a1 b1 | a4 b4 a5 b5
  const __m256 cd_lo = _mm256_unpacklo_ps(c, d), cd_hi = _mm256_unpackhi_ps(c, d);
  const __m256 g0 = pairs_lo(ab_lo, cd_lo), g1 = pairs_hi(ab_lo, cd_lo);  // groups 0 | 4 and 1 | 5
  const __m256 g2 = pairs_lo(ab_hi, cd_hi), g3 = pairs_hi(ab_hi, cd_hi);  // groups 2 | 6 and 3 | 7
  _mm256_storeu_ps(out, _mm256_permute2f128_ps(g0, g1, 0x20));
  _mm256_storeu_ps(out + 8, _mm256_permute2f128_ps(g2, g3, 0x20));
  _mm256_storeu_ps(out + 16, _mm256_permute2f128_ps(g0, g1, 0x31));
  _mm256_storeu_ps(out + 24, _mm256_permute2f128_ps(g2, g3, 0x31));
}

// Normal elements 4*counter .. 4*counter+31: eight Philox calls side by side, all four words of each
// used (genfast::philox_normal4 lane for lane). The integer rounds are bit-exact; log, sin and cos
// are SLEEF's (within 1 ULP of libm), so a normal may differ from the scalar one in its last bit or two.
inline void normals32_avx2(uint64_t seed, uint64_t counter, float* out) {
  const __m256i mul_a = _mm256_set1_epi32(static_cast<int>(0xD2511F53u));
  const __m256i mul_b = _mm256_set1_epi32(static_cast<int>(0xCD9E8D57u));
  const __m256i key_a = _mm256_set1_epi32(static_cast<int>(0x9E3779B9u));
  const __m256i key_b = _mm256_set1_epi32(static_cast<int>(0xBB67AE85u));
  __m256i c0, c1;
  if (static_cast<uint32_t>(counter) <= 0xFFFFFFFFu - 7) {  // the low words do not wrap inside the block
    c0 = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(counter))),
                          _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    c1 = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(counter >> 32)));
  } else {  // 64-bit counters: the block straddles a multiple of 2^32
    alignas(32) uint32_t lo_words[8], hi_words[8];
    for (int lane = 0; lane < 8; ++lane) {
      lo_words[lane] = static_cast<uint32_t>(counter + lane);
      hi_words[lane] = static_cast<uint32_t>((counter + lane) >> 32);
    }
    c0 = _mm256_load_si256(reinterpret_cast<const __m256i*>(lo_words));
    c1 = _mm256_load_si256(reinterpret_cast<const __m256i*>(hi_words));
  }
  __m256i c2 = _mm256_setzero_si256(), c3 = _mm256_setzero_si256();
  __m256i k0 = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(seed)));
  __m256i k1 = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(seed >> 32)));
  for (int round = 0; round < 10; ++round) {
    __m256i hi_b, lo_b, hi_a, lo_a;
    mul_wide(c2, mul_b, hi_b, lo_b);
    mul_wide(c0, mul_a, hi_a, lo_a);
    c0 = _mm256_xor_si256(_mm256_xor_si256(hi_b, c1), k0);
    c2 = _mm256_xor_si256(_mm256_xor_si256(hi_a, c3), k1);
    c1 = lo_b;
    c3 = lo_a;
    k0 = _mm256_add_epi32(k0, key_a);
    k1 = _mm256_add_epi32(k1, key_b);
  }
  const __m256 minus_two = _mm256_set1_ps(-2.0f), two_pi = _mm256_set1_ps(6.28318530717958647692f);
  const __m256 r1 = _mm256_sqrt_ps(_mm256_mul_ps(minus_two, Sleef_logf8_u10avx2(unit_open(c0))));
  const __m256 r2 = _mm256_sqrt_ps(_mm256_mul_ps(minus_two, Sleef_logf8_u10avx2(unit_open(c2))));
  const SleefFloat8x2 sc1 = Sleef_sincosf8_u10avx2(_mm256_mul_ps(two_pi, unit_open(c1)));
  const SleefFloat8x2 sc2 = Sleef_sincosf8_u10avx2(_mm256_mul_ps(two_pi, unit_open(c3)));
  store_interleaved4(out, _mm256_mul_ps(r1, sc1.cos), _mm256_mul_ps(r1, sc1.sin), _mm256_mul_ps(r2, sc2.cos),
                     _mm256_mul_ps(r2, sc2.sin));
}

// Normal elements start .. start+n-1: scalar up to a multiple of 4, then 32 at a time, then scalar.
void normals_avx2(uint64_t seed, int64_t start, int64_t n, float* out) {
  const int64_t head = std::min<int64_t>(n, (4 - (start & 3)) & 3);
  genfast::philox_normal_range(seed, static_cast<uint64_t>(start), head, out);
  int64_t i = head;
  for (; i + 32 <= n; i += 32) normals32_avx2(seed, static_cast<uint64_t>(start + i) >> 2, out + i);
  genfast::philox_normal_range(seed, static_cast<uint64_t>(start + i), n - i, out + i);
}
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f")
// GCC 12's AVX-512 headers build vectors from _mm512_undefined_*(), which -Wall reports as
// uninitialised inside inlined intrinsics; the values are never read.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

inline void mul_wide16(__m512i a, __m512i m, __m512i& hi, __m512i& lo) {  // mul_wide, sixteen lanes
  const __m512i even = _mm512_mul_epu32(a, m);
  const __m512i odd = _mm512_mul_epu32(_mm512_srli_epi64(a, 32), m);
  lo = _mm512_mask_blend_epi32(0xAAAA, even, _mm512_slli_epi64(odd, 32));
  hi = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(even, 32), odd);
}

inline __m512 unit_open16(__m512i bits) {  // == genfast::uint_to_unit_open, lane for lane (exact)
  const __m512 f = _mm512_cvtepi32_ps(_mm512_srli_epi32(bits, 8));
  return _mm512_mul_ps(_mm512_add_ps(f, _mm512_set1_ps(0.5f)), _mm512_set1_ps(1.0f / 16777216.0f));
}

inline __m512d pd(__m512 v) { return _mm512_castps_pd(v); }

// 4x16 -> 16x4: store a0 b0 c0 d0 a1 b1 c1 d1 ... a15 b15 c15 d15.
inline void store_interleaved4_16(float* out, __m512 a, __m512 b, __m512 c, __m512 d) {
  const __m512 ab_lo = _mm512_unpacklo_ps(a, b), ab_hi = _mm512_unpackhi_ps(a, b);
  const __m512 cd_lo = _mm512_unpacklo_ps(c, d), cd_hi = _mm512_unpackhi_ps(c, d);
  // g_k holds groups k | k+4 | k+8 | k+12 (a group = a_j b_j c_j d_j) in its four 128-bit lanes.
  const __m512 g0 = _mm512_castpd_ps(_mm512_unpacklo_pd(pd(ab_lo), pd(cd_lo)));
  const __m512 g1 = _mm512_castpd_ps(_mm512_unpackhi_pd(pd(ab_lo), pd(cd_lo)));
  const __m512 g2 = _mm512_castpd_ps(_mm512_unpacklo_pd(pd(ab_hi), pd(cd_hi)));
  const __m512 g3 = _mm512_castpd_ps(_mm512_unpackhi_pd(pd(ab_hi), pd(cd_hi)));
  // A 4x4 transpose of 128-bit lanes puts groups 4q .. 4q+3 in output vector q.
  const __m512 t0 = _mm512_shuffle_f32x4(g0, g1, 0x44), t1 = _mm512_shuffle_f32x4(g2, g3, 0x44);
  const __m512 t2 = _mm512_shuffle_f32x4(g0, g1, 0xEE), t3 = _mm512_shuffle_f32x4(g2, g3, 0xEE);
  _mm512_storeu_ps(out, _mm512_shuffle_f32x4(t0, t1, 0x88));
  _mm512_storeu_ps(out + 16, _mm512_shuffle_f32x4(t0, t1, 0xDD));
  _mm512_storeu_ps(out + 32, _mm512_shuffle_f32x4(t2, t3, 0x88));
  _mm512_storeu_ps(out + 48, _mm512_shuffle_f32x4(t2, t3, 0xDD));
}

// normals32_avx2 with sixteen Philox calls side by side: normal elements 4*counter .. 4*counter+63.
inline void normals64_avx512(uint64_t seed, uint64_t counter, float* out) {
  const __m512i mul_a = _mm512_set1_epi32(static_cast<int>(0xD2511F53u));
  const __m512i mul_b = _mm512_set1_epi32(static_cast<int>(0xCD9E8D57u));
  const __m512i key_a = _mm512_set1_epi32(static_cast<int>(0x9E3779B9u));
  const __m512i key_b = _mm512_set1_epi32(static_cast<int>(0xBB67AE85u));
  __m512i c0, c1;
  if (static_cast<uint32_t>(counter) <= 0xFFFFFFFFu - 15) {  // the low words do not wrap inside the block
    c0 = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(counter))),
                          _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
    c1 = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(counter >> 32)));
  } else {  // 64-bit counters: the block straddles a multiple of 2^32
    alignas(64) uint32_t lo_words[16], hi_words[16];
    for (int lane = 0; lane < 16; ++lane) {
      lo_words[lane] = static_cast<uint32_t>(counter + lane);
      hi_words[lane] = static_cast<uint32_t>((counter + lane) >> 32);
    }
    c0 = _mm512_load_si512(lo_words);
    c1 = _mm512_load_si512(hi_words);
  }
  __m512i c2 = _mm512_setzero_si512(), c3 = _mm512_setzero_si512();
  __m512i k0 = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(seed)));
  __m512i k1 = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(seed >> 32)));
  for (int round = 0; round < 10; ++round) {
    __m512i hi_b, lo_b, hi_a, lo_a;
    mul_wide16(c2, mul_b, hi_b, lo_b);
    mul_wide16(c0, mul_a, hi_a, lo_a);
    c0 = _mm512_xor_si512(_mm512_xor_si512(hi_b, c1), k0);
    c2 = _mm512_xor_si512(_mm512_xor_si512(hi_a, c3), k1);
    c1 = lo_b;
    c3 = lo_a;
    k0 = _mm512_add_epi32(k0, key_a);
    k1 = _mm512_add_epi32(k1, key_b);
  }
  const __m512 minus_two = _mm512_set1_ps(-2.0f), two_pi = _mm512_set1_ps(6.28318530717958647692f);
  const __m512 r1 = _mm512_sqrt_ps(_mm512_mul_ps(minus_two, Sleef_logf16_u10avx512f(unit_open16(c0))));
  const __m512 r2 = _mm512_sqrt_ps(_mm512_mul_ps(minus_two, Sleef_logf16_u10avx512f(unit_open16(c2))));
  const SleefFloat16x2 sc1 = Sleef_sincosf16_u10avx512f(_mm512_mul_ps(two_pi, unit_open16(c1)));
  const SleefFloat16x2 sc2 = Sleef_sincosf16_u10avx512f(_mm512_mul_ps(two_pi, unit_open16(c3)));
  store_interleaved4_16(out, _mm512_mul_ps(r1, sc1.cos), _mm512_mul_ps(r1, sc1.sin), _mm512_mul_ps(r2, sc2.cos),
                        _mm512_mul_ps(r2, sc2.sin));
}

void normals_avx512(uint64_t seed, int64_t start, int64_t n, float* out) {  // normals_avx2, 64 at a time
  const int64_t head = std::min<int64_t>(n, (4 - (start & 3)) & 3);
  genfast::philox_normal_range(seed, static_cast<uint64_t>(start), head, out);
  int64_t i = head;
  for (; i + 64 <= n; i += 64) normals64_avx512(seed, static_cast<uint64_t>(start + i) >> 2, out + i);
  genfast::philox_normal_range(seed, static_cast<uint64_t>(start + i), n - i, out + i);
}
#pragma GCC diagnostic pop
#pragma GCC pop_options

enum class NormalsIsa { kScalar, kAvx2, kAvx512 };

// The widest path this CPU, this torch's SLEEF and torch's own CPU capability allow. The last one
// honours ATEN_CPU_CAPABILITY (default / avx2 / avx512), which is how the tests reach every path.
NormalsIsa normals_isa() {
  static const NormalsIsa isa = [] {
    const std::string capability = at::get_cpu_capability();
    if (capability == "AVX512" && __builtin_cpu_supports("avx512f") && Sleef_logf16_u10avx512f != nullptr &&
        Sleef_sincosf16_u10avx512f != nullptr) {
      return NormalsIsa::kAvx512;
    }
    if (capability != "DEFAULT" && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
        Sleef_logf8_u10avx2 != nullptr && Sleef_sincosf8_u10avx2 != nullptr) {
      return NormalsIsa::kAvx2;
    }
    return NormalsIsa::kScalar;
  }();
  return isa;
}
#endif

void fill_normals(uint64_t seed, int64_t start, int64_t n, float* out) {
#ifdef GENFAST_DIFFUSION_AVX2
  switch (normals_isa()) {
    case NormalsIsa::kAvx512:
      return normals_avx512(seed, start, n, out);
    case NormalsIsa::kAvx2:
      return normals_avx2(seed, start, n, out);
    case NormalsIsa::kScalar:
      break;
  }
#endif
  normals_scalar(seed, start, n, out);
}

// One chunk of the step. Compile-time flags keep the loop free of branches so it vectorises.
// The three terms are folded into coefficients of x0, x and m once per chunk: prev = A*x0 + B*x + C*m
// (+ sigma*noise) with A = P0 + PE*E0, B = PX + PE*EX, C = PE*EM. That is the same formula with
// its products reassociated, i.e. a rounding-level difference from the term-by-term reference.
template <typename T, bool kUncond, bool kNoise>
__attribute__((always_inline)) inline void step_chunk_body(const T* __restrict__ x, const T* __restrict__ m,
                                                           const T* __restrict__ u, const float* __restrict__ noise,
                                                           const float* c, float g, T* __restrict__ out, int64_t n) {
  const float ax = c[AX], am = c[AM], lo = c[CLIP_LO], hi = c[CLIP_HI], sigma = c[SIGMA];
  const float a = c[P0] + c[PE] * c[E0], b = c[PX] + c[PE] * c[EX], cm = c[PE] * c[EM];
  for (int64_t i = 0; i < n; ++i) {
    const float xi = static_cast<float>(x[i]);
    float mi = static_cast<float>(m[i]);
    if constexpr (kUncond) {
      const float ui = static_cast<float>(u[i]);
      mi = ui + g * (mi - ui);
    }
    float x0 = ax * xi + am * mi;
    x0 = x0 < lo ? lo : (x0 > hi ? hi : x0);  // comparisons, so NaN propagates as in torch.clamp
    float prev = a * x0 + b * xi + cm * mi;
    if constexpr (kNoise) prev += sigma * noise[i];
    out[i] = static_cast<T>(prev);
  }
}

#ifdef GENFAST_DIFFUSION_AVX2
template <typename T, bool kUncond, bool kNoise>
__attribute__((target("avx2,fma"))) void step_chunk_avx2(const T* x, const T* m, const T* u, const float* noise,
                                                         const float* c, float g, T* out, int64_t n) {
  step_chunk_body<T, kUncond, kNoise>(x, m, u, noise, c, g, out, n);
}
#endif

template <typename T, bool kUncond, bool kNoise>
void step_chunk(const T* x, const T* m, const T* u, const float* noise, const float* c, float g, T* out, int64_t n) {
#ifdef GENFAST_DIFFUSION_AVX2
  static const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (avx2) return step_chunk_avx2<T, kUncond, kNoise>(x, m, u, noise, c, g, out, n);
#endif
  step_chunk_body<T, kUncond, kNoise>(x, m, u, noise, c, g, out, n);
}

// Runs f(begin, end) over [0, out.numel()) on torch's intra-op threads (see the top of this file).
template <typename F>
void parallel_flat(const at::Tensor& out, const F& f) {
  if (out.numel() == 0) return;
  const at::Tensor flat = out.view({-1});  // kept alive: the iterator borrows it
  at::TensorIterator iter = at::TensorIteratorConfig()
                                .add_output(flat)
                                .resize_outputs(false)
                                .check_all_same_dtype(false)
                                .build();
  const char* base = static_cast<const char*>(out.data_ptr());
  const int64_t element = out.element_size();
  iter.for_each(
      [&](char** data, const int64_t* strides, int64_t n) {
        const int64_t begin = (data[0] - base) / element;  // out is flat and contiguous
        f(begin, begin + n);
      },
      kGrain);
}

template <typename T, bool kUncond>
void step_range(const T* x, const T* m, const T* u, const float* noise, const int64_t* seed, const float* c, float g,
                T* out, int64_t begin, int64_t end) {
  alignas(64) float buffer[kChunk];
  for (int64_t s = begin; s < end; s += kChunk) {
    const int64_t n = std::min(kChunk, end - s);
    const T* uc = kUncond ? u + s : nullptr;
    if (noise != nullptr) {
      step_chunk<T, kUncond, true>(x + s, m + s, uc, noise + s, c, g, out + s, n);
    } else if (seed != nullptr) {
      fill_normals(static_cast<uint64_t>(*seed), s, n, buffer);
      step_chunk<T, kUncond, true>(x + s, m + s, uc, buffer, c, g, out + s, n);
    } else {
      step_chunk<T, kUncond, false>(x + s, m + s, uc, nullptr, c, g, out + s, n);
    }
  }
}

void check_float(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16,
              "scheduler_step: ", name, " must be float32, float16 or bfloat16, got ", t.scalar_type());
}

at::Tensor scheduler_step_cpu(const at::Tensor& sample, const at::Tensor& model_output,
                              const std::optional<at::Tensor>& model_output_uncond, double guidance_scale,
                              const at::Tensor& coefs, const std::optional<at::Tensor>& noise,
                              const std::optional<at::Tensor>& seed) {
  check_float(sample, "sample");
  TORCH_CHECK(model_output.sizes() == sample.sizes(), "scheduler_step: model_output has shape ",
              model_output.sizes(), " but sample has shape ", sample.sizes());
  TORCH_CHECK(model_output.scalar_type() == sample.scalar_type(),
              "scheduler_step: model_output and sample must share a dtype");
  if (model_output_uncond.has_value()) {
    TORCH_CHECK(model_output_uncond->sizes() == sample.sizes() &&
                    model_output_uncond->scalar_type() == sample.scalar_type(),
                "scheduler_step: model_output_uncond must have sample's shape and dtype");
  }
  TORCH_CHECK(coefs.scalar_type() == at::kFloat && coefs.numel() == NUM_COEFS,
              "scheduler_step: coefs must be float32 with 11 values, got ", coefs.scalar_type(), " with ",
              coefs.numel());
  TORCH_CHECK(!(noise.has_value() && seed.has_value()), "scheduler_step: pass noise or seed, not both");
  if (noise.has_value()) {
    TORCH_CHECK(noise->numel() == sample.numel(), "scheduler_step: noise must have sample's number of elements");
  }
  if (seed.has_value()) {
    TORCH_CHECK(seed->numel() == 1 && seed->scalar_type() == at::kLong, "scheduler_step: seed must be one int64");
  }
  for (const at::Tensor* t : {&sample, &model_output, &coefs}) {
    TORCH_CHECK(t->device().is_cpu(), "scheduler_step: every tensor must be on the CPU");
  }
  for (const std::optional<at::Tensor>* t : {&model_output_uncond, &noise, &seed}) {
    TORCH_CHECK(!t->has_value() || (*t)->device().is_cpu(), "scheduler_step: every tensor must be on the CPU");
  }

  const at::Tensor x = sample.contiguous();
  const at::Tensor m = model_output.contiguous();
  const at::Tensor u = model_output_uncond.has_value() ? model_output_uncond->contiguous() : at::Tensor();
  const at::Tensor c = coefs.contiguous();
  const at::Tensor nz = noise.has_value() ? noise->to(at::kFloat).contiguous() : at::Tensor();
  at::Tensor out = at::empty(sample.sizes(), sample.options().memory_format(at::MemoryFormat::Contiguous));
  const float* cp = c.data_ptr<float>();
  const float* noise_ptr = nz.defined() ? nz.data_ptr<float>() : nullptr;
  // A zero sigma makes the noise term vanish exactly: skip drawing it.
  const int64_t* seed_ptr = (seed.has_value() && cp[SIGMA] != 0.0f) ? seed->data_ptr<int64_t>() : nullptr;
  const float g = static_cast<float>(guidance_scale);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "scheduler_step_cpu", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* mp = m.data_ptr<scalar_t>();
    const scalar_t* up = u.defined() ? u.data_ptr<scalar_t>() : nullptr;
    scalar_t* op = out.data_ptr<scalar_t>();
    parallel_flat(out, [&](int64_t begin, int64_t end) {
      if (up != nullptr) {
        step_range<scalar_t, true>(xp, mp, up, noise_ptr, seed_ptr, cp, g, op, begin, end);
      } else {
        step_range<scalar_t, false>(xp, mp, up, noise_ptr, seed_ptr, cp, g, op, begin, end);
      }
    });
  });
  return out;
}

template <typename T>
__attribute__((always_inline)) inline void cfg_body(const T* __restrict__ u, const T* __restrict__ c, float g,
                                                    T* __restrict__ out, int64_t begin, int64_t end) {
  for (int64_t i = begin; i < end; ++i) {
    const float ui = static_cast<float>(u[i]);
    out[i] = static_cast<T>(ui + g * (static_cast<float>(c[i]) - ui));
  }
}

#ifdef GENFAST_DIFFUSION_AVX2
template <typename T>
__attribute__((target("avx2,fma"))) void cfg_avx2(const T* u, const T* c, float g, T* out, int64_t begin,
                                                  int64_t end) {
  cfg_body(u, c, g, out, begin, end);
}
#endif

template <typename T>
void cfg_range(const T* u, const T* c, float g, T* out, int64_t begin, int64_t end) {
#ifdef GENFAST_DIFFUSION_AVX2
  static const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (avx2) return cfg_avx2(u, c, g, out, begin, end);
#endif
  cfg_body(u, c, g, out, begin, end);
}

at::Tensor cfg_combine_cpu(const at::Tensor& uncond, const at::Tensor& cond, double guidance_scale) {
  TORCH_CHECK(uncond.sizes() == cond.sizes(), "cfg_combine: cond has shape ", cond.sizes(), " but uncond has ",
              uncond.sizes());
  TORCH_CHECK(uncond.scalar_type() == cond.scalar_type(), "cfg_combine: cond and uncond must share a dtype");
  TORCH_CHECK(uncond.scalar_type() == at::kFloat || uncond.scalar_type() == at::kHalf ||
                  uncond.scalar_type() == at::kBFloat16,
              "cfg_combine: uncond must be float32, float16 or bfloat16");
  TORCH_CHECK(uncond.device().is_cpu() && cond.device().is_cpu(), "cfg_combine: tensors must be on the CPU");
  const at::Tensor u = uncond.contiguous();
  const at::Tensor c = cond.contiguous();
  at::Tensor out = at::empty(uncond.sizes(), uncond.options().memory_format(at::MemoryFormat::Contiguous));
  const float g = static_cast<float>(guidance_scale);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, u.scalar_type(), "cfg_combine_cpu", [&] {
    const scalar_t* up = u.data_ptr<scalar_t>();
    const scalar_t* cp = c.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    parallel_flat(out, [&](int64_t begin, int64_t end) { cfg_range(up, cp, g, op, begin, end); });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(genfast, CPU, m) {
  m.impl("scheduler_step", &scheduler_step_cpu);
  m.impl("cfg_combine", &cfg_combine_cpu);
}

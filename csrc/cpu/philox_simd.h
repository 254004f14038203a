// genfast's Philox normals (csrc/philox.h) many at a time on x86 CPUs: eight or sixteen Philox calls side by side
// (AVX2 / AVX-512F), all four words of each used, with SLEEF's log and sincos. Shared by philox_noise
// (csrc/cpu/random.cpp) and the scheduler step that draws its noise inside (csrc/cpu/diffusion.cpp), so both give
// the same numbers for the same stream elements.
#pragma once
#include <algorithm>
#include <cstdint>

#include "../philox.h"
#include "simd.h"

namespace genfast::cpu {

inline void normals_scalar(uint64_t seed, int64_t start, int64_t n, float* out) {
  genfast::philox_normal_range(seed, static_cast<uint64_t>(start), n, out);
}

#ifdef GENFAST_CPU_X86
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
inline void normals_avx2(uint64_t seed, int64_t start, int64_t n, float* out) {
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

inline void normals_avx512(uint64_t seed, int64_t start, int64_t n, float* out) {  // normals_avx2, 64 at a time
  const int64_t head = std::min<int64_t>(n, (4 - (start & 3)) & 3);
  genfast::philox_normal_range(seed, static_cast<uint64_t>(start), head, out);
  int64_t i = head;
  for (; i + 64 <= n; i += 64) normals64_avx512(seed, static_cast<uint64_t>(start + i) >> 2, out + i);
  genfast::philox_normal_range(seed, static_cast<uint64_t>(start + i), n - i, out + i);
}
#pragma GCC diagnostic pop
#pragma GCC pop_options

#endif

inline void fill_normals(uint64_t seed, int64_t start, int64_t n, float* out) {
#ifdef GENFAST_CPU_X86
  switch (simd_isa()) {
    case Isa::kAvx512:
      return normals_avx512(seed, start, n, out);
    case Isa::kAvx2:
      return normals_avx2(seed, start, n, out);
    case Isa::kScalar:
      break;
  }
#endif
  normals_scalar(seed, start, n, out);
}

}  // namespace genfast::cpu

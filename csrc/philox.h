// genfast's counter-based random numbers: Philox4x32-10, shared by the C++ CPU kernels and the
// CUDA kernels (host and device), and mirrored exactly by genfast/kernels/_philox.py (Triton) and
// genfast/_philox.py (NumPy, the spec the tests check every backend against).
//
// Stream layout: Philox is keyed by (seed & 0xffffffff, seed >> 32); the call at counter c uses the
// counter words (c & 0xffffffff, c >> 32, 0, 0) and returns four words (x, y, z, w).
//   uniform element i = unit_open(x) of the call at counter i (one call per uniform);
//   normal element i  = lane (i & 3) of the call at counter (i >> 2) (four normals per call):
//     r1 = sqrt(-2 log u1), t1 = 2 pi u2, r2 = sqrt(-2 log u3), t2 = 2 pi u4  (u1..u4 = unit_open(x..w))
//     lanes = (r1 cos t1, r1 sin t1, r2 cos t2, r2 sin t2), both outputs of two Box-Muller transforms.
// A kernel that owns four consecutive normals starting at a multiple of 4 calls philox_normal4 once.
// Counter-based generation lets every backend draw element i's noise without drawing the others,
// which is why a fused kernel can skip the noise of tokens it has already filtered out.
#pragma once
#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define GENFAST_HD __host__ __device__ __forceinline__
#else
#define GENFAST_HD inline
#endif

namespace genfast {

struct Philox4 {
  uint32_t x, y, z, w;
};

GENFAST_HD uint32_t mulhi32(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

GENFAST_HD Philox4 philox4x32_10(uint64_t seed, uint64_t offset) {
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  uint32_t c0 = static_cast<uint32_t>(offset), c1 = static_cast<uint32_t>(offset >> 32);
  uint32_t c2 = 0, c3 = 0;
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    const uint32_t p0 = c0, p2 = c2;
    c0 = mulhi32(0xCD9E8D57u, p2) ^ c1 ^ k0;
    c2 = mulhi32(0xD2511F53u, p0) ^ c3 ^ k1;
    c1 = 0xCD9E8D57u * p2;
    c3 = 0xD2511F53u * p0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return {c0, c1, c2, c3};
}

// 24 random bits onto the centres of 2^24 equal cells: strictly inside (0, 1), so log(u) and
// log(-log(u)) are always finite.
GENFAST_HD float uint_to_unit_open(uint32_t bits) {
  return (static_cast<float>(bits >> 8) + 0.5f) * (1.0f / 16777216.0f);
}

GENFAST_HD float philox_uniform(uint64_t seed, uint64_t offset) {
  return uint_to_unit_open(philox4x32_10(seed, offset).x);
}

GENFAST_HD void sincos_f32(float angle, float* s, float* c) {
#if defined(__CUDA_ARCH__)
  sincosf(angle, s, c);
#else
  *s = sinf(angle);
  *c = cosf(angle);
#endif
}

// Normal elements 4*counter .. 4*counter+3 of the stream.
GENFAST_HD void philox_normal4(uint64_t seed, uint64_t counter, float out[4]) {
  const Philox4 r = philox4x32_10(seed, counter);
  const float r1 = sqrtf(-2.0f * logf(uint_to_unit_open(r.x)));
  const float r2 = sqrtf(-2.0f * logf(uint_to_unit_open(r.z)));
  float s1, c1, s2, c2;
  sincos_f32(6.28318530717958647692f * uint_to_unit_open(r.y), &s1, &c1);
  sincos_f32(6.28318530717958647692f * uint_to_unit_open(r.w), &s2, &c2);
  out[0] = r1 * c1;
  out[1] = r1 * s1;
  out[2] = r2 * c2;
  out[3] = r2 * s2;
}

// Normal element `offset` alone: one Box-Muller half of the call at counter offset >> 2.
GENFAST_HD float philox_normal(uint64_t seed, uint64_t offset) {
  const Philox4 r = philox4x32_10(seed, offset >> 2);
  const unsigned lane = static_cast<unsigned>(offset & 3);
  const uint32_t radius_bits = lane < 2 ? r.x : r.z;
  const uint32_t angle_bits = lane < 2 ? r.y : r.w;
  const float radius = sqrtf(-2.0f * logf(uint_to_unit_open(radius_bits)));
  const float angle = 6.28318530717958647692f * uint_to_unit_open(angle_bits);
#if defined(__CUDA_ARCH__)
  // Neighbouring threads take different lanes: one sincosf keeps the warp from diverging.
  float s, c;
  sincosf(angle, &s, &c);
  return radius * ((lane & 1) ? s : c);
#else
  return radius * ((lane & 1) ? sinf(angle) : cosf(angle));
#endif
}

// Normal elements start .. start+n-1 into out[0 .. n-1], one Philox call per four of them (the
// partial groups at either end take the lanes they need from a full call).
GENFAST_HD void philox_normal_range(uint64_t seed, uint64_t start, int64_t n, float* out) {
  int64_t i = 0;
  while (i < n) {
    const uint64_t element = start + static_cast<uint64_t>(i);
    const unsigned lane = static_cast<unsigned>(element & 3);
    if (lane == 0 && n - i >= 4) {
      philox_normal4(seed, element >> 2, out + i);
      i += 4;
      continue;
    }
    float four[4];
    philox_normal4(seed, element >> 2, four);
    for (unsigned l = lane; l < 4 && i < n; ++l, ++i) out[i] = four[l];
  }
}

}  // namespace genfast

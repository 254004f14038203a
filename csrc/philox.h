// genfast's counter-based random numbers: Philox4x32-10, shared by the C++ CPU kernels and the
// CUDA kernels (host and device), and mirrored exactly by genfast/kernels/_philox.py (Triton) and
// genfast/_philox.py (NumPy, the spec the tests check every backend against).
//
// Stream layout: element `offset` of a stream seeded with `seed` is Philox with
//   key     = (seed & 0xffffffff, seed >> 32)
//   counter = (offset & 0xffffffff, offset >> 32, 0, 0)
// A uniform uses the first output word; a normal uses the first two (Box-Muller, cosine branch).
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

GENFAST_HD float philox_normal(uint64_t seed, uint64_t offset) {
  const Philox4 r = philox4x32_10(seed, offset);
  const float u1 = uint_to_unit_open(r.x);
  const float u2 = uint_to_unit_open(r.y);
  const float radius = sqrtf(-2.0f * logf(u1));
  return radius * cosf(6.28318530717958647692f * u2);
}

}  // namespace genfast

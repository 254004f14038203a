// The sampling contract of the C++ kernels, shared by the CPU kernel (csrc/cpu/sampling.cpp) and the CUDA kernel
// (csrc/cuda/sampling.cu), host and device code alike:
//   - the value flags each kernel raises per row while it reads the logits (genfast/ops/sampling.py turns
//     them into named-argument errors; the Triton kernel and the reference set the same bits);
//   - the top-p arithmetic, in integers so that every backend (Triton too) resolves near-ties alike.
// Semantics: genfast/ops/sampling.py.
#pragma once
#include <cmath>
#include <cstdint>

#include "../philox.h"  // GENFAST_HD

namespace genfast::sampling {

// Per-row flags (int32 bit mask): SamplingFlag of genfast/kernels/_sampling_flags.py, the Triton kernel's and the
// reference's bits; tests/test_sampling_errors.py reads this header and fails when the two differ.
constexpr int32_t kFlagNaN = 1;             // a logit is NaN
constexpr int32_t kFlagPosInf = 2;          // a logit is +inf
constexpr int32_t kFlagAllNegInf = 4;       // no logit of the row is above -inf
constexpr int32_t kFlagOverflow = 8;        // a finite logit / temperature is +-inf
constexpr int32_t kFlagTemperature = 16;    // temperature NaN, negative or infinite
constexpr int32_t kFlagTopK = 32;           // top_k < 0
constexpr int32_t kFlagTopP = 64;           // top_p NaN or outside (0, 1]
constexpr int32_t kFlagMinP = 128;          // min_p NaN or outside [0, 1]

// The kernels accept fewer than 2^24 tokens per row: top-p weights below sum to < 2^62.
constexpr int64_t kMaxVocab = int64_t{1} << 24;

GENFAST_HD int32_t knob_flags(float temperature, int64_t top_k, float top_p, float min_p) {
  int32_t flags = 0;
  if (!(temperature >= 0.0f) || temperature == INFINITY) flags |= kFlagTemperature;
  if (top_k < 0) flags |= kFlagTopK;
  if (!(top_p > 0.0f && top_p <= 1.0f)) flags |= kFlagTopP;
  if (!(min_p >= 0.0f && min_p <= 1.0f)) flags |= kFlagMinP;
  return flags;
}

// Top-p weight of a token with d = y - y_max (fp32, <= 0): exp(d) in 2^-38 fixed point, truncated. Integers
// add up to the same sum in any order, on every backend; exp runs in fp64, whose last-bit differences
// between libraries almost never cross a 2^-38 step (the fp32 exps of different libraries often would).
// Tokens with d < -27 weigh 0 (exp(-27) * 2^38 < 1).
constexpr double kFixedOne = 274877906944.0;  // 2^38
GENFAST_HD int64_t fixed_weight(float d) {
  return d >= -27.0f ? static_cast<int64_t>(exp(static_cast<double>(d)) * kFixedOne) : 0;
}

// The top-p threshold is the largest v with double(G(v)) >= this target, G(v) the summed fixed_weight of
// the top-k survivors >= v and z = G(t_k) their total. At least 1 so that top_p <= 0 (validate=False) keeps
// the max token(s) rather than every token.
GENFAST_HD double top_p_target(float top_p, int64_t z) {
  const double target = static_cast<double>(top_p) * static_cast<double>(z);
  return target > 1.0 ? target : 1.0;
}

}  // namespace genfast::sampling

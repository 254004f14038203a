// Token sampling, shared by the C++ CPU kernel (csrc/cpu/sampling.cpp) and the CUDA kernel (sampling.cu):
//   - the value flags each kernel raises per row while it reads the logits (genfast/ops/sampling.py turns
//     them into named-argument errors; the Triton kernel and the reference set the same bits);
//   - the top-p arithmetic, in integers so that every backend (Triton too) resolves near-ties alike;
//   - the launcher of the CUDA kernel (torch-free: raw pointers, sizes, a stream).
// Semantics: genfast/ops/sampling.py; the CUDA algorithm: sampling.cu.
#pragma once
#include <cmath>
#include <cstdint>

#include "../philox.h"  // GENFAST_HD

namespace genfast::sampling {

// Per-row flags (int32 bit mask). Keep in step with _FLAG_MESSAGES in genfast/ops/sampling.py.
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

#if defined(__CUDACC__) || defined(GENFAST_WITH_CUDA)
#include <cuda_runtime.h>

#include "float_type.cuh"

namespace genfast::cuda {

// Where sample_tokens' noise comes from (all on the device): the caller's `values` (float32 [batch, vocab], uniform
// in [0, 1)), or Philox: row b draws uniform(seed[b * seed_stride], step_b * vocab + col) with seed_stride 0 (one
// seed for the batch) or 1 (per-row seeds), and step_b = offsets[b] where `offsets` (int64 [batch]) is given, else b.
struct SampleNoise {
  const float* values = nullptr;
  const int64_t* seed = nullptr;
  int64_t seed_stride = 0;
  const int64_t* offsets = nullptr;
};

// Logits [batch, vocab] (row stride `row_stride` elements, columns contiguous, 1 <= vocab < 2^24).
// Per-row knobs: temperature/top_p/min_p float32 [batch], top_k int64 [batch]; `flags` int32 [batch]
// receives each row's value flags. Exactly one of `filtered` (float32 [batch, vocab], filter_logits) and
// `tokens` (int64 [batch], sample_tokens) is non-null. For sampling, exactly one of `noise.values` and
// `noise.seed` is non-null; filter_logits passes SampleNoise{}.
cudaError_t launch_sampling(const void* logits, FloatType dtype, int64_t batch, int64_t vocab, int64_t row_stride,
                            const float* temperature, const int64_t* top_k, const float* top_p, const float* min_p,
                            float* filtered, int64_t* tokens, int32_t* flags, SampleNoise noise, cudaStream_t stream);

}  // namespace genfast::cuda
#endif

// Launcher of the CUDA sampling kernel (torch-free: raw pointers, sizes, a stream). The flags and the top-p
// arithmetic it shares with the CPU kernel: csrc/common/sampling.h. Semantics: genfast/ops/sampling.py; the
// algorithm: sampling.cu.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "../common/sampling.h"
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

// Launchers of the token-sampling kernels (torch-free: raw pointers, sizes, a stream).
// Semantics: genfast/ops/sampling.py; algorithm: csrc/cuda/sampling.cu.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "float_type.cuh"

namespace genfast::cuda {


// One block per row of logits [batch, vocab] (row stride `row_stride` elements, columns contiguous).
// Per-row knobs: temperature/top_p/min_p float32 [batch], top_k int64 [batch].
// Exactly one of `filtered` (float32 [batch, vocab], filter_logits) and `tokens` (int64 [batch],
// sample_tokens) is non-null. For sampling, exactly one of `noise` (float32 [batch, vocab], uniform in
// (0, 1)) and `seed` (one int64 on the device) is non-null.
cudaError_t launch_sampling(const void* logits, FloatType dtype, int64_t batch, int64_t vocab, int64_t row_stride,
                            const float* temperature, const int64_t* top_k, const float* top_p, const float* min_p,
                            float* filtered, int64_t* tokens, const float* noise, const int64_t* seed,
                            cudaStream_t stream);

}  // namespace genfast::cuda

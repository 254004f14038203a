// Launchers of the attention decode kernels (torch-free: raw pointers, sizes, a stream).
// Semantics: genfast/ops/attention_decode.py; algorithm: csrc/cuda/attention.cu, which mirrors the Triton
// kernels of genfast/kernels/attention_decode.py (split-K over the cache, then a combine pass by lse).
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "float_type.cuh"

namespace genfast::cuda {

constexpr int64_t kDecodeMaxHeadDim = 256;
constexpr int64_t kDecodeRowsPerBlock = 8;  // query rows (GQA heads x new tokens) per program

struct DecodeShape {
  int64_t batch, q_heads, kv_heads, new_tokens, cache_len, head_dim;  // B, Hq, Hk, Nq, Nmax, D
  int64_t q_stride[4], k_stride[4], v_stride[4];                        // elements, [B, H, N, D] order
};

// A paged cache (csrc/genfast.cpp, attention_decode): k and v are [num_blocks, Hk, 1 << page_shift, D] (their
// strides in DecodeShape, dim 0 stepping over blocks) and sequence b's logical slot j is slot j & (page - 1) of
// block table[b * row_stride + (j >> page_shift) * col_stride], clamped into [0, num_blocks); DecodeShape's
// cache_len is then the logical capacity (max_blocks_per_seq << page_shift). table == nullptr: a dense cache.
struct DecodePaging {
  const int32_t* table = nullptr;
  int64_t row_stride = 0, col_stride = 0, num_blocks = 0;
  int page_shift = 0;
};

// Splits per (batch, kv head) for this shape on `device`: ~2 waves of programs, each split >= 256 keys.
// Needs no host synchronisation (reads a device attribute only).
int64_t decode_num_splits(const DecodeShape& shape, int device);

// Splits per (batch, kv head) for batch invariance: a function of the cache capacity Nmax alone (one split per
// 256 keys, at most 128), never of B or of the device, so a row's merge order, hence its output bit for bit, does
// not depend on the rest of the batch. No host synchronisation either (CUDA graphs keep working).
int64_t decode_num_splits_invariant(const DecodeShape& shape);

// Floats of workspace the launcher needs: partial outputs then partial lse, both float32.
int64_t decode_workspace_floats(const DecodeShape& shape, int64_t num_splits);

// out [B, Hq, Nq, D] contiguous in `dtype`, lse [B, Hq, Nq] float32 (natural log, -inf for a row with no key).
// q, k, v in `dtype` with the given strides; seqlens [B] int32 or int64 (clamped to [0, Nmax] on the device).
// window_left/right: the resolved bounds (csrc/genfast.cpp, attention_decode): new token i at position p sees
// keys p - window_left <= j <= p + window_right; both >= 0 (cudaErrorInvalidValue otherwise).
cudaError_t launch_attention_decode(const void* q, const void* k, const void* v, FloatType dtype,
                                    const void* seqlens, bool seqlens_int64, const DecodeShape& shape, float scale,
                                    int64_t window_left, int64_t window_right, int64_t num_splits,
                                    float* workspace, void* out, float* lse, cudaStream_t stream,
                                    const DecodePaging& paging = DecodePaging{});

}  // namespace genfast::cuda

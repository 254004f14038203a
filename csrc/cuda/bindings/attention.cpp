// TORCH_LIBRARY_IMPL(genfast, CUDA) of the attention family: attention_decode.
// Checks each call's tensors, then calls the torch-free launchers of csrc/cuda/attention.cuh on the current stream.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "../attention.cuh"
#include "common.h"

namespace {

using genfast::cuda_bindings::current_stream;
using genfast::cuda_bindings::float_type;

std::tuple<at::Tensor, at::Tensor> attention_decode_cuda(const at::Tensor& q, const at::Tensor& k_cache,
                                                         const at::Tensor& v_cache, const at::Tensor& cache_seqlens,
                                                         bool causal, double scale, int64_t window_left,
                                                         int64_t window_right, int64_t num_splits,
                                                         const std::optional<at::Tensor>& block_table) {
  constexpr const char* op = "attention_decode";
  const genfast::cuda::FloatType dtype = float_type(q, op, "q");
  GENFAST_CHECK_CUDA(q, "attention_decode");
  TORCH_CHECK(q.dim() == 4 && k_cache.dim() == 4, op, ": q and k_cache must be 4-D, got ", q.sizes(), " and ",
              k_cache.sizes());
  TORCH_CHECK(k_cache.sizes() == v_cache.sizes(), op, ": v_cache has shape ", v_cache.sizes(), " but k_cache has ",
              k_cache.sizes());
  TORCH_CHECK(k_cache.scalar_type() == q.scalar_type() && v_cache.scalar_type() == q.scalar_type(), op,
              ": k_cache and v_cache must have q's dtype ", q.scalar_type());
  TORCH_CHECK(k_cache.device() == q.device() && v_cache.device() == q.device() &&
                  cache_seqlens.device() == q.device(),
              op, ": k_cache, v_cache and cache_seqlens must be on q's device");
  const int64_t b = q.size(0), hq = q.size(1), nq = q.size(2), d = q.size(3);
  const int64_t hk = k_cache.size(1);
  // Paged (csrc/genfast.cpp): the caches are a pool of blocks, Nmax the table's logical capacity.
  genfast::cuda::DecodePaging paging;
  int64_t nmax = k_cache.size(2);
  if (block_table.has_value()) {
    const at::Tensor& t = *block_table;
    const int64_t page = k_cache.size(2);
    TORCH_CHECK(t.dim() == 2 && t.size(0) == b && t.size(1) >= 1 && t.scalar_type() == at::kInt, op,
                ": block_table must be int32 [B, max_blocks_per_seq] with B=", b, ", got ", t.sizes());
    TORCH_CHECK(t.device() == q.device(), op, ": block_table must be on q's device");
    TORCH_CHECK(page >= 16 && page <= 256 && (page & (page - 1)) == 0, op,
                ": a paged cache's block size (k_cache dim 2) must be a power of two from 16 to 256, got ", page);
    TORCH_CHECK(k_cache.size(0) >= 1, op, ": a paged cache must hold at least one block");
    paging.table = t.data_ptr<int32_t>();
    paging.row_stride = t.stride(0);
    paging.col_stride = t.stride(1);
    paging.num_blocks = k_cache.size(0);
    while ((int64_t{1} << paging.page_shift) < page) ++paging.page_shift;
    nmax = t.size(1) * page;
  } else {
    TORCH_CHECK(k_cache.size(0) == b, op, ": k_cache has batch ", k_cache.size(0), " but q has batch ", b);
  }
  TORCH_CHECK(k_cache.size(3) == d, op, ": q and k_cache head dims differ: ", d, " vs ", k_cache.size(3));
  TORCH_CHECK(d >= 1 && d <= genfast::cuda::kDecodeMaxHeadDim, op, ": head dim must be in [1, ",
              genfast::cuda::kDecodeMaxHeadDim, "], got ", d);
  TORCH_CHECK(hk >= 1 && hq % hk == 0, op, ": the query heads Hq=", hq, " must be a multiple of the cache's Hk=", hk);
  TORCH_CHECK(nq >= 1 && nmax >= 1, op, ": need Nq >= 1 new tokens and a cache of Nmax >= 1 slots");
  TORCH_CHECK(cache_seqlens.dim() == 1 && cache_seqlens.size(0) == b &&
                  (cache_seqlens.scalar_type() == at::kInt || cache_seqlens.scalar_type() == at::kLong),
              op, ": cache_seqlens must be a 1-D int32/int64 tensor of ", b, " lengths");
  // -1 asks for batch invariance (a split count from Nmax alone), 0 for the occupancy choice, > 0 for that count.
  TORCH_CHECK(num_splits >= -1 && num_splits <= 65535, op, ": num_splits must be in [-1, 65535], got ", num_splits);
  TORCH_CHECK(window_left >= 0 && window_right >= 0 && (!causal || window_right == 0), op,
              ": window bounds must come resolved (>= 0, right = 0 when causal; "
              "genfast/ops/_attention_common.py window_bounds), got (", window_left, ", ", window_right, ")");
  const c10::cuda::CUDAGuard guard(q.device());
  const at::Tensor lengths = cache_seqlens.contiguous();
  at::Tensor out = at::empty({b, hq, nq, d}, q.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor lse = at::empty({b, hq, nq}, q.options().dtype(at::kFloat));
  if (out.numel() == 0) return {out, lse};
  genfast::cuda::DecodeShape shape{b, hq, hk, nq, nmax, d, {}, {}, {}};
  for (int i = 0; i < 4; ++i) {
    shape.q_stride[i] = q.stride(i);
    shape.k_stride[i] = k_cache.stride(i);
    shape.v_stride[i] = v_cache.stride(i);
  }
  const int64_t splits = num_splits > 0   ? num_splits
                         : num_splits < 0 ? genfast::cuda::decode_num_splits_invariant(shape)
                                          : genfast::cuda::decode_num_splits(shape, q.get_device());
  at::Tensor workspace = at::empty({genfast::cuda::decode_workspace_floats(shape, splits)}, lse.options());
  GENFAST_CHECK_LAUNCH(genfast::cuda::launch_attention_decode(
                           q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), dtype, lengths.data_ptr(),
                           lengths.scalar_type() == at::kLong, shape, static_cast<float>(scale), window_left,
                           window_right, splits, workspace.data_ptr<float>(), out.data_ptr(), lse.data_ptr<float>(),
                           current_stream(), paging),
                       "attention_decode");
  return {out, lse};
}

}  // namespace

TORCH_LIBRARY_IMPL(genfast, CUDA, m) {
  m.impl("attention_decode", &attention_decode_cuda);
}

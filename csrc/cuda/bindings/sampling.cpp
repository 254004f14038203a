// TORCH_LIBRARY_IMPL(genfast, CUDA) of the sampling family: filter_logits and sample_tokens.
// Checks each call's tensors, then calls the torch-free launchers of csrc/cuda/sampling.cuh on the current stream.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <limits>
#include <optional>
#include <tuple>

#include "../../op_checks.h"
#include "../sampling.cuh"
#include "common.h"

namespace {

using genfast::cuda_bindings::current_stream;
using genfast::cuda_bindings::float_type;

// The shared checks, plus what the CUDA kernel needs on top: a CUDA tensor, contiguous rows, and between 1 and
// 2^24 - 1 tokens (its fixed-point top-p sums rely on the bound, csrc/common/sampling.h).
void check_sampling_args_cuda(const char* op, const at::Tensor& logits, const at::Tensor& temperature,
                              const at::Tensor& top_k, const at::Tensor& top_p, const at::Tensor& min_p) {
  genfast::check_sampling_args(op, logits, temperature, top_k, top_p, min_p);
  TORCH_CHECK(logits.is_cuda(), op, ": logits must be a CUDA tensor");
  TORCH_CHECK(logits.stride(1) == 1, op, ": logits rows must be contiguous");
  TORCH_CHECK(logits.size(1) >= 1 && logits.size(1) < genfast::sampling::kMaxVocab, op,
              ": logits must have between 1 and 2^24 - 1 columns (tokens), got ", logits.size(1));
  TORCH_CHECK(logits.size(0) <= std::numeric_limits<int32_t>::max(), op, ": logits has too many rows (",
              logits.size(0), " > 2^31 - 1)");
  for (const at::Tensor* knob : {&temperature, &top_k, &top_p, &min_p}) {
    TORCH_CHECK(knob->is_contiguous(), op, ": the per-row knobs must be contiguous");
  }
}

std::tuple<at::Tensor, at::Tensor> filter_logits_cuda(const at::Tensor& logits, const at::Tensor& temperature,
                                                      const at::Tensor& top_k, const at::Tensor& top_p,
                                                      const at::Tensor& min_p) {
  check_sampling_args_cuda("filter_logits", logits, temperature, top_k, top_p, min_p);
  const c10::cuda::CUDAGuard guard(logits.device());
  at::Tensor out = at::empty(logits.sizes(), logits.options().dtype(at::kFloat));
  at::Tensor flags = at::empty({logits.size(0)}, logits.options().dtype(at::kInt));
  GENFAST_CHECK_LAUNCH(
      genfast::cuda::launch_sampling(logits.data_ptr(), float_type(logits, "filter_logits", "logits"), logits.size(0),
                                     logits.size(1), logits.stride(0), temperature.data_ptr<float>(),
                                     top_k.data_ptr<int64_t>(), top_p.data_ptr<float>(), min_p.data_ptr<float>(),
                                     out.data_ptr<float>(), nullptr, flags.data_ptr<int32_t>(),
                                     genfast::cuda::SampleNoise{}, current_stream()),
      "filter_logits");
  return {out, flags};
}

std::tuple<at::Tensor, at::Tensor> sample_tokens_cuda(const at::Tensor& logits, const at::Tensor& temperature,
                                                      const at::Tensor& top_k, const at::Tensor& top_p,
                                                      const at::Tensor& min_p, const std::optional<at::Tensor>& noise,
                                                      const std::optional<at::Tensor>& seed,
                                                      const std::optional<at::Tensor>& offsets) {
  check_sampling_args_cuda("sample_tokens", logits, temperature, top_k, top_p, min_p);
  genfast::check_sampling_noise_or_seeds("sample_tokens", logits, noise, seed, offsets);
  const at::Tensor noise_c = noise.has_value() ? noise->contiguous() : at::Tensor();
  const at::Tensor seed_c = seed.has_value() ? seed->contiguous() : at::Tensor();
  const at::Tensor offsets_c = offsets.has_value() ? offsets->contiguous() : at::Tensor();
  genfast::cuda::SampleNoise source;
  source.values = noise_c.defined() ? noise_c.data_ptr<float>() : nullptr;
  source.seed = seed_c.defined() ? seed_c.data_ptr<int64_t>() : nullptr;
  source.seed_stride = seed_c.defined() && seed_c.numel() > 1 ? 1 : 0;
  source.offsets = offsets_c.defined() ? offsets_c.data_ptr<int64_t>() : nullptr;
  const c10::cuda::CUDAGuard guard(logits.device());
  at::Tensor out = at::empty({logits.size(0)}, logits.options().dtype(at::kLong));
  at::Tensor flags = at::empty({logits.size(0)}, logits.options().dtype(at::kInt));
  GENFAST_CHECK_LAUNCH(
      genfast::cuda::launch_sampling(logits.data_ptr(), float_type(logits, "sample_tokens", "logits"), logits.size(0),
                                     logits.size(1), logits.stride(0), temperature.data_ptr<float>(),
                                     top_k.data_ptr<int64_t>(), top_p.data_ptr<float>(), min_p.data_ptr<float>(),
                                     nullptr, out.data_ptr<int64_t>(), flags.data_ptr<int32_t>(), source,
                                     current_stream()),
      "sample_tokens");
  return {out, flags};
}

}  // namespace

TORCH_LIBRARY_IMPL(genfast, CUDA, m) {
  m.impl("filter_logits", &filter_logits_cuda);
  m.impl("sample_tokens", &sample_tokens_cuda);
}

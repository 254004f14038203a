// TORCH_LIBRARY_IMPL(genfast, CUDA): checks each call's tensors, then calls the torch-free launchers
// declared in csrc/cuda/*.cuh on the current stream. Built only when torch has CUDA (setup.py).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "random.cuh"
#include "sampling.cuh"

namespace {

#define GENFAST_CHECK_CUDA(x, op) TORCH_CHECK((x).is_cuda(), op ": " #x " must be a CUDA tensor")
#define GENFAST_CHECK_LAUNCH(err, op) \
  TORCH_CHECK((err) == cudaSuccess, op ": kernel launch failed: ", cudaGetErrorString(err))

cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

// ---------------------------------------------------------------------------------------- random
at::Tensor philox_noise_cuda(const at::Tensor& seed, int64_t numel, int64_t offset, bool normal) {
  GENFAST_CHECK_CUDA(seed, "philox_noise");
  TORCH_CHECK(seed.numel() == 1 && seed.scalar_type() == at::kLong, "philox_noise: seed must be one int64 value");
  TORCH_CHECK(numel >= 0 && offset >= 0, "philox_noise: numel and offset must be non-negative");
  const c10::cuda::CUDAGuard guard(seed.device());
  at::Tensor out = at::empty({numel}, seed.options().dtype(at::kFloat));
  GENFAST_CHECK_LAUNCH(genfast::cuda::launch_philox_noise(seed.data_ptr<int64_t>(), out.data_ptr<float>(), numel,
                                                          offset, normal, current_stream()),
                       "philox_noise");
  return out;
}

// ---------------------------------------------------------------------------------------- sampling
void check_sampling_args(const char* op, const at::Tensor& logits, const at::Tensor& temperature,
                         const at::Tensor& top_k, const at::Tensor& top_p, const at::Tensor& min_p) {
  TORCH_CHECK(logits.is_cuda() && logits.dim() == 2, op, ": logits must be a 2-D CUDA tensor, got ", logits.sizes());
  TORCH_CHECK(logits.stride(1) == 1, op, ": logits rows must be contiguous");
  TORCH_CHECK(logits.size(1) < (int64_t{1} << 24), op, ": vocabularies of 2^24 or more tokens are not supported");
  const at::Tensor* knobs[] = {&temperature, &top_k, &top_p, &min_p};
  const char* names[] = {"temperature", "top_k", "top_p", "min_p"};
  for (int i = 0; i < 4; ++i) {
    const at::ScalarType want = i == 1 ? at::kLong : at::kFloat;
    TORCH_CHECK(knobs[i]->dim() == 1 && knobs[i]->size(0) == logits.size(0) && knobs[i]->scalar_type() == want &&
                    knobs[i]->device() == logits.device() && knobs[i]->is_contiguous(),
                op, ": ", names[i], " must be a contiguous 1-D ", at::toString(want), " tensor of ", logits.size(0),
                " values on the logits' device");
  }
}

genfast::cuda::LogitsDtype logits_dtype(const char* op, const at::Tensor& logits) {
  switch (logits.scalar_type()) {
    case at::kFloat: return genfast::cuda::LogitsDtype::kFloat32;
    case at::kHalf: return genfast::cuda::LogitsDtype::kFloat16;
    case at::kBFloat16: return genfast::cuda::LogitsDtype::kBFloat16;
    default: TORCH_CHECK(false, op, ": logits must be float32, float16 or bfloat16, got ", logits.scalar_type());
  }
}

at::Tensor filter_logits_cuda(const at::Tensor& logits, const at::Tensor& temperature, const at::Tensor& top_k,
                              const at::Tensor& top_p, const at::Tensor& min_p) {
  check_sampling_args("filter_logits", logits, temperature, top_k, top_p, min_p);
  const c10::cuda::CUDAGuard guard(logits.device());
  at::Tensor out = at::empty(logits.sizes(), logits.options().dtype(at::kFloat));
  GENFAST_CHECK_LAUNCH(
      genfast::cuda::launch_sampling(logits.data_ptr(), logits_dtype("filter_logits", logits), logits.size(0),
                                     logits.size(1), logits.stride(0), temperature.data_ptr<float>(),
                                     top_k.data_ptr<int64_t>(), top_p.data_ptr<float>(), min_p.data_ptr<float>(),
                                     out.data_ptr<float>(), nullptr, nullptr, nullptr, current_stream()),
      "filter_logits");
  return out;
}

at::Tensor sample_tokens_cuda(const at::Tensor& logits, const at::Tensor& temperature, const at::Tensor& top_k,
                              const at::Tensor& top_p, const at::Tensor& min_p, const std::optional<at::Tensor>& noise,
                              const std::optional<at::Tensor>& seed) {
  check_sampling_args("sample_tokens", logits, temperature, top_k, top_p, min_p);
  TORCH_CHECK(noise.has_value() != seed.has_value(), "sample_tokens: pass exactly one of noise and seed");
  at::Tensor noise_c;
  if (noise.has_value()) {
    TORCH_CHECK(noise->sizes() == logits.sizes() && noise->scalar_type() == at::kFloat &&
                    noise->device() == logits.device(),
                "sample_tokens: noise must be float32 with the logits' shape and device");
    noise_c = noise->contiguous();
  } else {
    TORCH_CHECK(seed->numel() == 1 && seed->scalar_type() == at::kLong && seed->device() == logits.device(),
                "sample_tokens: seed must be one int64 value on the logits' device");
  }
  const c10::cuda::CUDAGuard guard(logits.device());
  at::Tensor out = at::empty({logits.size(0)}, logits.options().dtype(at::kLong));
  GENFAST_CHECK_LAUNCH(
      genfast::cuda::launch_sampling(logits.data_ptr(), logits_dtype("sample_tokens", logits), logits.size(0),
                                     logits.size(1), logits.stride(0), temperature.data_ptr<float>(),
                                     top_k.data_ptr<int64_t>(), top_p.data_ptr<float>(), min_p.data_ptr<float>(),
                                     nullptr, out.data_ptr<int64_t>(),
                                     noise_c.defined() ? noise_c.data_ptr<float>() : nullptr,
                                     seed.has_value() ? seed->data_ptr<int64_t>() : nullptr, current_stream()),
      "sample_tokens");
  return out;
}

// ---------------------------------------------------------------------------------------- diffusion
// (diffusion bindings go here)

// ---------------------------------------------------------------------------------------- latent
// (latent bindings go here)

}  // namespace

TORCH_LIBRARY_IMPL(genfast, CUDA, m) {
  m.impl("philox_noise", &philox_noise_cuda);

  // sampling ops (registered below this line)
  m.impl("filter_logits", &filter_logits_cuda);
  m.impl("sample_tokens", &sample_tokens_cuda);

  // diffusion ops (registered below this line)

  // latent ops (registered below this line)
}

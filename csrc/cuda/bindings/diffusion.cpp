// TORCH_LIBRARY_IMPL(genfast, CUDA) of the diffusion family: scheduler_step and cfg_combine.
// Checks each call's tensors, then calls the torch-free launchers of csrc/cuda/diffusion.cuh on the current stream.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <optional>

#include "../diffusion.cuh"
#include "common.h"

namespace {

using genfast::cuda_bindings::current_stream;
using genfast::cuda_bindings::float_type;

at::Tensor scheduler_step_cuda(const at::Tensor& sample, const at::Tensor& model_output,
                               const std::optional<at::Tensor>& model_output_uncond, double guidance_scale,
                               const at::Tensor& coefs, const std::optional<at::Tensor>& noise,
                               const std::optional<at::Tensor>& seed) {
  const genfast::cuda::FloatType dtype = float_type(sample, "scheduler_step", "sample");
  GENFAST_CHECK_CUDA(sample, "scheduler_step");
  TORCH_CHECK(model_output.sizes() == sample.sizes() && model_output.scalar_type() == sample.scalar_type(),
              "scheduler_step: model_output must have sample's shape and dtype");
  TORCH_CHECK(model_output.device() == sample.device(), "scheduler_step: model_output is not on sample's device");
  if (model_output_uncond.has_value()) {
    TORCH_CHECK(model_output_uncond->sizes() == sample.sizes() &&
                    model_output_uncond->scalar_type() == sample.scalar_type(),
                "scheduler_step: model_output_uncond must have sample's shape and dtype");
    TORCH_CHECK(model_output_uncond->device() == sample.device(),
                "scheduler_step: model_output_uncond is not on sample's device");
  }
  TORCH_CHECK(coefs.scalar_type() == at::kFloat && coefs.numel() == 11 && coefs.device() == sample.device(),
              "scheduler_step: coefs must be 11 float32 values on sample's device");
  TORCH_CHECK(!(noise.has_value() && seed.has_value()), "scheduler_step: pass noise or seed, not both");
  if (noise.has_value()) {
    TORCH_CHECK(noise->numel() == sample.numel() && noise->device() == sample.device(),
                "scheduler_step: noise must have sample's number of elements and device");
  }
  if (seed.has_value()) {
    TORCH_CHECK(seed->numel() == 1 && seed->scalar_type() == at::kLong && seed->device() == sample.device(),
                "scheduler_step: seed must be one int64 on sample's device");
  }
  const c10::cuda::CUDAGuard guard(sample.device());
  const at::Tensor x = sample.contiguous();
  const at::Tensor m = model_output.contiguous();
  const at::Tensor u = model_output_uncond.has_value() ? model_output_uncond->contiguous() : at::Tensor();
  const at::Tensor c = coefs.contiguous();
  const at::Tensor nz = noise.has_value() ? noise->to(at::kFloat).contiguous() : at::Tensor();
  at::Tensor out = at::empty(sample.sizes(), sample.options().memory_format(at::MemoryFormat::Contiguous));
  GENFAST_CHECK_LAUNCH(
      genfast::cuda::launch_scheduler_step(dtype, x.data_ptr(), m.data_ptr(), u.defined() ? u.data_ptr() : nullptr,
                                           static_cast<float>(guidance_scale), c.data_ptr<float>(),
                                           nz.defined() ? nz.data_ptr<float>() : nullptr,
                                           seed.has_value() ? seed->data_ptr<int64_t>() : nullptr, out.data_ptr(),
                                           x.numel(), current_stream()),
      "scheduler_step");
  return out;
}

at::Tensor cfg_combine_cuda(const at::Tensor& uncond, const at::Tensor& cond, double guidance_scale) {
  const genfast::cuda::FloatType dtype = float_type(uncond, "cfg_combine", "uncond");
  GENFAST_CHECK_CUDA(uncond, "cfg_combine");
  TORCH_CHECK(cond.sizes() == uncond.sizes() && cond.scalar_type() == uncond.scalar_type() &&
                  cond.device() == uncond.device(),
              "cfg_combine: cond must have uncond's shape, dtype and device");
  const c10::cuda::CUDAGuard guard(uncond.device());
  const at::Tensor u = uncond.contiguous();
  const at::Tensor c = cond.contiguous();
  at::Tensor out = at::empty(uncond.sizes(), uncond.options().memory_format(at::MemoryFormat::Contiguous));
  GENFAST_CHECK_LAUNCH(genfast::cuda::launch_cfg_combine(dtype, u.data_ptr(), c.data_ptr(),
                                                         static_cast<float>(guidance_scale), out.data_ptr(),
                                                         u.numel(), current_stream()),
                       "cfg_combine");
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(genfast, CUDA, m) {
  m.impl("scheduler_step", &scheduler_step_cuda);
  m.impl("cfg_combine", &cfg_combine_cuda);
}

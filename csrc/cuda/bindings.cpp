// TORCH_LIBRARY_IMPL(genfast, CUDA): checks each call's tensors, then calls the torch-free launchers
// declared in csrc/cuda/*.cuh on the current stream. Built only when torch has CUDA (setup.py).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "random.cuh"

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
// (sampling bindings go here)

// ---------------------------------------------------------------------------------------- diffusion
// (diffusion bindings go here)

// ---------------------------------------------------------------------------------------- latent
// (latent bindings go here)

}  // namespace

TORCH_LIBRARY_IMPL(genfast, CUDA, m) {
  m.impl("philox_noise", &philox_noise_cuda);

  // sampling ops (registered below this line)

  // diffusion ops (registered below this line)

  // latent ops (registered below this line)
}

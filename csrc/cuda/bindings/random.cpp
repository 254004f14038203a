// TORCH_LIBRARY_IMPL(genfast, CUDA) of the random family: philox_noise (uniforms or normals of the Philox stream).
// Checks each call's tensors, then calls the torch-free launchers of csrc/cuda/random.cuh on the current stream.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../random.cuh"
#include "common.h"

namespace {

using genfast::cuda_bindings::current_stream;

at::Tensor philox_noise_cuda(const at::Tensor& seed, int64_t numel, int64_t offset, bool normal) {
  GENFAST_CHECK_CUDA(seed, "philox_noise");
  TORCH_CHECK(seed.numel() == 1 && seed.scalar_type() == at::kLong, "philox_noise: seed must be one int64 value");
  TORCH_CHECK(numel >= 0 && offset >= 0, "philox_noise: numel and offset must be non-negative");
  // Element indices are int64: past the end of the stream offset + i would wrap to the first elements.
  TORCH_CHECK(offset <= INT64_MAX - numel, "philox_noise: offset + numel must be <= 2**63 - 1, got offset=", offset,
              " and numel=", numel);
  const c10::cuda::CUDAGuard guard(seed.device());
  at::Tensor out = at::empty({numel}, seed.options().dtype(at::kFloat));
  GENFAST_CHECK_LAUNCH(genfast::cuda::launch_philox_noise(seed.data_ptr<int64_t>(), out.data_ptr<float>(), numel,
                                                          offset, normal, current_stream()),
                       "philox_noise");
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(genfast, CUDA, m) {
  m.impl("philox_noise", &philox_noise_cuda);
}

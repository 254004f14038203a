// What the CUDA binding files (csrc/cuda/bindings/<family>.cpp, one TORCH_LIBRARY_IMPL(genfast, CUDA) each) share:
// the device and launch checks, the current stream, and the kernels' storage type of a tensor. Built only when
// torch has CUDA (setup.py).
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>
#include <cuda_runtime.h>

#include "../float_type.cuh"

#define GENFAST_CHECK_CUDA(x, op) TORCH_CHECK((x).is_cuda(), op ": " #x " must be a CUDA tensor")
#define GENFAST_CHECK_LAUNCH(err, op) \
  TORCH_CHECK((err) == cudaSuccess, op ": kernel launch failed: ", cudaGetErrorString(err))

namespace genfast::cuda_bindings {

inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

// The kernels' storage type of a tensor; anything else is refused, naming the op and the argument.
inline genfast::cuda::FloatType float_type(const at::Tensor& t, const char* op, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return genfast::cuda::FloatType::kFloat32;
    case at::kHalf:
      return genfast::cuda::FloatType::kFloat16;
    case at::kBFloat16:
      return genfast::cuda::FloatType::kBFloat16;
    default:
      TORCH_CHECK(false, op, ": ", name, " must be float32, float16 or bfloat16, got ", t.scalar_type());
  }
}

}  // namespace genfast::cuda_bindings

// Launchers of the random-number kernels (torch-free: raw pointers, sizes, a stream).
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

namespace genfast::cuda {

// out[i] = element (offset + i) of the Philox stream seeded with *seed (a device pointer).
cudaError_t launch_philox_noise(const int64_t* seed, float* out, int64_t numel, int64_t offset, bool normal,
                                cudaStream_t stream);

}  // namespace genfast::cuda

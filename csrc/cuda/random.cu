// CUDA kernel of genfast::philox_noise: the shared Philox stream (csrc/philox.h) as a tensor.
#include "../philox.h"
#include "random.cuh"

namespace genfast::cuda {
namespace {

__global__ void philox_noise_kernel(const int64_t* __restrict__ seed_ptr, float* __restrict__ out, int64_t numel,
                                    int64_t offset, bool normal) {
  const uint64_t seed = static_cast<uint64_t>(*seed_ptr);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < numel; i += stride) {
    const uint64_t counter = static_cast<uint64_t>(offset + i);
    out[i] = normal ? philox_normal(seed, counter) : philox_uniform(seed, counter);
  }
}

}  // namespace

cudaError_t launch_philox_noise(const int64_t* seed, float* out, int64_t numel, int64_t offset, bool normal,
                                cudaStream_t stream) {
  if (numel == 0) return cudaSuccess;
  const int threads = 256;
  const int64_t wanted = (numel + threads - 1) / threads;
  const int blocks = static_cast<int>(wanted < 65535 ? wanted : 65535);
  philox_noise_kernel<<<blocks, threads, 0, stream>>>(seed, out, numel, offset, normal);
  return cudaGetLastError();
}

}  // namespace genfast::cuda

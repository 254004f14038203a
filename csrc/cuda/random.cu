// CUDA kernel of genfast::philox_noise: the shared Philox stream (csrc/philox.h) as a tensor.
#include "../philox.h"
#include "random.cuh"

namespace genfast::cuda {
namespace {

__global__ void philox_noise_kernel(const int64_t* __restrict__ seed_ptr, float* __restrict__ out, int64_t numel,
                                    int64_t offset, bool normal) {
  const uint64_t seed = static_cast<uint64_t>(*seed_ptr);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (!normal) {
    for (int64_t i = first; i < numel; i += stride) out[i] = philox_uniform(seed, static_cast<uint64_t>(offset + i));
    return;
  }
  // Normals: one thread per Philox call (four consecutive elements of the stream), keeping the lanes
  // that fall inside [offset, offset + numel).
  const int64_t first_call = offset >> 2;
  const int64_t calls = ((offset + numel - 1) >> 2) - first_call + 1;
  for (int64_t c = first; c < calls; c += stride) {
    const int64_t call = first_call + c;
    float four[4];
    philox_normal4(seed, static_cast<uint64_t>(call), four);
#pragma unroll
    for (int lane = 0; lane < 4; ++lane) {
      const int64_t i = 4 * call + lane - offset;
      if (i >= 0 && i < numel) out[i] = four[lane];
    }
  }
}

}  // namespace

cudaError_t launch_philox_noise(const int64_t* seed, float* out, int64_t numel, int64_t offset, bool normal,
                                cudaStream_t stream) {
  if (numel == 0) return cudaSuccess;
  const int threads = 256;
  const int64_t work = normal ? ((offset + numel - 1) >> 2) - (offset >> 2) + 1 : numel;  // threads' items
  const int64_t wanted = (work + threads - 1) / threads;
  const int blocks = static_cast<int>(wanted < 65535 ? wanted : 65535);
  philox_noise_kernel<<<blocks, threads, 0, stream>>>(seed, out, numel, offset, normal);
  return cudaGetLastError();
}

}  // namespace genfast::cuda

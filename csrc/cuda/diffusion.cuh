// Launchers of the diffusion kernels (torch-free: raw pointers, sizes, a stream). The formulas and
// the coefficient layout are those of genfast/ops/diffusion.py.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "float_type.cuh"

namespace genfast::cuda {


// out = one scheduler step over `numel` contiguous elements of `dtype`. `uncond` may be null (no
// guidance). Noise: `noise` (float32, contiguous) if not null, else drawn from the Philox stream
// seeded with *seed (a device pointer) if not null, else none. `coefs`: 11 float32 on the device.
cudaError_t launch_scheduler_step(FloatType dtype, const void* sample, const void* model_output, const void* uncond,
                                  float guidance_scale, const float* coefs, const float* noise, const int64_t* seed,
                                  void* out, int64_t numel, cudaStream_t stream);

// out = uncond + guidance_scale * (cond - uncond), computed in float32.
cudaError_t launch_cfg_combine(FloatType dtype, const void* uncond, const void* cond, float guidance_scale, void* out,
                               int64_t numel, cudaStream_t stream);

}  // namespace genfast::cuda

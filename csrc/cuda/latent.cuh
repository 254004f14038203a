// Launchers of the latent-variable kernels (torch-free: raw pointers, sizes, a stream).
//
// Tensors are contiguous; `mu`, `logvar`, `x`, `grad` and outputs hold `dtype` elements, `noise` and the
// gaussian_kl outputs and incoming gradient are float32. Exactly one of `noise` and `seed` is non-null:
// `seed` is a device pointer to the Philox seed, and element i of eps is philox_normal(*seed, i).
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "float_type.cuh"

namespace genfast::cuda::latent {


// out = mu + exp(0.5 * logvar) * eps.
cudaError_t launch_reparameterize(FloatType dtype, const void* mu, const void* logvar, const float* noise,
                                  const int64_t* seed, void* out, int64_t numel, cudaStream_t stream);

// dlogvar = grad * 0.5 * exp(0.5 * logvar) * eps (eps regenerated from the seed, or read from noise).
cudaError_t launch_reparameterize_backward(FloatType dtype, const void* grad, const void* logvar, const float* noise,
                                           const int64_t* seed, void* dlogvar, int64_t numel, cudaStream_t stream);

// How gaussian_kl splits each of `rows` rows of `cols` elements over blocks (the same plan as the Triton
// launcher): `splits` blocks per row, each summing `chunk` consecutive elements. When splits > 1 the
// launcher needs a float32 workspace of rows * splits elements.
struct KlPlan {
  int64_t splits;
  int64_t chunk;
};
KlPlan gaussian_kl_plan(int64_t rows, int64_t cols);

// out[r] = -0.5 * sum_c (1 + logvar - mu^2 - exp(logvar)) over row r of a [rows, cols] pair, in float32.
// `workspace` may be null when gaussian_kl_plan(rows, cols).splits == 1.
cudaError_t launch_gaussian_kl(FloatType dtype, const void* mu, const void* logvar, float* out, float* workspace,
                               int64_t rows, int64_t cols, cudaStream_t stream);

// dmu = grad[r] * mu, dlogvar = grad[r] * 0.5 * (exp(logvar) - 1), for every element of row r.
cudaError_t launch_gaussian_kl_backward(FloatType dtype, const float* grad, const void* mu, const void* logvar, void* dmu,
                                        void* dlogvar, int64_t rows, int64_t cols, cudaStream_t stream);

// out = x - step_size * grad + noise_scale * eps, then clamped to [clamp_min, clamp_max] (NaN passes through).
cudaError_t launch_langevin_step(FloatType dtype, const void* x, const void* grad, float step_size, float noise_scale,
                                 float clamp_min, float clamp_max, const float* noise, const int64_t* seed, void* out,
                                 int64_t numel, cudaStream_t stream);

}  // namespace genfast::cuda::latent

// CUDA kernels of the latent-variable ops: reparameterize (+ backward), gaussian_kl (+ backward),
// langevin_step. They mirror genfast/kernels/latent.py (the Triton kernels, which the CPU tests run
// in Triton's interpreter) operation for operation: load in the tensor's dtype, compute in float32,
// draw eps as philox_normal(seed, flat index) from csrc/philox.h, store in the output's dtype.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cub/block/block_reduce.cuh>

#include "../philox.h"
#include "latent.cuh"
#include "float_convert.cuh"

namespace genfast::cuda::latent {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 65535;  // grid-stride loops cover the rest
// gaussian_kl's plan: the same constants as genfast/kernels/latent.py.
constexpr int64_t kKlTargetBlocks = 1024;
constexpr int64_t kKlMinChunk = 2048;
constexpr int64_t kKlMaxSplits = 1024;
constexpr int64_t kKlChunkAlign = 1024;  // a multiple of every vector width, and Triton's KL_BLOCK

// VEC elements moved by one 16-byte (or smaller) load or store.
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

template <typename T>
constexpr int vec_width() {
  return static_cast<int>(16 / sizeof(T));
}

bool aligned(const void* p, size_t bytes) { return p == nullptr || reinterpret_cast<uintptr_t>(p) % bytes == 0; }

int blocks_for(int64_t work) {
  const int64_t wanted = (work + kThreads - 1) / kThreads;
  return static_cast<int>(wanted < 1 ? 1 : (wanted < kMaxBlocks ? wanted : kMaxBlocks));
}

// Standard normal eps for flat index i: the caller's noise, else the Philox stream.
__device__ __forceinline__ float eps_at(const float* noise, uint64_t seed, int64_t i) {
  return noise != nullptr ? noise[i] : philox_normal(seed, static_cast<uint64_t>(i));
}

// ------------------------------------------------------------------------------ elementwise ops
// out[i] = f(a[i], b[i], eps[i]): the form shared by reparameterize, its backward and langevin_step.
struct Reparameterize {
  __device__ float operator()(float mu, float logvar, float eps) const { return mu + expf(0.5f * logvar) * eps; }
};

struct ReparameterizeBackward {
  __device__ float operator()(float grad, float logvar, float eps) const {
    return grad * 0.5f * expf(0.5f * logvar) * eps;
  }
};

struct Langevin {
  float step_size, noise_scale, lo, hi;
  bool clamp;
  __device__ float operator()(float x, float grad, float eps) const {
    float value = x - step_size * grad + noise_scale * eps;
    if (clamp) {
      // Comparisons rather than fminf/fmaxf so that NaN passes through, as torch.clamp lets it.
      value = value < lo ? lo : value;
      value = value > hi ? hi : value;
    }
    return value;
  }
};

template <typename T, int VEC, typename F>
__global__ void elementwise_kernel(const T* __restrict__ a, const T* __restrict__ b, const float* __restrict__ noise,
                                   const int64_t* __restrict__ seed_ptr, T* __restrict__ out, int64_t numel, F f) {
  const uint64_t seed = noise != nullptr ? 0 : static_cast<uint64_t>(*seed_ptr);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t packs = numel / VEC;
  for (int64_t p = first; p < packs; p += stride) {
    const Pack<T, VEC> pa = reinterpret_cast<const Pack<T, VEC>*>(a)[p];
    const Pack<T, VEC> pb = reinterpret_cast<const Pack<T, VEC>*>(b)[p];
    Pack<T, VEC> po;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      po.v[k] = from_float<T>(f(to_float(pa.v[k]), to_float(pb.v[k]), eps_at(noise, seed, p * VEC + k)));
    }
    reinterpret_cast<Pack<T, VEC>*>(out)[p] = po;
  }
  // The numel % VEC elements left over.
  for (int64_t i = packs * VEC + first; i < numel; i += stride) {
    out[i] = from_float<T>(f(to_float(a[i]), to_float(b[i]), eps_at(noise, seed, i)));
  }
}

template <typename T, typename F>
cudaError_t launch_elementwise(const void* a, const void* b, const float* noise, const int64_t* seed, void* out,
                               int64_t numel, F f, cudaStream_t stream) {
  if (numel == 0) return cudaSuccess;
  constexpr int kVec = vec_width<T>();
  const T* ta = static_cast<const T*>(a);
  const T* tb = static_cast<const T*>(b);
  T* tout = static_cast<T*>(out);
  const size_t bytes = sizeof(T) * kVec;
  if (aligned(a, bytes) && aligned(b, bytes) && aligned(out, bytes)) {
    elementwise_kernel<T, kVec, F>
        <<<blocks_for(numel / kVec + 1), kThreads, 0, stream>>>(ta, tb, noise, seed, tout, numel, f);
  } else {
    elementwise_kernel<T, 1, F><<<blocks_for(numel), kThreads, 0, stream>>>(ta, tb, noise, seed, tout, numel, f);
  }
  return cudaGetLastError();
}

// Runs fn(T{}) with T the element type of `dtype`: one switch for every launcher.
template <typename Fn>
cudaError_t with_dtype(FloatType dtype, Fn&& fn) {
  switch (dtype) {
    case FloatType::kFloat32:
      return fn(float{});
    case FloatType::kFloat16:
      return fn(__half{});
    case FloatType::kBFloat16:
      return fn(__nv_bfloat16{});
  }
  return cudaErrorInvalidValue;
}

template <typename F>
cudaError_t dispatch_elementwise(FloatType dtype, const void* a, const void* b, const float* noise, const int64_t* seed,
                                 void* out, int64_t numel, F f, cudaStream_t stream) {
  return with_dtype(dtype, [&](auto tag) {
    return launch_elementwise<decltype(tag)>(a, b, noise, seed, out, numel, f, stream);
  });
}

// ------------------------------------------------------------------------------ gaussian_kl
__device__ __forceinline__ float kl_term(float mu, float logvar) { return 1.0f + logvar - mu * mu - expf(logvar); }

// Block (row, split) sums its chunk of the row; rows stride over gridDim.x. out[row * splits + split].
// VEC > 1 only when cols and the base pointers are multiples of VEC (checked by the launcher), so every
// pack lies inside one row and is aligned (chunk is a multiple of kKlChunkAlign).
template <typename T, int VEC>
__global__ void kl_partial_kernel(const T* __restrict__ mu, const T* __restrict__ logvar, float* __restrict__ out,
                                  int64_t rows, int64_t cols, int64_t chunk, int64_t splits) {
  using BlockReduce = cub::BlockReduce<float, kThreads>;
  __shared__ typename BlockReduce::TempStorage temp;
  const int64_t split = blockIdx.y;
  const int64_t begin = split * chunk;
  const int64_t end = begin + chunk < cols ? begin + chunk : cols;
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const T* mu_row = mu + row * cols;
    const T* logvar_row = logvar + row * cols;
    float acc = 0.0f;
    constexpr int64_t kStep = static_cast<int64_t>(kThreads) * VEC;
    for (int64_t c = begin + static_cast<int64_t>(threadIdx.x) * VEC; c < end; c += kStep) {
      const Pack<T, VEC> pm = *reinterpret_cast<const Pack<T, VEC>*>(mu_row + c);
      const Pack<T, VEC> pl = *reinterpret_cast<const Pack<T, VEC>*>(logvar_row + c);
#pragma unroll
      for (int k = 0; k < VEC; ++k) acc += kl_term(to_float(pm.v[k]), to_float(pl.v[k]));
    }
    const float total = BlockReduce(temp).Sum(acc);
    if (threadIdx.x == 0) out[row * splits + split] = -0.5f * total;
    __syncthreads();  // temp is reused by the next row
  }
}

// Second stage of split rows: out[row] = sum of partial[row, 0:splits].
__global__ void kl_sum_rows_kernel(const float* __restrict__ partial, float* __restrict__ out, int64_t rows,
                                   int64_t splits) {
  using BlockReduce = cub::BlockReduce<float, kThreads>;
  __shared__ typename BlockReduce::TempStorage temp;
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    float acc = 0.0f;
    for (int64_t k = threadIdx.x; k < splits; k += kThreads) acc += partial[row * splits + k];
    const float total = BlockReduce(temp).Sum(acc);
    if (threadIdx.x == 0) out[row] = total;
    __syncthreads();
  }
}

template <typename T>
cudaError_t launch_kl(const void* mu, const void* logvar, float* out, float* workspace, int64_t rows, int64_t cols,
                      cudaStream_t stream) {
  const KlPlan plan = gaussian_kl_plan(rows, cols);
  if (plan.splits > 1 && workspace == nullptr) return cudaErrorInvalidValue;
  float* target = plan.splits > 1 ? workspace : out;
  const dim3 grid(static_cast<unsigned>(rows < kMaxBlocks ? rows : kMaxBlocks), static_cast<unsigned>(plan.splits));
  constexpr int kVec = vec_width<T>();
  const T* tmu = static_cast<const T*>(mu);
  const T* tlogvar = static_cast<const T*>(logvar);
  if (cols % kVec == 0 && aligned(mu, sizeof(T) * kVec) && aligned(logvar, sizeof(T) * kVec)) {
    kl_partial_kernel<T, kVec>
        <<<grid, kThreads, 0, stream>>>(tmu, tlogvar, target, rows, cols, plan.chunk, plan.splits);
  } else {
    kl_partial_kernel<T, 1><<<grid, kThreads, 0, stream>>>(tmu, tlogvar, target, rows, cols, plan.chunk, plan.splits);
  }
  if (plan.splits > 1) {
    // Two stages, not atomics: the sum's grouping, hence its bits, is the same on every run.
    kl_sum_rows_kernel<<<grid.x, kThreads, 0, stream>>>(workspace, out, rows, plan.splits);
  }
  return cudaGetLastError();
}

template <typename T, int VEC>
__global__ void kl_backward_kernel(const float* __restrict__ grad, const T* __restrict__ mu,
                                   const T* __restrict__ logvar, T* __restrict__ dmu, T* __restrict__ dlogvar,
                                   int64_t numel, int64_t cols) {
  // VEC > 1 only when cols % VEC == 0, so the VEC elements of a pack share one row.
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; p < numel / VEC; p += stride) {
    const float g = grad[p * VEC / cols];
    const Pack<T, VEC> pm = reinterpret_cast<const Pack<T, VEC>*>(mu)[p];
    const Pack<T, VEC> pl = reinterpret_cast<const Pack<T, VEC>*>(logvar)[p];
    Pack<T, VEC> odmu, odlogvar;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      odmu.v[k] = from_float<T>(g * to_float(pm.v[k]));
      odlogvar.v[k] = from_float<T>(g * 0.5f * (expf(to_float(pl.v[k])) - 1.0f));
    }
    reinterpret_cast<Pack<T, VEC>*>(dmu)[p] = odmu;
    reinterpret_cast<Pack<T, VEC>*>(dlogvar)[p] = odlogvar;
  }
}

template <typename T>
cudaError_t launch_kl_backward(const float* grad, const void* mu, const void* logvar, void* dmu, void* dlogvar,
                               int64_t rows, int64_t cols, cudaStream_t stream) {
  const int64_t numel = rows * cols;
  if (numel == 0) return cudaSuccess;
  constexpr int kVec = vec_width<T>();
  const size_t bytes = sizeof(T) * kVec;
  const T* tmu = static_cast<const T*>(mu);
  const T* tlogvar = static_cast<const T*>(logvar);
  T* tdmu = static_cast<T*>(dmu);
  T* tdlogvar = static_cast<T*>(dlogvar);
  if (cols % kVec == 0 && aligned(mu, bytes) && aligned(logvar, bytes) && aligned(dmu, bytes) &&
      aligned(dlogvar, bytes)) {
    kl_backward_kernel<T, kVec>
        <<<blocks_for(numel / kVec), kThreads, 0, stream>>>(grad, tmu, tlogvar, tdmu, tdlogvar, numel, cols);
  } else {
    kl_backward_kernel<T, 1>
        <<<blocks_for(numel), kThreads, 0, stream>>>(grad, tmu, tlogvar, tdmu, tdlogvar, numel, cols);
  }
  return cudaGetLastError();
}

}  // namespace

KlPlan gaussian_kl_plan(int64_t rows, int64_t cols) {
  int64_t splits = kKlTargetBlocks / (rows > 1 ? rows : 1);
  const int64_t by_size = (cols + kKlMinChunk - 1) / kKlMinChunk;
  splits = splits < by_size ? splits : by_size;
  splits = splits < kKlMaxSplits ? splits : kKlMaxSplits;
  splits = splits > 1 ? splits : 1;
  const int64_t per_split = (cols + splits - 1) / splits;
  const int64_t chunk = (per_split + kKlChunkAlign - 1) / kKlChunkAlign * kKlChunkAlign;
  return {chunk > 0 ? (cols + chunk - 1) / chunk : 1, chunk > 0 ? chunk : kKlChunkAlign};
}

cudaError_t launch_reparameterize(FloatType dtype, const void* mu, const void* logvar, const float* noise,
                                  const int64_t* seed, void* out, int64_t numel, cudaStream_t stream) {
  return dispatch_elementwise(dtype, mu, logvar, noise, seed, out, numel, Reparameterize{}, stream);
}

cudaError_t launch_reparameterize_backward(FloatType dtype, const void* grad, const void* logvar, const float* noise,
                                           const int64_t* seed, void* dlogvar, int64_t numel, cudaStream_t stream) {
  return dispatch_elementwise(dtype, grad, logvar, noise, seed, dlogvar, numel, ReparameterizeBackward{}, stream);
}

cudaError_t launch_langevin_step(FloatType dtype, const void* x, const void* grad, float step_size, float noise_scale,
                                 float clamp_min, float clamp_max, const float* noise, const int64_t* seed, void* out,
                                 int64_t numel, cudaStream_t stream) {
  const bool clamp = clamp_min != -INFINITY || clamp_max != INFINITY;
  const Langevin f{step_size, noise_scale, clamp_min, clamp_max, clamp};
  return dispatch_elementwise(dtype, x, grad, noise, seed, out, numel, f, stream);
}

cudaError_t launch_gaussian_kl(FloatType dtype, const void* mu, const void* logvar, float* out, float* workspace,
                               int64_t rows, int64_t cols, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  if (cols == 0) return cudaMemsetAsync(out, 0, sizeof(float) * rows, stream);
  return with_dtype(dtype, [&](auto tag) {
    return launch_kl<decltype(tag)>(mu, logvar, out, workspace, rows, cols, stream);
  });
}

cudaError_t launch_gaussian_kl_backward(FloatType dtype, const float* grad, const void* mu, const void* logvar, void* dmu,
                                        void* dlogvar, int64_t rows, int64_t cols, cudaStream_t stream) {
  return with_dtype(dtype, [&](auto tag) {
    return launch_kl_backward<decltype(tag)>(grad, mu, logvar, dmu, dlogvar, rows, cols, stream);
  });
}

}  // namespace genfast::cuda::latent

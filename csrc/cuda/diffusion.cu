// CUDA kernels of genfast::scheduler_step and genfast::cfg_combine (formulas and coefficient layout:
// genfast/ops/diffusion.py). Memory-bound elementwise passes: each thread moves 16-byte packs
// (4 floats or 8 halves) in a grid-stride loop with int64 indices; the scalar tail, and inputs whose
// pointers are not 16-byte aligned, take the same code with packs of one. Noise drawn inside is
// element i of the Philox stream (csrc/philox.h) at the flat index i, as on every backend; a pack of
// 4 or 8 elements draws its normals with one philox_normal4 per four.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "../philox.h"
#include "float_convert.cuh"
#include "diffusion.cuh"

namespace genfast::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxBlocks = 65535;
enum NoiseMode { kNoNoise = 0, kNoiseTensor = 1, kNoiseSeed = 2 };

template <typename T, int kVec>
struct alignas(sizeof(T) * kVec) Pack {
  T v[kVec];
};

// The coefficient row, in the order of genfast.ops.diffusion.COEFS.
struct StepCoefs {
  float ax, am, lo, hi, ex, em, e0, p0, pe, px, sigma;
};

__device__ __forceinline__ StepCoefs load_coefs(const float* __restrict__ c) {
  return {__ldg(c + 0), __ldg(c + 1), __ldg(c + 2), __ldg(c + 3), __ldg(c + 4), __ldg(c + 5),
          __ldg(c + 6), __ldg(c + 7), __ldg(c + 8), __ldg(c + 9), __ldg(c + 10)};
}

// The step without its noise term, in float32.
__device__ __forceinline__ float step_one(const StepCoefs& k, float x, float m) {
  float x0 = k.ax * x + k.am * m;
  x0 = x0 < k.lo ? k.lo : (x0 > k.hi ? k.hi : x0);  // comparisons, so NaN propagates as in torch.clamp
  const float eps = k.ex * x + k.em * m + k.e0 * x0;
  return k.p0 * x0 + k.pe * eps + k.px * x;
}

template <typename T, int kVec, bool kUncond, int kNoise>
__global__ void __launch_bounds__(kThreads)
    scheduler_step_kernel(const T* __restrict__ x, const T* __restrict__ m, const T* __restrict__ u, float g,
                          const float* __restrict__ coefs, const float* __restrict__ noise,
                          const int64_t* __restrict__ seed_ptr, T* __restrict__ out, int64_t numel) {
  using P = Pack<T, kVec>;
  const StepCoefs k = load_coefs(coefs);
  // Uniform over the grid: with a zero sigma the noise term vanishes exactly, so skip the draw.
  const bool draw = kNoise == kNoiseSeed && k.sigma != 0.0f;
  const uint64_t seed = kNoise == kNoiseSeed ? static_cast<uint64_t>(*seed_ptr) : 0;
  const int64_t packs = numel / kVec;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  for (int64_t p = first; p < packs; p += stride) {
    const P xv = reinterpret_cast<const P*>(x)[p];
    const P mv = reinterpret_cast<const P*>(m)[p];
    P uv;
    if constexpr (kUncond) uv = reinterpret_cast<const P*>(u)[p];
    float nz[kVec];
    if constexpr (kNoise == kNoiseTensor) {
      if constexpr (kVec % 4 == 0) {
#pragma unroll
        for (int j = 0; j < kVec / 4; ++j) {
          const float4 f = reinterpret_cast<const float4*>(noise + p * kVec)[j];
          nz[4 * j] = f.x, nz[4 * j + 1] = f.y, nz[4 * j + 2] = f.z, nz[4 * j + 3] = f.w;
        }
      } else {
#pragma unroll
        for (int j = 0; j < kVec; ++j) nz[j] = noise[p * kVec + j];
      }
    }
    // A pack of a multiple of 4 elements starts at a multiple of 4: its normals are whole Philox calls.
    constexpr bool kWholeCalls = kNoise == kNoiseSeed && kVec % 4 == 0;
    if constexpr (kWholeCalls) {
      if (draw) {
#pragma unroll
        for (int j = 0; j < kVec / 4; ++j) philox_normal4(seed, static_cast<uint64_t>(p * (kVec / 4) + j), nz + 4 * j);
      }
    }
    P ov;
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      float mj = to_float(mv.v[j]);
      if constexpr (kUncond) {
        const float uj = to_float(uv.v[j]);
        mj = uj + g * (mj - uj);
      }
      float prev = step_one(k, to_float(xv.v[j]), mj);
      if constexpr (kNoise == kNoiseTensor) prev += k.sigma * nz[j];
      if constexpr (kWholeCalls) {
        if (draw) prev += k.sigma * nz[j];
      } else if constexpr (kNoise == kNoiseSeed) {
        if (draw) prev += k.sigma * philox_normal(seed, static_cast<uint64_t>(p * kVec + j));
      }
      ov.v[j] = from_float<T>(prev);
    }
    reinterpret_cast<P*>(out)[p] = ov;
  }
  // The numel % kVec elements after the last full pack.
  for (int64_t i = packs * kVec + first; i < numel; i += stride) {
    float mi = to_float(m[i]);
    if constexpr (kUncond) {
      const float ui = to_float(u[i]);
      mi = ui + g * (mi - ui);
    }
    float prev = step_one(k, to_float(x[i]), mi);
    if constexpr (kNoise == kNoiseTensor) prev += k.sigma * noise[i];
    if constexpr (kNoise == kNoiseSeed) {
      if (draw) prev += k.sigma * philox_normal(seed, static_cast<uint64_t>(i));
    }
    out[i] = from_float<T>(prev);
  }
}

template <typename T, int kVec>
__global__ void __launch_bounds__(kThreads)
    cfg_combine_kernel(const T* __restrict__ u, const T* __restrict__ c, float g, T* __restrict__ out, int64_t numel) {
  using P = Pack<T, kVec>;
  const int64_t packs = numel / kVec;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  for (int64_t p = first; p < packs; p += stride) {
    const P uv = reinterpret_cast<const P*>(u)[p];
    const P cv = reinterpret_cast<const P*>(c)[p];
    P ov;
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      const float uj = to_float(uv.v[j]);
      ov.v[j] = from_float<T>(uj + g * (to_float(cv.v[j]) - uj));
    }
    reinterpret_cast<P*>(out)[p] = ov;
  }
  for (int64_t i = packs * kVec + first; i < numel; i += stride) {
    const float ui = to_float(u[i]);
    out[i] = from_float<T>(ui + g * (to_float(c[i]) - ui));
  }
}

bool aligned16(const void* p) { return p == nullptr || reinterpret_cast<uintptr_t>(p) % 16 == 0; }

int blocks_for(int64_t work) {
  const int64_t wanted = (work + kThreads - 1) / kThreads;
  return static_cast<int>(wanted < 1 ? 1 : (wanted < kMaxBlocks ? wanted : kMaxBlocks));
}

template <typename T, int kVec, bool kUncond, int kNoise>
void launch_step(const void* x, const void* m, const void* u, float g, const float* coefs, const float* noise,
                 const int64_t* seed, void* out, int64_t numel, cudaStream_t stream) {
  scheduler_step_kernel<T, kVec, kUncond, kNoise><<<blocks_for(numel / kVec), kThreads, 0, stream>>>(
      static_cast<const T*>(x), static_cast<const T*>(m), static_cast<const T*>(u), g, coefs, noise, seed,
      static_cast<T*>(out), numel);
}

template <typename T, int kVec>
void launch_step_modes(const void* x, const void* m, const void* u, float g, const float* coefs, const float* noise,
                       const int64_t* seed, void* out, int64_t numel, cudaStream_t stream) {
  const bool uncond = u != nullptr;
  if (noise != nullptr) {
    uncond ? launch_step<T, kVec, true, kNoiseTensor>(x, m, u, g, coefs, noise, seed, out, numel, stream)
           : launch_step<T, kVec, false, kNoiseTensor>(x, m, u, g, coefs, noise, seed, out, numel, stream);
  } else if (seed != nullptr) {
    uncond ? launch_step<T, kVec, true, kNoiseSeed>(x, m, u, g, coefs, noise, seed, out, numel, stream)
           : launch_step<T, kVec, false, kNoiseSeed>(x, m, u, g, coefs, noise, seed, out, numel, stream);
  } else {
    uncond ? launch_step<T, kVec, true, kNoNoise>(x, m, u, g, coefs, noise, seed, out, numel, stream)
           : launch_step<T, kVec, false, kNoNoise>(x, m, u, g, coefs, noise, seed, out, numel, stream);
  }
}

template <typename T>
void launch_step_typed(const void* x, const void* m, const void* u, float g, const float* coefs, const float* noise,
                       const int64_t* seed, void* out, int64_t numel, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  if (aligned16(x) && aligned16(m) && aligned16(u) && aligned16(noise) && aligned16(out)) {
    launch_step_modes<T, kVec>(x, m, u, g, coefs, noise, seed, out, numel, stream);
  } else {
    launch_step_modes<T, 1>(x, m, u, g, coefs, noise, seed, out, numel, stream);
  }
}

template <typename T>
void launch_cfg_typed(const void* u, const void* c, float g, void* out, int64_t numel, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  const T* up = static_cast<const T*>(u);
  const T* cp = static_cast<const T*>(c);
  T* op = static_cast<T*>(out);
  if (aligned16(u) && aligned16(c) && aligned16(out)) {
    cfg_combine_kernel<T, kVec><<<blocks_for(numel / kVec), kThreads, 0, stream>>>(up, cp, g, op, numel);
  } else {
    cfg_combine_kernel<T, 1><<<blocks_for(numel), kThreads, 0, stream>>>(up, cp, g, op, numel);
  }
}

}  // namespace

cudaError_t launch_scheduler_step(FloatType dtype, const void* sample, const void* model_output, const void* uncond,
                                  float guidance_scale, const float* coefs, const float* noise, const int64_t* seed,
                                  void* out, int64_t numel, cudaStream_t stream) {
  if (numel == 0) return cudaSuccess;
  switch (dtype) {
    case FloatType::kFloat32:
      launch_step_typed<float>(sample, model_output, uncond, guidance_scale, coefs, noise, seed, out, numel, stream);
      break;
    case FloatType::kFloat16:
      launch_step_typed<__half>(sample, model_output, uncond, guidance_scale, coefs, noise, seed, out, numel, stream);
      break;
    case FloatType::kBFloat16:
      launch_step_typed<__nv_bfloat16>(sample, model_output, uncond, guidance_scale, coefs, noise, seed, out, numel,
                                       stream);
      break;
  }
  return cudaGetLastError();
}

cudaError_t launch_cfg_combine(FloatType dtype, const void* uncond, const void* cond, float guidance_scale, void* out,
                               int64_t numel, cudaStream_t stream) {
  if (numel == 0) return cudaSuccess;
  switch (dtype) {
    case FloatType::kFloat32:
      launch_cfg_typed<float>(uncond, cond, guidance_scale, out, numel, stream);
      break;
    case FloatType::kFloat16:
      launch_cfg_typed<__half>(uncond, cond, guidance_scale, out, numel, stream);
      break;
    case FloatType::kBFloat16:
      launch_cfg_typed<__nv_bfloat16>(uncond, cond, guidance_scale, out, numel, stream);
      break;
  }
  return cudaGetLastError();
}

}  // namespace genfast::cuda

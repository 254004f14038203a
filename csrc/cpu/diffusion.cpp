// CPU kernels of genfast::scheduler_step and genfast::cfg_combine (formulas and the coefficient
// layout: genfast/ops/diffusion.py).
//
// Each thread walks its range in chunks of kChunk elements: when the noise is drawn inside, the
// chunk's normals are generated first into an L1-resident buffer (four normals per Philox call, eight or
// sixteen calls side by side with AVX2 or AVX-512 where the CPU has it: csrc/cpu/philox_simd.h, which
// philox_noise uses too), then one loop, compiled twice (AVX2+FMA and baseline, chosen at run time), computes the
// step. The normals are the Philox stream of csrc/philox.h at the output's flat index, like every other backend.
//
// Threads: the flat output is split through TensorIterator::for_each, which runs on torch's intra-op
// thread pool (so torch.set_num_threads applies) and hands each thread contiguous ranges.
#include <ATen/Dispatch.h>
#include <ATen/TensorIterator.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>

#include "philox_simd.h"

namespace {

// Coefficient indices (genfast.ops.diffusion.COEFS).
enum Coef { AX, AM, CLIP_LO, CLIP_HI, EX, EM, E0, P0, PE, PX, SIGMA, NUM_COEFS };

// Small enough that one chunk's noise (2 KiB) stays in L1 between generation and use.
constexpr int64_t kChunk = 512;
// Below this many elements per thread, threading costs more than it saves.
constexpr int64_t kGrain = 32768;

using genfast::cpu::fill_normals;

// One chunk of the step. Compile-time flags keep the loop free of branches so it vectorises.
// The three terms are folded into coefficients of x0, x and m once per chunk: prev = A*x0 + B*x + C*m
// (+ sigma*noise) with A = P0 + PE*E0, B = PX + PE*EX, C = PE*EM. That is the same formula with
// its products reassociated, i.e. a rounding-level difference from the term-by-term reference.
template <typename T, bool kUncond, bool kNoise>
__attribute__((always_inline)) inline void step_chunk_body(const T* __restrict__ x, const T* __restrict__ m,
                                                           const T* __restrict__ u, const float* __restrict__ noise,
                                                           const float* c, float g, T* __restrict__ out, int64_t n) {
  const float ax = c[AX], am = c[AM], lo = c[CLIP_LO], hi = c[CLIP_HI], sigma = c[SIGMA];
  const float a = c[P0] + c[PE] * c[E0], b = c[PX] + c[PE] * c[EX], cm = c[PE] * c[EM];
  for (int64_t i = 0; i < n; ++i) {
    const float xi = static_cast<float>(x[i]);
    float mi = static_cast<float>(m[i]);
    if constexpr (kUncond) {
      const float ui = static_cast<float>(u[i]);
      mi = ui + g * (mi - ui);
    }
    float x0 = ax * xi + am * mi;
    x0 = x0 < lo ? lo : (x0 > hi ? hi : x0);  // comparisons, so NaN propagates as in torch.clamp
    float prev = a * x0 + b * xi + cm * mi;
    if constexpr (kNoise) prev += sigma * noise[i];
    out[i] = static_cast<T>(prev);
  }
}

#ifdef GENFAST_CPU_X86
template <typename T, bool kUncond, bool kNoise>
__attribute__((target("avx2,fma"))) void step_chunk_avx2(const T* x, const T* m, const T* u, const float* noise,
                                                         const float* c, float g, T* out, int64_t n) {
  step_chunk_body<T, kUncond, kNoise>(x, m, u, noise, c, g, out, n);
}
#endif

template <typename T, bool kUncond, bool kNoise>
void step_chunk(const T* x, const T* m, const T* u, const float* noise, const float* c, float g, T* out, int64_t n) {
#ifdef GENFAST_CPU_X86
  static const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (avx2) return step_chunk_avx2<T, kUncond, kNoise>(x, m, u, noise, c, g, out, n);
#endif
  step_chunk_body<T, kUncond, kNoise>(x, m, u, noise, c, g, out, n);
}

// Runs f(begin, end) over [0, out.numel()) on torch's intra-op threads (see the top of this file).
template <typename F>
void parallel_flat(const at::Tensor& out, const F& f) {
  if (out.numel() == 0) return;
  const at::Tensor flat = out.view({-1});  // kept alive: the iterator borrows it
  at::TensorIterator iter = at::TensorIteratorConfig()
                                .add_output(flat)
                                .resize_outputs(false)
                                .check_all_same_dtype(false)
                                .build();
  const char* base = static_cast<const char*>(out.data_ptr());
  const int64_t element = out.element_size();
  iter.for_each(
      [&](char** data, const int64_t* strides, int64_t n) {
        const int64_t begin = (data[0] - base) / element;  // out is flat and contiguous
        f(begin, begin + n);
      },
      kGrain);
}

template <typename T, bool kUncond>
void step_range(const T* x, const T* m, const T* u, const float* noise, const int64_t* seed, const float* c, float g,
                T* out, int64_t begin, int64_t end) {
  alignas(64) float buffer[kChunk];
  for (int64_t s = begin; s < end; s += kChunk) {
    const int64_t n = std::min(kChunk, end - s);
    const T* uc = kUncond ? u + s : nullptr;
    if (noise != nullptr) {
      step_chunk<T, kUncond, true>(x + s, m + s, uc, noise + s, c, g, out + s, n);
    } else if (seed != nullptr) {
      fill_normals(static_cast<uint64_t>(*seed), s, n, buffer);
      step_chunk<T, kUncond, true>(x + s, m + s, uc, buffer, c, g, out + s, n);
    } else {
      step_chunk<T, kUncond, false>(x + s, m + s, uc, nullptr, c, g, out + s, n);
    }
  }
}

void check_float(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16,
              "scheduler_step: ", name, " must be float32, float16 or bfloat16, got ", t.scalar_type());
}

at::Tensor scheduler_step_cpu(const at::Tensor& sample, const at::Tensor& model_output,
                              const std::optional<at::Tensor>& model_output_uncond, double guidance_scale,
                              const at::Tensor& coefs, const std::optional<at::Tensor>& noise,
                              const std::optional<at::Tensor>& seed) {
  check_float(sample, "sample");
  TORCH_CHECK(model_output.sizes() == sample.sizes(), "scheduler_step: model_output has shape ",
              model_output.sizes(), " but sample has shape ", sample.sizes());
  TORCH_CHECK(model_output.scalar_type() == sample.scalar_type(),
              "scheduler_step: model_output and sample must share a dtype");
  if (model_output_uncond.has_value()) {
    TORCH_CHECK(model_output_uncond->sizes() == sample.sizes() &&
                    model_output_uncond->scalar_type() == sample.scalar_type(),
                "scheduler_step: model_output_uncond must have sample's shape and dtype");
  }
  TORCH_CHECK(coefs.scalar_type() == at::kFloat && coefs.numel() == NUM_COEFS,
              "scheduler_step: coefs must be float32 with 11 values, got ", coefs.scalar_type(), " with ",
              coefs.numel());
  TORCH_CHECK(!(noise.has_value() && seed.has_value()), "scheduler_step: pass noise or seed, not both");
  if (noise.has_value()) {
    TORCH_CHECK(noise->numel() == sample.numel(), "scheduler_step: noise must have sample's number of elements");
  }
  if (seed.has_value()) {
    TORCH_CHECK(seed->numel() == 1 && seed->scalar_type() == at::kLong, "scheduler_step: seed must be one int64");
  }
  for (const at::Tensor* t : {&sample, &model_output, &coefs}) {
    TORCH_CHECK(t->device().is_cpu(), "scheduler_step: every tensor must be on the CPU");
  }
  for (const std::optional<at::Tensor>* t : {&model_output_uncond, &noise, &seed}) {
    TORCH_CHECK(!t->has_value() || (*t)->device().is_cpu(), "scheduler_step: every tensor must be on the CPU");
  }

  const at::Tensor x = sample.contiguous();
  const at::Tensor m = model_output.contiguous();
  const at::Tensor u = model_output_uncond.has_value() ? model_output_uncond->contiguous() : at::Tensor();
  const at::Tensor c = coefs.contiguous();
  const at::Tensor nz = noise.has_value() ? noise->to(at::kFloat).contiguous() : at::Tensor();
  at::Tensor out = at::empty(sample.sizes(), sample.options().memory_format(at::MemoryFormat::Contiguous));
  const float* cp = c.data_ptr<float>();
  const float* noise_ptr = nz.defined() ? nz.data_ptr<float>() : nullptr;
  // A zero sigma makes the noise term vanish exactly: skip drawing it.
  const int64_t* seed_ptr = (seed.has_value() && cp[SIGMA] != 0.0f) ? seed->data_ptr<int64_t>() : nullptr;
  const float g = static_cast<float>(guidance_scale);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "scheduler_step_cpu", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* mp = m.data_ptr<scalar_t>();
    const scalar_t* up = u.defined() ? u.data_ptr<scalar_t>() : nullptr;
    scalar_t* op = out.data_ptr<scalar_t>();
    parallel_flat(out, [&](int64_t begin, int64_t end) {
      if (up != nullptr) {
        step_range<scalar_t, true>(xp, mp, up, noise_ptr, seed_ptr, cp, g, op, begin, end);
      } else {
        step_range<scalar_t, false>(xp, mp, up, noise_ptr, seed_ptr, cp, g, op, begin, end);
      }
    });
  });
  return out;
}

template <typename T>
__attribute__((always_inline)) inline void cfg_body(const T* __restrict__ u, const T* __restrict__ c, float g,
                                                    T* __restrict__ out, int64_t begin, int64_t end) {
  for (int64_t i = begin; i < end; ++i) {
    const float ui = static_cast<float>(u[i]);
    out[i] = static_cast<T>(ui + g * (static_cast<float>(c[i]) - ui));
  }
}

#ifdef GENFAST_CPU_X86
template <typename T>
__attribute__((target("avx2,fma"))) void cfg_avx2(const T* u, const T* c, float g, T* out, int64_t begin,
                                                  int64_t end) {
  cfg_body(u, c, g, out, begin, end);
}
#endif

template <typename T>
void cfg_range(const T* u, const T* c, float g, T* out, int64_t begin, int64_t end) {
#ifdef GENFAST_CPU_X86
  static const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (avx2) return cfg_avx2(u, c, g, out, begin, end);
#endif
  cfg_body(u, c, g, out, begin, end);
}

at::Tensor cfg_combine_cpu(const at::Tensor& uncond, const at::Tensor& cond, double guidance_scale) {
  TORCH_CHECK(uncond.sizes() == cond.sizes(), "cfg_combine: cond has shape ", cond.sizes(), " but uncond has ",
              uncond.sizes());
  TORCH_CHECK(uncond.scalar_type() == cond.scalar_type(), "cfg_combine: cond and uncond must share a dtype");
  TORCH_CHECK(uncond.scalar_type() == at::kFloat || uncond.scalar_type() == at::kHalf ||
                  uncond.scalar_type() == at::kBFloat16,
              "cfg_combine: uncond must be float32, float16 or bfloat16");
  TORCH_CHECK(uncond.device().is_cpu() && cond.device().is_cpu(), "cfg_combine: tensors must be on the CPU");
  const at::Tensor u = uncond.contiguous();
  const at::Tensor c = cond.contiguous();
  at::Tensor out = at::empty(uncond.sizes(), uncond.options().memory_format(at::MemoryFormat::Contiguous));
  const float g = static_cast<float>(guidance_scale);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, u.scalar_type(), "cfg_combine_cpu", [&] {
    const scalar_t* up = u.data_ptr<scalar_t>();
    const scalar_t* cp = c.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    parallel_flat(out, [&](int64_t begin, int64_t end) { cfg_range(up, cp, g, op, begin, end); });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(genfast, CPU, m) {
  m.impl("scheduler_step", &scheduler_step_cpu);
  m.impl("cfg_combine", &cfg_combine_cpu);
}

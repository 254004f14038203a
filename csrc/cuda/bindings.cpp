// TORCH_LIBRARY_IMPL(genfast, CUDA): checks each call's tensors, then calls the torch-free launchers
// declared in csrc/cuda/*.cuh on the current stream. Built only when torch has CUDA (setup.py).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/string_view.h>
#include <torch/library.h>

#include <algorithm>
#include <string>
#include <tuple>

#include "../op_checks.h"
#include "attention.cuh"
#include "conv_transpose.cuh"
#include "diffusion.cuh"
#include "latent.cuh"
#include "random.cuh"
#include "sampling.cuh"

namespace {

#define GENFAST_CHECK_CUDA(x, op) TORCH_CHECK((x).is_cuda(), op ": " #x " must be a CUDA tensor")
#define GENFAST_CHECK_LAUNCH(err, op) \
  TORCH_CHECK((err) == cudaSuccess, op ": kernel launch failed: ", cudaGetErrorString(err))

cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

// The kernels' storage type of a tensor; anything else is refused, naming the op and the argument.
genfast::cuda::FloatType float_type(const at::Tensor& t, const char* op, const char* name) {
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

// ---------------------------------------------------------------------------------------- random
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

// ---------------------------------------------------------------------------------------- sampling
// The shared checks, plus what the CUDA kernel needs on top: a CUDA tensor, contiguous rows, and between 1 and
// 2^24 - 1 tokens (its fixed-point top-p sums rely on the bound, csrc/cuda/sampling.cuh).
void check_sampling_args_cuda(const char* op, const at::Tensor& logits, const at::Tensor& temperature,
                              const at::Tensor& top_k, const at::Tensor& top_p, const at::Tensor& min_p) {
  genfast::check_sampling_args(op, logits, temperature, top_k, top_p, min_p);
  TORCH_CHECK(logits.is_cuda(), op, ": logits must be a CUDA tensor");
  TORCH_CHECK(logits.stride(1) == 1, op, ": logits rows must be contiguous");
  TORCH_CHECK(logits.size(1) >= 1 && logits.size(1) < genfast::sampling::kMaxVocab, op,
              ": logits must have between 1 and 2^24 - 1 columns (tokens), got ", logits.size(1));
  TORCH_CHECK(logits.size(0) <= std::numeric_limits<int32_t>::max(), op, ": logits has too many rows (",
              logits.size(0), " > 2^31 - 1)");
  for (const at::Tensor* knob : {&temperature, &top_k, &top_p, &min_p}) {
    TORCH_CHECK(knob->is_contiguous(), op, ": the per-row knobs must be contiguous");
  }
}

std::tuple<at::Tensor, at::Tensor> filter_logits_cuda(const at::Tensor& logits, const at::Tensor& temperature,
                                                      const at::Tensor& top_k, const at::Tensor& top_p,
                                                      const at::Tensor& min_p) {
  check_sampling_args_cuda("filter_logits", logits, temperature, top_k, top_p, min_p);
  const c10::cuda::CUDAGuard guard(logits.device());
  at::Tensor out = at::empty(logits.sizes(), logits.options().dtype(at::kFloat));
  at::Tensor flags = at::empty({logits.size(0)}, logits.options().dtype(at::kInt));
  GENFAST_CHECK_LAUNCH(
      genfast::cuda::launch_sampling(logits.data_ptr(), float_type(logits, "filter_logits", "logits"), logits.size(0),
                                     logits.size(1), logits.stride(0), temperature.data_ptr<float>(),
                                     top_k.data_ptr<int64_t>(), top_p.data_ptr<float>(), min_p.data_ptr<float>(),
                                     out.data_ptr<float>(), nullptr, flags.data_ptr<int32_t>(),
                                     genfast::cuda::SampleNoise{}, current_stream()),
      "filter_logits");
  return {out, flags};
}

std::tuple<at::Tensor, at::Tensor> sample_tokens_cuda(const at::Tensor& logits, const at::Tensor& temperature,
                                                      const at::Tensor& top_k, const at::Tensor& top_p,
                                                      const at::Tensor& min_p, const std::optional<at::Tensor>& noise,
                                                      const std::optional<at::Tensor>& seed,
                                                      const std::optional<at::Tensor>& offsets) {
  check_sampling_args_cuda("sample_tokens", logits, temperature, top_k, top_p, min_p);
  genfast::check_sampling_noise_or_seeds("sample_tokens", logits, noise, seed, offsets);
  const at::Tensor noise_c = noise.has_value() ? noise->contiguous() : at::Tensor();
  const at::Tensor seed_c = seed.has_value() ? seed->contiguous() : at::Tensor();
  const at::Tensor offsets_c = offsets.has_value() ? offsets->contiguous() : at::Tensor();
  genfast::cuda::SampleNoise source;
  source.values = noise_c.defined() ? noise_c.data_ptr<float>() : nullptr;
  source.seed = seed_c.defined() ? seed_c.data_ptr<int64_t>() : nullptr;
  source.seed_stride = seed_c.defined() && seed_c.numel() > 1 ? 1 : 0;
  source.offsets = offsets_c.defined() ? offsets_c.data_ptr<int64_t>() : nullptr;
  const c10::cuda::CUDAGuard guard(logits.device());
  at::Tensor out = at::empty({logits.size(0)}, logits.options().dtype(at::kLong));
  at::Tensor flags = at::empty({logits.size(0)}, logits.options().dtype(at::kInt));
  GENFAST_CHECK_LAUNCH(
      genfast::cuda::launch_sampling(logits.data_ptr(), float_type(logits, "sample_tokens", "logits"), logits.size(0),
                                     logits.size(1), logits.stride(0), temperature.data_ptr<float>(),
                                     top_k.data_ptr<int64_t>(), top_p.data_ptr<float>(), min_p.data_ptr<float>(),
                                     nullptr, out.data_ptr<int64_t>(), flags.data_ptr<int32_t>(), source,
                                     current_stream()),
      "sample_tokens");
  return {out, flags};
}

// ---------------------------------------------------------------------------------------- diffusion

at::Tensor scheduler_step_cuda(const at::Tensor& sample, const at::Tensor& model_output,
                               const std::optional<at::Tensor>& model_output_uncond, double guidance_scale,
                               const at::Tensor& coefs, const std::optional<at::Tensor>& noise,
                               const std::optional<at::Tensor>& seed) {
  const genfast::cuda::FloatType dtype = float_type(sample, "scheduler_step", "sample");
  GENFAST_CHECK_CUDA(sample, "scheduler_step");
  TORCH_CHECK(model_output.sizes() == sample.sizes() && model_output.scalar_type() == sample.scalar_type(),
              "scheduler_step: model_output must have sample's shape and dtype");
  TORCH_CHECK(model_output.device() == sample.device(), "scheduler_step: model_output is not on sample's device");
  if (model_output_uncond.has_value()) {
    TORCH_CHECK(model_output_uncond->sizes() == sample.sizes() &&
                    model_output_uncond->scalar_type() == sample.scalar_type(),
                "scheduler_step: model_output_uncond must have sample's shape and dtype");
    TORCH_CHECK(model_output_uncond->device() == sample.device(),
                "scheduler_step: model_output_uncond is not on sample's device");
  }
  TORCH_CHECK(coefs.scalar_type() == at::kFloat && coefs.numel() == 11 && coefs.device() == sample.device(),
              "scheduler_step: coefs must be 11 float32 values on sample's device");
  TORCH_CHECK(!(noise.has_value() && seed.has_value()), "scheduler_step: pass noise or seed, not both");
  if (noise.has_value()) {
    TORCH_CHECK(noise->numel() == sample.numel() && noise->device() == sample.device(),
                "scheduler_step: noise must have sample's number of elements and device");
  }
  if (seed.has_value()) {
    TORCH_CHECK(seed->numel() == 1 && seed->scalar_type() == at::kLong && seed->device() == sample.device(),
                "scheduler_step: seed must be one int64 on sample's device");
  }
  const c10::cuda::CUDAGuard guard(sample.device());
  const at::Tensor x = sample.contiguous();
  const at::Tensor m = model_output.contiguous();
  const at::Tensor u = model_output_uncond.has_value() ? model_output_uncond->contiguous() : at::Tensor();
  const at::Tensor c = coefs.contiguous();
  const at::Tensor nz = noise.has_value() ? noise->to(at::kFloat).contiguous() : at::Tensor();
  at::Tensor out = at::empty(sample.sizes(), sample.options().memory_format(at::MemoryFormat::Contiguous));
  GENFAST_CHECK_LAUNCH(
      genfast::cuda::launch_scheduler_step(dtype, x.data_ptr(), m.data_ptr(), u.defined() ? u.data_ptr() : nullptr,
                                           static_cast<float>(guidance_scale), c.data_ptr<float>(),
                                           nz.defined() ? nz.data_ptr<float>() : nullptr,
                                           seed.has_value() ? seed->data_ptr<int64_t>() : nullptr, out.data_ptr(),
                                           x.numel(), current_stream()),
      "scheduler_step");
  return out;
}

at::Tensor cfg_combine_cuda(const at::Tensor& uncond, const at::Tensor& cond, double guidance_scale) {
  const genfast::cuda::FloatType dtype = float_type(uncond, "cfg_combine", "uncond");
  GENFAST_CHECK_CUDA(uncond, "cfg_combine");
  TORCH_CHECK(cond.sizes() == uncond.sizes() && cond.scalar_type() == uncond.scalar_type() &&
                  cond.device() == uncond.device(),
              "cfg_combine: cond must have uncond's shape, dtype and device");
  const c10::cuda::CUDAGuard guard(uncond.device());
  const at::Tensor u = uncond.contiguous();
  const at::Tensor c = cond.contiguous();
  at::Tensor out = at::empty(uncond.sizes(), uncond.options().memory_format(at::MemoryFormat::Contiguous));
  GENFAST_CHECK_LAUNCH(genfast::cuda::launch_cfg_combine(dtype, u.data_ptr(), c.data_ptr(),
                                                         static_cast<float>(guidance_scale), out.data_ptr(),
                                                         u.numel(), current_stream()),
                       "cfg_combine");
  return out;
}

// ---------------------------------------------------------------------------------------- latent
namespace latent = genfast::cuda::latent;


// Two CUDA tensors of one shape, dtype and device.
void latent_check_pair(const char* op, const char* a_name, const at::Tensor& a, const char* b_name,
                       const at::Tensor& b) {
  TORCH_CHECK(a.is_cuda(), op, ": ", a_name, " must be a CUDA tensor");
  TORCH_CHECK(b.device() == a.device(), op, ": ", b_name, " is on ", b.device(), " but ", a_name, " is on ",
              a.device());
  TORCH_CHECK(b.sizes() == a.sizes(), op, ": ", b_name, " has shape ", b.sizes(), " but ", a_name, " has shape ",
              a.sizes());
  TORCH_CHECK(b.scalar_type() == a.scalar_type(), op, ": ", b_name, " has dtype ", b.scalar_type(), " but ", a_name,
              " has dtype ", a.scalar_type());
  float_type(a, op, a_name);
}

// Exactly one of noise (like's numel, made float32 and contiguous) and seed (one int64 on like's device).
// Returns the contiguous float32 noise, or an undefined tensor when the seed is used.
at::Tensor latent_noise(const char* op, const at::Tensor& like, const std::optional<at::Tensor>& noise,
                        const std::optional<at::Tensor>& seed) {
  TORCH_CHECK(noise.has_value() != seed.has_value(), op, ": pass exactly one of noise and seed");
  if (seed.has_value()) {
    TORCH_CHECK(seed->device() == like.device(), op, ": seed is on ", seed->device(), " but the input is on ",
                like.device());
    TORCH_CHECK(seed->numel() == 1 && seed->scalar_type() == at::kLong, op, ": seed must be one int64 value");
    return at::Tensor();
  }
  TORCH_CHECK(noise->device() == like.device(), op, ": noise is on ", noise->device(), " but the input is on ",
              like.device());
  TORCH_CHECK(noise->numel() == like.numel(), op, ": noise has ", noise->numel(), " elements but the input has ",
              like.numel());
  return noise->to(at::kFloat).contiguous();
}

const float* latent_noise_ptr(const at::Tensor& noise) { return noise.defined() ? noise.data_ptr<float>() : nullptr; }

const int64_t* latent_seed_ptr(const at::Tensor& noise, const std::optional<at::Tensor>& seed) {
  return noise.defined() ? nullptr : seed->data_ptr<int64_t>();
}

at::Tensor reparameterize_cuda(const at::Tensor& mu_in, const at::Tensor& logvar_in,
                               const std::optional<at::Tensor>& noise_in, const std::optional<at::Tensor>& seed) {
  latent_check_pair("reparameterize", "mu", mu_in, "logvar", logvar_in);
  const c10::cuda::CUDAGuard guard(mu_in.device());
  const at::Tensor mu = mu_in.contiguous(), logvar = logvar_in.contiguous();
  const at::Tensor noise = latent_noise("reparameterize", mu, noise_in, seed);
  at::Tensor out = at::empty(mu.sizes(), mu.options());
  GENFAST_CHECK_LAUNCH(latent::launch_reparameterize(float_type(mu, "reparameterize", "mu"), mu.data_ptr(),
                                                     logvar.data_ptr(), latent_noise_ptr(noise),
                                                     latent_seed_ptr(noise, seed), out.data_ptr(), mu.numel(),
                                                     current_stream()),
                       "reparameterize");
  return out;
}

at::Tensor reparameterize_backward_cuda(const at::Tensor& grad_in, const at::Tensor& logvar_in,
                                        const std::optional<at::Tensor>& noise_in,
                                        const std::optional<at::Tensor>& seed) {
  latent_check_pair("reparameterize_backward", "logvar", logvar_in, "grad", grad_in);
  const c10::cuda::CUDAGuard guard(logvar_in.device());
  // grad is often expanded (stride 0), e.g. from z.sum().backward().
  const at::Tensor grad = grad_in.contiguous(), logvar = logvar_in.contiguous();
  const at::Tensor noise = latent_noise("reparameterize_backward", logvar, noise_in, seed);
  at::Tensor out = at::empty(logvar.sizes(), logvar.options());
  GENFAST_CHECK_LAUNCH(
      latent::launch_reparameterize_backward(float_type(logvar, "reparameterize_backward", "logvar"),
                                             grad.data_ptr(), logvar.data_ptr(), latent_noise_ptr(noise),
                                             latent_seed_ptr(noise, seed), out.data_ptr(), logvar.numel(),
                                             current_stream()),
      "reparameterize_backward");
  return out;
}

at::Tensor gaussian_kl_cuda(const at::Tensor& mu_in, const at::Tensor& logvar_in) {
  latent_check_pair("gaussian_kl", "mu", mu_in, "logvar", logvar_in);
  TORCH_CHECK(mu_in.dim() >= 1, "gaussian_kl: mu must have at least 1 dimension (the batch)");
  const c10::cuda::CUDAGuard guard(mu_in.device());
  const at::Tensor mu = mu_in.contiguous(), logvar = logvar_in.contiguous();
  const int64_t rows = mu.size(0);
  const int64_t cols = rows > 0 ? mu.numel() / rows : 0;
  at::Tensor out = at::empty({rows}, mu.options().dtype(at::kFloat));
  const latent::KlPlan plan = latent::gaussian_kl_plan(rows, cols);
  at::Tensor workspace;
  if (plan.splits > 1) workspace = at::empty({rows * plan.splits}, out.options());
  GENFAST_CHECK_LAUNCH(latent::launch_gaussian_kl(float_type(mu, "gaussian_kl", "mu"), mu.data_ptr(),
                                                  logvar.data_ptr(), out.data_ptr<float>(),
                                                  workspace.defined() ? workspace.data_ptr<float>() : nullptr, rows,
                                                  cols, current_stream()),
                       "gaussian_kl");
  return out;
}

std::tuple<at::Tensor, at::Tensor> gaussian_kl_backward_cuda(const at::Tensor& grad_in, const at::Tensor& mu_in,
                                                             const at::Tensor& logvar_in) {
  latent_check_pair("gaussian_kl_backward", "mu", mu_in, "logvar", logvar_in);
  TORCH_CHECK(mu_in.dim() >= 1, "gaussian_kl_backward: mu must have at least 1 dimension (the batch)");
  TORCH_CHECK(grad_in.device() == mu_in.device(), "gaussian_kl_backward: grad is on ", grad_in.device(),
              " but mu is on ", mu_in.device());
  TORCH_CHECK(grad_in.dim() == 1 && grad_in.size(0) == mu_in.size(0), "gaussian_kl_backward: grad must have shape [",
              mu_in.size(0), "], got ", grad_in.sizes());
  const c10::cuda::CUDAGuard guard(mu_in.device());
  const at::Tensor grad = grad_in.to(at::kFloat).contiguous();
  const at::Tensor mu = mu_in.contiguous(), logvar = logvar_in.contiguous();
  const int64_t rows = mu.size(0);
  const int64_t cols = rows > 0 ? mu.numel() / rows : 0;
  at::Tensor dmu = at::empty(mu.sizes(), mu.options());
  at::Tensor dlogvar = at::empty(logvar.sizes(), logvar.options());
  GENFAST_CHECK_LAUNCH(latent::launch_gaussian_kl_backward(float_type(mu, "gaussian_kl_backward", "mu"),
                                                           grad.data_ptr<float>(), mu.data_ptr(), logvar.data_ptr(),
                                                           dmu.data_ptr(), dlogvar.data_ptr(), rows, cols,
                                                           current_stream()),
                       "gaussian_kl_backward");
  return {dmu, dlogvar};
}

at::Tensor langevin_step_cuda(const at::Tensor& x_in, const at::Tensor& grad_in, double step_size, double noise_scale,
                              double clamp_min, double clamp_max, const std::optional<at::Tensor>& noise_in,
                              const std::optional<at::Tensor>& seed) {
  latent_check_pair("langevin_step", "x", x_in, "grad", grad_in);
  TORCH_CHECK(!(clamp_min >= clamp_max), "langevin_step: clamp_min must be < clamp_max, got ", clamp_min, " and ",
              clamp_max);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous(), grad = grad_in.contiguous();
  const at::Tensor noise = latent_noise("langevin_step", x, noise_in, seed);
  at::Tensor out = at::empty(x.sizes(), x.options());
  GENFAST_CHECK_LAUNCH(latent::launch_langevin_step(float_type(x, "langevin_step", "x"), x.data_ptr(),
                                                    grad.data_ptr(), static_cast<float>(step_size),
                                                    static_cast<float>(noise_scale), static_cast<float>(clamp_min),
                                                    static_cast<float>(clamp_max), latent_noise_ptr(noise),
                                                    latent_seed_ptr(noise, seed), out.data_ptr(), x.numel(),
                                                    current_stream()),
                       "langevin_step");
  return out;
}

// ---------------------------------------------------------------------------------------- attention
std::tuple<at::Tensor, at::Tensor> attention_decode_cuda(const at::Tensor& q, const at::Tensor& k_cache,
                                                         const at::Tensor& v_cache, const at::Tensor& cache_seqlens,
                                                         bool causal, double scale, int64_t window_left,
                                                         int64_t window_right, int64_t num_splits) {
  constexpr const char* op = "attention_decode";
  const genfast::cuda::FloatType dtype = float_type(q, op, "q");
  GENFAST_CHECK_CUDA(q, "attention_decode");
  TORCH_CHECK(q.dim() == 4 && k_cache.dim() == 4, op, ": q and k_cache must be 4-D, got ", q.sizes(), " and ",
              k_cache.sizes());
  TORCH_CHECK(k_cache.sizes() == v_cache.sizes(), op, ": v_cache has shape ", v_cache.sizes(), " but k_cache has ",
              k_cache.sizes());
  TORCH_CHECK(k_cache.scalar_type() == q.scalar_type() && v_cache.scalar_type() == q.scalar_type(), op,
              ": k_cache and v_cache must have q's dtype ", q.scalar_type());
  TORCH_CHECK(k_cache.device() == q.device() && v_cache.device() == q.device() &&
                  cache_seqlens.device() == q.device(),
              op, ": k_cache, v_cache and cache_seqlens must be on q's device");
  const int64_t b = q.size(0), hq = q.size(1), nq = q.size(2), d = q.size(3);
  const int64_t hk = k_cache.size(1), nmax = k_cache.size(2);
  TORCH_CHECK(k_cache.size(0) == b, op, ": k_cache has batch ", k_cache.size(0), " but q has batch ", b);
  TORCH_CHECK(k_cache.size(3) == d, op, ": q and k_cache head dims differ: ", d, " vs ", k_cache.size(3));
  TORCH_CHECK(d >= 1 && d <= genfast::cuda::kDecodeMaxHeadDim, op, ": head dim must be in [1, ",
              genfast::cuda::kDecodeMaxHeadDim, "], got ", d);
  TORCH_CHECK(hk >= 1 && hq % hk == 0, op, ": the query heads Hq=", hq, " must be a multiple of the cache's Hk=", hk);
  TORCH_CHECK(nq >= 1 && nmax >= 1, op, ": need Nq >= 1 new tokens and a cache of Nmax >= 1 slots");
  TORCH_CHECK(cache_seqlens.dim() == 1 && cache_seqlens.size(0) == b &&
                  (cache_seqlens.scalar_type() == at::kInt || cache_seqlens.scalar_type() == at::kLong),
              op, ": cache_seqlens must be a 1-D int32/int64 tensor of ", b, " lengths");
  // -1 asks for batch invariance (a split count from Nmax alone), 0 for the occupancy choice, > 0 for that count.
  TORCH_CHECK(num_splits >= -1 && num_splits <= 65535, op, ": num_splits must be in [-1, 65535], got ", num_splits);
  TORCH_CHECK(window_left >= -1 && window_right >= -1, op, ": window sides must be >= -1");
  const c10::cuda::CUDAGuard guard(q.device());
  const at::Tensor lengths = cache_seqlens.contiguous();
  at::Tensor out = at::empty({b, hq, nq, d}, q.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor lse = at::empty({b, hq, nq}, q.options().dtype(at::kFloat));
  if (out.numel() == 0) return {out, lse};
  genfast::cuda::DecodeShape shape{b, hq, hk, nq, nmax, d, {}, {}, {}};
  for (int i = 0; i < 4; ++i) {
    shape.q_stride[i] = q.stride(i);
    shape.k_stride[i] = k_cache.stride(i);
    shape.v_stride[i] = v_cache.stride(i);
  }
  const int64_t splits = num_splits > 0   ? num_splits
                         : num_splits < 0 ? genfast::cuda::decode_num_splits_invariant(shape)
                                          : genfast::cuda::decode_num_splits(shape, q.get_device());
  at::Tensor workspace = at::empty({genfast::cuda::decode_workspace_floats(shape, splits)}, lse.options());
  GENFAST_CHECK_LAUNCH(genfast::cuda::launch_attention_decode(
                           q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), dtype, lengths.data_ptr(),
                           lengths.scalar_type() == at::kLong, shape, causal, static_cast<float>(scale), window_left,
                           window_right, splits, workspace.data_ptr<float>(), out.data_ptr(), lse.data_ptr<float>(),
                           current_stream()),
                       "attention_decode");
  return {out, lse};
}


// ---------------------------------------------------------------------------------------- conv_transpose
// The activation names of genfast/ops/conv_transpose.py, in the kernel's codes.
genfast::cuda::ConvActivation conv_activation(c10::string_view name) {
  using genfast::cuda::ConvActivation;
  if (name == "none") return ConvActivation::kNone;
  if (name == "relu") return ConvActivation::kRelu;
  if (name == "leaky_relu") return ConvActivation::kLeakyRelu;
  if (name == "tanh") return ConvActivation::kTanh;
  if (name == "sigmoid") return ConvActivation::kSigmoid;
  if (name == "silu") return ConvActivation::kSilu;
  if (name == "gelu") return ConvActivation::kGelu;
  TORCH_CHECK(false, "conv_transpose2d: activation must be one of none, relu, leaky_relu, tanh, sigmoid, silu, gelu, "
              "got '", std::string(name.data(), name.size()), "'");
}

// A pair of ints, each >= minimum.
void conv_pair(const char* name, at::IntArrayRef values, int64_t minimum) {
  TORCH_CHECK(values.size() == 2, "conv_transpose2d: ", name, " must have 2 values (h, w), got ", values);
  TORCH_CHECK(values[0] >= minimum && values[1] >= minimum, "conv_transpose2d: ", name, " must be >= ", minimum,
              ", got ", values);
}

// An optional per-output-channel vector: 1-D, C_out elements, on x's device.
void conv_channel_vector(const char* name, const std::optional<at::Tensor>& t, const at::Tensor& x, int64_t c_out) {
  if (!t.has_value()) return;
  TORCH_CHECK(t->device() == x.device(), "conv_transpose2d: ", name, " is on ", t->device(), " but x is on ",
              x.device());
  TORCH_CHECK(t->dim() == 1 && t->size(0) == c_out, "conv_transpose2d: ", name, " must have shape [C_out = ", c_out,
              "], got ", t->sizes());
  TORCH_CHECK(at::isFloatingType(t->scalar_type()), "conv_transpose2d: ", name, " must be a float tensor, got ",
              t->scalar_type());
}

std::tuple<at::Tensor, at::Tensor> conv_transpose2d_cuda(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef output_padding, int64_t groups, at::IntArrayRef dilation,
    const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& shift, c10::string_view activation,
    double negative_slope, bool save_pre) {
  constexpr const char* op = "conv_transpose2d";
  GENFAST_CHECK_CUDA(x, "conv_transpose2d");
  const genfast::cuda::FloatType dtype = float_type(x, op, "x");
  TORCH_CHECK(x.dim() == 4, op, ": x must be 4-D [N, C_in, H, W], got shape ", x.sizes());
  TORCH_CHECK(weight.dim() == 4, op, ": weight must be 4-D [C_in, C_out/groups, KH, KW], got shape ", weight.sizes());
  TORCH_CHECK(weight.device() == x.device(), op, ": weight is on ", weight.device(), " but x is on ", x.device());
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), op, ": weight has dtype ", weight.scalar_type(),
              " but x has dtype ", x.scalar_type());
  TORCH_CHECK(groups >= 1 && groups <= genfast::cuda::kConvTransposeMaxGridYZ, op, ": groups must be in [1, ",
              genfast::cuda::kConvTransposeMaxGridYZ, "], got ", groups);
  const int64_t n = x.size(0), c_in = x.size(1), h = x.size(2), w = x.size(3);
  TORCH_CHECK(weight.size(0) == c_in, op, ": weight must be [C_in=", c_in, ", C_out/groups, KH, KW], got shape ",
              weight.sizes());
  TORCH_CHECK(c_in % groups == 0, op, ": in_channels (", c_in, ") must be divisible by groups (", groups, ")");
  TORCH_CHECK(c_in >= 1 && h >= 1 && w >= 1, op, ": x must have channels and a non-empty image, got shape ",
              x.sizes());
  TORCH_CHECK(weight.size(1) >= 1 && weight.size(2) >= 1 && weight.size(3) >= 1, op,
              ": weight must have no empty dimension, got shape ", weight.sizes());
  conv_pair("stride", stride, 1);
  conv_pair("padding", padding, 0);
  conv_pair("output_padding", output_padding, 0);
  conv_pair("dilation", dilation, 1);
  TORCH_CHECK(stride[0] * stride[1] <= genfast::cuda::kConvTransposeMaxGridYZ, op,
              ": stride_h * stride_w must be at most ", genfast::cuda::kConvTransposeMaxGridYZ, ", got stride ",
              stride);
  const int64_t cog = weight.size(1), c_out = cog * groups;
  int64_t out_size[2];
  for (int d = 0; d < 2; ++d) {
    TORCH_CHECK(output_padding[d] < std::max(stride[d], dilation[d]), op,
                ": output_padding must be smaller than either stride or dilation, got output_padding=",
                output_padding, ", stride=", stride, ", dilation=", dilation);
    out_size[d] = genfast::cuda::conv_transpose_output_size(x.size(2 + d), weight.size(2 + d), stride[d], padding[d],
                                                            output_padding[d], dilation[d]);
    TORCH_CHECK(out_size[d] >= 1, op, ": the output would be empty (size ", out_size[d], " along spatial dim ", d,
                "): padding ", padding, " is too large for input ", x.sizes().slice(2), " and kernel ",
                weight.sizes().slice(2));
  }
  if (bias.has_value()) {
    conv_channel_vector("bias", bias, x, c_out);
    TORCH_CHECK(bias->scalar_type() == x.scalar_type(), op, ": bias has dtype ", bias->scalar_type(),
                " but x has dtype ", x.scalar_type());
  }
  conv_channel_vector("scale", scale, x, c_out);
  conv_channel_vector("shift", shift, x, c_out);
  const genfast::cuda::ConvActivation act = conv_activation(activation);

  const c10::cuda::CUDAGuard guard(x.device());
  // The output (and pre) in x's layout: channels_last when x is, as the Triton kernel and the fake impl decide.
  const bool channels_last = !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast);
  const auto options = x.options().memory_format(channels_last ? at::MemoryFormat::ChannelsLast
                                                               : at::MemoryFormat::Contiguous);
  at::Tensor out = at::empty({n, c_out, out_size[0], out_size[1]}, options);
  at::Tensor pre = save_pre ? at::empty({n, c_out, out_size[0], out_size[1]}, options) : at::empty({0}, x.options());
  if (out.numel() == 0) return {out, pre};
  // weight as [KH, KW, C_in, C_out/groups] in memory (viewed back in torch's order): the B tile's output channels
  // become contiguous. A small copy per call, as in the Triton launcher.
  const at::Tensor w_t = weight.permute({2, 3, 0, 1}).contiguous().permute({2, 3, 0, 1});
  const at::Tensor bias_c = bias.has_value() ? bias->contiguous() : at::Tensor();
  const at::Tensor scale_f = scale.has_value() ? scale->to(at::kFloat).contiguous() : at::Tensor();
  const at::Tensor shift_f = shift.has_value() ? shift->to(at::kFloat).contiguous() : at::Tensor();

  genfast::cuda::ConvTransposeShape shape{};
  shape.batch = n;
  shape.in_channels = c_in;
  shape.height = h;
  shape.width = w;
  shape.out_channels_per_group = cog;
  shape.kernel_h = weight.size(2);
  shape.kernel_w = weight.size(3);
  shape.groups = groups;
  shape.out_height = out_size[0];
  shape.out_width = out_size[1];
  for (int d = 0; d < 2; ++d) {
    shape.stride[d] = stride[d];
    shape.padding[d] = padding[d];
    shape.dilation[d] = dilation[d];
  }
  for (int d = 0; d < 4; ++d) {
    shape.x_stride[d] = x.stride(d);
    shape.w_stride[d] = w_t.stride(d);
    shape.out_stride[d] = out.stride(d);
    shape.pre_stride[d] = save_pre ? pre.stride(d) : 0;
  }
  genfast::cuda::ConvTransposeEpilogue epilogue{};
  epilogue.bias = bias_c.defined() ? bias_c.data_ptr() : nullptr;
  epilogue.scale = scale_f.defined() ? scale_f.data_ptr<float>() : nullptr;
  epilogue.shift = shift_f.defined() ? shift_f.data_ptr<float>() : nullptr;
  epilogue.activation = act;
  epilogue.negative_slope = static_cast<float>(negative_slope);
  epilogue.pre = save_pre ? pre.data_ptr() : nullptr;
  GENFAST_CHECK_LAUNCH(genfast::cuda::launch_conv_transpose2d(x.data_ptr(), w_t.data_ptr(), dtype, shape, epilogue,
                                                              out.data_ptr(), current_stream()),
                       "conv_transpose2d");
  return {out, pre};
}

}  // namespace

TORCH_LIBRARY_IMPL(genfast, CUDA, m) {
  m.impl("philox_noise", &philox_noise_cuda);

  // sampling ops (registered below this line)
  m.impl("filter_logits", &filter_logits_cuda);
  m.impl("sample_tokens", &sample_tokens_cuda);

  // diffusion ops (registered below this line)
  m.impl("scheduler_step", &scheduler_step_cuda);
  m.impl("cfg_combine", &cfg_combine_cuda);

  // latent ops (registered below this line)
  m.impl("reparameterize", &reparameterize_cuda);
  m.impl("reparameterize_backward", &reparameterize_backward_cuda);
  m.impl("gaussian_kl", &gaussian_kl_cuda);
  m.impl("gaussian_kl_backward", &gaussian_kl_backward_cuda);
  m.impl("langevin_step", &langevin_step_cuda);

  // attention ops (registered below this line)
  m.impl("attention_decode", &attention_decode_cuda);

  // conv_transpose ops (registered below this line)
  m.impl("conv_transpose2d", &conv_transpose2d_cuda);
}

// TORCH_LIBRARY_IMPL(genfast, CUDA) of the latent family: reparameterize, gaussian_kl (each with its
// backward) and langevin_step. Checks each call's tensors, then calls the torch-free launchers of
// csrc/cuda/latent.cuh on the current stream.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "../latent.cuh"
#include "common.h"

namespace {

using genfast::cuda_bindings::current_stream;
using genfast::cuda_bindings::float_type;

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

}  // namespace

TORCH_LIBRARY_IMPL(genfast, CUDA, m) {
  m.impl("reparameterize", &reparameterize_cuda);
  m.impl("reparameterize_backward", &reparameterize_backward_cuda);
  m.impl("gaussian_kl", &gaussian_kl_cuda);
  m.impl("gaussian_kl_backward", &gaussian_kl_backward_cuda);
  m.impl("langevin_step", &langevin_step_cuda);
}

// genfast._C: the op schemas of every genfast custom op, and the Python module that loads them.
//
// Schemas live here, in one place, so that the CPU kernels (csrc/cpu), the CUDA kernels
// (csrc/cuda/bindings/) and the Python side (fake implementations, autograd, Triton twins named
// <op>_triton) all agree on one signature per op. Conventions shared by the ops:
//   - `seed` is an int64 tensor of one element on the op's device: the Philox seed (csrc/philox.h).
//     Reading it on the device, not as a Python int, keeps the host out of the loop.
//   - `noise` replaces in-kernel noise where the caller gives it (tests give both paths the same).
//     Exactly one of `noise` and `seed` is given to a stochastic op.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// A module with no methods: importing it runs the static TORCH_LIBRARY registrations below and in
// the kernel files. No pybind11, which keeps the build small.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(genfast, m) {
  // Philox stream, exposed so tests can check each backend's generator against genfast/_philox.py.
  m.def("philox_noise(Tensor seed, int numel, int offset, bool normal) -> Tensor");

  // Token sampling. Per-row knobs are 1-D tensors of B elements: temperature/top_p/min_p float32,
  // top_k int64. Repetition penalty is applied before these ops (genfast/ops/sampling.py). The second
  // output is int32 [B]: each row's value flags (csrc/common/sampling.h), set while the kernel reads it.
  // sample_tokens' `seed` holds 1 value or B (per-row seeds); row b's noise is Philox(seed_b, step_b * V + col)
  // with step_b = offsets[b] when `offsets` (int64 [B]) is given, else b.
  m.def(
      "filter_logits(Tensor logits, Tensor temperature, Tensor top_k, Tensor top_p, Tensor min_p) -> "
      "(Tensor, Tensor)");
  m.def(
      "sample_tokens(Tensor logits, Tensor temperature, Tensor top_k, Tensor top_p, Tensor min_p, "
      "Tensor? noise, Tensor? seed, Tensor? offsets=None) -> (Tensor, Tensor)");

  // Diffusion: one scheduler step, with classifier-free guidance fused when `model_output_uncond`
  // is given. `coefs` (float32, 11 values) is laid out in genfast/ops/diffusion.py.
  m.def(
      "scheduler_step(Tensor sample, Tensor model_output, Tensor? model_output_uncond, float guidance_scale, "
      "Tensor coefs, Tensor? noise, Tensor? seed) -> Tensor");
  m.def("cfg_combine(Tensor uncond, Tensor cond, float guidance_scale) -> Tensor");

  // Latent-variable sampling.
  m.def("reparameterize(Tensor mu, Tensor logvar, Tensor? noise, Tensor? seed) -> Tensor");
  m.def("reparameterize_backward(Tensor grad, Tensor logvar, Tensor? noise, Tensor? seed) -> Tensor");
  m.def("gaussian_kl(Tensor mu, Tensor logvar) -> Tensor");
  m.def("gaussian_kl_backward(Tensor grad, Tensor mu, Tensor logvar) -> (Tensor, Tensor)");
  m.def(
      "langevin_step(Tensor x, Tensor grad, float step_size, float noise_scale, float clamp_min, float clamp_max, "
      "Tensor? noise, Tensor? seed) -> Tensor");

  // Attention decode over a KV cache (genfast/ops/attention_decode.py): q [B, Hq, Nq, D], caches
  // [B, Hk, Nmax, D], cache_seqlens int32/int64 [B]; num_splits 0 = chosen for the machine, -1 =
  // batch-invariant (a function of Nmax, D and the dtype only, merged in a fixed order).
  // window_left/window_right are the bounds resolved by the one window rule (genfast/ops/_attention_common.py,
  // window_bounds): new token i at position p sees keys p - window_left <= j <= p + window_right, both >= 0 (an
  // unbounded side is a distance no position reaches); `causal` is already folded in as window_right = 0, and the
  // kernels only check that the two agree.
  // Returns (out [B, Hq, Nq, D], lse [B, Hq, Nq] float32).
  // Paged caches: with `block_table` (int32 [B, max_blocks_per_seq]) the caches are [num_blocks, Hk, block_size, D]
  // (block_size a power of two, 16 to 256) and sequence b's logical slot j is slot j % block_size of block
  // block_table[b, j / block_size]; Nmax = max_blocks_per_seq * block_size is the logical capacity the lengths and
  // the batch-invariant split count refer to. Entries are clamped to [0, num_blocks) when read (the Python op
  // validates the ones a sequence needs), so no entry can make a kernel read outside the caches.
  m.def(
      "attention_decode(Tensor q, Tensor k_cache, Tensor v_cache, Tensor cache_seqlens, bool causal, float scale, "
      "int window_left, int window_right, int num_splits, Tensor? block_table=None) -> (Tensor, Tensor)");
  // In place: k_cache[b, :, L_b + t] = k_new[b, :, t] (same for v) with L = cache_seqlens; slots outside
  // [0, Nmax) are dropped. CPU kernel in csrc/cpu/attention_decode.cpp (GPUs use the Triton twin). With
  // `block_table` (as above) the logical slot L_b + t is written, and a token whose block entry is outside
  // [0, num_blocks) is dropped (never clamped: a write must not land in another sequence's block).
  m.def(
      "kv_cache_append(Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor k_new, Tensor v_new, "
      "Tensor cache_seqlens, Tensor? block_table=None) -> ()");

  // Transposed convolution with a fused epilogue (genfast/ops/conv_transpose.py), the signature of its Triton
  // twin conv_transpose2d_triton: x [N, C_in, H, W], weight [C_in, C_out/groups, KH, KW], bias [C_out] in x's
  // dtype; scale, shift [C_out] any float dtype; activation "none", "relu", "leaky_relu", "tanh", "sigmoid",
  // "silu" or "gelu". Returns (act((conv + bias) * scale + shift), conv + bias when save_pre else an empty
  // tensor), both in x's dtype and memory format.
  m.def(
      "conv_transpose2d(Tensor x, Tensor weight, Tensor? bias, int[] stride, int[] padding, int[] output_padding, "
      "int groups, int[] dilation, Tensor? scale, Tensor? shift, str activation, float negative_slope, "
      "bool save_pre) -> (Tensor, Tensor)");

  // Fused LSTM cell (genfast/ops/lstm.py): x_gates, h_gates [B, 4H] in nn.LSTM's gate order (i, f, g, o), one
  // float dtype; c [B, H] in that dtype or float32. Returns (h in the gates' dtype, c_new in c's dtype). The
  // backward returns (the gradient of the gates, shared by x_gates and h_gates, and of c).
  m.def("lstm_cell(Tensor x_gates, Tensor h_gates, Tensor c) -> (Tensor, Tensor)");
  m.def(
      "lstm_cell_backward(Tensor grad_h, Tensor grad_c, Tensor x_gates, Tensor h_gates, Tensor c) -> "
      "(Tensor, Tensor)");
}

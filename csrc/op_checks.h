// Argument checks shared by the CPU kernels (csrc/cpu) and the CUDA bindings (csrc/cuda/bindings/).
// The Python ops check everything first with friendlier messages; these guard direct torch.ops calls,
// so that nothing reaches a kernel with a shape, dtype or device it does not expect.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>

namespace genfast {

// logits [B, V] float32/float16/bfloat16 and the per-row knobs: four 1-D tensors of B values on the
// logits' device (temperature, top_p, min_p float32; top_k int64).
inline void check_sampling_args(const char* op, const at::Tensor& logits, const at::Tensor& temperature,
                                const at::Tensor& top_k, const at::Tensor& top_p, const at::Tensor& min_p) {
  TORCH_CHECK(logits.dim() == 2, op, ": logits must be 2-D [B, V], got ", logits.sizes());
  const at::ScalarType dtype = logits.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16, op,
              ": logits must be float32, float16 or bfloat16, got ", dtype);
  const int64_t batch = logits.size(0);
  const at::Tensor* knobs[] = {&temperature, &top_k, &top_p, &min_p};
  const char* names[] = {"temperature", "top_k", "top_p", "min_p"};
  for (int i = 0; i < 4; ++i) {
    const at::ScalarType want = i == 1 ? at::kLong : at::kFloat;
    const at::Tensor& t = *knobs[i];
    TORCH_CHECK(t.dim() == 1 && t.size(0) == batch && t.scalar_type() == want && t.device() == logits.device(), op,
                ": ", names[i], " must be a 1-D tensor of ", batch, " ", at::toString(want),
                " values on the logits' device");
  }
}

// Exactly one of `noise` (float32, the shape and device of `like`) and `seed` (one int64 on that device).
inline void check_noise_or_seed(const char* op, const at::Tensor& like, const std::optional<at::Tensor>& noise,
                                const std::optional<at::Tensor>& seed) {
  TORCH_CHECK(noise.has_value() != seed.has_value(), op, ": pass exactly one of noise and seed");
  if (noise.has_value()) {
    TORCH_CHECK(noise->sizes() == like.sizes() && noise->scalar_type() == at::kFloat && noise->device() == like.device(),
                op, ": noise must be float32 with the input's shape and device");
  } else {
    TORCH_CHECK(seed->numel() == 1 && seed->scalar_type() == at::kLong && seed->device() == like.device(), op,
                ": seed must be one int64 value on the input's device");
  }
}

// sample_tokens' noise source: `noise`, or `seed` holding 1 int64 (one stream for the batch: row b's counter block
// is b) or one per row (1-D, B values); `offsets` (with `seed` only) int64 [B]: row b's counter block. All on the
// logits' device (the op moves CPU seeds there).
inline void check_sampling_noise_or_seeds(const char* op, const at::Tensor& logits,
                                          const std::optional<at::Tensor>& noise, const std::optional<at::Tensor>& seed,
                                          const std::optional<at::Tensor>& offsets) {
  const int64_t batch = logits.size(0);
  if (!seed.has_value() || seed->numel() == 1) {
    check_noise_or_seed(op, logits, noise, seed);
  } else {
    TORCH_CHECK(!noise.has_value(), op, ": pass exactly one of noise and seed");
    TORCH_CHECK(seed->dim() == 1 && seed->size(0) == batch && seed->scalar_type() == at::kLong &&
                    seed->device() == logits.device(),
                op, ": seed must hold 1 or ", batch, " (one per row) int64 values on the logits' device, got shape ",
                seed->sizes());
  }
  if (offsets.has_value()) {
    TORCH_CHECK(seed.has_value(), op, ": offsets needs seed");
    TORCH_CHECK(offsets->dim() == 1 && offsets->size(0) == batch && offsets->scalar_type() == at::kLong &&
                    offsets->device() == logits.device(),
                op, ": offsets must be a 1-D tensor of ", batch, " int64 values on the logits' device");
  }
}

}  // namespace genfast

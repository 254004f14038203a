// CPU kernel of genfast::philox_noise: the shared Philox stream (csrc/philox.h) as a tensor. Normals come from
// csrc/cpu/philox_simd.h, eight or sixteen Philox calls side by side (the scheduler step draws its noise through the
// same code), which is what puts it level with torch.randn's own vectorised Box-Muller.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cstdint>

#include "../philox.h"
#include "philox_simd.h"

namespace {

at::Tensor philox_noise_cpu(const at::Tensor& seed, int64_t numel, int64_t offset, bool normal) {
  TORCH_CHECK(seed.numel() == 1 && seed.scalar_type() == at::kLong, "philox_noise: seed must be one int64 value");
  TORCH_CHECK(numel >= 0 && offset >= 0, "philox_noise: numel and offset must be non-negative");
  // Element indices are int64: past the end of the stream offset + i would wrap to the first elements.
  TORCH_CHECK(offset <= INT64_MAX - numel, "philox_noise: offset + numel must be <= 2**63 - 1, got offset=", offset,
              " and numel=", numel);
  const uint64_t s = static_cast<uint64_t>(seed.item<int64_t>());
  at::Tensor out = at::empty({numel}, seed.options().dtype(at::kFloat));
  float* data = out.data_ptr<float>();
  // Threads only past 64K elements: below that, waking them costs more than drawing the numbers.
  at::parallel_for(0, numel, 65536, [&](int64_t begin, int64_t end) {
    if (normal) {  // four normals per Philox call
      genfast::cpu::fill_normals(s, offset + begin, end - begin, data + begin);
      return;
    }
    for (int64_t i = begin; i < end; ++i) data[i] = genfast::philox_uniform(s, static_cast<uint64_t>(offset + i));
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(genfast, CPU, m) { m.impl("philox_noise", &philox_noise_cpu); }

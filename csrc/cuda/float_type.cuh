// The storage types the CUDA kernels read and write; they all compute in float32.
#pragma once

namespace genfast::cuda {

enum class FloatType { kFloat32, kFloat16, kBFloat16 };

}  // namespace genfast::cuda

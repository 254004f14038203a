// Launchers of genfast::conv_transpose2d (torch-free: raw pointers, sizes, strides, a stream).
// Semantics: genfast/ops/conv_transpose.py (conv_transpose2d_ref is the spec); algorithm: csrc/cuda/conv_transpose.cu,
// the same phase decomposition as the Triton kernel in genfast/kernels/conv_transpose.py.
//
//   pre = conv_transpose2d(x, weight) + bias            (kept in `pre` when it is non-null)
//   out = act(pre * scale + shift)                      (scale, shift per output channel; each optional)
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "float_type.cuh"

namespace genfast::cuda {

// The epilogue's activation; the codes are those of ACTIVATIONS in genfast/kernels/conv_transpose.py.
enum class ConvActivation : int { kNone = 0, kRelu = 1, kLeakyRelu = 2, kTanh = 3, kSigmoid = 4, kSilu = 5, kGelu = 6 };

// CUDA grid axes 1 and 2 carry the stride_h * stride_w phases and the groups: each at most this many.
constexpr int64_t kConvTransposeMaxGridYZ = 65535;

// Output length along one spatial axis, torch's formula (may be < 1 for invalid arguments: callers check).
inline int64_t conv_transpose_output_size(int64_t size, int64_t kernel, int64_t stride, int64_t padding,
                                          int64_t output_padding, int64_t dilation) {
  return (size - 1) * stride - 2 * padding + dilation * (kernel - 1) + output_padding + 1;
}

struct ConvTransposeShape {
  int64_t batch, in_channels, height, width;         // x: [N, C_in, H, W]
  int64_t out_channels_per_group, kernel_h, kernel_w;  // weight: [C_in, C_out / groups, KH, KW]
  int64_t groups;
  int64_t out_height, out_width;  // conv_transpose_output_size of each axis (output_padding is folded in here)
  int64_t stride[2], padding[2], dilation[2];  // (h, w)
  // Element strides in [N, C, H, W] order for x, out and pre, in [C_in, C_out/groups, KH, KW] order for weight.
  // Any strides work (NCHW, channels_last, views); contiguous channels of x / weight's output channels are fastest.
  int64_t x_stride[4], w_stride[4], out_stride[4], pre_stride[4];
};

struct ConvTransposeEpilogue {
  const void* bias;    // [C_out] in the data dtype, or null
  const float* scale;  // [C_out] float32, or null
  const float* shift;  // [C_out] float32, or null
  ConvActivation activation;
  float negative_slope;  // leaky_relu only
  void* pre;             // [N, C_out, OH, OW] in the data dtype (strides in shape.pre_stride), or null: not kept
};

// x, weight, out (and pre, bias) hold `dtype` elements. fp16/bf16 multiply on tensor cores (WMMA, fp32
// accumulation); fp32 runs exact fp32 FMAs on the CUDA cores. Returns cudaErrorInvalidValue for a shape the
// kernel cannot take (checked by the bindings first, with clear messages), else the launch's error.
cudaError_t launch_conv_transpose2d(const void* x, const void* weight, FloatType dtype, const ConvTransposeShape& shape,
                                    const ConvTransposeEpilogue& epilogue, void* out, cudaStream_t stream);

}  // namespace genfast::cuda

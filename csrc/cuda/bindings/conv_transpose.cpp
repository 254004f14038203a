// TORCH_LIBRARY_IMPL(genfast, CUDA) of the conv_transpose family: conv_transpose2d with its fused epilogue.
// Checks each call's tensors, then calls the torch-free launchers of csrc/cuda/conv_transpose.cuh on the
// current stream.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/string_view.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <string>
#include <tuple>

#include "../conv_transpose.cuh"
#include "common.h"

namespace {

using genfast::cuda_bindings::current_stream;
using genfast::cuda_bindings::float_type;

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
  m.impl("conv_transpose2d", &conv_transpose2d_cuda);
}

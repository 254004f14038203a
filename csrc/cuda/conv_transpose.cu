// CUDA kernel of genfast::conv_transpose2d: a transposed convolution as stride_h * stride_w implicit GEMMs, with
// the bias / scale / shift / activation epilogue fused. Written for clarity over the last bit of speed.
//
// Phase decomposition (the same as genfast/kernels/conv_transpose.py). Along one axis, output position
//   o = p + s * j        (p = o mod s is the output's *phase*, 0 <= p < s; j indexes the phase's own grid)
// receives input position i through tap k exactly when o + pad - k * dil = i * s. For a fixed phase that needs
//   k * dil = p + pad   (mod s),
// which holds for no tap, or for the taps k0, k0 + step, k0 + 2 step, ... < K, with step = s / gcd(s, dil) and
// k0 the smallest solution (it lies in [0, step)). Each such tap reads the input at
//   i = j + (p + pad - k * dil) / s      (an exact division, by the choice of k),
// i.e. at a *fixed offset* from j. So within one phase (ph, pw) the transposed convolution is a dense, stride-1
// correlation over the phase's taps, which is the implicit GEMM
//   out[n, g * Cog + co, ph + sh * jh, pw + sw * jw] = sum over taps (kh, kw) and ci < Cig of
//       x[n, g * Cig + ci, jh + dh(kh), jw + dw(kw)] * weight[g * Cig + ci, co, kh, kw]
// with  M = N * OHp * OWp  rows (the phase's output pixels (n, jh, jw)),
//       N = C_out / groups  columns (output channels co of group g),
//       K = (C_in / groups) * taps(ph) * taps(pw).
// No zero is inserted between input pixels and no multiply-add is issued for a tap that cannot reach the phase;
// the only masked work is at the image border (an input position outside [0, H) x [0, W)), as in any implicit
// GEMM, and in the ragged last tile.
//
// Grid and tiles:
//   blockIdx.z = group g, blockIdx.y = phase ph * sw + pw,
//   blockIdx.x = (tile of kBlockM rows of this phase's M) * n_tiles + (tile of kBlockN columns of C_out / groups).
//   The x axis is sized for the largest phase; blocks past a smaller phase's last row return at once.
//   The K loop walks the phase's taps (kh outer, kw inner) and, per tap, the group's input channels in chunks of
//   kBlockK: A [kBlockM x kBlockK] is gathered from x (row m -> input pixel of (n, jh, jw) at this tap, column
//   -> channel), B [kBlockK x kBlockN] from weight; both go through shared memory in the data dtype.
//   fp16/bf16: 4 warps in a 2 x 2 layout, each a 32 x 32 sub-tile of 2 x 2 WMMA 16x16x16 fragments (mma.sync on
//   tensor cores, fp32 accumulation). fp32: each of the 128 threads accumulates an 8 x 4 micro-tile with FMAs.
//   Both write their fp32 tile to shared memory, and one epilogue adds the bias, stores pre if asked, applies
//   scale, shift and the activation, and stores in the output's dtype through its strides.
// Every offset into x, weight, out and pre is int64. Loads and stores pick the thread order that makes the
// contiguous dimension fastest (channels for channels_last, pixels for NCHW), which keeps them coalesced.
//
// Status: a secondary path, run when the "cuda" backend is named; `auto` takes the Triton kernel. The SASS shows
// why (cuobjdump -sass, nvcc 13, sm_90a and sm_80 alike): per K step this kernel issues HMMA (mma.sync) from
// synchronous LDG -> STS staging in one buffer (no LDGSTS/cp.async, a barrier pair per step), fp16 fragments
// come through LDSM but bf16 ones through LDS + MOVM; the Triton kernel compiles to wgmma (HGMMA) on sm_90a fed by
// a 3-4 stage 16-byte cp.async pipeline (and mma.sync with the same pipeline on sm_80). Catching up means
// ldmatrix for both dtypes (raw mma.sync instead of WMMA, whose bf16 load has no ldmatrix form) and a
// double-buffered cp.async pipeline; that rewrite waits for a GPU to test and time it on.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <algorithm>
#include <type_traits>

#include "float_convert.cuh"
#include "conv_transpose.cuh"

// WMMA for fp16 and bf16 needs sm_80 (bf16 fragments); older targets run the fp32-accumulating SIMT path.
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
#define GENFAST_CONV_TENSOR_CORES 1
#else
#define GENFAST_CONV_TENSOR_CORES 0
#endif

namespace genfast::cuda {
namespace {

constexpr int kThreads = 128;  // 4 warps
constexpr int kBlockM = 64;    // output pixels of one phase per block
constexpr int kBlockN = 64;    // output channels of one group per block
constexpr int kBlockK = 32;    // input channels per K step (of one tap)
// Row padding of the shared tiles, in elements: WMMA needs leading dimensions that are multiples of 8 (16-bit
// types) or 4 (fp32), and fragment pointers 32-byte aligned, which these keep for every fragment (see Smem).
constexpr int kPadAB = 8;
constexpr int kPadC = 4;
constexpr int kLdA = kBlockK + kPadAB;
constexpr int kLdB = kBlockN + kPadAB;
constexpr int kLdC = kBlockN + kPadC;

// SIMT micro-tile: thread t owns rows (t / 16) + 8 * i (i < 8) and columns (t % 16) + 16 * j (j < 4).
constexpr int kSimtRowThreads = 8;
constexpr int kSimtColThreads = 16;
constexpr int kSimtRows = kBlockM / kSimtRowThreads;
constexpr int kSimtCols = kBlockN / kSimtColThreads;
static_assert(kSimtRowThreads * kSimtColThreads == kThreads, "SIMT thread layout covers the block");
// WMMA layout: warp w owns the 32 x 32 sub-tile at rows 32 * (w / 2), columns 32 * (w % 2).
constexpr int kWarpTile = 32;
constexpr int kFrag = 16;
static_assert((kBlockM / kWarpTile) * (kBlockN / kWarpTile) * 32 == kThreads, "one 32 x 32 sub-tile per warp");
static_assert(kBlockK % kFrag == 0, "K step is a whole number of WMMA fragments");

constexpr float kInvSqrt2 = 0.7071067811865476f;

__host__ __device__ __forceinline__ int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The epilogue's activation in fp32, as the Triton kernel and the reference define it (gelu: exact, erf form;
// relu'(0) conventions do not matter here, only the values).
__device__ __forceinline__ float activate(float z, ConvActivation act, float negative_slope) {
  switch (act) {
    case ConvActivation::kNone:
      return z;
    case ConvActivation::kRelu:
      return z > 0.f ? z : 0.f;
    case ConvActivation::kLeakyRelu:
      return z > 0.f ? z : z * negative_slope;
    case ConvActivation::kTanh:
      return tanhf(z);
    case ConvActivation::kSigmoid:
      return 1.f / (1.f + expf(-z));
    case ConvActivation::kSilu:
      return z / (1.f + expf(-z));
    case ConvActivation::kGelu:
      return 0.5f * z * (1.f + erff(z * kInvSqrt2));
  }
  return z;
}

// The taps of one output phase along one axis: k = first + t * step for t < count (see the file comment).
struct AxisTaps {
  int64_t first, count;
};

__device__ AxisTaps phase_taps(int64_t phase, int64_t pad, int64_t dil, int64_t stride, int64_t step,
                               int64_t kernel) {
  const int64_t r = (phase + pad) % stride;
  for (int64_t k = 0; k < step && k < kernel; ++k) {
    if ((k * dil) % stride == r) return {k, cdiv(kernel - k, step)};
  }
  return {0, 0};
}

struct Args {
  ConvTransposeShape shape;
  ConvTransposeEpilogue epilogue;
  int64_t step_h, step_w;    // stride / gcd(stride, dilation) per axis: the spacing of a phase's taps
  int64_t n_tiles;           // tiles of kBlockN over C_out / groups
  bool x_channels_fastest;   // x's channel stride is 1 (channels_last): gather A along channels
  bool out_channels_fastest; // out's channel stride is 1: store the epilogue along channels
};

// Shared memory of one block (static, < 48 KiB for every T). Offsets of a, b and c are multiples of 32 bytes
// for 2-byte T (a: 0, b: 5120, c: 9728), as WMMA's fragment loads and stores require.
template <typename T>
struct Smem {
  T a[kBlockM][kLdA];         // x gathered for this K step: row = output pixel of the phase, column = channel
  T b[kBlockK][kLdB];         // weight for this K step: row = input channel, column = output channel
  float c[kBlockM][kLdC];     // the fp32 accumulator tile, for the epilogue
  int64_t row_image[kBlockM]; // n of each row, -1 for rows past M
  int64_t row_jh[kBlockM];    // the row's position (jh, jw) in the phase's output grid
  int64_t row_jw[kBlockM];
  int64_t row_x[kBlockM];     // offset of the row's input pixel at the current tap, -1 outside the image
};

#if GENFAST_CONV_TENSOR_CORES
// acc[i][j] += A[rows 32 wm + 16 i, all K] x B[all K, columns 32 wn + 16 j] for this warp, on tensor cores.
template <typename T>
__device__ __forceinline__ void mma_step_wmma(
    const Smem<T>& s, int wm, int wn,
    nvcuda::wmma::fragment<nvcuda::wmma::accumulator, kFrag, kFrag, kFrag, float> (&acc)[2][2]) {
  using namespace nvcuda;
#pragma unroll
  for (int kk = 0; kk < kBlockK; kk += kFrag) {
    wmma::fragment<wmma::matrix_a, kFrag, kFrag, kFrag, T, wmma::row_major> fa[2];
    wmma::fragment<wmma::matrix_b, kFrag, kFrag, kFrag, T, wmma::row_major> fb[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) wmma::load_matrix_sync(fa[i], &s.a[wm * kWarpTile + i * kFrag][kk], kLdA);
#pragma unroll
    for (int j = 0; j < 2; ++j) wmma::load_matrix_sync(fb[j], &s.b[kk][wn * kWarpTile + j * kFrag], kLdB);
#pragma unroll
    for (int i = 0; i < 2; ++i) {
#pragma unroll
      for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
    }
  }
}
#endif

template <typename T>
constexpr bool kUseTensorCores = GENFAST_CONV_TENSOR_CORES && !std::is_same_v<T, float>;

// Min. blocks per SM = 1: without it ptxas for sm_80 caps the fp32 instantiation at 128 registers and spills
// (72 bytes, seen with nvcc 13 -Xptxas -v); with it every instantiation is spill-free on sm_80 and sm_90a.
template <typename T>
__global__ void __launch_bounds__(kThreads, 1)
    conv_transpose2d_kernel(const T* __restrict__ x, const T* __restrict__ w, T* __restrict__ out, Args a) {
  __shared__ __align__(128) unsigned char smem_raw[sizeof(Smem<T>)];
  Smem<T>& s = *reinterpret_cast<Smem<T>*>(smem_raw);
  const ConvTransposeShape& sh = a.shape;
  const ConvTransposeEpilogue& ep = a.epilogue;
  const int tid = threadIdx.x;

  // ---- which phase, group and tile
  const int64_t group = blockIdx.z;
  const int64_t ph = blockIdx.y / sh.stride[1];
  const int64_t pw = blockIdx.y % sh.stride[1];
  // The phase's output grid: oh = ph + stride_h * jh for jh < OHp (OHp = 0 when ph >= OH).
  const int64_t ohp = ph < sh.out_height ? cdiv(sh.out_height - ph, sh.stride[0]) : 0;
  const int64_t owp = pw < sh.out_width ? cdiv(sh.out_width - pw, sh.stride[1]) : 0;
  const int64_t pixels = ohp * owp;
  const int64_t rows = sh.batch * pixels;  // M of this phase's GEMM
  const int64_t m0 = static_cast<int64_t>(blockIdx.x / a.n_tiles) * kBlockM;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x % a.n_tiles) * kBlockN;
  if (m0 >= rows) return;  // the whole block leaves together, before any barrier

  const int64_t cig = sh.in_channels / sh.groups;
  const int64_t cog = sh.out_channels_per_group;
  const AxisTaps taps_h = phase_taps(ph, sh.padding[0], sh.dilation[0], sh.stride[0], a.step_h, sh.kernel_h);
  const AxisTaps taps_w = phase_taps(pw, sh.padding[1], sh.dilation[1], sh.stride[1], a.step_w, sh.kernel_w);

  for (int i = tid; i < kBlockM; i += kThreads) {
    const int64_t m = m0 + i;
    if (m < rows) {
      const int64_t rem = m % pixels;
      s.row_image[i] = m / pixels;
      s.row_jh[i] = rem / owp;
      s.row_jw[i] = rem % owp;
    } else {
      s.row_image[i] = -1;
      s.row_jh[i] = 0;
      s.row_jw[i] = 0;
    }
  }

  const T* x_group = x + group * cig * sh.x_stride[1];
  const T* w_group = w + group * cig * sh.w_stride[0];
  const T zero = from_float<T>(0.f);

  // ---- accumulators: WMMA fragments (fp16/bf16) or a per-thread micro-tile (fp32)
#if GENFAST_CONV_TENSOR_CORES
  nvcuda::wmma::fragment<nvcuda::wmma::accumulator, kFrag, kFrag, kFrag, float> frag_acc[2][2];
  if constexpr (kUseTensorCores<T>) {
    for (int i = 0; i < 2; ++i) {
      for (int j = 0; j < 2; ++j) nvcuda::wmma::fill_fragment(frag_acc[i][j], 0.f);
    }
  }
#endif
  float simt_acc[kSimtRows][kSimtCols];
  for (int i = 0; i < kSimtRows; ++i) {
    for (int j = 0; j < kSimtCols; ++j) simt_acc[i][j] = 0.f;
  }
  [[maybe_unused]] const int warp = tid / 32;  // the WMMA path's warp index
  const int simt_row = tid / kSimtColThreads;
  const int simt_col = tid % kSimtColThreads;

  // ---- K loop: the phase's taps, then the group's input channels in chunks of kBlockK
  for (int64_t th = 0; th < taps_h.count; ++th) {
    const int64_t kh = taps_h.first + th * a.step_h;
    const int64_t dh = (ph + sh.padding[0] - kh * sh.dilation[0]) / sh.stride[0];  // exact: see the file comment
    for (int64_t tw = 0; tw < taps_w.count; ++tw) {
      const int64_t kw = taps_w.first + tw * a.step_w;
      const int64_t dw = (pw + sh.padding[1] - kw * sh.dilation[1]) / sh.stride[1];
      __syncthreads();  // the previous K step is done with row_x and the tiles
      for (int i = tid; i < kBlockM; i += kThreads) {
        const int64_t ih = s.row_jh[i] + dh, iw = s.row_jw[i] + dw;
        const bool inside = s.row_image[i] >= 0 && ih >= 0 && ih < sh.height && iw >= 0 && iw < sh.width;
        s.row_x[i] = inside ? s.row_image[i] * sh.x_stride[0] + ih * sh.x_stride[2] + iw * sh.x_stride[3] : -1;
      }
      __syncthreads();
      const T* w_tap = w_group + kh * sh.w_stride[2] + kw * sh.w_stride[3];
      for (int64_t c0 = 0; c0 < cig; c0 += kBlockK) {
        // A: x[n, g * Cig + c0 + k, ih, iw] for row i, column k (zero outside the image or past Cig).
        for (int idx = tid; idx < kBlockM * kBlockK; idx += kThreads) {
          const int i = a.x_channels_fastest ? idx / kBlockK : idx % kBlockM;
          const int k = a.x_channels_fastest ? idx % kBlockK : idx / kBlockM;
          const int64_t c = c0 + k;
          const int64_t off = s.row_x[i];
          s.a[i][k] = (off >= 0 && c < cig) ? x_group[off + c * sh.x_stride[1]] : zero;
        }
        // B: weight[g * Cig + c0 + k, n0 + j, kh, kw] for row k, column j (zero past Cig or Cog).
        for (int idx = tid; idx < kBlockK * kBlockN; idx += kThreads) {
          const int k = idx / kBlockN, j = idx % kBlockN;
          const int64_t c = c0 + k, co = n0 + j;
          s.b[k][j] = (c < cig && co < cog) ? w_tap[c * sh.w_stride[0] + co * sh.w_stride[1]] : zero;
        }
        __syncthreads();
        if constexpr (kUseTensorCores<T>) {
#if GENFAST_CONV_TENSOR_CORES
          mma_step_wmma<T>(s, warp / 2, warp % 2, frag_acc);
#endif
        } else {
#pragma unroll 4
          for (int k = 0; k < kBlockK; ++k) {
            float bv[kSimtCols];
#pragma unroll
            for (int j = 0; j < kSimtCols; ++j) bv[j] = to_float(s.b[k][simt_col + kSimtColThreads * j]);
#pragma unroll
            for (int i = 0; i < kSimtRows; ++i) {
              const float av = to_float(s.a[simt_row + kSimtRowThreads * i][k]);
#pragma unroll
              for (int j = 0; j < kSimtCols; ++j) simt_acc[i][j] = fmaf(av, bv[j], simt_acc[i][j]);
            }
          }
        }
        __syncthreads();  // the tiles are read before the next chunk overwrites them
      }
    }
  }

  // ---- the fp32 tile to shared memory (no barrier needed before: the K loop ends on one, or never ran)
  if constexpr (kUseTensorCores<T>) {
#if GENFAST_CONV_TENSOR_CORES
    const int wm = warp / 2, wn = warp % 2;
    for (int i = 0; i < 2; ++i) {
      for (int j = 0; j < 2; ++j) {
        nvcuda::wmma::store_matrix_sync(&s.c[wm * kWarpTile + i * kFrag][wn * kWarpTile + j * kFrag], frag_acc[i][j],
                                        kLdC, nvcuda::wmma::mem_row_major);
      }
    }
#endif
  } else {
    for (int i = 0; i < kSimtRows; ++i) {
      for (int j = 0; j < kSimtCols; ++j) {
        s.c[simt_row + kSimtRowThreads * i][simt_col + kSimtColThreads * j] = simt_acc[i][j];
      }
    }
  }
  __syncthreads();

  // ---- epilogue: + bias (-> pre), * scale + shift, activation, store through the output's strides
  const T* bias = static_cast<const T*>(ep.bias);
  T* pre = static_cast<T*>(ep.pre);
  for (int idx = tid; idx < kBlockM * kBlockN; idx += kThreads) {
    const int i = a.out_channels_fastest ? idx / kBlockN : idx % kBlockM;
    const int j = a.out_channels_fastest ? idx % kBlockN : idx / kBlockM;
    const int64_t n = s.row_image[i];
    const int64_t co = n0 + j;
    if (n < 0 || co >= cog) continue;
    const int64_t channel = group * cog + co;
    const int64_t oh = ph + s.row_jh[i] * sh.stride[0];
    const int64_t ow = pw + s.row_jw[i] * sh.stride[1];
    float v = s.c[i][j];
    if (bias != nullptr) v += to_float(bias[channel]);
    if (pre != nullptr) {
      pre[n * sh.pre_stride[0] + channel * sh.pre_stride[1] + oh * sh.pre_stride[2] + ow * sh.pre_stride[3]] =
          from_float<T>(v);
    }
    if (ep.scale != nullptr) v *= ep.scale[channel];
    if (ep.shift != nullptr) v += ep.shift[channel];
    v = activate(v, ep.activation, ep.negative_slope);
    out[n * sh.out_stride[0] + channel * sh.out_stride[1] + oh * sh.out_stride[2] + ow * sh.out_stride[3]] =
        from_float<T>(v);
  }
}

int64_t gcd(int64_t p, int64_t q) {
  while (q != 0) {
    const int64_t r = p % q;
    p = q;
    q = r;
  }
  return p;
}

template <typename T>
cudaError_t launch_typed(const void* x, const void* weight, const Args& a, void* out, cudaStream_t stream) {
  const ConvTransposeShape& sh = a.shape;
  // Sized for the largest phase (phase 0): ceil(OH / sh) x ceil(OW / sw) pixels per image.
  const int64_t m_tiles = cdiv(sh.batch * cdiv(sh.out_height, sh.stride[0]) * cdiv(sh.out_width, sh.stride[1]),
                               kBlockM);
  const int64_t blocks_x = m_tiles * a.n_tiles;
  if (blocks_x > INT32_MAX) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned>(blocks_x), static_cast<unsigned>(sh.stride[0] * sh.stride[1]),
                  static_cast<unsigned>(sh.groups));
  conv_transpose2d_kernel<T><<<grid, kThreads, 0, stream>>>(static_cast<const T*>(x), static_cast<const T*>(weight),
                                                           static_cast<T*>(out), a);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_conv_transpose2d(const void* x, const void* weight, FloatType dtype, const ConvTransposeShape& shape,
                                    const ConvTransposeEpilogue& epilogue, void* out, cudaStream_t stream) {
  const ConvTransposeShape& s = shape;
  if (s.batch < 0 || s.in_channels < 1 || s.height < 1 || s.width < 1 || s.out_channels_per_group < 1 ||
      s.kernel_h < 1 || s.kernel_w < 1 || s.groups < 1 || s.in_channels % s.groups != 0) {
    return cudaErrorInvalidValue;
  }
  for (int d = 0; d < 2; ++d) {
    if (s.stride[d] < 1 || s.dilation[d] < 1 || s.padding[d] < 0) return cudaErrorInvalidValue;
  }
  if (s.stride[0] * s.stride[1] > kConvTransposeMaxGridYZ || s.groups > kConvTransposeMaxGridYZ) {
    return cudaErrorInvalidValue;
  }
  // The output size must be torch's for some output_padding in [0, max(stride, dilation)).
  const int64_t base_h = conv_transpose_output_size(s.height, s.kernel_h, s.stride[0], s.padding[0], 0, s.dilation[0]);
  const int64_t base_w = conv_transpose_output_size(s.width, s.kernel_w, s.stride[1], s.padding[1], 0, s.dilation[1]);
  if (s.out_height < 1 || s.out_width < 1 || s.out_height < base_h || s.out_width < base_w ||
      s.out_height - base_h >= std::max(s.stride[0], s.dilation[0]) ||
      s.out_width - base_w >= std::max(s.stride[1], s.dilation[1])) {
    return cudaErrorInvalidValue;
  }
  if (s.batch == 0) return cudaSuccess;
  Args a{};
  a.shape = shape;
  a.epilogue = epilogue;
  a.step_h = s.stride[0] / gcd(s.stride[0], s.dilation[0]);
  a.step_w = s.stride[1] / gcd(s.stride[1], s.dilation[1]);
  a.n_tiles = cdiv(s.out_channels_per_group, kBlockN);
  a.x_channels_fastest = s.x_stride[1] == 1 && s.in_channels / s.groups > 1;
  a.out_channels_fastest = s.out_stride[1] == 1 && s.out_channels_per_group * s.groups > 1;
  switch (dtype) {
    case FloatType::kFloat32:
      return launch_typed<float>(x, weight, a, out, stream);
    case FloatType::kFloat16:
      return launch_typed<__half>(x, weight, a, out, stream);
    case FloatType::kBFloat16:
      return launch_typed<__nv_bfloat16>(x, weight, a, out, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace genfast::cuda

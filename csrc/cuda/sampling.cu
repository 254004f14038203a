// CUDA kernels of genfast::filter_logits and genfast::sample_tokens: sort-free, exact, no host sync.
//
// One block per row, the algorithm of genfast/kernels/sampling.py (read its docstring first):
//   pass 1      y = x / temperature (correctly rounded), its max, lowest argmax and smallest key;
//   searches    top-k then top-p threshold t* = max{c : G(c) >= target} on order-preserving int32 keys.
//               Each pass buckets every element of [lo, ...) between NP sorted pivots of [lo, hi)
//               (binary search in shared memory) and accumulates per bucket its weight and its min/max key
//               with shared atomics; suffix sums of the buckets give G at every pivot, and the min/max keys
//               cut the new bracket down to keys of real elements. Weights are summed in 2^-40 fixed point
//               (integer atomics), so the sums do not depend on thread timing: results are deterministic;
//   last pass   write the filtered row, or Gumbel-max over kept tokens with Philox noise drawn for those only.
// All offsets are int64; loops are grid-stride over the row, so any vocabulary size is memory-safe.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <climits>
#include <cub/block/block_reduce.cuh>

#include "../philox.h"
#include "sampling.cuh"
#include "float_convert.cuh"

namespace genfast::cuda {
namespace {

constexpr int kThreads = 512;
constexpr int kPivots = 32;
constexpr double kFixedOne = 1099511627776.0;  // 2^40: weights in [0, 1] as integers; V * 2^40 < 2^64

// Order-preserving int32 key of a float (signed compare); -0.0 shares +0.0's key, as the values tie.
__device__ __forceinline__ int32_t float_key(float y) {
  const int32_t bits = __float_as_int(y);
  if (bits == INT_MIN) return 0;
  return bits >= 0 ? bits : (bits ^ 0x7FFFFFFF);
}

// The reference divides in fp32; top-k ties depend on that exact rounding, hence __fdiv_rn.
template <typename T>
__device__ __forceinline__ float load_y(const T* row, int64_t i, float temperature) {
  return __fdiv_rn(to_float(row[i]), temperature);
}

// Smallest float d with double(d) >= log(min_p): (y - y_max) >= d is then the reference's fp64 test.
__device__ float min_p_bound(float min_p) {
  double bound = log(static_cast<double>(min_p));
  if (isnan(bound)) bound = -INFINITY;
  if (bound > 0) bound = 0;
  float d = __double2float_rn(bound);
  if (static_cast<double>(d) < bound) d = nextafterf(d, INFINITY);
  return d;
}

struct ArgMax {
  float value;
  int64_t index;
};

// Larger value wins; on a tie the lower index (so the result is the lowest index of the maximum).
struct ArgMaxOp {
  __device__ __forceinline__ ArgMax operator()(const ArgMax& a, const ArgMax& b) const {
    if (b.value > a.value || (b.value == a.value && b.index < a.index)) return b;
    return a;
  }
};

struct MinOp {
  __device__ __forceinline__ int32_t operator()(int32_t a, int32_t b) const { return a < b ? a : b; }
};

struct SearchShared {
  int32_t pivot[kPivots];
  unsigned long long weight[kPivots];
  int32_t key_min[kPivots];
  int32_t key_max[kPivots];
  int64_t lo, hi;
  double target;
};

// t* = max{c among element keys in [lo, hi) : G(c) >= target}, or lo. lo must be an element key.
// RELATIVE: G sums exp(y - y_max) over keys >= floor (== the initial lo) and the target is fraction * G(lo),
// taken from the first pass; else G counts elements and the target is `fraction` itself.
template <typename T, bool RELATIVE>
__device__ int64_t block_search(const T* row, int64_t vocab, float temperature, float y_max, int64_t lo, int64_t hi,
                                double fraction, SearchShared& sh) {
  bool first = true;
  while (hi - lo > 1) {  // lo and hi are block-uniform: every thread reads them from shared memory
    if (threadIdx.x < kPivots) {
      const int64_t j = threadIdx.x;
      sh.pivot[j] = static_cast<int32_t>(lo + ((hi - lo) * j) / kPivots);  // pivot[0] == lo, sorted
      sh.weight[j] = 0;
      sh.key_min[j] = INT_MAX;
      sh.key_max[j] = INT_MIN;
    }
    __syncthreads();
    const int32_t lo_key = static_cast<int32_t>(lo);
    for (int64_t i = threadIdx.x; i < vocab; i += blockDim.x) {
      const float y = load_y(row, i, temperature);
      const int32_t key = float_key(y);
      if (key < lo_key) continue;  // below the bracket: counted by no pivot
      int b = 0;                   // largest b with pivot[b] <= key
#pragma unroll
      for (int step = kPivots / 2; step > 0; step >>= 1) {
        if (sh.pivot[b + step] <= key) b += step;
      }
      const unsigned long long w =
          RELATIVE ? static_cast<unsigned long long>(static_cast<double>(expf(y - y_max)) * kFixedOne) : 1ull;
      atomicAdd(&sh.weight[b], w);
      atomicMin(&sh.key_min[b], key);
      atomicMax(&sh.key_max[b], key);
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      // G(pivot[j]) = weight of buckets >= j; min key >= pivot[j]; max key < pivot[j].
      unsigned long long g[kPivots];
      int32_t above_min[kPivots], below_max[kPivots];
      unsigned long long acc = 0;
      int32_t mn = INT_MAX;
      for (int j = kPivots - 1; j >= 0; --j) {
        acc += sh.weight[j];
        mn = min(mn, sh.key_min[j]);
        g[j] = acc;
        above_min[j] = mn;
      }
      int32_t mx = INT_MIN;
      for (int j = 0; j < kPivots; ++j) {
        below_max[j] = mx;
        mx = max(mx, sh.key_max[j]);
      }
      if (first) sh.target = fmax(RELATIVE ? fraction * static_cast<double>(g[0]) : fraction, 0.5);
      int64_t new_lo = lo, new_hi = hi;
      for (int j = 0; j < kPivots; ++j) {
        if (static_cast<double>(g[j]) >= sh.target) {
          new_lo = max(new_lo, static_cast<int64_t>(above_min[j]));
        } else {
          new_hi = min(new_hi, static_cast<int64_t>(below_max[j]) + 1);
        }
      }
      sh.lo = new_lo;
      sh.hi = new_hi;
    }
    __syncthreads();
    lo = sh.lo;
    hi = sh.hi;
    first = false;
    __syncthreads();  // everyone has read lo/hi before thread 0 may write them again
  }
  return lo;
}

template <typename T, bool SAMPLE>
__global__ void __launch_bounds__(kThreads)
    sampling_kernel(const T* __restrict__ logits, int64_t vocab, int64_t row_stride, const float* __restrict__ temp_ptr,
                    const int64_t* __restrict__ top_k_ptr, const float* __restrict__ top_p_ptr,
                    const float* __restrict__ min_p_ptr, float* __restrict__ filtered, int64_t* __restrict__ tokens,
                    const float* __restrict__ noise, const int64_t* __restrict__ seed_ptr) {
  using ArgReduce = cub::BlockReduce<ArgMax, kThreads>;
  using KeyReduce = cub::BlockReduce<int32_t, kThreads>;
  __shared__ union {
    typename ArgReduce::TempStorage arg;
    typename KeyReduce::TempStorage key;
  } reduce_storage;
  __shared__ SearchShared sh;
  __shared__ ArgMax s_best;
  __shared__ int32_t s_key_min;

  const int64_t b = blockIdx.x;
  const T* row = logits + b * row_stride;
  const float temp_in = temp_ptr[b];
  const bool greedy = !(temp_in > 0.0f);  // also NaN and negative temperatures (validate=False)
  const float temperature = greedy ? 1.0f : temp_in;
  const int64_t top_k = top_k_ptr[b];
  const float top_p = top_p_ptr[b];

  // Pass 1: max with its lowest index, and the smallest key.
  ArgMax local{-INFINITY, 0};
  int32_t local_key_min = INT_MAX;
  for (int64_t i = threadIdx.x; i < vocab; i += blockDim.x) {
    const float y = load_y(row, i, temperature);
    if (y > local.value) local = {y, i};  // i increases per thread, so strict > keeps the lowest index
    local_key_min = min(local_key_min, float_key(y));
  }
  const ArgMax best = ArgReduce(reduce_storage.arg).Reduce(local, ArgMaxOp());
  if (threadIdx.x == 0) s_best = best;
  __syncthreads();
  const int32_t key_min = KeyReduce(reduce_storage.key).Reduce(local_key_min, MinOp());
  if (threadIdx.x == 0) s_key_min = key_min;
  __syncthreads();
  const float y_max = s_best.value;
  const int64_t arg_max = s_best.index;

  int64_t threshold = s_key_min;
  if (!greedy) {
    const int64_t hi = static_cast<int64_t>(float_key(y_max)) + 1;
    if (top_k > 0 && top_k < vocab) {
      threshold = block_search<T, false>(row, vocab, temperature, y_max, threshold, hi, static_cast<double>(top_k), sh);
    }
    if (top_p < 1.0f) {  // NaN top_p disables top-p, like the reference
      threshold = block_search<T, true>(row, vocab, temperature, y_max, threshold, hi, static_cast<double>(top_p), sh);
    }
  }
  const float d_min = min_p_bound(min_p_ptr[b]);

  if (!SAMPLE) {
    float* out = filtered + b * vocab;
    for (int64_t i = threadIdx.x; i < vocab; i += blockDim.x) {
      const float y = load_y(row, i, temperature);
      const bool keep = greedy ? i == arg_max : (float_key(y) >= threshold && (y - y_max) >= d_min);
      out[i] = keep ? y : -INFINITY;
    }
    return;
  }
  if (greedy) {
    if (threadIdx.x == 0) tokens[b] = arg_max;
    return;
  }
  const uint64_t seed = noise == nullptr ? static_cast<uint64_t>(*seed_ptr) : 0;
  const uint64_t base = static_cast<uint64_t>(b) * static_cast<uint64_t>(vocab);
  ArgMax pick{-INFINITY, arg_max};
  for (int64_t i = threadIdx.x; i < vocab; i += blockDim.x) {
    const float y = load_y(row, i, temperature);
    if (float_key(y) >= threshold && (y - y_max) >= d_min) {  // noise only for kept tokens
      const float u = noise != nullptr ? noise[base + i] : philox_uniform(seed, base + i);
      const float score = y - logf(-logf(u));
      if (score > pick.value) pick = {score, i};
    }
  }
  __syncthreads();  // reduce_storage is reused
  const ArgMax chosen = ArgReduce(reduce_storage.arg).Reduce(pick, ArgMaxOp());
  if (threadIdx.x == 0) tokens[b] = chosen.value > -INFINITY ? chosen.index : arg_max;
}

template <typename T>
cudaError_t launch_typed(const T* logits, int64_t batch, int64_t vocab, int64_t row_stride, const float* temperature,
                         const int64_t* top_k, const float* top_p, const float* min_p, float* filtered,
                         int64_t* tokens, const float* noise, const int64_t* seed, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(batch));
  if (tokens != nullptr) {
    sampling_kernel<T, true><<<grid, kThreads, 0, stream>>>(logits, vocab, row_stride, temperature, top_k, top_p,
                                                            min_p, filtered, tokens, noise, seed);
  } else {
    sampling_kernel<T, false><<<grid, kThreads, 0, stream>>>(logits, vocab, row_stride, temperature, top_k, top_p,
                                                             min_p, filtered, tokens, noise, seed);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_sampling(const void* logits, FloatType dtype, int64_t batch, int64_t vocab, int64_t row_stride,
                            const float* temperature, const int64_t* top_k, const float* top_p, const float* min_p,
                            float* filtered, int64_t* tokens, const float* noise, const int64_t* seed,
                            cudaStream_t stream) {
  if (batch == 0 || vocab == 0) return cudaSuccess;
  if (batch > INT_MAX) return cudaErrorInvalidConfiguration;
  switch (dtype) {
    case FloatType::kFloat32:
      return launch_typed(static_cast<const float*>(logits), batch, vocab, row_stride, temperature, top_k, top_p, min_p,
                          filtered, tokens, noise, seed, stream);
    case FloatType::kFloat16:
      return launch_typed(static_cast<const __half*>(logits), batch, vocab, row_stride, temperature, top_k, top_p,
                          min_p, filtered, tokens, noise, seed, stream);
    case FloatType::kBFloat16:
      return launch_typed(static_cast<const __nv_bfloat16*>(logits), batch, vocab, row_stride, temperature, top_k,
                          top_p, min_p, filtered, tokens, noise, seed, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace genfast::cuda

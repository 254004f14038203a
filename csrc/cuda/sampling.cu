// CUDA kernel of genfast::filter_logits and genfast::sample_tokens: sort-free, exact, atomics-free, no host sync.
//
// The algorithm of genfast/kernels/sampling.py (read its docstring first), laid out for the GPU:
//   work split  a row is cut into `splits` contiguous chunks, one CTA each; the CTAs of a row form a thread
//               block cluster (sm_90), so a batch of 1 still fills up to 8 SMs. Without clusters (sm_80) a
//               row is one CTA. Chunk boundaries are multiples of 16 bytes, and rows whose start is 16-byte
//               aligned are read with 16-byte vector loads.
//   pass 1      y = x / temperature (correctly rounded), its max, lowest argmax and smallest key, and the row's
//               value flags (csrc/common/sampling.h);
//   searches    top-k, then top-p threshold t* = max{c : G(c) >= target} on order-preserving int32 keys. Each
//               pass evaluates, for kPivots pivots of [lo, hi) at once, three things per pivot p:
//                 G(p)         the summed weight of keys >= p (1 per token for top-k, fixed_weight for top-p),
//                 above_min(p) the smallest key >= p,   below_max(p) the largest key < p (keys >= lo only);
//               the bracket then becomes [max above_min(p) over p with G(p) >= target,
//                                         min below_max(p) + 1 over the others).
//               Every thread keeps these 3 * kPivots values in registers for its own elements; a warp shuffle
//               tree, then one slot per warp in shared memory, then one per CTA read by every CTA of the
//               cluster through distributed shared memory, combine them. No atomics: integer sums, min and
//               max give the same result in any order, so the search is deterministic and equals the
//               Triton and C++ kernels' (same integer arithmetic, csrc/common/sampling.h).
//   last pass   write the filtered row, or Gumbel-max over kept tokens with Philox noise drawn for those only.
// All offsets are int64; any vocabulary below 2^24 tokens is memory-safe.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <climits>

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#include <cooperative_groups.h>
#define GENFAST_CLUSTERS 1
#endif

#include "../philox.h"
#include "float_convert.cuh"
#include "sampling.cuh"

namespace genfast::cuda {
namespace {

using namespace genfast::sampling;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kPivots = 8;
constexpr int kMaxSplits = 8;  // the portable cluster size

// Order-preserving int32 key of a float (signed compare); -0.0 shares +0.0's key, as the values tie.
__device__ __forceinline__ int32_t float_key(float y) {
  const int32_t bits = __float_as_int(y);
  if (bits == INT_MIN) return 0;
  return bits >= 0 ? bits : (bits ^ 0x7FFFFFFF);
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

// Where a CTA works: row `row`, columns [begin, end); `rank` of `splits` CTAs of the row.
struct Chunk {
  int64_t row, begin, end;
  int rank, splits;
};

// Calls f(i, x_i) for every column i of the chunk, this thread's share: 16-byte vectors where the row is
// aligned (VEC), single elements otherwise and for the tail.
template <typename T, bool VEC, typename F>
__device__ __forceinline__ void for_each_x(const T* row, const Chunk& c, F&& f) {
  constexpr int kWidth = 16 / sizeof(T);
  int64_t scalar_from = c.begin;
  if (VEC) {
    const int64_t vectors = (c.end - c.begin) / kWidth;  // begin is a multiple of kWidth
    const uint4* base = reinterpret_cast<const uint4*>(row + c.begin);
    for (int64_t v = threadIdx.x; v < vectors; v += kThreads) {
      const uint4 raw = __ldg(base + v);
      const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
      for (int k = 0; k < kWidth; ++k) f(c.begin + v * kWidth + k, to_float(e[k]));
    }
    scalar_from = c.begin + vectors * kWidth;
  }
  for (int64_t i = scalar_from + threadIdx.x; i < c.end; i += kThreads) f(i, to_float(row[i]));
}

// ---------------------------------------------------------------------------------------- reductions
struct ArgMax {
  float value;
  int64_t index;
};

// Larger value wins; on a tie the lower index (so the result is the lowest index of the maximum).
__device__ __forceinline__ ArgMax better(const ArgMax& a, const ArgMax& b) {
  return (b.value > a.value || (b.value == a.value && b.index < a.index)) ? b : a;
}

struct Pass1 {
  ArgMax best;
  int32_t key_min, flags;
};

__device__ __forceinline__ Pass1 combine(const Pass1& a, const Pass1& b) {
  return {better(a.best, b.best), min(a.key_min, b.key_min), a.flags | b.flags};
}

struct PivotStats {
  long long g[kPivots];
  int32_t above_min[kPivots], below_max[kPivots];
};

__device__ __forceinline__ void combine_into(PivotStats& a, const PivotStats& b) {
#pragma unroll
  for (int j = 0; j < kPivots; ++j) {
    a.g[j] += b.g[j];
    a.above_min[j] = min(a.above_min[j], b.above_min[j]);
    a.below_max[j] = max(a.below_max[j], b.below_max[j]);
  }
}

__device__ __forceinline__ Pass1 warp_reduce(Pass1 v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    Pass1 o;
    o.best.value = __shfl_xor_sync(0xffffffffu, v.best.value, offset);
    o.best.index = __shfl_xor_sync(0xffffffffu, v.best.index, offset);
    o.key_min = __shfl_xor_sync(0xffffffffu, v.key_min, offset);
    o.flags = __shfl_xor_sync(0xffffffffu, v.flags, offset);
    v = combine(v, o);
  }
  return v;
}

__device__ __forceinline__ void warp_reduce(PivotStats& v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
#pragma unroll
    for (int j = 0; j < kPivots; ++j) {
      v.g[j] += __shfl_xor_sync(0xffffffffu, v.g[j], offset);
      v.above_min[j] = min(v.above_min[j], __shfl_xor_sync(0xffffffffu, v.above_min[j], offset));
      v.below_max[j] = max(v.below_max[j], __shfl_xor_sync(0xffffffffu, v.below_max[j], offset));
    }
  }
}

// Shared memory of one CTA. `cta` holds this CTA's combined partial results, which the other CTAs of the
// cluster read; `warp` the per-warp ones.
struct Shared {
  union {
    Pass1 pass1[kWarps];
    PivotStats stats[kWarps];
    ArgMax pick[kWarps];
  } warp;
  union {
    Pass1 pass1;
    PivotStats stats;
    ArgMax pick;
  } cta;
  int64_t lo, hi;
  double target;
};

// Cluster-wide barrier, and the same CTA's `cta` slot at another rank (only rank 0 without clusters).
__device__ __forceinline__ void cluster_barrier() {
#ifdef GENFAST_CLUSTERS
  cooperative_groups::this_cluster().sync();
#else
  __syncthreads();
#endif
}

__device__ __forceinline__ Shared* shared_of_rank(Shared* mine, int rank) {
#ifdef GENFAST_CLUSTERS
  return cooperative_groups::this_cluster().map_shared_rank(mine, rank);
#else
  (void)rank;
  return mine;
#endif
}

// Reduces every thread's value into a cluster-wide result, the same in every CTA and every thread:
// warp shuffles, one slot per warp, one per CTA, then the CTAs' slots read in rank order.
template <typename V, typename SlotW, typename SlotC, typename Combine>
__device__ V cluster_reduce(V v, Shared& sh, const Chunk& c, SlotW warp_slot, SlotC cta_slot, Combine combine) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) warp_slot(sh, warp) = v;
  __syncthreads();
  if (threadIdx.x == 0) {
    V acc = warp_slot(sh, 0);
    for (int w = 1; w < kWarps; ++w) acc = combine(acc, warp_slot(sh, w));
    cta_slot(sh) = acc;
  }
  cluster_barrier();  // every CTA's slot is written
  V acc = cta_slot(*shared_of_rank(&sh, 0));
  for (int r = 1; r < c.splits; ++r) acc = combine(acc, cta_slot(*shared_of_rank(&sh, r)));
  cluster_barrier();  // every CTA has read every slot before any is written again
  return acc;
}

// ---------------------------------------------------------------------------------------- the search
// t* = max{c among element keys in [lo, hi) : G(c) >= target}, or lo. lo must be an element key with
// G(lo) >= target. RELATIVE: G sums fixed_weight(y - y_max) over keys >= the initial lo, and the target is
// top_p_target(fraction, G(initial lo)), taken in the first pass; else G counts and the target is `fraction`.
template <typename T, bool VEC, bool RELATIVE>
__device__ int64_t cluster_search(const T* row, const Chunk& c, float temperature, float y_max, int64_t lo,
                                  int64_t hi, float fraction, Shared& sh) {
  bool first = true;
  double target = RELATIVE ? 0.0 : static_cast<double>(fraction);
  while (hi - lo > 1) {  // lo and hi are the same in every thread of the cluster
    int32_t pivot[kPivots];
    PivotStats s;
#pragma unroll
    for (int j = 0; j < kPivots; ++j) {
      pivot[j] = static_cast<int32_t>(lo + ((hi - lo) * j) / kPivots);  // pivot[0] == lo, non-decreasing
      s.g[j] = 0;
      s.above_min[j] = INT_MAX;
      s.below_max[j] = INT_MIN;
    }
    for_each_x<T, VEC>(row, c, [&](int64_t, float x) {
      const float y = __fdiv_rn(x, temperature);
      const int32_t key = float_key(y);
      if (key < pivot[0]) return;  // below the bracket: no pivot counts it
      const long long w = RELATIVE ? fixed_weight(y - y_max) : 1;
#pragma unroll
      for (int j = 0; j < kPivots; ++j) {
        const bool ge = key >= pivot[j];
        s.g[j] += ge ? w : 0;
        s.above_min[j] = ge ? min(s.above_min[j], key) : s.above_min[j];
        s.below_max[j] = ge ? s.below_max[j] : max(s.below_max[j], key);
      }
    });
    warp_reduce(s);
    const PivotStats all = cluster_reduce(
        s, sh, c, [](Shared& m, int w) -> PivotStats& { return m.warp.stats[w]; },
        [](Shared& m) -> PivotStats& { return m.cta.stats; },
        [](PivotStats a, const PivotStats& b) {
          combine_into(a, b);
          return a;
        });
    if (first && RELATIVE) target = top_p_target(fraction, all.g[0]);
    first = false;
    int64_t new_lo = lo, new_hi = hi;
#pragma unroll
    for (int j = 0; j < kPivots; ++j) {
      if (static_cast<double>(all.g[j]) >= (target > 1.0 ? target : 1.0)) {
        new_lo = max(new_lo, static_cast<int64_t>(all.above_min[j]));
      } else {
        new_hi = min(new_hi, static_cast<int64_t>(all.below_max[j]) + 1);
      }
    }
    lo = new_lo;
    hi = new_hi;
  }
  return lo;
}

// ---------------------------------------------------------------------------------------- the kernel
template <typename T, bool VEC, bool SAMPLE>
__global__ void __launch_bounds__(kThreads)
    sampling_kernel(const T* __restrict__ logits, int64_t vocab, int64_t row_stride, int splits,
                    const float* __restrict__ temp_ptr, const int64_t* __restrict__ top_k_ptr,
                    const float* __restrict__ top_p_ptr, const float* __restrict__ min_p_ptr,
                    float* __restrict__ filtered, int64_t* __restrict__ tokens, int32_t* __restrict__ flags_out,
                    SampleNoise noise) {
  __shared__ Shared sh;
  Chunk c;
  c.row = blockIdx.x / splits;
  c.rank = static_cast<int>(blockIdx.x % splits);  // == the CTA's rank in its cluster (cluster dims splits x 1)
  c.splits = splits;
  constexpr int64_t kWidth = 16 / sizeof(T);
  const int64_t per_chunk = ((vocab + splits - 1) / splits + kWidth - 1) / kWidth * kWidth;
  c.begin = min(vocab, c.rank * per_chunk);
  c.end = min(vocab, c.begin + per_chunk);

  const T* row = logits + c.row * row_stride;
  const float temp_in = temp_ptr[c.row];
  const bool greedy = !(temp_in > 0.0f);  // also NaN and negative temperatures (validate=False)
  const float temperature = greedy ? 1.0f : temp_in;
  const int64_t top_k = top_k_ptr[c.row];
  const float top_p = top_p_ptr[c.row];
  const float min_p = min_p_ptr[c.row];

  // Pass 1: max with its lowest index, the smallest key, the value flags.
  Pass1 local{{-INFINITY, 0}, INT_MAX, 0};
  for_each_x<T, VEC>(row, c, [&](int64_t i, float x) {
    const float y = __fdiv_rn(x, temperature);
    const bool is_nan = x != x;
    if (!is_nan) {
      local.best = better(local.best, ArgMax{y, i});
      local.key_min = min(local.key_min, float_key(y));
    }
    local.flags |= (is_nan ? kFlagNaN : 0) | (x == INFINITY ? kFlagPosInf : 0) |
                   ((fabsf(y) == INFINITY && fabsf(x) != INFINITY) ? kFlagOverflow : 0);
  });
  if (!(local.best.value > -INFINITY)) local.best.index = INT64_MAX;  // a thread without a max never wins a tie
  const Pass1 row1 = cluster_reduce(
      warp_reduce(local), sh, c, [](Shared& m, int w) -> Pass1& { return m.warp.pass1[w]; },
      [](Shared& m) -> Pass1& { return m.cta.pass1; }, combine);
  const float y_max = row1.best.value;
  const int64_t arg_max = y_max > -INFINITY ? row1.best.index : 0;
  if (c.rank == 0 && threadIdx.x == 0) {
    flags_out[c.row] = row1.flags | (y_max > -INFINITY ? 0 : kFlagAllNegInf) |
                       knob_flags(temp_in, top_k, top_p, min_p);
  }

  int64_t threshold = row1.key_min;
  if (!greedy && y_max > -INFINITY) {
    const int64_t hi = static_cast<int64_t>(float_key(y_max)) + 1;
    if (top_k > 0 && top_k < vocab) {
      threshold = cluster_search<T, VEC, false>(row, c, temperature, y_max, threshold, hi,
                                                static_cast<float>(top_k), sh);
    }
    if (top_p < 1.0f) {  // NaN top_p disables top-p, like the reference
      threshold = cluster_search<T, VEC, true>(row, c, temperature, y_max, threshold, hi, top_p, sh);
    }
  }
  const float d_min = min_p_bound(min_p);

  if (!SAMPLE) {
    float* out = filtered + c.row * vocab;
    for_each_x<T, VEC>(row, c, [&](int64_t i, float x) {
      const float y = __fdiv_rn(x, temperature);
      const bool keep = greedy ? i == arg_max : (float_key(y) >= threshold && (y - y_max) >= d_min);
      out[i] = keep ? y : -INFINITY;
    });
    return;
  }
  if (greedy) {
    if (c.rank == 0 && threadIdx.x == 0) tokens[c.row] = arg_max;
    return;
  }
  // Row b's noise: Philox(seed_b, step_b * V + col), one mechanism for one seed per batch (step_b = b) and per-row
  // seeds (step_b = offsets[b]); uint64 arithmetic, which wraps only past the bound the op checks.
  const bool given = noise.values != nullptr;
  const uint64_t seed = given ? 0 : static_cast<uint64_t>(noise.seed[c.row * noise.seed_stride]);
  const uint64_t base = static_cast<uint64_t>(c.row) * static_cast<uint64_t>(vocab);  // into the caller's noise
  const uint64_t counter_base =
      noise.offsets != nullptr ? static_cast<uint64_t>(noise.offsets[c.row]) * static_cast<uint64_t>(vocab) : base;
  ArgMax pick{-INFINITY, INT64_MAX};
  for_each_x<T, VEC>(row, c, [&](int64_t i, float x) {
    const float y = __fdiv_rn(x, temperature);
    if (float_key(y) >= threshold && (y - y_max) >= d_min) {  // noise only for kept tokens
      const float u = given ? noise.values[base + i] : philox_uniform(seed, counter_base + i);
      const float score = y - logf(-logf(u));
      if (score > -INFINITY) pick = better(pick, ArgMax{score, i});
    }
  });
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    ArgMax o;
    o.value = __shfl_xor_sync(0xffffffffu, pick.value, offset);
    o.index = __shfl_xor_sync(0xffffffffu, pick.index, offset);
    pick = better(pick, o);
  }
  const ArgMax chosen = cluster_reduce(
      pick, sh, c, [](Shared& m, int w) -> ArgMax& { return m.warp.pick[w]; },
      [](Shared& m) -> ArgMax& { return m.cta.pick; }, better);
  // Every kept token drew u == 0 (score -inf): the argmax, as in the reference.
  if (c.rank == 0 && threadIdx.x == 0) tokens[c.row] = chosen.value > -INFINITY ? chosen.index : arg_max;
}

// CTAs per row: enough for about two CTAs per SM over the batch, at most a portable cluster, at least
// 4096 elements each; 1 where the device has no clusters (before sm_90).
int choose_splits(int64_t batch, int64_t vocab) {
  int device = 0, major = 0, sms = 1;
  if (cudaGetDevice(&device) != cudaSuccess) return 1;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess || major < 9) {
    return 1;
  }
  if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) return 1;
  const int64_t for_occupancy = (2 * static_cast<int64_t>(sms) + batch - 1) / batch;
  const int64_t for_work = (vocab + 4095) / 4096;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>({for_occupancy, for_work, kMaxSplits})));
}

template <typename T, bool VEC, bool SAMPLE>
cudaError_t launch_kernel(const T* logits, int64_t batch, int64_t vocab, int64_t row_stride, const float* temperature,
                          const int64_t* top_k, const float* top_p, const float* min_p, float* filtered,
                          int64_t* tokens, int32_t* flags, SampleNoise noise, cudaStream_t stream) {
  const int splits = choose_splits(batch, vocab);
  if (batch * splits > INT_MAX) return cudaErrorInvalidConfiguration;
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(static_cast<unsigned>(batch * splits));
  config.blockDim = dim3(kThreads);
  config.stream = stream;
  cudaLaunchAttribute cluster;
  cluster.id = cudaLaunchAttributeClusterDimension;
  cluster.val.clusterDim.x = static_cast<unsigned>(splits);
  cluster.val.clusterDim.y = 1;
  cluster.val.clusterDim.z = 1;
  config.attrs = &cluster;
  config.numAttrs = splits > 1 ? 1 : 0;  // no cluster attribute at all before sm_90
  return cudaLaunchKernelEx(&config, sampling_kernel<T, VEC, SAMPLE>, logits, vocab, row_stride, splits,
                            temperature, top_k, top_p, min_p, filtered, tokens, flags, noise);
}

template <typename T>
cudaError_t launch_typed(const T* logits, int64_t batch, int64_t vocab, int64_t row_stride, const float* temperature,
                         const int64_t* top_k, const float* top_p, const float* min_p, float* filtered,
                         int64_t* tokens, int32_t* flags, SampleNoise noise, cudaStream_t stream) {
  // 16-byte loads need every row to start on a 16-byte boundary.
  const bool aligned = reinterpret_cast<uintptr_t>(logits) % 16 == 0 && (row_stride * sizeof(T)) % 16 == 0;
  if (tokens != nullptr) {
    return aligned ? launch_kernel<T, true, true>(logits, batch, vocab, row_stride, temperature, top_k, top_p, min_p,
                                                  filtered, tokens, flags, noise, stream)
                   : launch_kernel<T, false, true>(logits, batch, vocab, row_stride, temperature, top_k, top_p, min_p,
                                                   filtered, tokens, flags, noise, stream);
  }
  return aligned ? launch_kernel<T, true, false>(logits, batch, vocab, row_stride, temperature, top_k, top_p, min_p,
                                                 filtered, tokens, flags, noise, stream)
                 : launch_kernel<T, false, false>(logits, batch, vocab, row_stride, temperature, top_k, top_p, min_p,
                                                  filtered, tokens, flags, noise, stream);
}

}  // namespace

cudaError_t launch_sampling(const void* logits, FloatType dtype, int64_t batch, int64_t vocab, int64_t row_stride,
                            const float* temperature, const int64_t* top_k, const float* top_p, const float* min_p,
                            float* filtered, int64_t* tokens, int32_t* flags, SampleNoise noise,
                            cudaStream_t stream) {
  if (batch == 0) return cudaSuccess;
  if (vocab < 1 || vocab >= kMaxVocab || batch > INT_MAX) return cudaErrorInvalidValue;
  switch (dtype) {
    case FloatType::kFloat32:
      return launch_typed(static_cast<const float*>(logits), batch, vocab, row_stride, temperature, top_k, top_p, min_p,
                          filtered, tokens, flags, noise, stream);
    case FloatType::kFloat16:
      return launch_typed(static_cast<const __half*>(logits), batch, vocab, row_stride, temperature, top_k, top_p,
                          min_p, filtered, tokens, flags, noise, stream);
    case FloatType::kBFloat16:
      return launch_typed(static_cast<const __nv_bfloat16*>(logits), batch, vocab, row_stride, temperature, top_k,
                          top_p, min_p, filtered, tokens, flags, noise, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace genfast::cuda

// CUDA kernels of genfast::attention_decode: flash-decoding, the algorithm of
// genfast/kernels/attention_decode.py (read its docstring first), written for clarity over speed:
//   split kernel    one block per (split, batch x kv head, block of kRows query rows). Rows r = g * Nq + i
//                   cover every query head g of the GQA group and every new token i, so a kv tile is read
//                   once for the whole group. The keys any row may see, [lo, hi), are cut into num_splits
//                   chunks (multiples of kTile); each block streams its chunk through shared memory with an
//                   online softmax in base 2 and writes its normalised partial output and lse (fp32);
//   combine kernel  merges the splits of each row by their lse into out and lse.
// Lengths are read on the device and clamped to [0, Nmax]: no key outside a sequence's prefix (or the cache)
// is ever read. Paged caches (DecodePaging) fetch each key row of a tile through the block table, clamped into the
// pool, with everything else as for the dense cache (so the same arithmetic, tile for tile). All offsets are int64. Everything computes in float32 (Triton rounds P to the input dtype
// before its PV matmul; this kernel does not, so it is at least as accurate).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cmath>

#include "float_convert.cuh"
#include "attention.cuh"

namespace genfast::cuda {
namespace {

constexpr int kThreads = 128;
constexpr int kRows = static_cast<int>(kDecodeRowsPerBlock);
constexpr int kTile = 16;  // keys per shared-memory tile
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr int64_t kMinKeysPerSplit = 256;
constexpr int64_t kMaxSplits = 128;

int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }
__device__ __forceinline__ int64_t cdiv_d(int64_t a, int64_t b) { return (a + b - 1) / b; }

struct SplitArgs {
  DecodeShape shape;
  const void* seqlens;
  bool seqlens_int64;
  int64_t rows, group, num_splits, row_blocks, left, right;  // left/right: the resolved window bounds
  float qk_scale;                                 // scale * log2(e)
  float* opart;                                   // [B * Hk * S * rows, D]
  float* lpart;                                   // [B * Hk * S * rows], base 2
  DecodePaging paging;                            // table == nullptr: dense
};

// Rows of the q, acc, k and v tiles in shared memory are `row_stride(D)` floats apart: D rounded up to an odd
// number. The score loop has the 16 keys of a tile read by neighbouring threads at the same d; with a stride
// that is a multiple of 32 floats (D = 64, 128, ...) all 16 land in one bank (a 16-way conflict), with an odd
// stride they land in 16 different banks.
__host__ __device__ constexpr int row_stride(int d) { return d | 1; }

// Shared memory: q rows [kRows][ld], acc [kRows][ld], k and v tiles [kTile][ld], scores [kRows][kTile], per-row
// m, l, alpha (floats) and the rows' positions (int64, first so it stays 8-byte aligned).
size_t split_smem_bytes(int64_t d) {
  const int64_t ld = row_stride(static_cast<int>(d));
  return sizeof(int64_t) * kRows + sizeof(float) * (2 * kRows * ld + 2 * kTile * ld + kRows * kTile + 3 * kRows);
}

// Threads walk a [rows][D] tile as 4 warps x 32 lanes: warp w takes rows w, w + 4, ..., lane l columns
// l, l + 32, ...: coalesced along D, and no division per element.
constexpr int kWarps = kThreads / 32;
static_assert(kThreads % 32 == 0 && kRows * kTile == kThreads, "one score per thread");

template <typename T>
__global__ void __launch_bounds__(kThreads) decode_split_kernel(const T* __restrict__ q, const T* __restrict__ k,
                                                                const T* __restrict__ v, SplitArgs a) {
  extern __shared__ int64_t smem_words[];
  const DecodeShape& s = a.shape;
  const int d_len = static_cast<int>(s.head_dim);  // <= kDecodeMaxHeadDim
  const int ld = row_stride(d_len);
  int64_t* spos = smem_words;  // position of each row's new token
  float* sq = reinterpret_cast<float*>(spos + kRows);
  float* acc = sq + kRows * ld;
  float* sk = acc + kRows * ld;
  float* sv = sk + kTile * ld;
  float* ss = sv + kTile * ld;
  float* sm = ss + kRows * kTile;
  float* sl = sm + kRows;
  float* salpha = sl + kRows;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;

  // One flat grid axis (the launcher keeps it below 2^31): split fastest, then the row block, then batch x kv
  // head. 32-bit unsigned division, once per block.
  const unsigned pid = blockIdx.x;
  const unsigned splits = static_cast<unsigned>(a.num_splits), row_blocks = static_cast<unsigned>(a.row_blocks);
  const int64_t split = pid % splits;
  const unsigned rest = pid / splits;
  const int r0 = static_cast<int>(rest % row_blocks) * kRows;
  const unsigned bhk32 = rest / row_blocks;
  const int64_t bhk = bhk32;
  const int64_t b = bhk32 / static_cast<unsigned>(s.kv_heads);
  const int64_t hk = bhk32 % static_cast<unsigned>(s.kv_heads);
  int64_t length = a.seqlens_int64 ? static_cast<const int64_t*>(a.seqlens)[b]
                                   : static_cast<int64_t>(static_cast<const int32_t*>(a.seqlens)[b]);
  length = min(max(length, int64_t{0}), s.cache_len);
  const int new_tokens = static_cast<int>(s.new_tokens), rows = static_cast<int>(a.rows);

  // q rows, pre-scaled so that scores come out in base 2; rows past `rows` are zeros and never stored.
  for (int rr = warp; rr < kRows; rr += kWarps) {
    const int r = r0 + rr;
    const int h_in_group = r / new_tokens, i = r % new_tokens;  // 32-bit: rows < 2^31
    const T* q_row = q + b * s.q_stride[0] + (hk * a.group + h_in_group) * s.q_stride[1] + i * s.q_stride[2];
    for (int dd = lane; dd < d_len; dd += 32) {
      sq[rr * ld + dd] = r < rows ? to_float(q_row[dd * s.q_stride[3]]) * a.qk_scale : 0.f;
      acc[rr * ld + dd] = 0.f;
    }
  }
  if (threadIdx.x < kRows) {
    sm[threadIdx.x] = -INFINITY;
    sl[threadIdx.x] = 0.f;
    spos[threadIdx.x] = length - s.new_tokens + (r0 + static_cast<int>(threadIdx.x)) % new_tokens;
  }
  // Keys any row may see, and this split's chunk of them (same arithmetic as the Triton kernel); the only
  // 64-bit divisions, once per block.
  const int64_t lo = max(length - s.new_tokens - a.left, int64_t{0});
  const int64_t hi = min(length, length + a.right);
  const int64_t span = max(hi - lo, int64_t{0});
  const int64_t chunk = cdiv_d(cdiv_d(span, a.num_splits), kTile) * kTile;
  const int64_t start = lo + split * chunk;
  const int64_t end = min(start + chunk, hi);
  // Paged: the head's rows of block 0, to which each key adds its block's offset.
  const bool paged = a.paging.table != nullptr;
  const T* k_base = k + (paged ? 0 : b) * s.k_stride[0] + hk * s.k_stride[1];
  const T* v_base = v + (paged ? 0 : b) * s.v_stride[0] + hk * s.v_stride[1];
  const int32_t* table_row = paged ? a.paging.table + b * a.paging.row_stride : nullptr;
  const int64_t page_mask = (int64_t{1} << a.paging.page_shift) - 1;
  // This thread's score: row rr_s, key j_s of the tile.
  const int rr_s = threadIdx.x / kTile, j_s = threadIdx.x % kTile;
  __syncthreads();

  for (int64_t t0 = start; t0 < end; t0 += kTile) {
    for (int j = warp; j < kTile; j += kWarps) {
      const int64_t n = t0 + j;
      const bool ok = n < end;  // end <= length <= Nmax: in bounds
      int64_t block = b, slot = n;  // dense: the sequence's own rows
      if (paged) {                  // the table is read only for keys in range (n < Nmax: its row has the entry)
        block = ok ? min(max(static_cast<int64_t>(table_row[(n >> a.paging.page_shift) * a.paging.col_stride]),
                             int64_t{0}),
                         a.paging.num_blocks - 1)
                   : 0;
        slot = n & page_mask;
      }
      const T* k_row = k_base + (paged ? block * s.k_stride[0] : 0) + slot * s.k_stride[2];
      const T* v_row = v_base + (paged ? block * s.v_stride[0] : 0) + slot * s.v_stride[2];
      for (int dd = lane; dd < d_len; dd += 32) {
        sk[j * ld + dd] = ok ? to_float(k_row[dd * s.k_stride[3]]) : 0.f;
        sv[j * ld + dd] = ok ? to_float(v_row[dd * s.v_stride[3]]) : 0.f;
      }
    }
    __syncthreads();
    {
      const int64_t n = t0 + j_s, pos = spos[rr_s];
      float score = -INFINITY;
      if (r0 + rr_s < rows && n < end && n >= pos - a.left && n <= pos + a.right) {
        float dot = 0.f;
        for (int dd = 0; dd < d_len; ++dd) dot += sq[rr_s * ld + dd] * sk[j_s * ld + dd];
        score = dot;
      }
      ss[threadIdx.x] = score;  // = ss[rr_s * kTile + j_s]
    }
    __syncthreads();
    if (threadIdx.x < kRows) {
      const int rr = threadIdx.x;
      float m_new = sm[rr];
      for (int j = 0; j < kTile; ++j) m_new = fmaxf(m_new, ss[rr * kTile + j]);
      // A row that has seen only -inf keeps a finite shift, so exp2 gives 0 rather than NaN.
      const float m_use = m_new == -INFINITY ? 0.f : m_new;
      const float alpha = exp2f(sm[rr] - m_use);
      float total = 0.f;
      for (int j = 0; j < kTile; ++j) {
        const float p = exp2f(ss[rr * kTile + j] - m_use);
        ss[rr * kTile + j] = p;
        total += p;
      }
      sl[rr] = sl[rr] * alpha + total;
      sm[rr] = m_new;
      salpha[rr] = alpha;
    }
    __syncthreads();
    for (int rr = warp; rr < kRows; rr += kWarps) {
      for (int dd = lane; dd < d_len; dd += 32) {
        float x = acc[rr * ld + dd] * salpha[rr];
        for (int j = 0; j < kTile; ++j) x += ss[rr * kTile + j] * sv[j * ld + dd];
        acc[rr * ld + dd] = x;
      }
    }
    __syncthreads();
  }

  const int64_t part0 = (bhk * a.num_splits + split) * a.rows;
  for (int rr = warp; rr < kRows; rr += kWarps) {
    const int r = r0 + rr;
    if (r >= rows) continue;
    const float l = sl[rr];
    float* o_row = a.opart + (part0 + r) * d_len;
    for (int dd = lane; dd < d_len; dd += 32) o_row[dd] = l == 0.f ? 0.f : acc[rr * ld + dd] / l;
    if (lane == 0) a.lpart[part0 + r] = l == 0.f ? -INFINITY : sm[rr] + log2f(l);
  }
}

// out row (b, hk * group + g, i) of [B, Hq, Nq, D] is bhk * rows + r since r = g * Nq + i. Grid: one flat axis
// of row blocks (fastest) x batch x kv head.
template <typename T>
__global__ void __launch_bounds__(kThreads) decode_combine_kernel(const float* __restrict__ opart,
                                                                  const float* __restrict__ lpart, T* out,
                                                                  float* lse, int64_t rows, int64_t d_len,
                                                                  int64_t num_splits, int64_t row_blocks) {
  const unsigned pid = blockIdx.x;
  const int64_t bhk = pid / static_cast<unsigned>(row_blocks);
  const int64_t r0 = static_cast<int64_t>(pid % static_cast<unsigned>(row_blocks)) * kRows;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int rr = warp; rr < kRows; rr += kWarps) {
    const int64_t r = r0 + rr;
    if (r >= rows) continue;
    float m = -INFINITY;
    for (int64_t sp = 0; sp < num_splits; ++sp) m = fmaxf(m, lpart[(bhk * num_splits + sp) * rows + r]);
    const float m_use = m == -INFINITY ? 0.f : m;
    for (int64_t dd = lane; dd < d_len; dd += 32) {
      float total = 0.f, x = 0.f;
      for (int64_t sp = 0; sp < num_splits; ++sp) {
        const int64_t part = (bhk * num_splits + sp) * rows + r;
        const float w = exp2f(lpart[part] - m_use);
        total += w;
        x += w * opart[part * d_len + dd];
      }
      out[(bhk * rows + r) * d_len + dd] = from_float<T>(total == 0.f ? 0.f : x / total);
      if (dd == 0) lse[bhk * rows + r] = total == 0.f ? -INFINITY : (m_use + log2f(total)) * kLn2;
    }
  }
}

template <typename T>
cudaError_t launch_typed(const void* q, const void* k, const void* v, const SplitArgs& a, void* out, float* lse,
                         cudaStream_t stream) {
  const DecodeShape& s = a.shape;
  const size_t smem = split_smem_bytes(s.head_dim);
  // Above 48 KiB (D > 128) a kernel must opt in to more dynamic shared memory.
  cudaError_t err = cudaFuncSetAttribute(decode_split_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(smem));
  if (err != cudaSuccess) return err;
  const int64_t heads = s.batch * s.kv_heads;
  decode_split_kernel<T><<<static_cast<unsigned>(heads * a.row_blocks * a.num_splits), kThreads, smem, stream>>>(
      static_cast<const T*>(q), static_cast<const T*>(k), static_cast<const T*>(v), a);
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  decode_combine_kernel<T><<<static_cast<unsigned>(heads * a.row_blocks), kThreads, 0, stream>>>(
      a.opart, a.lpart, static_cast<T*>(out), lse, a.rows, s.head_dim, a.num_splits, a.row_blocks);
  return cudaGetLastError();
}

}  // namespace

int64_t decode_num_splits(const DecodeShape& shape, int device) {
  int sms = 0;
  if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess || sms <= 0) sms = 1;
  const int64_t rows = (shape.q_heads / shape.kv_heads) * shape.new_tokens;
  const int64_t programs = shape.batch * shape.kv_heads * cdiv(rows, kRows);
  const int64_t want = cdiv(2 * static_cast<int64_t>(sms), programs);
  const int64_t useful = cdiv(shape.cache_len, kMinKeysPerSplit);
  return std::max(int64_t{1}, std::min(std::min(want, useful), kMaxSplits));
}

int64_t decode_num_splits_invariant(const DecodeShape& shape) {
  return std::max(int64_t{1}, std::min(cdiv(shape.cache_len, kMinKeysPerSplit), kMaxSplits));
}

int64_t decode_workspace_floats(const DecodeShape& shape, int64_t num_splits) {
  const int64_t rows = (shape.q_heads / shape.kv_heads) * shape.new_tokens;
  return shape.batch * shape.kv_heads * num_splits * rows * (shape.head_dim + 1);
}

cudaError_t launch_attention_decode(const void* q, const void* k, const void* v, FloatType dtype,
                                    const void* seqlens, bool seqlens_int64, const DecodeShape& shape, float scale,
                                    int64_t window_left, int64_t window_right, int64_t num_splits,
                                    float* workspace, void* out, float* lse, cudaStream_t stream,
                                    const DecodePaging& paging) {
  if (shape.batch == 0 || shape.q_heads == 0) return cudaSuccess;
  if (paging.table != nullptr && (paging.num_blocks <= 0 || paging.page_shift < 4 || paging.page_shift > 8)) {
    return cudaErrorInvalidValue;
  }
  if (shape.kv_heads <= 0 || shape.q_heads % shape.kv_heads != 0 || shape.head_dim <= 0 ||
      shape.head_dim > kDecodeMaxHeadDim || shape.new_tokens <= 0 || shape.cache_len <= 0 || num_splits <= 0 ||
      num_splits > 65535 || window_left < 0 || window_right < 0) {
    return cudaErrorInvalidValue;
  }
  // Every block index fits grid axis x (2^31 - 1), and so do the rows of a GQA group, which the kernels index
  // in 32 bits.
  const int64_t rows = (shape.q_heads / shape.kv_heads) * shape.new_tokens;
  const int64_t row_blocks = cdiv(rows, kRows);
  if (rows >= (int64_t{1} << 31) || shape.batch * shape.kv_heads * row_blocks * num_splits >= (int64_t{1} << 31)) {
    return cudaErrorInvalidConfiguration;
  }
  SplitArgs a{};
  a.shape = shape;
  a.seqlens = seqlens;
  a.seqlens_int64 = seqlens_int64;
  a.group = shape.q_heads / shape.kv_heads;
  a.rows = rows;
  a.row_blocks = row_blocks;
  a.num_splits = num_splits;
  a.left = window_left;
  a.right = window_right;
  a.qk_scale = scale * kLog2e;
  a.paging = paging;
  a.opart = workspace;
  a.lpart = workspace + shape.batch * shape.kv_heads * num_splits * a.rows * shape.head_dim;
  switch (dtype) {
    case FloatType::kFloat32:
      return launch_typed<float>(q, k, v, a, out, lse, stream);
    case FloatType::kFloat16:
      return launch_typed<__half>(q, k, v, a, out, lse, stream);
    case FloatType::kBFloat16:
      return launch_typed<__nv_bfloat16>(q, k, v, a, out, lse, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace genfast::cuda

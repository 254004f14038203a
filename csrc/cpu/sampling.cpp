// CPU kernels of genfast::filter_logits and genfast::sample_tokens (semantics: genfast/ops/sampling.py).
//
// Rows run in parallel (at::parallel_for); each row is processed without a full sort:
//   1. y = x / temperature (fp32, a correctly rounded division like the reference), its max, and the row's
//      value flags (NaN, +inf, all -inf, overflow, bad knobs: the bits of csrc/common/sampling.h), in one pass;
//   2. top-k threshold t_k = the k-th largest y: a bounded min-heap of k values for small k (16 elements
//      at a time are skipped when none beats the heap's top), else a selection (below) with unit weights;
//   3. the survivors y >= t_k are gathered with their index and, for top-p, their fixed-point weight
//      (csrc/common/sampling.h: the same integer arithmetic as the Triton and CUDA kernels, so near-ties resolve
//      alike on every backend);
//   4. top-p threshold t_p = max{v : double(G(v)) >= max(top_p * double(Z), 1)}, G(v) the summed weight of
//      survivors >= v and Z = G(t_k), by a weighted 3-way quickselect over the survivors (expected linear);
//   5. min-p: (y_i - y_max) >= d, d the smallest float with double(d) >= log(min_p) (the reference's test);
//   6. the filtered row is written in one pass, or the Gumbel-max is taken over the survivors only, drawing
//      Philox noise (csrc/philox.h) for the kept ones.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <tuple>
#include <vector>

#include "../common/sampling.h"
#include "../op_checks.h"
#include "../philox.h"

namespace {

using namespace genfast::sampling;

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr float kPosInf = std::numeric_limits<float>::infinity();
constexpr int64_t kHeapMaxK = 256;
constexpr int kLanes = 16;  // elements per step of the vectorisable loops

// Smallest fp32 d with double(d) >= log(min_p); NaN min_p disables min-p, min_p > 1 keeps the max.
float min_p_bound(float min_p) {
  double bound = std::log(static_cast<double>(min_p));
  if (std::isnan(bound)) bound = -std::numeric_limits<double>::infinity();
  if (bound > 0) bound = 0;
  float d = static_cast<float>(bound);
  if (static_cast<double>(d) < bound) d = std::nextafter(d, kPosInf);
  return d;
}

struct Survivor {
  float y;
  int32_t index;
  int64_t w;  // unit weight (top-k selection) or fixed-point weight (top-p)
};

// max{v among a[0..n) : double(above + sum of w over a >= v) >= target}, or `fallback` when no v qualifies.
// 3-way quickselect: each round partitions around a median-of-three pivot into > / == / <, keeps the side
// the answer lies in and adds the weight of what lies above it to `above`. Expected O(n); ties cannot stall.
// Integer sums: the order of the partition does not change them.
float weighted_select(Survivor* a, int64_t n, double target, float fallback) {
  int64_t above = 0;
  float best = fallback;
  while (n > 0) {
    const float p0 = a[0].y, p1 = a[n / 2].y, p2 = a[n - 1].y;
    const float pivot = std::max(std::min(p0, p1), std::min(std::max(p0, p1), p2));
    // Dutch flag: [0, gt) > pivot, [gt, i) == pivot, [lt, n) < pivot.
    int64_t gt = 0, i = 0, lt = n;
    int64_t sum_ge = 0;
    while (i < lt) {
      if (a[i].y > pivot) {
        sum_ge += a[i].w;
        std::swap(a[i++], a[gt++]);
      } else if (a[i].y < pivot) {
        std::swap(a[i], a[--lt]);
      } else {
        sum_ge += a[i++].w;
      }
    }
    if (static_cast<double>(above + sum_ge) >= target) {  // G(pivot) >= target: the answer is pivot or larger
      best = pivot;
      n = gt;
    } else {
      above += sum_ge;
      a += lt;
      n -= lt;
    }
  }
  return best;
}

// The k-th largest of y[0..V) (0 < k < V), with multiplicity.
float kth_largest(const float* y, int64_t V, int64_t k, std::vector<Survivor>& scratch) {
  if (k <= kHeapMaxK) {
    std::vector<float> heap(y, y + k);  // min-heap of the k largest so far; its top is the running k-th
    std::make_heap(heap.begin(), heap.end(), std::greater<float>());
    auto offer = [&](float v) {
      if (v > heap.front()) {
        std::pop_heap(heap.begin(), heap.end(), std::greater<float>());
        heap.back() = v;
        std::push_heap(heap.begin(), heap.end(), std::greater<float>());
      }
    };
    int64_t i = k;
    for (; i + kLanes <= V; i += kLanes) {  // almost every group of 16 has nothing above the running k-th
      const float top = heap.front();
      bool any = false;
      for (int l = 0; l < kLanes; ++l) any |= y[i + l] > top;
      if (any) {
        for (int l = 0; l < kLanes; ++l) offer(y[i + l]);
      }
    }
    for (; i < V; ++i) offer(y[i]);
    return heap.front();
  }
  scratch.resize(V);
  for (int64_t i = 0; i < V; ++i) scratch[i] = {y[i], static_cast<int32_t>(i), 1};
  return weighted_select(scratch.data(), V, static_cast<double>(k), kNegInf);
}

struct RowKnobs {
  float temperature;
  int64_t top_k;
  float top_p, min_p;
};

struct RowResult {
  int64_t token;
  int32_t flags;
};

// Pass 1: y = x / temperature, the row max, and the value flags of x and y. Lane-wise accumulators keep the
// loop free of cross-iteration dependencies, so the compiler vectorises it.
template <typename scalar_t>
int32_t scale_and_scan(const scalar_t* x, int64_t V, float temperature, float* y, float& y_max_out) {
  float lane_max[kLanes];
  int32_t lane_flags[kLanes];
  for (int l = 0; l < kLanes; ++l) {
    lane_max[l] = kNegInf;
    lane_flags[l] = 0;
  }
  auto visit = [&](int l, int64_t i) {
    const float xf = static_cast<float>(x[i]);
    const float yi = xf / temperature;
    y[i] = yi;
    lane_max[l] = yi > lane_max[l] ? yi : lane_max[l];  // NaN never wins
    lane_flags[l] |= (xf != xf ? kFlagNaN : 0) | (xf == kPosInf ? kFlagPosInf : 0) |
                     ((std::fabs(yi) == kPosInf && std::fabs(xf) != kPosInf) ? kFlagOverflow : 0);
  };
  int64_t i = 0;
  for (; i + kLanes <= V; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) visit(l, i + l);
  }
  for (int l = 0; i < V; ++i, ++l) visit(l, i);
  float y_max = kNegInf;
  int32_t flags = 0;
  for (int l = 0; l < kLanes; ++l) {
    y_max = lane_max[l] > y_max ? lane_max[l] : y_max;
    flags |= lane_flags[l];
  }
  if (y_max == kNegInf) flags |= kFlagAllNegInf;
  y_max_out = y_max;
  return flags;
}

// Processes one row; writes the filtered row to `out` (filter) or returns the sampled token (sample).
template <typename scalar_t>
RowResult process_row(const scalar_t* x, int64_t V, RowKnobs knobs, float* out, const float* noise, uint64_t seed,
                      uint64_t counter_base, std::vector<float>& y, std::vector<Survivor>& scratch) {
  const bool greedy = !(knobs.temperature > 0.0f);  // NaN and negative temperatures too (validate=False)
  const float temperature = greedy ? 1.0f : knobs.temperature;
  y.resize(V);
  float y_max;
  int32_t flags = scale_and_scan(x, V, temperature, y.data(), y_max) | knob_flags(knobs.temperature, knobs.top_k,
                                                                                  knobs.top_p, knobs.min_p);
  int64_t arg_max = 0;  // the lowest index of the max (0 for a row without one: all -inf or NaN)
  if (y_max > kNegInf) {
    while (y[arg_max] != y_max) ++arg_max;
  }
  if (greedy) {
    if (out != nullptr) {
      std::fill(out, out + V, kNegInf);
      out[arg_max] = y[arg_max];
    }
    return {arg_max, flags};
  }

  const bool use_top_k = knobs.top_k > 0 && knobs.top_k < V;
  const bool use_top_p = knobs.top_p < 1.0f;  // NaN top_p disables, like the reference
  const float t_k = use_top_k ? kth_largest(y.data(), V, knobs.top_k, scratch) : kNegInf;
  float threshold = t_k;
  const bool have_survivors = use_top_k || use_top_p;
  if (have_survivors) {
    scratch.clear();
    int64_t z = 0;
    for (int64_t i = 0; i < V; ++i) {
      if (y[i] >= t_k) {
        const int64_t w = use_top_p ? fixed_weight(y[i] - y_max) : 1;
        scratch.push_back({y[i], static_cast<int32_t>(i), w});
        z += w;
      }
    }
    if (use_top_p) {
      threshold = std::max(threshold, weighted_select(scratch.data(), static_cast<int64_t>(scratch.size()),
                                                      top_p_target(knobs.top_p, z), threshold));
    }
  }
  const float d_min = min_p_bound(knobs.min_p);
  auto kept = [&](float v) { return v >= threshold && (v - y_max) >= d_min; };

  if (out != nullptr) {
    for (int64_t i = 0; i < V; ++i) out[i] = kept(y[i]) ? y[i] : kNegInf;
    return {arg_max, flags};
  }
  // Gumbel-max over kept tokens, noise drawn for those only; lowest index on ties, in any visiting order.
  float best_score = kNegInf;
  int64_t token = arg_max;
  auto offer = [&](float v, int64_t i) {
    if (!kept(v)) return;
    const float u = noise != nullptr ? noise[i] : genfast::philox_uniform(seed, counter_base + i);
    const float score = v - std::log(-std::log(u));
    if (score > best_score || (score == best_score && best_score > kNegInf && i < token)) {
      best_score = score;
      token = i;
    }
  };
  if (have_survivors) {
    for (const Survivor& s : scratch) offer(s.y, s.index);
  } else {
    for (int64_t i = 0; i < V; ++i) offer(y[i], i);
  }
  return {token, flags};
}

template <typename Body>
void for_each_row(const at::Tensor& logits_in, const at::Tensor& temperature, const at::Tensor& top_k,
                  const at::Tensor& top_p, const at::Tensor& min_p, int32_t* flags_out, Body body) {
  const at::Tensor logits = logits_in.contiguous();
  const at::Tensor t = temperature.contiguous(), k = top_k.contiguous(), p = top_p.contiguous(),
                   mp = min_p.contiguous();
  const float* t_ptr = t.data_ptr<float>();
  const int64_t* k_ptr = k.data_ptr<int64_t>();
  const float* p_ptr = p.data_ptr<float>();
  const float* mp_ptr = mp.data_ptr<float>();
  const int64_t B = logits.size(0), V = logits.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "sampling_cpu", [&] {
    const scalar_t* x = logits.data_ptr<scalar_t>();
    at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> y;
      std::vector<Survivor> scratch;
      for (int64_t b = begin; b < end; ++b) {
        flags_out[b] = body(b, x + b * V, V, RowKnobs{t_ptr[b], k_ptr[b], p_ptr[b], mp_ptr[b]}, y, scratch);
      }
    });
  });
}

// Shape guards of direct torch.ops calls, beyond the shared ones: at least one token, and fewer than 2^24
// (the fixed-point sums of csrc/common/sampling.h and the int32 survivor indices rely on it).
void check_vocab(const char* op, const at::Tensor& logits) {
  TORCH_CHECK(logits.size(1) >= 1 && logits.size(1) < kMaxVocab, op, ": logits must have between 1 and 2^24 - 1 ",
              "columns (tokens), got ", logits.size(1));
}

std::tuple<at::Tensor, at::Tensor> filter_logits_cpu(const at::Tensor& logits, const at::Tensor& temperature,
                                                     const at::Tensor& top_k, const at::Tensor& top_p,
                                                     const at::Tensor& min_p) {
  genfast::check_sampling_args("filter_logits", logits, temperature, top_k, top_p, min_p);
  check_vocab("filter_logits", logits);
  at::Tensor out = at::empty(logits.sizes(), logits.options().dtype(at::kFloat));
  at::Tensor flags = at::empty({logits.size(0)}, logits.options().dtype(at::kInt));
  float* o = out.data_ptr<float>();
  for_each_row(logits, temperature, top_k, top_p, min_p, flags.data_ptr<int32_t>(),
               [&](int64_t b, const auto* x, int64_t V, RowKnobs knobs, std::vector<float>& y,
                   std::vector<Survivor>& scratch) {
                 return process_row(x, V, knobs, o + b * V, nullptr, 0, 0, y, scratch).flags;
               });
  return {out, flags};
}

std::tuple<at::Tensor, at::Tensor> sample_tokens_cpu(const at::Tensor& logits, const at::Tensor& temperature,
                                                     const at::Tensor& top_k, const at::Tensor& top_p,
                                                     const at::Tensor& min_p, const std::optional<at::Tensor>& noise,
                                                     const std::optional<at::Tensor>& seed,
                                                     const std::optional<at::Tensor>& offsets) {
  genfast::check_sampling_args("sample_tokens", logits, temperature, top_k, top_p, min_p);
  check_vocab("sample_tokens", logits);
  genfast::check_sampling_noise_or_seeds("sample_tokens", logits, noise, seed, offsets);
  const at::Tensor noise_c = noise.has_value() ? noise->contiguous() : at::Tensor();
  const float* u = noise_c.defined() ? noise_c.data_ptr<float>() : nullptr;
  // Row b's noise: Philox(seed_b, step_b * V + col) with seed_b = seeds[b] (or the one seed) and step_b =
  // offsets[b] (or b): uint64 arithmetic, which wraps only past the bound the op checks.
  const at::Tensor seed_c = seed.has_value() ? seed->contiguous() : at::Tensor();
  const at::Tensor offsets_c = offsets.has_value() ? offsets->contiguous() : at::Tensor();
  const int64_t* seeds = seed_c.defined() ? seed_c.data_ptr<int64_t>() : nullptr;
  const int64_t seed_stride = seed_c.defined() && seed_c.numel() > 1 ? 1 : 0;
  const int64_t* steps = offsets_c.defined() ? offsets_c.data_ptr<int64_t>() : nullptr;
  at::Tensor out = at::empty({logits.size(0)}, logits.options().dtype(at::kLong));
  at::Tensor flags = at::empty({logits.size(0)}, logits.options().dtype(at::kInt));
  int64_t* o = out.data_ptr<int64_t>();
  for_each_row(logits, temperature, top_k, top_p, min_p, flags.data_ptr<int32_t>(),
               [&](int64_t b, const auto* x, int64_t V, RowKnobs knobs, std::vector<float>& y,
                   std::vector<Survivor>& scratch) {
                 const uint64_t s = seeds != nullptr ? static_cast<uint64_t>(seeds[b * seed_stride]) : 0;
                 const uint64_t step = static_cast<uint64_t>(steps != nullptr ? steps[b] : b);
                 const uint64_t base = step * static_cast<uint64_t>(V);
                 const RowResult r =
                     process_row(x, V, knobs, nullptr, u != nullptr ? u + b * V : nullptr, s, base, y, scratch);
                 o[b] = r.token;
                 return r.flags;
               });
  return {out, flags};
}

}  // namespace

TORCH_LIBRARY_IMPL(genfast, CPU, m) {
  m.impl("filter_logits", &filter_logits_cpu);
  m.impl("sample_tokens", &sample_tokens_cpu);
}

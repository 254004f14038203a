// CPU kernels of genfast::filter_logits and genfast::sample_tokens (semantics: genfast/ops/sampling.py).
//
// Rows run in parallel (at::parallel_for); each row is processed without a full sort:
//   1. y = x / temperature (fp32, a correctly rounded division like the reference), its max and argmax;
//   2. top-k threshold t_k = the k-th largest y: a bounded min-heap of k values for small k (one compare
//      per element for almost all of them), else a selection (below) with unit weights;
//   3. top-p threshold t_p = max{v : sum of exp(y_j - y_max) over y_j >= v, y_j >= t_k, is >= top_p * Z1}
//      by a weighted 3-way quickselect over the top-k survivors (expected linear time);
//   4. min-p: (y_i - y_max) >= d, d the smallest float with double(d) >= log(min_p) (exactly the
//      reference's fp64 test);
//   5. one last pass writes the filtered row, or takes the Gumbel-max over kept tokens, drawing
//      Philox noise (csrc/philox.h) only for those.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <vector>

#include "../op_checks.h"
#include "../philox.h"

namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr int64_t kHeapMaxK = 256;

// Smallest fp32 d with double(d) >= log(min_p); NaN min_p disables min-p, min_p > 1 keeps the max.
float min_p_bound(float min_p) {
  double bound = std::log(static_cast<double>(min_p));
  if (std::isnan(bound)) bound = -std::numeric_limits<double>::infinity();
  if (bound > 0) bound = 0;
  float d = static_cast<float>(bound);
  if (static_cast<double>(d) < bound) d = std::nextafter(d, std::numeric_limits<float>::infinity());
  return d;
}

struct Weighted {
  float y, w;
};

// max{v among a[0..n) : (above + sum of w over a >= v) >= target}, or `fallback` when no v qualifies.
// 3-way quickselect: each round partitions around a median-of-three pivot into > / == / <, keeps the side
// the answer lies in and adds the mass of what lies above it to `above`. Expected O(n); ties cannot stall.
float weighted_select(Weighted* a, int64_t n, double target, float fallback) {
  double above = 0;
  float best = fallback;
  while (n > 0) {
    const float p0 = a[0].y, p1 = a[n / 2].y, p2 = a[n - 1].y;
    const float pivot = std::max(std::min(p0, p1), std::min(std::max(p0, p1), p2));
    // Dutch flag: [0, gt) > pivot, [gt, i) == pivot, [lt, n) < pivot.
    int64_t gt = 0, i = 0, lt = n;
    double sum_gt = 0, sum_eq = 0;
    while (i < lt) {
      if (a[i].y > pivot) {
        sum_gt += a[i].w;
        std::swap(a[i++], a[gt++]);
      } else if (a[i].y < pivot) {
        std::swap(a[i], a[--lt]);
      } else {
        sum_eq += a[i++].w;
      }
    }
    if (above + sum_gt + sum_eq >= target) {  // G(pivot) >= target: the answer is pivot or larger
      best = pivot;
      n = gt;
    } else {
      above += sum_gt + sum_eq;
      a += lt;
      n -= lt;
    }
  }
  return best;
}

// The k-th largest of y[0..V) (0 < k < V), with multiplicity.
float kth_largest(const float* y, int64_t V, int64_t k, std::vector<Weighted>& scratch) {
  if (k <= kHeapMaxK) {
    std::vector<float> heap(y, y + k);  // min-heap of the k largest so far; its top is the running k-th
    std::make_heap(heap.begin(), heap.end(), std::greater<float>());
    for (int64_t i = k; i < V; ++i) {
      if (y[i] > heap.front()) {
        std::pop_heap(heap.begin(), heap.end(), std::greater<float>());
        heap.back() = y[i];
        std::push_heap(heap.begin(), heap.end(), std::greater<float>());
      }
    }
    return heap.front();
  }
  scratch.resize(V);
  for (int64_t i = 0; i < V; ++i) scratch[i] = {y[i], 1.0f};
  return weighted_select(scratch.data(), V, static_cast<double>(k), kNegInf);
}

struct RowKnobs {
  float temperature;
  int64_t top_k;
  float top_p, min_p;
};

// Processes one row; writes the filtered row to `out` (filter) or returns the sampled token (sample).
template <typename scalar_t>
int64_t process_row(const scalar_t* x, int64_t V, RowKnobs knobs, float* out, const float* noise, uint64_t seed,
                    uint64_t counter_base, std::vector<float>& y, std::vector<Weighted>& scratch) {
  const bool greedy = !(knobs.temperature > 0.0f);  // NaN and negative temperatures too (validate=False)
  const float temperature = greedy ? 1.0f : knobs.temperature;
  y.resize(V);
  for (int64_t i = 0; i < V; ++i) y[i] = static_cast<float>(x[i]) / temperature;
  float y_max = kNegInf;
  int64_t arg_max = 0;
  for (int64_t i = 0; i < V; ++i) {
    if (y[i] > y_max) {
      y_max = y[i];
      arg_max = i;
    }
  }
  if (greedy) {
    if (out != nullptr) {
      std::fill(out, out + V, kNegInf);
      out[arg_max] = y[arg_max];
    }
    return arg_max;
  }

  float threshold = kNegInf;
  if (knobs.top_k > 0 && knobs.top_k < V) threshold = kth_largest(y.data(), V, knobs.top_k, scratch);
  if (knobs.top_p < 1.0f) {  // NaN top_p disables, like the reference
    scratch.clear();
    double z = 0;
    for (int64_t i = 0; i < V; ++i) {
      if (y[i] >= threshold) {
        const float w = std::exp(y[i] - y_max);
        scratch.push_back({y[i], w});
        z += w;
      }
    }
    // top_p <= 0 (validate=False) must still keep the max: a tiny positive target does.
    const double target = std::max(static_cast<double>(knobs.top_p) * z, 1e-30);
    threshold = std::max(threshold, weighted_select(scratch.data(), static_cast<int64_t>(scratch.size()), target,
                                                    threshold));
  }
  const float d_min = min_p_bound(knobs.min_p);

  if (out != nullptr) {
    for (int64_t i = 0; i < V; ++i) out[i] = (y[i] >= threshold && (y[i] - y_max) >= d_min) ? y[i] : kNegInf;
    return arg_max;
  }
  float best_score = kNegInf;
  int64_t token = arg_max;
  for (int64_t i = 0; i < V; ++i) {
    if (y[i] >= threshold && (y[i] - y_max) >= d_min) {  // noise only for kept tokens
      const float u = noise != nullptr ? noise[i] : genfast::philox_uniform(seed, counter_base + i);
      const float score = y[i] - std::log(-std::log(u));
      if (score > best_score) {
        best_score = score;
        token = i;
      }
    }
  }
  return token;
}

template <typename Body>
void for_each_row(const at::Tensor& logits_in, const at::Tensor& temperature, const at::Tensor& top_k,
                  const at::Tensor& top_p, const at::Tensor& min_p, Body body) {
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
      std::vector<Weighted> scratch;
      for (int64_t b = begin; b < end; ++b) {
        body(b, x + b * V, V, RowKnobs{t_ptr[b], k_ptr[b], p_ptr[b], mp_ptr[b]}, y, scratch);
      }
    });
  });
}

at::Tensor filter_logits_cpu(const at::Tensor& logits, const at::Tensor& temperature, const at::Tensor& top_k,
                             const at::Tensor& top_p, const at::Tensor& min_p) {
  genfast::check_sampling_args("filter_logits", logits, temperature, top_k, top_p, min_p);
  at::Tensor out = at::empty(logits.sizes(), logits.options().dtype(at::kFloat));
  float* o = out.data_ptr<float>();
  for_each_row(logits, temperature, top_k, top_p, min_p,
               [&](int64_t b, const auto* x, int64_t V, RowKnobs knobs, std::vector<float>& y,
                   std::vector<Weighted>& scratch) {
                 process_row(x, V, knobs, o + b * V, nullptr, 0, 0, y, scratch);
               });
  return out;
}

at::Tensor sample_tokens_cpu(const at::Tensor& logits, const at::Tensor& temperature, const at::Tensor& top_k,
                             const at::Tensor& top_p, const at::Tensor& min_p, const std::optional<at::Tensor>& noise,
                             const std::optional<at::Tensor>& seed) {
  genfast::check_sampling_args("sample_tokens", logits, temperature, top_k, top_p, min_p);
  genfast::check_noise_or_seed("sample_tokens", logits, noise, seed);
  const at::Tensor noise_c = noise.has_value() ? noise->contiguous() : at::Tensor();
  const uint64_t s = seed.has_value() ? static_cast<uint64_t>(seed->item<int64_t>()) : 0;
  const float* u = noise_c.defined() ? noise_c.data_ptr<float>() : nullptr;
  at::Tensor out = at::empty({logits.size(0)}, logits.options().dtype(at::kLong));
  int64_t* o = out.data_ptr<int64_t>();
  for_each_row(logits, temperature, top_k, top_p, min_p,
               [&](int64_t b, const auto* x, int64_t V, RowKnobs knobs, std::vector<float>& y,
                   std::vector<Weighted>& scratch) {
                 const uint64_t base = static_cast<uint64_t>(b) * static_cast<uint64_t>(V);
                 o[b] = process_row(x, V, knobs, nullptr, u != nullptr ? u + b * V : nullptr, s, base, y, scratch);
               });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(genfast, CPU, m) {
  m.impl("filter_logits", &filter_logits_cpu);
  m.impl("sample_tokens", &sample_tokens_cpu);
}

// The exact level's running softmax sums: every row swaps the old share of a few changed keys
// for their new share, in one pass over the rows (float32, CPU).
//
// The same arithmetic as `attention._swap_key_contributions` in PyTorch, which takes about 20
// operators per attention block, most of them on tensors of a few thousand values, where each
// operator's fixed cost is larger than its arithmetic (BENCHMARKS.md, "roofline"). Here each row
// reads its query once, forms its 2 m logits from the changed keys (held transposed, so that a
// loaded vector of keys serves one multiply-add per feature), raises its shift to the
// log-sum-exp of its new logits, and adds the weighted values to its numerator, while the
// row's sums are in cache. Rows are independent; threads share blocks of rows.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "vectors.h"

namespace {

using namespace eventful_vectors;

constexpr int64_t ROW_BLOCK = 32;  // rows per task of a thread

// V vectors of one row's numerator from column c: rescaled, plus the new keys' weighted values,
// less the old keys'.
template <int V>
void accumulate_values(float* numerator, float rescale, const float* weights,
                       const float* new_values, const float* old_weights,
                       const float* old_values, int64_t count, int64_t dh, int64_t c) {
  Vector a[V];
  for (int u = 0; u < V; ++u) a[u] = load(numerator + c + u * WIDTH) * splat(rescale);
  for (int64_t j = 0; j < count; ++j) {
    const Vector w = splat(weights[j]);
    const float* row = new_values + j * dh + c;
    for (int u = 0; u < V; ++u) a[u] += w * load(row + u * WIDTH);
  }
  for (int64_t j = 0; j < count; ++j) {
    const Vector w = splat(old_weights[j]);
    const float* row = old_values + j * dh + c;
    for (int u = 0; u < V; ++u) a[u] -= w * load(row + u * WIDTH);
  }
  for (int u = 0; u < V; ++u) store(numerator + c + u * WIDTH, a[u]);
}

// numerator[0, dh) = numerator * rescale + sum_j weights[j] values[j] - sum_j old[j] olds[j].
void row_values(float* numerator, float rescale, const float* weights, const float* new_values,
                const float* old_weights, const float* old_values, int64_t count, int64_t dh) {
  int64_t c = 0;
  for (; c + 8 * WIDTH <= dh; c += 8 * WIDTH) {
    accumulate_values<8>(numerator, rescale, weights, new_values, old_weights, old_values, count,
                         dh, c);
  }
  for (; c + 4 * WIDTH <= dh; c += 4 * WIDTH) {
    accumulate_values<4>(numerator, rescale, weights, new_values, old_weights, old_values, count,
                         dh, c);
  }
  for (; c + WIDTH <= dh; c += WIDTH) {
    accumulate_values<1>(numerator, rescale, weights, new_values, old_weights, old_values, count,
                         dh, c);
  }
  for (; c < dh; ++c) {
    float a = numerator[c] * rescale;
    for (int64_t j = 0; j < count; ++j) a += weights[j] * new_values[j * dh + c];
    for (int64_t j = 0; j < count; ++j) a -= old_weights[j] * old_values[j * dh + c];
    numerator[c] = a;
  }
}

void check_float32(const torch::Tensor& t, const char* name, bool contiguous = true) {
  const bool laid_out = contiguous ? t.is_contiguous() : t.stride(-1) == 1;
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == torch::kFloat32 && laid_out,
              "swap_key_contributions expects ", name, " as a float32 CPU tensor, ",
              contiguous ? "contiguous" : "its last dimension contiguous", ", got ",
              t.scalar_type(), " on ", t.device(), " with strides ", t.strides());
}

void check_shape(const torch::Tensor& t, const char* name, at::IntArrayRef shape) {
  TORCH_CHECK(t.sizes() == shape, "swap_key_contributions expects ", name, " of shape ", shape,
              ", got ", t.sizes());
}

// numerator (G, H, L, dh), denominator and shift (G, H, L): updated in place. q (G, H, L, dh),
// any strides but a contiguous last dimension (a view of the qkv rows); new and old keys and
// values (G, H, m, dh); columns_bias (G, H, L, m) or none.
void swap_key_contributions(torch::Tensor numerator, torch::Tensor denominator,
                            torch::Tensor shift, const torch::Tensor& q,
                            const torch::Tensor& new_keys, const torch::Tensor& new_values,
                            const torch::Tensor& old_keys, const torch::Tensor& old_values,
                            const c10::optional<torch::Tensor>& columns_bias) {
  TORCH_CHECK(q.dim() == 4, "swap_key_contributions expects q as (G, H, L, dh), got ",
              q.sizes());
  check_float32(q, "q", false);
  const int64_t groups = q.size(0), heads = q.size(1), length = q.size(2), dh = q.size(3);
  TORCH_CHECK(new_keys.dim() == 4, "swap_key_contributions expects new_keys as (G, H, m, dh), got ",
              new_keys.sizes());
  const int64_t count = new_keys.size(2);
  const torch::Tensor* changed[] = {&new_keys, &new_values, &old_keys, &old_values};
  const char* names[] = {"new_keys", "new_values", "old_keys", "old_values"};
  for (int t = 0; t < 4; ++t) {
    check_float32(*changed[t], names[t]);
    check_shape(*changed[t], names[t], {groups, heads, count, dh});
  }
  check_float32(numerator, "numerator");
  check_shape(numerator, "numerator", q.sizes());
  check_float32(denominator, "denominator");
  check_shape(denominator, "denominator", {groups, heads, length});
  check_float32(shift, "shift");
  check_shape(shift, "shift", {groups, heads, length});
  const float* bias = nullptr;
  if (columns_bias.has_value() && columns_bias->defined()) {
    check_float32(*columns_bias, "columns_bias");
    check_shape(*columns_bias, "columns_bias", {groups, heads, length, count});
    bias = columns_bias->data_ptr<float>();
  }
  const int64_t batch = groups * heads;
  const int64_t group_stride = q.stride(0), head_stride = q.stride(1), row_stride = q.stride(2);
  if (count == 0 || length == 0) return;
  // Keys held transposed: the new ones in columns [0, m), the old ones in [half, half + m),
  // half = m rounded up to whole vectors; zeros in the other columns.
  const int64_t half = (count + WIDTH - 1) / WIDTH * WIDTH;
  const int64_t padded = 2 * half;
  const int64_t blocks = (length + ROW_BLOCK - 1) / ROW_BLOCK;
  float* numerators = numerator.data_ptr<float>();
  float* denominators = denominator.data_ptr<float>();
  float* shifts = shift.data_ptr<float>();
  const float* queries = q.data_ptr<float>();
  const float* news[] = {new_keys.data_ptr<float>(), new_values.data_ptr<float>()};
  const float* olds[] = {old_keys.data_ptr<float>(), old_values.data_ptr<float>()};

  at::parallel_for(0, batch * blocks, 1, [&](int64_t begin, int64_t end) {
    // One buffer for the transposed keys, the logits and the weights, each part starting on a
    // cache line so that no loaded vector straddles two lines.
    const int64_t keys_size = dh * padded, logits_size = ROW_BLOCK * padded;
    std::vector<float> buffer(keys_size + logits_size + 2 * half + LINE);
    float* keys_by_feature = aligned(buffer.data());
    float* logits = keys_by_feature + keys_size;
    float* weights = logits + logits_size;
    int64_t held = -1;  // the (group, head) whose keys keys_by_feature holds
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / blocks, first = (task % blocks) * ROW_BLOCK;
      const int64_t rows = std::min(ROW_BLOCK, length - first);
      if (b != held) {
        const float* new_k = news[0] + b * count * dh;
        const float* old_k = olds[0] + b * count * dh;
        std::fill(keys_by_feature, keys_by_feature + keys_size, 0.0f);
        for (int64_t j = 0; j < count; ++j) {
          for (int64_t d = 0; d < dh; ++d) {
            keys_by_feature[d * padded + j] = new_k[j * dh + d];
            keys_by_feature[d * padded + half + j] = old_k[j * dh + d];
          }
        }
        held = b;
      }
      const float* block_q =
          queries + (b / heads) * group_stride + (b % heads) * head_stride + first * row_stride;
      // The block's query rows are far apart (rows of the qkv buffer): each pair asks for the
      // next pair's cache lines while it computes.
      int64_t r = 0;
      for (; r + 2 <= rows; r += 2) {
        for (int64_t next = r + 2; next < std::min(r + 4, rows); ++next) {
          for (int64_t line = 0; line < dh; line += LINE) {
            __builtin_prefetch(block_q + next * row_stride + line);
          }
        }
        rows_logits<2, 4>(block_q + r * row_stride, row_stride, keys_by_feature, dh, padded,
                       logits + r * padded);
      }
      if (r < rows) {
        rows_logits<1, 4>(block_q + r * row_stride, row_stride, keys_by_feature, dh, padded,
                       logits + r * padded);
      }
      for (r = 0; r < rows; ++r) {
        const int64_t row = b * length + first + r;
        float* row_logits = logits + r * padded;
        if (bias != nullptr) {
          const float* row_bias = bias + row * count;
          for (int64_t j = 0; j < count; ++j) {
            row_logits[j] += row_bias[j];
            row_logits[half + j] += row_bias[j];
          }
        }
        // The new logits' log-sum-exp, then the raised shift; lanes at or past m count for
        // nothing.
        Vector largest = splat(-INFINITY);
        for (int64_t c = 0; c < half; c += WIDTH) {
          const Integers in_use = lanes_below(c, count);
          largest = max(largest, in_use ? load(row_logits + c) : splat(-INFINITY));
        }
        const float most = max_of(largest);
        Vector total{};
        for (int64_t c = 0; c < half; c += WIDTH) {
          const Integers in_use = lanes_below(c, count);
          total += in_use ? vector_exp(load(row_logits + c) - splat(most)) : Vector{};
        }
        const float old_shift = shifts[row];
        const float raised = std::max(old_shift, most + std::log(sum_of(total)));
        // Every weight is exp(l - raised), so that a key whose logit did not change (a padding
        // position of a group) adds exactly the share it removes.
        Vector change{};
        for (int64_t c = 0; c < half; c += WIDTH) {
          const Integers in_use = lanes_below(c, count);
          const Vector added = vector_exp(load(row_logits + c) - splat(raised));
          const Vector removed = vector_exp(load(row_logits + half + c) - splat(raised));
          const Vector difference = in_use ? added - removed : Vector{};
          change += difference;
          store(weights + c, added);
          store(weights + half + c, removed);
        }
        const float rescale = std::exp(old_shift - raised);
        denominators[row] = denominators[row] * rescale + sum_of(change);
        row_values(numerators + row * dh, rescale, weights, news[1] + b * count * dh,
                   weights + half, olds[1] + b * count * dh, count, dh);
        shifts[row] = raised;
      }
    }
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(eventful, library) {
  library.def(
      "swap_key_contributions(Tensor(a!) numerator, Tensor(b!) denominator, Tensor(c!) shift, "
      "Tensor q, Tensor new_keys, Tensor new_values, Tensor old_keys, Tensor old_values, "
      "Tensor? columns_bias) -> ()");
}

TORCH_LIBRARY_IMPL(eventful, CPU, library) {
  library.impl("swap_key_contributions", &swap_key_contributions);
}

// The exact level's running softmax sums of a block of query rows of one head: each row swaps
// the old share of a few changed keys for their new share (swap_key_contributions.cpp,
// exact_update.cpp).
//
// Row i keeps U_i = sum_j exp(l_ij - m_i) v_j (its numerator, dh values), Z_i = sum_j
// exp(l_ij - m_i) (its denominator) and the shift m_i. Each row reads its query once, forms its
// 2 m logits from the changed keys (held transposed, so that a loaded vector of keys serves one
// multiply-add per feature), raises its shift to the log-sum-exp of its new logits, and adds the
// weighted values to its numerator, while the row's sums are in cache. Rows are independent.

#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "vectors.h"

namespace eventful_swap {

using namespace eventful_vectors;

// V vectors of one row's numerator from column c: rescaled, plus the new keys' weighted values,
// less the old keys'.
template <int V>
inline void accumulate_values(float* numerator, float rescale, const float* weights,
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
inline void row_values(float* numerator, float rescale, const float* weights,
                       const float* new_values, const float* old_weights,
                       const float* old_values, int64_t count, int64_t dh) {
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

// The changed keys of one head: m = count keys, new ones and old ones, each (m, dh) contiguous,
// with their values.
struct ChangedKeys {
  const float* new_keys;
  const float* new_values;
  const float* old_keys;
  const float* old_values;
  int64_t count;
  int64_t dh;
  // Columns of the transposed keys: the new ones in [0, m), the old ones in [m, 2 m), the rest
  // up to whole vectors zero.
  int64_t padded() const { return (2 * count + WIDTH - 1) / WIDTH * WIDTH; }
};

// keys_by_feature (dh, padded): the changed keys transposed, zeros in the unused columns.
inline void lay_out_changed_keys(const ChangedKeys& keys, float* keys_by_feature) {
  const int64_t dh = keys.dh, count = keys.count, padded = keys.padded();
  std::fill(keys_by_feature, keys_by_feature + dh * padded, 0.0f);
  for (int64_t j = 0; j < count; ++j) {
    for (int64_t d = 0; d < dh; ++d) {
      keys_by_feature[d * padded + j] = keys.new_keys[j * dh + d];
      keys_by_feature[d * padded + count + j] = keys.old_keys[j * dh + d];
    }
  }
}

// `rows` consecutive query rows (from `queries`, rows `row_stride` apart) swap the changed keys'
// share of their sums (from `numerators` (rows, dh), `denominators`, `shifts`). A row with
// skip[r] set is left as it is (it is recomputed anyway). `bias` (rows, m): the changed columns'
// bias of each row, or null. `logits` holds rows x padded floats, `weights` padded, both on
// cache lines.
inline void swap_rows(const ChangedKeys& keys, const float* keys_by_feature,
                      const float* queries, int64_t row_stride, int64_t rows, const float* bias,
                      const uint8_t* skip, float* numerators, float* denominators,
                      float* shifts, float* logits, float* weights) {
  const int64_t count = keys.count, dh = keys.dh, padded = keys.padded();
  // The rows are far apart (rows of the qkv buffer): each group of four asks for the next
  // group's cache lines while it computes. Four rows keep at least four sums in flight where the
  // changed keys fill a single vector.
  int64_t r = 0;
  for (; r + 4 <= rows; r += 4) {
    for (int64_t next = r + 4; next < std::min(r + 8, rows); ++next) {
      for (int64_t line = 0; line < dh; line += LINE) {
        __builtin_prefetch(queries + next * row_stride + line);
      }
    }
    rows_logits<4, 2>(queries + r * row_stride, row_stride, keys_by_feature, dh, padded,
                      logits + r * padded);
  }
  for (; r < rows; ++r) {
    rows_logits<1, 4>(queries + r * row_stride, row_stride, keys_by_feature, dh, padded,
                      logits + r * padded);
  }
  for (r = 0; r < rows; ++r) {
    if (skip != nullptr && skip[r]) continue;
    float* row_logits = logits + r * padded;
    if (bias != nullptr) {
      const float* row_bias = bias + r * count;
      for (int64_t j = 0; j < count; ++j) {
        row_logits[j] += row_bias[j];
        row_logits[count + j] += row_bias[j];
      }
    }
    // The new logits' log-sum-exp, then the raised shift; lanes of old keys or past them count
    // for nothing.
    Vector largest = splat(-INFINITY);
    for (int64_t c = 0; c < count; c += WIDTH) {
      largest = max(largest, lanes_below(c, count) ? load(row_logits + c) : splat(-INFINITY));
    }
    const float most = max_of(largest);
    Vector total{};
    for (int64_t c = 0; c < count; c += WIDTH) {
      total += lanes_below(c, count) ? vector_exp(load(row_logits + c) - splat(most)) : Vector{};
    }
    const float old_shift = shifts[r];
    const float raised = std::max(old_shift, most + std::log(sum_of(total)));
    // Every weight is exp(l - raised), so that a key whose logit did not change (a padding
    // position of a group) adds exactly the share it removes: the new keys' weights count
    // positively in the denominator, the old keys' negatively.
    Vector change{};
    for (int64_t c = 0; c < padded; c += WIDTH) {
      const Vector weight =
          lanes_below(c, 2 * count) ? vector_exp(load(row_logits + c) - splat(raised)) : Vector{};
      change += lanes_below(c, count) ? weight : -weight;
      store(weights + c, weight);
    }
    const float rescale = std::exp(old_shift - raised);
    denominators[r] = denominators[r] * rescale + sum_of(change);
    row_values(numerators + r * dh, rescale, weights, keys.new_values, weights + count,
               keys.old_values, count, dh);
    shifts[r] = raised;
  }
}

}  // namespace eventful_swap

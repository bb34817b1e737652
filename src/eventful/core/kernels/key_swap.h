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
// less the old keys', each product fused into its sum (`multiply_add`), so that the one-row and
// two-row forms round alike.
template <int V>
inline void accumulate_values(float* numerator, float rescale, const float* weights,
                              const float* new_values, const float* old_weights,
                              const float* old_values, int64_t count, int64_t dh, int64_t c) {
  Vector a[V];
  for (int u = 0; u < V; ++u) a[u] = load(numerator + c + u * WIDTH) * splat(rescale);
  for (int64_t j = 0; j < count; ++j) {
    const Vector w = splat(weights[j]);
    const float* row = new_values + j * dh + c;
    for (int u = 0; u < V; ++u) a[u] = multiply_add(w, load(row + u * WIDTH), a[u]);
  }
  for (int64_t j = 0; j < count; ++j) {
    const Vector w = splat(-old_weights[j]);
    const float* row = old_values + j * dh + c;
    for (int u = 0; u < V; ++u) a[u] = multiply_add(w, load(row + u * WIDTH), a[u]);
  }
  for (int u = 0; u < V; ++u) store(numerator + c + u * WIDTH, a[u]);
}

// The features [c, dh) of `row_values`, one at a time.
inline void row_values_tail(float* numerator, float rescale, const float* weights,
                            const float* new_values, const float* old_weights,
                            const float* old_values, int64_t count, int64_t dh, int64_t c) {
  for (; c < dh; ++c) {
    float a = numerator[c] * rescale;
    for (int64_t j = 0; j < count; ++j) a = std::fma(weights[j], new_values[j * dh + c], a);
    for (int64_t j = 0; j < count; ++j) a = std::fma(-old_weights[j], old_values[j * dh + c], a);
    numerator[c] = a;
  }
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
  row_values_tail(numerator, rescale, weights, new_values, old_weights, old_values, count, dh, c);
}

// Two rows' V vectors from column c at once, each formed as `accumulate_values` forms it: the
// values loaded once serve both rows, and 2 V sums are in flight (V = 4 where vectors hold 16
// floats and dh = 64: one row's four sums alone wait on the adder's latency). `weights` of a row:
// its new keys' in [0, count), its old keys' in [count, 2 count).
template <int V>
inline void accumulate_values_2(float* numerator0, float* numerator1, float rescale0,
                                float rescale1, const float* weights0, const float* weights1,
                                const float* new_values, const float* old_values, int64_t count,
                                int64_t dh, int64_t c) {
  Vector a[V], b[V];
  for (int u = 0; u < V; ++u) {
    a[u] = load(numerator0 + c + u * WIDTH) * splat(rescale0);
    b[u] = load(numerator1 + c + u * WIDTH) * splat(rescale1);
  }
  for (int64_t j = 0; j < count; ++j) {
    const Vector w0 = splat(weights0[j]), w1 = splat(weights1[j]);
    const float* row = new_values + j * dh + c;
    for (int u = 0; u < V; ++u) {
      const Vector value = load(row + u * WIDTH);
      a[u] = multiply_add(w0, value, a[u]);
      b[u] = multiply_add(w1, value, b[u]);
    }
  }
  for (int64_t j = 0; j < count; ++j) {
    const Vector w0 = splat(-weights0[count + j]), w1 = splat(-weights1[count + j]);
    const float* row = old_values + j * dh + c;
    for (int u = 0; u < V; ++u) {
      const Vector value = load(row + u * WIDTH);
      a[u] = multiply_add(w0, value, a[u]);
      b[u] = multiply_add(w1, value, b[u]);
    }
  }
  for (int u = 0; u < V; ++u) {
    store(numerator0 + c + u * WIDTH, a[u]);
    store(numerator1 + c + u * WIDTH, b[u]);
  }
}

// `row_values` of two rows: the same sums, each row's in the same order.
inline void two_rows_values(float* numerator0, float* numerator1, float rescale0,
                            float rescale1, const float* weights0, const float* weights1,
                            const float* new_values, const float* old_values, int64_t count,
                            int64_t dh) {
  int64_t c = 0;
  for (; c + 8 * WIDTH <= dh; c += 8 * WIDTH) {  // eight sums per row already: one row at a time
    accumulate_values<8>(numerator0, rescale0, weights0, new_values, weights0 + count,
                         old_values, count, dh, c);
    accumulate_values<8>(numerator1, rescale1, weights1, new_values, weights1 + count,
                         old_values, count, dh, c);
  }
  for (; c + 4 * WIDTH <= dh; c += 4 * WIDTH) {
    accumulate_values_2<4>(numerator0, numerator1, rescale0, rescale1, weights0, weights1,
                           new_values, old_values, count, dh, c);
  }
  for (; c + WIDTH <= dh; c += WIDTH) {
    accumulate_values_2<1>(numerator0, numerator1, rescale0, rescale1, weights0, weights1,
                           new_values, old_values, count, dh, c);
  }
  if (c < dh) {  // features past the last whole vector
    row_values_tail(numerator0, rescale0, weights0, new_values, weights0 + count, old_values,
                    count, dh, c);
    row_values_tail(numerator1, rescale1, weights1, new_values, weights1 + count, old_values,
                    count, dh, c);
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

constexpr int64_t SWAP_CHUNK = 32;  // rows whose weights are held before their values

// `rows` consecutive query rows (from `queries`, rows `row_stride` apart) swap the changed keys'
// share of their sums (from `numerators` (rows, dh), `denominators`, `shifts`). A row with
// skip[r] set is left as it is (it is recomputed anyway). `bias` (rows, m): the changed columns'
// bias of each row, or null. `logits` holds rows x padded floats, on a cache line: each row's
// logits, then its weights.
inline void swap_rows(const ChangedKeys& keys, const float* keys_by_feature,
                      const float* queries, int64_t row_stride, int64_t rows, const float* bias,
                      const uint8_t* skip, float* numerators, float* denominators,
                      float* shifts, float* logits) {
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
  // Each row's weights take the place of its logits; then the rows' values, two rows at a time.
  float rescales[SWAP_CHUNK];
  for (int64_t start = 0; start < rows; start += SWAP_CHUNK) {
    const int64_t end = std::min(rows, start + SWAP_CHUNK);
    for (r = start; r < end; ++r) {
      if (skip != nullptr && skip[r]) continue;
      float* row_logits = logits + r * padded;
      if (bias != nullptr) {
        const float* row_bias = bias + r * count;
        for (int64_t j = 0; j < count; ++j) {
          row_logits[j] += row_bias[j];
          row_logits[count + j] += row_bias[j];
        }
      }
      // The new logits' log-sum-exp, then the raised shift; lanes of old keys or past them
      // count for nothing.
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
        const Vector weight = lanes_below(c, 2 * count)
                                  ? vector_exp(load(row_logits + c) - splat(raised))
                                  : Vector{};
        change += lanes_below(c, count) ? weight : -weight;
        store(row_logits + c, weight);
      }
      const float rescale = std::exp(old_shift - raised);
      rescales[r - start] = rescale;
      denominators[r] = denominators[r] * rescale + sum_of(change);
      shifts[r] = raised;
    }
    int64_t waiting = -1;  // a swapped row without its pair yet
    for (r = start; r < end; ++r) {
      if (skip != nullptr && skip[r]) continue;
      if (waiting < 0) {
        waiting = r;
        continue;
      }
      two_rows_values(numerators + waiting * dh, numerators + r * dh, rescales[waiting - start],
                      rescales[r - start], logits + waiting * padded, logits + r * padded,
                      keys.new_values, keys.old_values, count, dh);
      waiting = -1;
    }
    if (waiting >= 0) {
      const float* weights = logits + waiting * padded;
      row_values(numerators + waiting * dh, rescales[waiting - start], weights, keys.new_values,
                 weights + count, keys.old_values, count, dh);
    }
  }
}

}  // namespace eventful_swap

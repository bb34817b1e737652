// The exact level's running softmax sums of a block of query rows of one head: each row swaps
// the old share of a few changed keys for their new share (swap_key_contributions.cpp,
// exact_update.cpp).
//
// Row i keeps U_i = sum_j exp(l_ij - m_i) v_j (its numerator, dh values), Z_i = sum_j
// exp(l_ij - m_i) (its denominator) and the shift m_i. Each row reads its query once, forms its
// 2 m logits from the changed keys (held transposed, so that a loaded vector of keys serves one
// multiply-add per feature), raises its shift to the log-sum-exp of its new logits (that step
// across the lanes of WIDTH rows at once), and adds the weighted values to its numerator, while
// the row's sums are in cache. Rows are independent.

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
                              int64_t stride, const float* new_values, const float* old_weights,
                              const float* old_values, int64_t count, int64_t dh, int64_t c) {
  Vector a[V];
  for (int u = 0; u < V; ++u) a[u] = load(numerator + c + u * WIDTH) * splat(rescale);
  for (int64_t j = 0; j < count; ++j) {
    const Vector w = splat(weights[j * stride]);
    const float* row = new_values + j * dh + c;
    for (int u = 0; u < V; ++u) a[u] = multiply_add(w, load(row + u * WIDTH), a[u]);
  }
  for (int64_t j = 0; j < count; ++j) {
    const Vector w = splat(-old_weights[j * stride]);
    const float* row = old_values + j * dh + c;
    for (int u = 0; u < V; ++u) a[u] = multiply_add(w, load(row + u * WIDTH), a[u]);
  }
  for (int u = 0; u < V; ++u) store(numerator + c + u * WIDTH, a[u]);
}

// The features [c, dh) of `row_values`, one at a time.
inline void row_values_tail(float* numerator, float rescale, const float* weights,
                            int64_t stride, const float* new_values, const float* old_weights,
                            const float* old_values, int64_t count, int64_t dh, int64_t c) {
  for (; c < dh; ++c) {
    float a = numerator[c] * rescale;
    for (int64_t j = 0; j < count; ++j) {
      a = std::fma(weights[j * stride], new_values[j * dh + c], a);
    }
    for (int64_t j = 0; j < count; ++j) {
      a = std::fma(-old_weights[j * stride], old_values[j * dh + c], a);
    }
    numerator[c] = a;
  }
}

// numerator[0, dh) = numerator * rescale + sum_j weights[j] values[j] - sum_j old[j] olds[j],
// the weights `stride` floats apart.
inline void row_values(float* numerator, float rescale, const float* weights, int64_t stride,
                       const float* new_values, const float* old_weights,
                       const float* old_values, int64_t count, int64_t dh) {
  int64_t c = 0;
  for (; c + 8 * WIDTH <= dh; c += 8 * WIDTH) {
    accumulate_values<8>(numerator, rescale, weights, stride, new_values, old_weights, old_values,
                         count, dh, c);
  }
  for (; c + 4 * WIDTH <= dh; c += 4 * WIDTH) {
    accumulate_values<4>(numerator, rescale, weights, stride, new_values, old_weights, old_values,
                         count, dh, c);
  }
  for (; c + WIDTH <= dh; c += WIDTH) {
    accumulate_values<1>(numerator, rescale, weights, stride, new_values, old_weights, old_values,
                         count, dh, c);
  }
  row_values_tail(numerator, rescale, weights, stride, new_values, old_weights, old_values, count,
                  dh, c);
}

// Two rows' V vectors from column c at once, each formed as `accumulate_values` forms it: the
// values loaded once serve both rows, and 2 V sums are in flight (V = 4 where vectors hold 16
// floats and dh = 64: one row's four sums alone wait on the adder's latency). `weights` of a row,
// `stride` floats apart: its new keys' j in [0, count), its old keys' in [count, 2 count).
template <int V>
inline void accumulate_values_2(float* numerator0, float* numerator1, float rescale0,
                                float rescale1, const float* weights0, const float* weights1,
                                int64_t stride, const float* new_values, const float* old_values,
                                int64_t count, int64_t dh, int64_t c) {
  Vector a[V], b[V];
  for (int u = 0; u < V; ++u) {
    a[u] = load(numerator0 + c + u * WIDTH) * splat(rescale0);
    b[u] = load(numerator1 + c + u * WIDTH) * splat(rescale1);
  }
  for (int64_t j = 0; j < count; ++j) {
    const Vector w0 = splat(weights0[j * stride]), w1 = splat(weights1[j * stride]);
    const float* row = new_values + j * dh + c;
    for (int u = 0; u < V; ++u) {
      const Vector value = load(row + u * WIDTH);
      a[u] = multiply_add(w0, value, a[u]);
      b[u] = multiply_add(w1, value, b[u]);
    }
  }
  const float* old_weights0 = weights0 + count * stride;
  const float* old_weights1 = weights1 + count * stride;
  for (int64_t j = 0; j < count; ++j) {
    const Vector w0 = splat(-old_weights0[j * stride]), w1 = splat(-old_weights1[j * stride]);
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
                            int64_t stride, const float* new_values, const float* old_values,
                            int64_t count, int64_t dh) {
  const float* old_weights0 = weights0 + count * stride;
  const float* old_weights1 = weights1 + count * stride;
  int64_t c = 0;
  for (; c + 8 * WIDTH <= dh; c += 8 * WIDTH) {  // eight sums per row already: one row at a time
    accumulate_values<8>(numerator0, rescale0, weights0, stride, new_values, old_weights0,
                         old_values, count, dh, c);
    accumulate_values<8>(numerator1, rescale1, weights1, stride, new_values, old_weights1,
                         old_values, count, dh, c);
  }
  for (; c + 4 * WIDTH <= dh; c += 4 * WIDTH) {
    accumulate_values_2<4>(numerator0, numerator1, rescale0, rescale1, weights0, weights1,
                           stride, new_values, old_values, count, dh, c);
  }
  for (; c + WIDTH <= dh; c += WIDTH) {
    accumulate_values_2<1>(numerator0, numerator1, rescale0, rescale1, weights0, weights1,
                           stride, new_values, old_values, count, dh, c);
  }
  if (c < dh) {  // features past the last whole vector
    row_values_tail(numerator0, rescale0, weights0, stride, new_values, old_weights0, old_values,
                    count, dh, c);
    row_values_tail(numerator1, rescale1, weights1, stride, new_values, old_weights1, old_values,
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

// The logits of `chunk` (at most WIDTH) query rows from row `start` of `queries` (rows
// `row_stride` apart, `rows` in all) for the changed keys, transposed so that a vector holds one
// key's logit in every row: by_key[j * WIDTH + r] = q_{start + r} . key j (the new keys j < m,
// the old ones m + j), plus the row's bias for the key's column where `bias` (rows, m) is given;
// lanes past `chunk` zero. `logits` is scratch of (WIDTH, padded) floats.
inline void chunk_logits_by_key(const ChangedKeys& keys, const float* keys_by_feature,
                                const float* queries, int64_t row_stride, int64_t rows,
                                int64_t start, int64_t chunk, const float* bias, float* logits,
                                float* by_key) {
  const int64_t count = keys.count, dh = keys.dh, padded = keys.padded();
  // The rows are far apart (rows of the qkv buffer): each group of four asks for the next
  // group's cache lines while it computes. Four rows keep at least four sums in flight where
  // the changed keys fill a single vector.
  int64_t r = 0;
  for (; r + 4 <= chunk; r += 4) {
    for (int64_t next = start + r + 4; next < std::min(start + r + 8, rows); ++next) {
      for (int64_t line = 0; line < dh; line += LINE) {
        __builtin_prefetch(queries + next * row_stride + line);
      }
    }
    rows_logits<4, 2>(queries + (start + r) * row_stride, row_stride, keys_by_feature, dh,
                      padded, logits + r * padded);
  }
  for (; r < chunk; ++r) {
    rows_logits<1, 4>(queries + (start + r) * row_stride, row_stride, keys_by_feature, dh,
                      padded, logits + r * padded);
  }
  if (chunk < WIDTH) std::fill(by_key, by_key + 2 * count * WIDTH, 0.0f);
  transpose(logits, padded, chunk, 2 * count, by_key, WIDTH);
  if (bias != nullptr) {
    for (r = 0; r < chunk; ++r) {
      const float* row_bias = bias + (start + r) * count;
      for (int64_t j = 0; j < count; ++j) {
        by_key[j * WIDTH + r] += row_bias[j];
        by_key[(count + j) * WIDTH + r] += row_bias[j];
      }
    }
  }
}

// The running sums of `chunk` rows (from `denominators`, `shifts`; a row with skip[r] set is
// left as it is) swap the changed keys' share, the rows in the lanes of a few vectors: each
// row's shift is raised to the log-sum-exp of its new logits (from `chunk_logits_by_key`), and
// its denominator takes the new keys' weights exp(l - raised) and gives back the old keys'.
// by_key's logits become those weights; rescales[r] = exp(old shift - raised) of row r.
inline void swap_chunk_sums(float* by_key, int64_t count, int64_t chunk, const uint8_t* skip,
                            float* denominators, float* shifts, float* rescales) {
  Vector most = splat(-INFINITY);
  for (int64_t j = 0; j < count; ++j) most = max(most, load(by_key + j * WIDTH));
  Vector total{};
  for (int64_t j = 0; j < count; ++j) total += vector_exp(load(by_key + j * WIDTH) - most);
  float lanes[WIDTH] = {};
  std::copy(shifts, shifts + chunk, lanes);
  const Vector old_shift = load(lanes);
  const Vector raised = max(old_shift, most + vector_log(total));
  // Every weight is exp(l - raised), so that a key whose logit did not change (a padding
  // position of a group) adds exactly the share it removes: the new keys' weights count
  // positively in the denominator, the old keys' negatively.
  Vector change{};
  for (int64_t j = 0; j < 2 * count; ++j) {
    const Vector weight = vector_exp(load(by_key + j * WIDTH) - raised);
    change = j < count ? change + weight : change - weight;
    store(by_key + j * WIDTH, weight);
  }
  const Vector rescale = vector_exp(old_shift - raised);
  std::copy(denominators, denominators + chunk, lanes);
  float new_denominators[WIDTH], new_shifts[WIDTH];
  store(new_denominators, multiply_add(load(lanes), rescale, change));
  store(new_shifts, raised);
  store(rescales, rescale);
  for (int64_t r = 0; r < chunk; ++r) {
    if (skip != nullptr && skip[r]) continue;
    denominators[r] = new_denominators[r];
    shifts[r] = new_shifts[r];
  }
}

// Floats of scratch `swap_rows` needs for the changed keys' `padded` columns: a chunk of WIDTH
// rows' logits, then the same transposed.
inline int64_t swap_scratch_floats(int64_t padded) { return 2 * WIDTH * padded; }

// `rows` consecutive query rows (from `queries`, rows `row_stride` apart) swap the changed keys'
// share of their sums (from `numerators` (rows, dh), `denominators`, `shifts`). A row with
// skip[r] set is left as it is (it is recomputed anyway). `bias` (rows, m): the changed columns'
// bias of each row, or null. `scratch` holds swap_scratch_floats(padded) floats, on a cache line.
//
// Chunks of WIDTH rows: the rows' logits, transposed so that the rows' shifts, weights and
// denominators are formed in the lanes of a few vectors (per row, these steps are a handful of
// operations on one vector, each followed by a sum or a maximum across its lanes); then the
// rows' values, two at a time. A row's arithmetic is the same in every lane, so it does not
// depend on the rows beside it.
inline void swap_rows(const ChangedKeys& keys, const float* keys_by_feature,
                      const float* queries, int64_t row_stride, int64_t rows, const float* bias,
                      const uint8_t* skip, float* numerators, float* denominators,
                      float* shifts, float* scratch) {
  const int64_t count = keys.count, dh = keys.dh, padded = keys.padded();
  float* logits = scratch;                   // (WIDTH, padded)
  float* by_key = scratch + WIDTH * padded;  // (padded, WIDTH): logits, then weights
  float rescales[WIDTH];
  for (int64_t start = 0; start < rows; start += WIDTH) {
    const int64_t chunk = std::min(WIDTH, rows - start);
    chunk_logits_by_key(keys, keys_by_feature, queries, row_stride, rows, start, chunk, bias,
                        logits, by_key);
    const uint8_t* chunk_skip = skip == nullptr ? nullptr : skip + start;
    swap_chunk_sums(by_key, count, chunk, chunk_skip, denominators + start, shifts + start,
                    rescales);
    // The rows' values, two rows at a time; a row's weights are column r of `by_key`.
    int64_t waiting = -1;  // a swapped row without its pair yet
    for (int64_t r = 0; r < chunk; ++r) {
      if (chunk_skip != nullptr && chunk_skip[r]) continue;
      if (waiting < 0) {
        waiting = r;
        continue;
      }
      two_rows_values(numerators + (start + waiting) * dh, numerators + (start + r) * dh,
                      rescales[waiting], rescales[r], by_key + waiting, by_key + r, WIDTH,
                      keys.new_values, keys.old_values, count, dh);
      waiting = -1;
    }
    if (waiting >= 0) {
      const float* weights = by_key + waiting;
      row_values(numerators + (start + waiting) * dh, rescales[waiting], weights, WIDTH,
                 keys.new_values, weights + count * WIDTH, keys.old_values, count, dh);
    }
  }
}

}  // namespace eventful_swap

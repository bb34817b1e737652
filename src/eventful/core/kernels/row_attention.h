// Softmax attention of a few query rows over every key of one head, for the kernels that attend
// rows (attention_rows.cpp, exact_update.cpp, full_update.cpp), and what the exact and full
// levels' kernels share in planning it: which rows they recompute, in which tasks. The keys are laid out transposed (dh, padded)
// once per head, so that a loaded vector of keys serves up to ROWS query rows from registers;
// a block of rows forms its logits in cache, turns them into weights with the rows' maxima and
// sums, and multiplies them by the values, ROWS rows per loaded vector of values. Every block
// forms each row's sums in the same order, so that a row's result does not depend on the rows
// beside it.

#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "vectors.h"

namespace eventful_attention {

using namespace eventful_vectors;

constexpr int ROWS = 6;  // query rows per block
// From this many query rows of a head on, its values are copied side by side before the rows
// attend them (`copy_rows`): every block of rows reads them all, and in a wider tensor (the qkv
// buffer) each row of a head's values lies far from the last.
constexpr int64_t COPY_VALUES_FROM_ROWS = 4 * ROWS;
// Vectors of columns per pass over a block's rows: ROWS x COLUMNS sums in flight, which with the
// loaded columns fill most of the vector registers (16 with AVX2, 32 with AVX-512).
constexpr int COLUMNS = WIDTH == 16 ? 4 : 2;

// to[d * padded + j] = from[j * row_stride + d] for j < length, d < dh; zero for length <= j <
// padded.
inline void transpose_keys(const float* from, int64_t row_stride, int64_t length, int64_t dh,
                    float* to, int64_t padded) {
  transpose(from, row_stride, length, dh, to, padded);
  for (int64_t d = 0; d < dh; ++d) std::fill(to + d * padded + length, to + (d + 1) * padded, 0.0f);
}

// to (length, dh) = the rows from + j * row_stride (j < length), side by side.
inline void copy_rows(const float* from, int64_t row_stride, int64_t length, int64_t dh,
                      float* to) {
  for (int64_t j = 0; j < length; ++j) {
    std::memcpy(to + j * dh, from + j * row_stride, dh * sizeof(float));
  }
}

// The rows of a group whose log-sum-exp is recomputed over every key: with `every_row`, all
// `length`; else its changed rows (in the order given), then its unchanged rows (`changed` zero)
// whose denominator fell below `underflow` in any of its heads, counted in *lost. denominators:
// the group's (heads, length).
inline std::vector<int64_t> recomputed_rows(const std::vector<int64_t>& changed_rows,
                                            const uint8_t* changed, const float* denominators,
                                            int64_t heads, int64_t length, bool every_row,
                                            double underflow, int64_t* lost) {
  std::vector<int64_t> rows;
  if (every_row) {
    rows.resize(length);
    for (int64_t i = 0; i < length; ++i) rows[i] = i;
    return rows;
  }
  rows = changed_rows;
  for (int64_t i = 0; i < length; ++i) {
    if (changed[i]) continue;
    for (int64_t h = 0; h < heads; ++h) {
      if (denominators[h * length + i] < underflow) {
        rows.push_back(i);
        ++*lost;
        break;
      }
    }
  }
  return rows;
}

// Tasks over blocks of ROWS rows: for each item p of `rows` (its row count), tasks of
// `blocks_per_task` blocks; task t covers item pair[t] from block first_block[t].
struct RowBlockTasks {
  std::vector<int64_t> pair, first_block;
};

inline RowBlockTasks row_block_tasks(const std::vector<int64_t>& rows, int64_t blocks_per_task) {
  RowBlockTasks tasks;
  for (int64_t p = 0; p < static_cast<int64_t>(rows.size()); ++p) {
    const int64_t blocks = (rows[p] + ROWS - 1) / ROWS;
    for (int64_t block = 0; block < blocks; block += blocks_per_task) {
      tasks.pair.push_back(p);
      tasks.first_block.push_back(block);
    }
  }
  return tasks;
}

// The output features of R rows: their weights (R, padded) times the values (length, dh; rows
// `value_stride` apart), each row divided by its weights' sum (times `inverse`).
template <int R>
inline void weighted_values(const float* weights, int64_t padded, int64_t length, const float* values,
                     int64_t value_stride, int64_t dh, const float* inverse, float* out,
                     int64_t out_stride) {
  int64_t c = 0;
  for (; COLUMNS > 2 && c + COLUMNS * WIDTH <= dh; c += COLUMNS * WIDTH) {
    rows_times_columns<R, COLUMNS>(weights, padded, values, value_stride, length, c, out,
                                   out_stride, inverse);
  }
  for (; c + 2 * WIDTH <= dh; c += 2 * WIDTH) {
    rows_times_columns<R, 2>(weights, padded, values, value_stride, length, c, out, out_stride,
                             inverse);
  }
  for (; c + WIDTH <= dh; c += WIDTH) {
    rows_times_columns<R, 1>(weights, padded, values, value_stride, length, c, out, out_stride,
                             inverse);
  }
  for (; c < dh; ++c) {  // features past the last whole vector
    for (int r = 0; r < R; ++r) {
      float a = 0.0f;
      for (int64_t j = 0; j < length; ++j) {
        a += weights[r * padded + j] * values[j * value_stride + c];
      }
      out[r * out_stride + c] = a * inverse[r];
    }
  }
}

// One row's logits (padded, the first `length` in use, `bias` added if given) -> its weights
// exp(l - max), zero past `length`; returns the log-sum-exp and sets *inverse to 1 / sum.
inline float softmax_row(float* logits, const float* bias, int64_t length, int64_t padded,
                  float* inverse) {
  if (bias != nullptr) {
    for (int64_t j = 0; j < length; ++j) logits[j] += bias[j];
  }
  // Whole vectors of keys, then the last one, whose lanes at or past `length` count for nothing.
  const int64_t whole = length / WIDTH * WIDTH;
  Vector largest = splat(-INFINITY);
  for (int64_t c = 0; c < whole; c += WIDTH) largest = max(largest, load(logits + c));
  if (whole < padded) {
    largest = max(largest, lanes_below(whole, length) ? load(logits + whole) : splat(-INFINITY));
  }
  const float most = max_of(largest);
  Vector total{};
  for (int64_t c = 0; c < whole; c += WIDTH) {
    const Vector weights = vector_exp(load(logits + c) - splat(most));
    store(logits + c, weights);
    total += weights;
  }
  if (whole < padded) {
    const Vector weights =
        lanes_below(whole, length) ? vector_exp(load(logits + whole) - splat(most)) : Vector{};
    store(logits + whole, weights);
    total += weights;
  }
  const float sum = sum_of(total);
  *inverse = 1.0f / sum;
  return most + std::log(sum);
}

struct Head {
  const float* queries;  // the block's first query row
  int64_t query_stride;
  const float* keys_by_feature;  // (dh, padded), or null where the logits are given
  const float* values;
  int64_t value_stride;
  const float* bias;  // the block's first row of bias, or null
  int64_t bias_stride;
  float* out;  // the block's first output row
  int64_t out_stride;
  float* logsumexp;  // the block's first row's
};

// The logits of `rows` (at most WIDTH) query rows (`queries`, (rows, dh) contiguous) over the
// `length` keys in their own rows (key j at keys + j * key_stride), into logits (rows, padded):
// each logit the same sum in the same order as `rows_logits` forms it from the keys laid out by
// feature (a product in a fused multiply-add is exact whichever factor is broadcast), without
// laying the keys out. The queries go by feature into the lanes of a vector, so that each key's
// feature, broadcast, serves every row; KEYS keys keep their sums in flight. The logits past
// `length` are zero, as from the laid-out keys' zero padding. Scratch: by_key (padded, WIDTH)
// and query_lanes (dh, WIDTH), on cache lines.
inline void logits_from_key_rows(const float* queries, int64_t rows, const float* keys,
                                 int64_t key_stride, int64_t length, int64_t dh, int64_t padded,
                                 float* by_key, float* query_lanes, float* logits) {
  constexpr int64_t KEYS = 8;
  std::fill(query_lanes, query_lanes + dh * WIDTH, 0.0f);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t d = 0; d < dh; ++d) query_lanes[d * WIDTH + r] = queries[r * dh + d];
  }
  int64_t j = 0;
  for (; j + KEYS <= length; j += KEYS) {
    // The next keys' rows, far apart in the qkv buffer, asked for while these form their sums.
    for (int64_t next = j + KEYS; next < std::min(j + 2 * KEYS, length); ++next) {
      for (int64_t d = 0; d < dh; d += LINE) __builtin_prefetch(keys + next * key_stride + d);
    }
    Vector sums[KEYS] = {};
    for (int64_t d = 0; d < dh; ++d) {
      const Vector q = load(query_lanes + d * WIDTH);
      for (int64_t k = 0; k < KEYS; ++k) {
        sums[k] = multiply_add(splat(keys[(j + k) * key_stride + d]), q, sums[k]);
      }
    }
    for (int64_t k = 0; k < KEYS; ++k) store(by_key + (j + k) * WIDTH, sums[k]);
  }
  for (; j < length; ++j) {
    Vector sum{};
    for (int64_t d = 0; d < dh; ++d) {
      sum = multiply_add(splat(keys[j * key_stride + d]), load(query_lanes + d * WIDTH), sum);
    }
    store(by_key + j * WIDTH, sum);
  }
  std::fill(by_key + length * WIDTH, by_key + padded * WIDTH, 0.0f);
  transpose(by_key, WIDTH, padded, rows, logits, padded);
}

// `values` false: the rows' log-sum-exp only (head.values and head.out are not read).
// head.keys_by_feature null: the rows' logits (R, padded) are given in `logits`
// (`logits_from_key_rows`), and head.queries is not read.
template <int R>
inline void attend_block(const Head& head, int64_t length, int64_t padded, int64_t dh, float* logits,
                         bool values) {
  if (head.keys_by_feature != nullptr) {
    rows_logits<R, (R >= 4 ? COLUMNS : 4)>(head.queries, head.query_stride, head.keys_by_feature,
                                      dh, padded, logits);
  }
  float inverse[R];
  for (int r = 0; r < R; ++r) {
    const float* bias = head.bias == nullptr ? nullptr : head.bias + r * head.bias_stride;
    head.logsumexp[r] = softmax_row(logits + r * padded, bias, length, padded, &inverse[r]);
  }
  if (!values) return;
  weighted_values<R>(logits, padded, length, head.values, head.value_stride, dh, inverse,
                     head.out, head.out_stride);
}

inline void attend_rows(const Head& head, int rows, int64_t length, int64_t padded, int64_t dh,
                 float* logits, bool values = true) {
  switch (rows) {
    case 6: return attend_block<6>(head, length, padded, dh, logits, values);
    case 5: return attend_block<5>(head, length, padded, dh, logits, values);
    case 4: return attend_block<4>(head, length, padded, dh, logits, values);
    case 3: return attend_block<3>(head, length, padded, dh, logits, values);
    case 2: return attend_block<2>(head, length, padded, dh, logits, values);
    default: return attend_block<1>(head, length, padded, dh, logits, values);
  }
}

}  // namespace eventful_attention

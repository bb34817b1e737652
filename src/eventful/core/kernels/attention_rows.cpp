// Softmax attention of some query rows over every key, and each row's log-sum-exp (float32, CPU).
//
// At a ViT's sizes (a few hundred keys, 64 features per head) PyTorch's fused CPU attention runs
// at about half of this machine's multiply-add peak, and it is the largest part of a tokenwise
// step, which attends every row (BENCHMARKS.md, "roofline"). Here the keys of each head are
// first laid out transposed (dh, L), so that a loaded vector of keys serves six query rows from
// registers; then each block of six rows forms its logits in cache, turns them into weights with
// the rows' maxima and sums, and multiplies them by the values, six rows per loaded vector of
// values. Blocks of rows are independent; threads share them. Every block forms each row's sums
// in the same order, so that a row's result does not depend on the rows beside it.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#include "vectors.h"

namespace {

using namespace eventful_vectors;

constexpr int ROWS = 6;                   // query rows per block: 12 sums in flight
constexpr int64_t BLOCKS_PER_TASK = 4;    // blocks of rows per task of a thread
constexpr int64_t COPY_VALUES_FROM_ROWS = 4 * ROWS;  // query rows from which values are copied

struct Strides {
  int64_t group, head, row;
};

Strides strides_of(const torch::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2)}; }

// to[d * padded + j] = from[j * row_stride + d] for j < length, d < dh; zero for length <= j <
// padded.
void transpose_keys(const float* from, int64_t row_stride, int64_t length, int64_t dh,
                    float* to, int64_t padded) {
  transpose(from, row_stride, length, dh, to, padded);
  for (int64_t d = 0; d < dh; ++d) std::fill(to + d * padded + length, to + (d + 1) * padded, 0.0f);
}

// The output features of R rows: their weights (R, padded) times the values (length, dh; rows
// `value_stride` apart), each row divided by its weights' sum (times `inverse`).
template <int R>
void weighted_values(const float* weights, int64_t padded, int64_t length, const float* values,
                     int64_t value_stride, int64_t dh, const float* inverse, float* out,
                     int64_t out_stride) {
  int64_t c = 0;
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
float softmax_row(float* logits, const float* bias, int64_t length, int64_t padded,
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
  const float* keys_by_feature;  // (dh, padded)
  const float* values;
  int64_t value_stride;
  const float* bias;  // the block's first row of bias, or null
  int64_t bias_stride;
  float* out;  // the block's first output row
  int64_t out_stride;
  float* logsumexp;  // the block's first row's
};

template <int R>
void attend_block(const Head& head, int64_t length, int64_t padded, int64_t dh, float* logits) {
  rows_logits<R, (R >= 4 ? 2 : 4)>(head.queries, head.query_stride, head.keys_by_feature, dh,
                                    padded, logits);
  float inverse[R];
  for (int r = 0; r < R; ++r) {
    const float* bias = head.bias == nullptr ? nullptr : head.bias + r * head.bias_stride;
    head.logsumexp[r] = softmax_row(logits + r * padded, bias, length, padded, &inverse[r]);
  }
  weighted_values<R>(logits, padded, length, head.values, head.value_stride, dh, inverse,
                     head.out, head.out_stride);
}

void attend_rows(const Head& head, int rows, int64_t length, int64_t padded, int64_t dh,
                 float* logits) {
  switch (rows) {
    case 6: return attend_block<6>(head, length, padded, dh, logits);
    case 5: return attend_block<5>(head, length, padded, dh, logits);
    case 4: return attend_block<4>(head, length, padded, dh, logits);
    case 3: return attend_block<3>(head, length, padded, dh, logits);
    case 2: return attend_block<2>(head, length, padded, dh, logits);
    default: return attend_block<1>(head, length, padded, dh, logits);
  }
}

void check_float32(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == torch::kFloat32 && t.dim() == 4 &&
                  t.stride(3) == 1,
              "attention_rows expects ", name,
              " as a float32 CPU tensor (G, H, rows, dh) with a contiguous last dimension, got ",
              t.scalar_type(), " on ", t.device(), " of shape ", t.sizes(), " with strides ",
              t.strides());
}

// q (G, H, Nq, dh), k and v (G, H, L, dh), bias (G, H, Nq, L) or none: any strides but a
// contiguous last dimension. Returns the attention output (G, H, Nq, dh), laid out as
// (G, Nq, H, dh) so that its heads side by side are a view, and the log-sum-exp (G, H, Nq).
std::tuple<torch::Tensor, torch::Tensor> attention_rows(const torch::Tensor& q,
                                                        const torch::Tensor& k,
                                                        const torch::Tensor& v,
                                                        const c10::optional<torch::Tensor>& bias) {
  check_float32(q, "q");
  check_float32(k, "k");
  check_float32(v, "v");
  const int64_t groups = q.size(0), heads = q.size(1), rows = q.size(2), dh = q.size(3);
  const int64_t length = k.size(2);
  TORCH_CHECK(k.sizes() == v.sizes() && k.size(0) == groups && k.size(1) == heads &&
                  k.size(3) == dh,
              "attention_rows expects k and v of shape (", groups, ", ", heads, ", L, ", dh,
              "), got ", k.sizes(), " and ", v.sizes());
  TORCH_CHECK(length > 0, "attention_rows expects at least one key, got none");
  const float* biases = nullptr;
  Strides bias_strides{0, 0, 0};
  if (bias.has_value() && bias->defined()) {
    check_float32(*bias, "bias");
    const std::vector<int64_t> shape{groups, heads, rows, length};
    TORCH_CHECK(bias->sizes() == at::IntArrayRef(shape), "attention_rows expects the bias of ",
                "shape ", at::IntArrayRef(shape), ", got ", bias->sizes());
    biases = bias->data_ptr<float>();
    bias_strides = strides_of(*bias);
  }
  auto output = torch::empty({groups, rows, heads, dh}, q.options());
  auto logsumexp = torch::empty({groups, heads, rows}, q.options());
  if (rows == 0 || groups * heads == 0) return {output.transpose(1, 2), logsumexp};

  // Every head's keys transposed, (dh, padded), zero past L, and, where many blocks of rows read
  // them, its values one after the other (L, dh): rows of a qkv buffer lie pages apart. One
  // task per head.
  const int64_t padded = (length + WIDTH - 1) / WIDTH * WIDTH;
  const int64_t batch = groups * heads;
  const bool copy_values = rows >= COPY_VALUES_FROM_ROWS;
  const int64_t keys_size = dh * padded, values_size = copy_values ? length * dh : 0;
  // Not zeroed: every value is written.
  std::unique_ptr<float[]> laid_out(new float[batch * (keys_size + values_size) + LINE]);
  float* keys_by_feature = aligned(laid_out.get());
  float* values_by_row = keys_by_feature + batch * keys_size;
  const Strides qs = strides_of(q), ks = strides_of(k), vs = strides_of(v);
  const float* queries = q.data_ptr<float>();
  const float* keys = k.data_ptr<float>();
  const float* values = v.data_ptr<float>();
  auto lay_out = [&](int64_t b) {
    const int64_t g = b / heads, h = b % heads;
    transpose_keys(keys + g * ks.group + h * ks.head, ks.row, length, dh,
                   keys_by_feature + b * keys_size, padded);
    if (copy_values) {
      const float* from = values + g * vs.group + h * vs.head;
      float* to = values_by_row + b * values_size;
      for (int64_t j = 0; j < length; ++j) {
        std::memcpy(to + j * dh, from + j * vs.row, dh * sizeof(float));
      }
    }
  };

  const int64_t blocks = (rows + ROWS - 1) / ROWS;
  const int64_t tasks_per_head = (blocks + BLOCKS_PER_TASK - 1) / BLOCKS_PER_TASK;
  float* outputs = output.data_ptr<float>();
  float* sums = logsumexp.data_ptr<float>();
  // Task t: blocks of rows [t % tasks_per_head * BLOCKS_PER_TASK, ...) of head t / tasks_per_head.
  auto attend_task = [&](int64_t task, float* logits) {
    const int64_t b = task / tasks_per_head, g = b / heads, h = b % heads;
    const int64_t first_block = (task % tasks_per_head) * BLOCKS_PER_TASK;
    const int64_t last_block = std::min(blocks, first_block + BLOCKS_PER_TASK);
    for (int64_t block = first_block; block < last_block; ++block) {
      const int64_t first = block * ROWS;
      const int count = static_cast<int>(std::min<int64_t>(ROWS, rows - first));
      Head head;
      head.queries = queries + g * qs.group + h * qs.head + first * qs.row;
      head.query_stride = qs.row;
      head.keys_by_feature = keys_by_feature + b * keys_size;
      head.values =
          copy_values ? values_by_row + b * values_size : values + g * vs.group + h * vs.head;
      head.value_stride = copy_values ? dh : vs.row;
      head.bias = biases == nullptr ? nullptr
                                    : biases + g * bias_strides.group + h * bias_strides.head +
                                          first * bias_strides.row;
      head.bias_stride = bias_strides.row;
      head.out = outputs + (g * rows + first) * heads * dh + h * dh;
      head.out_stride = heads * dh;
      head.logsumexp = sums + b * rows + first;
      attend_rows(head, count, length, padded, dh, logits);
    }
  };

  if (tasks_per_head == 1) {  // few rows: each head laid out by the thread that reads it
    at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> buffer(ROWS * padded + LINE);
      for (int64_t b = begin; b < end; ++b) {
        lay_out(b);
        attend_task(b, aligned(buffer.data()));
      }
    });
  } else {  // every head laid out first, so that threads may share a head's blocks
    at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) lay_out(b);
    });
    at::parallel_for(0, batch * tasks_per_head, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> buffer(ROWS * padded + LINE);
      for (int64_t task = begin; task < end; ++task) attend_task(task, aligned(buffer.data()));
    });
  }
  return {output.transpose(1, 2), logsumexp};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(eventful, library) {
  library.def(
      "attention_rows(Tensor q, Tensor k, Tensor v, Tensor? bias) -> (Tensor output, "
      "Tensor logsumexp)");
}

TORCH_LIBRARY_IMPL(eventful, CPU, library) {
  library.impl("attention_rows", &attention_rows);
}

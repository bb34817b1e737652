// Softmax attention of some query rows over every key, and each row's log-sum-exp (float32, CPU).
//
// At a ViT's sizes (a few hundred keys, 64 features per head) PyTorch's fused CPU attention runs
// at about half of this machine's multiply-add peak, and it is the largest part of a tokenwise
// step, which attends every row (BENCHMARKS.md, "roofline"). Here the keys of each head are
// first laid out transposed, then blocks of six rows attend them (row_attention.h). Blocks of
// rows are independent; threads share them.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#include "operators.h"
#include "row_attention.h"

namespace {

using namespace eventful_attention;

constexpr int64_t BLOCKS_PER_TASK = 4;    // blocks of rows per task of a thread

struct Strides {
  int64_t group, head, row;
};

Strides strides_of(const torch::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2)}; }

void check_float32(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == torch::kFloat32 && t.dim() == 4 &&
                  t.stride(3) == 1,
              "attention_rows expects ", name,
              " as a float32 CPU tensor (G, H, rows, dh) with a contiguous last dimension, got ",
              t.scalar_type(), " on ", t.device(), " of shape ", t.sizes(), " with strides ",
              t.strides());
}

}  // namespace

// q (G, H, Nq, dh), k and v (G, H, L, dh), bias (G, H, Nq, L) or none: any strides but a
// contiguous last dimension. Returns the attention output (G, H, Nq, dh), laid out as
// (G, Nq, H, dh) so that its heads side by side are a view, and the log-sum-exp (G, H, Nq).
std::tuple<torch::Tensor, torch::Tensor> eventful_kernels::attention_rows(
    const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
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
      copy_rows(values + g * vs.group + h * vs.head, vs.row, length, dh,
                values_by_row + b * values_size);
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

TORCH_LIBRARY_FRAGMENT(eventful, library) {
  library.def(
      "attention_rows(Tensor q, Tensor k, Tensor v, Tensor? bias) -> (Tensor output, "
      "Tensor logsumexp)");
}

TORCH_LIBRARY_IMPL(eventful, CPU, library) {
  library.impl("attention_rows", &eventful_kernels::attention_rows);
}

// One step of the exact level's attention over the whole sequence of each stream, in one call
// (float32, CPU): the work of `EventfulBlock._attend_cached` for global attention without a bias.
//
// In PyTorch operators this step takes some sixty operators per block (gathers of the old keys
// and values, the buffer's update, the swap, the changed rows' recompute and its scatters, the
// underflow check, the division and the heads' copy into the tokens' layout), most of them on a
// few thousand values, where each operator's fixed cost is larger than its arithmetic
// (BENCHMARKS.md, "roofline"). Here, per stream:
//
// 1. the old keys and values of the changed tokens are read, then their new qkv rows written
//    into the buffer;
// 2. a stream with few changes: every unchanged row swaps the changed keys' old share of its
//    running sums for their new share (key_swap.h); the changed rows, and the rows whose
//    denominator fell below `underflow` in any head, are recomputed over every key
//    (row_attention.h). A stream with `dense_from` changes or more recomputes every row, its
//    values first copied side by side per head;
// 3. every row's output, numerator over denominator, is written in the tokens' layout as its
//    sums are finished.
//
// Each row's arithmetic is that of the kernels the step otherwise calls (swap_key_contributions,
// attention_rows), so the caches and the output are the same, bit for bit.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#include "key_swap.h"
#include "operators.h"
#include "row_attention.h"

namespace {

using namespace eventful_vectors;

constexpr int64_t SWAP_ROW_BLOCK = 32;         // rows per task of the swap
constexpr int64_t RECOMPUTE_BLOCKS_PER_TASK = 4;  // blocks of recomputed rows per task
constexpr int64_t OUTPUT_ROWS_PER_TASK = 64;   // rows per task of the output

struct Sizes {
  int64_t streams, tokens, dim, heads, dh;
  int64_t qkv_row() const { return 3 * dim; }
};

// One stream's changed tokens (in the order given) and what the step does with it.
struct StreamPlan {
  std::vector<int64_t> changed;
  std::vector<int64_t> recomputed;  // rows recomputed over every key
  bool dense = false;
  // The changed tokens' keys and values, per head (count, dh) one after the other.
  std::vector<float> new_keys, new_values, old_keys, old_values;
};

void check_tensor(const torch::Tensor& t, const char* name, at::IntArrayRef shape) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == torch::kFloat32 && t.is_contiguous(),
              "exact_attention_update expects ", name, " as a contiguous float32 CPU tensor, got ",
              t.scalar_type(), " on ", t.device(), t.is_contiguous() ? "" : " (not contiguous)");
  TORCH_CHECK(t.sizes() == shape, "exact_attention_update expects ", name, " of shape ", shape,
              ", got ", t.sizes());
}

// The heads' keys or values (from feature `offset` of a qkv row) of the given tokens, per head
// (count, dh) one after the other.
void gather_heads(const float* qkv_rows, int64_t row_stride, const std::vector<int64_t>& rows,
                  int64_t offset, const Sizes& s, std::vector<float>& to) {
  const int64_t count = static_cast<int64_t>(rows.size());
  to.resize(s.heads * count * s.dh);
  for (int64_t h = 0; h < s.heads; ++h) {
    for (int64_t j = 0; j < count; ++j) {
      std::memcpy(to.data() + (h * count + j) * s.dh,
                  qkv_rows + rows[j] * row_stride + offset + h * s.dh, s.dh * sizeof(float));
    }
  }
}

}  // namespace

std::tuple<torch::Tensor, torch::Tensor> eventful_kernels::exact_attention_update(
    torch::Tensor qkv, const torch::Tensor& rows, const torch::Tensor& index,
    torch::Tensor numerator, torch::Tensor denominator, torch::Tensor shift, int64_t heads,
    int64_t dense_from, double underflow) {
  TORCH_CHECK(qkv.dim() == 3 && qkv.size(2) % 3 == 0,
              "exact_attention_update expects qkv as (B, N, 3 D), got ", qkv.sizes());
  TORCH_CHECK(heads > 0 && qkv.size(2) / 3 % heads == 0, "exact_attention_update expects ",
              "heads to divide the model width ", qkv.size(2) / 3, ", got ", heads);
  const Sizes s{qkv.size(0), qkv.size(1), qkv.size(2) / 3, heads, qkv.size(2) / 3 / heads};
  check_tensor(qkv, "qkv", qkv.sizes());
  TORCH_CHECK(index.dim() == 1 && index.scalar_type() == torch::kInt64 && index.device().is_cpu(),
              "exact_attention_update expects index as a 1-D int64 CPU tensor, got ",
              index.scalar_type(), " of shape ", index.sizes());
  const int64_t count = index.size(0);
  check_tensor(rows, "rows", {count, 3 * s.dim});
  check_tensor(numerator, "numerator", {s.streams, s.heads, s.tokens, s.dh});
  check_tensor(denominator, "denominator", {s.streams, s.heads, s.tokens});
  check_tensor(shift, "shift", {s.streams, s.heads, s.tokens});
  TORCH_CHECK(dense_from > 0, "exact_attention_update expects dense_from > 0, got ", dense_from);

  // Each stream's changed tokens: the flat indices b N + i come stream by stream.
  const auto flat_index = index.contiguous();
  const int64_t* flat = flat_index.data_ptr<int64_t>();
  std::vector<StreamPlan> plans(s.streams);
  std::vector<uint8_t> changed(s.streams * s.tokens, 0);
  std::vector<int64_t> first_row(s.streams + 1, 0);  // into `rows`
  int64_t stream = 0;
  for (int64_t j = 0; j < count; ++j) {
    const int64_t b = flat[j] / s.tokens, i = flat[j] % s.tokens;
    TORCH_CHECK(flat[j] >= 0 && b < s.streams && b >= stream, "exact_attention_update expects ",
                "flat token indices in [0, ", s.streams * s.tokens, ") stream by stream, got ",
                flat[j], " after stream ", stream);
    TORCH_CHECK(!changed[b * s.tokens + i], "exact_attention_update expects distinct token ",
                "indices, got ", flat[j], " twice");
    for (; stream < b; ++stream) first_row[stream + 1] = j;
    changed[b * s.tokens + i] = 1;
    plans[b].changed.push_back(i);
  }
  for (; stream < s.streams; ++stream) first_row[stream + 1] = count;

  float* buffer = qkv.data_ptr<float>();
  const float* new_rows = rows.data_ptr<float>();
  const int64_t qkv_row = s.qkv_row();
  std::vector<int64_t> updated;  // streams updated by swaps
  for (int64_t b = 0; b < s.streams; ++b) {
    StreamPlan& plan = plans[b];
    const int64_t changes = static_cast<int64_t>(plan.changed.size());
    float* stream_rows = buffer + b * s.tokens * qkv_row;
    plan.dense = changes >= dense_from;
    if (changes > 0 && !plan.dense) {
      // The old keys and values, read before the buffer takes the new rows; the new ones.
      gather_heads(stream_rows, qkv_row, plan.changed, s.dim, s, plan.old_keys);
      gather_heads(stream_rows, qkv_row, plan.changed, 2 * s.dim, s, plan.old_values);
      std::vector<int64_t> in_order(changes);
      for (int64_t j = 0; j < changes; ++j) in_order[j] = j;
      const float* stream_new = new_rows + first_row[b] * qkv_row;
      gather_heads(stream_new, qkv_row, in_order, s.dim, s, plan.new_keys);
      gather_heads(stream_new, qkv_row, in_order, 2 * s.dim, s, plan.new_values);
      updated.push_back(b);
    }
    for (int64_t j = 0; j < changes; ++j) {
      std::memcpy(stream_rows + plan.changed[j] * qkv_row,
                  new_rows + (first_row[b] + j) * qkv_row, qkv_row * sizeof(float));
    }
  }

  float* numerators = numerator.data_ptr<float>();
  float* denominators = denominator.data_ptr<float>();
  float* shifts = shift.data_ptr<float>();
  const int64_t dh = s.dh;
  auto sums_offset = [&](int64_t b, int64_t h, int64_t row) {
    return (b * s.heads + h) * s.tokens + row;
  };

  // The output in the tokens' layout (B, N, D), each row's numerator over its denominator: the
  // swap writes its rows', the recompute its rows', and a last pass the rest (streams without
  // changes), each while the row's sums are in cache.
  auto out = torch::empty({s.streams, s.tokens, s.dim}, qkv.options());
  float* outs = out.data_ptr<float>();
  auto write_output = [&](int64_t b, int64_t h, int64_t row) {
    const int64_t at = sums_offset(b, h, row);
    const float* from = numerators + at * dh;
    float* to = outs + (b * s.tokens + row) * s.dim + h * dh;
    const float by = denominators[at];
    for (int64_t d = 0; d < dh; ++d) to[d] = from[d] / by;
  };

  // The swap: every unchanged row of every updated stream, tasks of (stream, head, rows).
  const int64_t swap_blocks = (s.tokens + SWAP_ROW_BLOCK - 1) / SWAP_ROW_BLOCK;
  const int64_t swap_tasks = static_cast<int64_t>(updated.size()) * s.heads * swap_blocks;
  at::parallel_for(0, swap_tasks, 1, [&](int64_t begin, int64_t end) {
    int64_t held = -1, padded = 0;
    std::vector<float> scratch;
    float *keys_by_feature = nullptr, *swap_scratch = nullptr;
    eventful_swap::ChangedKeys keys{nullptr, nullptr, nullptr, nullptr, 0, dh};
    for (int64_t task = begin; task < end; ++task) {
      const int64_t pair = task / swap_blocks, first = (task % swap_blocks) * SWAP_ROW_BLOCK;
      const int64_t b = updated[pair / s.heads], h = pair % s.heads;
      const StreamPlan& plan = plans[b];
      if (pair != held) {
        const int64_t m = static_cast<int64_t>(plan.changed.size());
        keys = {plan.new_keys.data() + h * m * dh, plan.new_values.data() + h * m * dh,
                plan.old_keys.data() + h * m * dh, plan.old_values.data() + h * m * dh, m, dh};
        padded = keys.padded();
        scratch.assign(dh * padded + eventful_swap::swap_scratch_floats(padded) + LINE, 0.0f);
        keys_by_feature = aligned(scratch.data());
        swap_scratch = keys_by_feature + dh * padded;
        eventful_swap::lay_out_changed_keys(keys, keys_by_feature);
        held = pair;
      }
      const int64_t count_rows = std::min(SWAP_ROW_BLOCK, s.tokens - first);
      const int64_t at = sums_offset(b, h, first);
      eventful_swap::swap_rows(keys, keys_by_feature,
                               buffer + (b * s.tokens + first) * qkv_row + h * dh, qkv_row,
                               count_rows, nullptr, changed.data() + b * s.tokens + first,
                               numerators + at * dh, denominators + at, shifts + at,
                               swap_scratch);
      for (int64_t r = 0; r < count_rows; ++r) {
        if (!changed[b * s.tokens + first + r]) write_output(b, h, first + r);
      }
    }
  });

  // The rows recomputed over every key: every row of a dense stream; the changed rows of an
  // updated one, and its unchanged rows whose denominator underflowed in any head.
  auto lost = torch::zeros({s.streams}, index.options());
  int64_t* lost_counts = lost.data_ptr<int64_t>();
  for (int64_t b = 0; b < s.streams; ++b) {
    StreamPlan& plan = plans[b];
    if (plan.changed.empty()) continue;
    plan.recomputed = eventful_attention::recomputed_rows(
        plan.changed, changed.data() + b * s.tokens, denominators + sums_offset(b, 0, 0),
        s.heads, s.tokens, plan.dense, underflow, lost_counts + b);
  }

  // Recompute, tasks of (stream, head, blocks of rows). A stream that recomputes many rows has
  // each head's keys laid out transposed and its values copied side by side once, for all its
  // blocks of rows; one that recomputes fewer forms its rows' logits from the keys in their own
  // rows (`logits_from_key_rows`, the same sums): laying out every key for a few rows took
  // about a third of the recompute, and without it the whole update took 0.93-0.97 of its time
  // (Intel Xeon with AVX-512, 2 threads, 13 of 257 rows changed).
  std::vector<int64_t> recomputing;  // streams with rows to recompute
  for (int64_t b = 0; b < s.streams; ++b) {
    if (!plans[b].recomputed.empty()) recomputing.push_back(b);
  }
  auto lays_out = [&](int64_t b) {
    return static_cast<int64_t>(plans[b].recomputed.size()) >=
           eventful_attention::COPY_VALUES_FROM_ROWS;
  };
  const bool any_laid_out = std::any_of(recomputing.begin(), recomputing.end(), lays_out);
  const int64_t padded = (s.tokens + WIDTH - 1) / WIDTH * WIDTH;
  const int64_t keys_size = any_laid_out ? dh * padded : 0;
  const int64_t values_size = any_laid_out ? s.tokens * dh : 0;
  const int64_t pairs = static_cast<int64_t>(recomputing.size()) * s.heads;
  std::unique_ptr<float[]> laid_out(new float[pairs * (keys_size + values_size) + LINE]);
  float* keys_by_feature = aligned(laid_out.get());
  float* values_by_row = keys_by_feature + pairs * keys_size;
  if (any_laid_out) {
    at::parallel_for(0, pairs, 1, [&](int64_t begin, int64_t end) {
      for (int64_t pair = begin; pair < end; ++pair) {
        const int64_t b = recomputing[pair / s.heads], h = pair % s.heads;
        if (!lays_out(b)) continue;
        const float* stream_rows = buffer + b * s.tokens * qkv_row;
        eventful_attention::transpose_keys(stream_rows + s.dim + h * dh, qkv_row, s.tokens, dh,
                                           keys_by_feature + pair * keys_size, padded);
        eventful_attention::copy_rows(stream_rows + 2 * s.dim + h * dh, qkv_row, s.tokens, dh,
                                      values_by_row + pair * values_size);
      }
    });
  }
  std::vector<int64_t> rows_per_pair(pairs);
  for (int64_t pair = 0; pair < pairs; ++pair) {
    rows_per_pair[pair] =
        static_cast<int64_t>(plans[recomputing[pair / s.heads]].recomputed.size());
  }
  const auto tasks_of =
      eventful_attention::row_block_tasks(rows_per_pair, RECOMPUTE_BLOCKS_PER_TASK);
  const int64_t recompute_tasks = static_cast<int64_t>(tasks_of.pair.size());
  at::parallel_for(0, recompute_tasks, 1, [&](int64_t begin, int64_t end) {
    constexpr int ROWS = eventful_attention::ROWS;
    constexpr int64_t TASK_ROWS = RECOMPUTE_BLOCKS_PER_TASK * ROWS;
    std::vector<float> scratch(TASK_ROWS * padded + TASK_ROWS * dh + ROWS * dh +
                               padded * WIDTH + dh * WIDTH + 4 * LINE);
    float* logits = aligned(scratch.data());  // (TASK_ROWS, padded)
    float* queries = aligned(logits + TASK_ROWS * padded);  // (TASK_ROWS, dh)
    float* outputs = queries + TASK_ROWS * dh;  // (ROWS, dh)
    float* by_key = aligned(outputs + ROWS * dh);  // (padded, WIDTH)
    float* query_lanes = aligned(by_key + padded * WIDTH);  // (dh, WIDTH)
    float logsumexp[ROWS];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t pair = tasks_of.pair[task];
      const int64_t b = recomputing[pair / s.heads], h = pair % s.heads;
      const std::vector<int64_t>& rows_of = plans[b].recomputed;
      const int64_t total = static_cast<int64_t>(rows_of.size());
      const float* stream_rows = buffer + b * s.tokens * qkv_row;
      const int64_t task_first = tasks_of.first_block[task] * ROWS;
      const int64_t last_row = std::min(total, task_first + TASK_ROWS);
      const bool from_key_rows = !lays_out(b);
      for (int64_t r = task_first; r < last_row; ++r) {
        std::memcpy(queries + (r - task_first) * dh, stream_rows + rows_of[r] * qkv_row + h * dh,
                    dh * sizeof(float));
      }
      if (from_key_rows) {
        for (int64_t first = task_first; first < last_row; first += WIDTH) {
          eventful_attention::logits_from_key_rows(
              queries + (first - task_first) * dh, std::min<int64_t>(WIDTH, last_row - first),
              stream_rows + s.dim + h * dh, qkv_row, s.tokens, dh, padded, by_key, query_lanes,
              logits + (first - task_first) * padded);
        }
      }
      for (int64_t first = task_first; first < last_row; first += ROWS) {
        const int count_rows = static_cast<int>(std::min<int64_t>(ROWS, last_row - first));
        eventful_attention::Head head;
        head.queries = queries + (first - task_first) * dh;
        head.query_stride = dh;
        head.keys_by_feature = from_key_rows ? nullptr : keys_by_feature + pair * keys_size;
        if (from_key_rows) {
          head.values = stream_rows + 2 * s.dim + h * dh;
          head.value_stride = qkv_row;
        } else {
          head.values = values_by_row + pair * values_size;
          head.value_stride = dh;
        }
        head.bias = nullptr;
        head.bias_stride = 0;
        head.out = outputs;
        head.out_stride = dh;
        head.logsumexp = logsumexp;
        eventful_attention::attend_rows(head, count_rows, s.tokens, padded, dh,
                                        logits + (first - task_first) * padded);
        for (int r = 0; r < count_rows; ++r) {
          const int64_t at = sums_offset(b, h, rows_of[first + r]);
          std::memcpy(numerators + at * dh, outputs + r * dh, dh * sizeof(float));
          denominators[at] = 1.0f;
          shifts[at] = logsumexp[r];
          write_output(b, h, rows_of[first + r]);
        }
      }
    }
  });

  // The rest of the output: the streams that changed nothing.
  std::vector<int64_t> unchanged;
  for (int64_t b = 0; b < s.streams; ++b) {
    if (plans[b].changed.empty()) unchanged.push_back(b);
  }
  const int64_t output_blocks = (s.tokens + OUTPUT_ROWS_PER_TASK - 1) / OUTPUT_ROWS_PER_TASK;
  const int64_t output_tasks = static_cast<int64_t>(unchanged.size()) * output_blocks;
  at::parallel_for(0, output_tasks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = unchanged[task / output_blocks];
      const int64_t first = (task % output_blocks) * OUTPUT_ROWS_PER_TASK;
      const int64_t last = std::min(s.tokens, first + OUTPUT_ROWS_PER_TASK);
      for (int64_t h = 0; h < s.heads; ++h) {
        for (int64_t i = first; i < last; ++i) write_output(b, h, i);
      }
    }
  });
  return {out, lost};
}

TORCH_LIBRARY_FRAGMENT(eventful, library) {
  library.def(
      "exact_attention_update(Tensor(a!) qkv, Tensor rows, Tensor index, Tensor(b!) numerator, "
      "Tensor(c!) denominator, Tensor(d!) shift, int heads, int dense_from, float underflow) -> "
      "(Tensor output, Tensor lost)");
}

TORCH_LIBRARY_IMPL(eventful, CPU, library) {
  library.impl("exact_attention_update", &eventful_kernels::exact_attention_update);
}

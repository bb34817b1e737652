// The exact level's running softmax sums: every row swaps the old share of a few changed keys
// for their new share, in one pass over the rows (float32, CPU).
//
// The same arithmetic as `attention._swap_key_contributions` in PyTorch, which takes about 20
// operators per attention block, most of them on tensors of a few thousand values, where each
// operator's fixed cost is larger than its arithmetic (BENCHMARKS.md, "roofline"). Here each row
// swaps the shares in one pass while its sums are in cache (key_swap.h). Rows are independent;
// threads share blocks of rows.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "key_swap.h"

namespace {

using namespace eventful_swap;

constexpr int64_t ROW_BLOCK = 32;  // rows per task of a thread

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
  const int64_t padded = ChangedKeys{nullptr, nullptr, nullptr, nullptr, count, dh}.padded();
  const int64_t blocks = (length + ROW_BLOCK - 1) / ROW_BLOCK;
  float* numerators = numerator.data_ptr<float>();
  float* denominators = denominator.data_ptr<float>();
  float* shifts = shift.data_ptr<float>();
  const float* queries = q.data_ptr<float>();
  const float* news[] = {new_keys.data_ptr<float>(), new_values.data_ptr<float>()};
  const float* olds[] = {old_keys.data_ptr<float>(), old_values.data_ptr<float>()};

  at::parallel_for(0, batch * blocks, 1, [&](int64_t begin, int64_t end) {
    // One buffer for the transposed keys and the swap's scratch, each part starting on a cache
    // line so that no loaded vector straddles two lines.
    const int64_t keys_size = dh * padded;
    std::vector<float> buffer(keys_size + swap_scratch_floats(padded) + LINE);
    float* keys_by_feature = aligned(buffer.data());
    float* swap_scratch = keys_by_feature + keys_size;
    int64_t held = -1;  // the (group, head) whose keys keys_by_feature holds
    ChangedKeys keys{nullptr, nullptr, nullptr, nullptr, count, dh};
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / blocks, first = (task % blocks) * ROW_BLOCK;
      const int64_t rows = std::min(ROW_BLOCK, length - first);
      if (b != held) {
        keys.new_keys = news[0] + b * count * dh;
        keys.new_values = news[1] + b * count * dh;
        keys.old_keys = olds[0] + b * count * dh;
        keys.old_values = olds[1] + b * count * dh;
        lay_out_changed_keys(keys, keys_by_feature);
        held = b;
      }
      const float* block_q =
          queries + (b / heads) * group_stride + (b % heads) * head_stride + first * row_stride;
      const int64_t row = b * length + first;
      swap_rows(keys, keys_by_feature, block_q, row_stride, rows,
                bias == nullptr ? nullptr : bias + row * count, nullptr, numerators + row * dh,
                denominators + row, shifts + row, swap_scratch);
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

// One step of the full level's attention update in one call (float32, CPU): the work of
// `attention.update_full_groups` without a bias.
//
// The full level caches per group and head the attention-value product (L, dh), the attention
// reference key-major (L keys, L queries) and each row's log-sum-exp as running sums (shift and
// denominator). In PyTorch operators its update makes some twenty passes over tensors of s L
// values per head (the changed keys' logits, their exponentials, the reference's columns and
// their change), each written to memory and read back. Here, per group and head:
//
// 1. every row swaps the changed keys' old share of its running sums for their new share
//    (key_swap.h), and keeps its new logits for the columns (key-major, s L values);
// 2. the changed rows, and the rows whose denominator fell below `underflow` in any head, have
//    their log-sum-exp recomputed over every key (row_attention.h). With `every_row` (many
//    changes) every row's log-sum-exp is recomputed instead, and step 1 only keeps the logits;
// 3. each changed key's new column exp(logit - log-sum-exp) replaces its reference, and every
//    row of the product takes new column x (new value - old value) + (new column - reference
//    column) x old value, while the row's product is in cache.
//
// Padding positions of a group (valid false) are left out: their keys did not change, so they
// have no share to swap and no column to pass on.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#include "key_swap.h"
#include "row_attention.h"

namespace {

using namespace eventful_vectors;

constexpr int64_t ROW_BLOCK = 32;                   // rows per task of the swap and the columns
constexpr int64_t LOGSUMEXP_BLOCKS_PER_TASK = 4;  // blocks of recomputed rows per task
constexpr int64_t KEY_BLOCK = 32;  // changed keys whose values every row of a chunk reads in turn

// A (G, H, L, dh) tensor's data and strides, its last dimension contiguous.
struct Heads {
  const float* data;
  int64_t group, head, row;
  const float* at(int64_t g, int64_t h, int64_t i) const {
    return data + g * group + h * head + i * row;
  }
};

void check_float32(const torch::Tensor& t, const char* name, at::IntArrayRef shape,
                   bool contiguous) {
  const bool laid_out = contiguous ? t.is_contiguous() : t.stride(-1) == 1;
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == torch::kFloat32 && laid_out,
              "full_attention_update expects ", name, " as a float32 CPU tensor with ",
              contiguous ? "contiguous memory" : "its last dimension contiguous", ", got ",
              t.scalar_type(), " on ", t.device(), " with strides ", t.strides());
  TORCH_CHECK(t.sizes() == shape, "full_attention_update expects ", name, " of shape ", shape,
              ", got ", t.sizes());
}

Heads heads_of(const torch::Tensor& t) {
  return {t.data_ptr<float>(), t.stride(0), t.stride(1), t.stride(2)};
}

// One (group, head)'s changed keys, packed (count, dh) each: new keys, old keys, the change of
// their values (new - old), old values; and its new logits key-major (count, rows `padded`
// floats apart, a whole number of vectors).
struct PairKeys {
  int64_t count = 0;
  std::vector<float> new_keys, old_keys, value_change, old_values;
  float* new_logits = nullptr;
};

torch::Tensor full_attention_update(torch::Tensor product, torch::Tensor reference,
                                    torch::Tensor denominator, torch::Tensor shift,
                                    const torch::Tensor& q, const torch::Tensor& k,
                                    const torch::Tensor& v, const torch::Tensor& old_keys,
                                    const torch::Tensor& old_values, const torch::Tensor& index,
                                    const torch::Tensor& valid, double underflow,
                                    bool every_row) {
  TORCH_CHECK(q.dim() == 4, "full_attention_update expects q as (G, H, L, dh), got ", q.sizes());
  const int64_t groups = q.size(0), heads = q.size(1), length = q.size(2), dh = q.size(3);
  check_float32(q, "q", q.sizes(), false);
  check_float32(k, "k", q.sizes(), false);
  check_float32(v, "v", q.sizes(), false);
  check_float32(product, "product", q.sizes(), true);
  check_float32(reference, "reference", {groups, heads, length, length}, true);
  check_float32(denominator, "denominator", {groups, heads, length}, true);
  check_float32(shift, "shift", {groups, heads, length}, true);
  TORCH_CHECK(index.dim() == 2 && index.size(0) == groups && index.scalar_type() == torch::kInt64 &&
                  index.device().is_cpu() && index.is_contiguous(),
              "full_attention_update expects index as a contiguous (G, m) int64 CPU tensor with ",
              "G = ", groups, ", got ", index.scalar_type(), " of shape ", index.sizes());
  const int64_t slots = index.size(1);
  TORCH_CHECK(valid.scalar_type() == torch::kBool && valid.device().is_cpu() &&
                  valid.is_contiguous() && valid.sizes() == index.sizes(),
              "full_attention_update expects valid as a contiguous bool CPU tensor of shape ",
              index.sizes(), ", got ", valid.scalar_type(), " of shape ", valid.sizes());
  check_float32(old_keys, "old_keys", {groups, heads, slots, dh}, true);
  check_float32(old_values, "old_values", {groups, heads, slots, dh}, true);

  // Each group's changed positions (its valid slots), checked before anything is written.
  const int64_t* positions = index.data_ptr<int64_t>();
  const bool* is_valid = valid.data_ptr<bool>();
  std::vector<std::vector<int64_t>> changed_rows(groups), changed_slots(groups);
  std::vector<uint8_t> changed(groups * length, 0);
  for (int64_t g = 0; g < groups; ++g) {
    for (int64_t j = 0; j < slots; ++j) {
      if (!is_valid[g * slots + j]) continue;
      const int64_t i = positions[g * slots + j];
      TORCH_CHECK(i >= 0 && i < length, "full_attention_update expects positions in [0, ",
                  length, "), got ", i, " in group ", g);
      TORCH_CHECK(!changed[g * length + i], "full_attention_update expects distinct positions ",
                  "in a group, got ", i, " twice in group ", g);
      changed[g * length + i] = 1;
      changed_rows[g].push_back(i);
      changed_slots[g].push_back(j);
    }
  }

  const Heads queries = heads_of(q), keys = heads_of(k), values = heads_of(v);
  const float* olds[] = {old_keys.data_ptr<float>(), old_values.data_ptr<float>()};
  float* products = product.data_ptr<float>();
  float* references = reference.data_ptr<float>();
  float* denominators = denominator.data_ptr<float>();
  float* shifts = shift.data_ptr<float>();
  const int64_t pairs = groups * heads;
  auto sums_offset = [&](int64_t pair, int64_t row) { return pair * length + row; };

  // The changed keys of every (group, head) with changes, packed, pairs in parallel.
  const int64_t padded_length = (length + WIDTH - 1) / WIDTH * WIDTH;
  std::vector<PairKeys> packed(pairs);
  std::vector<int64_t> updated;  // the pairs with changes
  int64_t logits_size = 0;
  for (int64_t pair = 0; pair < pairs; ++pair) {
    packed[pair].count = static_cast<int64_t>(changed_rows[pair / heads].size());
    if (packed[pair].count == 0) continue;
    updated.push_back(pair);
    logits_size += packed[pair].count * padded_length;
  }
  std::unique_ptr<float[]> all_new_logits(new float[logits_size]);  // every float written
  float* next_logits = all_new_logits.get();
  for (const int64_t pair : updated) {
    packed[pair].new_logits = next_logits;
    next_logits += packed[pair].count * padded_length;
  }
  at::parallel_for(0, static_cast<int64_t>(updated.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t u = begin; u < end; ++u) {
      const int64_t pair = updated[u], g = pair / heads, h = pair % heads;
      PairKeys& keys_of = packed[pair];
      for (auto* to : {&keys_of.new_keys, &keys_of.old_keys, &keys_of.value_change,
                       &keys_of.old_values}) {
        to->resize(keys_of.count * dh);
      }
      for (int64_t j = 0; j < keys_of.count; ++j) {
        const int64_t i = changed_rows[g][j];
        const int64_t old_at = (pair * slots + changed_slots[g][j]) * dh;
        const float* new_value = values.at(g, h, i);
        std::memcpy(keys_of.new_keys.data() + j * dh, keys.at(g, h, i), dh * sizeof(float));
        std::memcpy(keys_of.old_keys.data() + j * dh, olds[0] + old_at, dh * sizeof(float));
        std::memcpy(keys_of.old_values.data() + j * dh, olds[1] + old_at, dh * sizeof(float));
        for (int64_t d = 0; d < dh; ++d) {
          keys_of.value_change[j * dh + d] = new_value[d] - olds[1][old_at + d];
        }
      }
    }
  });
  const int64_t blocks = (length + ROW_BLOCK - 1) / ROW_BLOCK;
  const int64_t tasks = static_cast<int64_t>(updated.size()) * blocks;

  // 1. The swap (with `every_row`, the logits only), tasks of (pair, block of rows); each
  // chunk's new logits kept key-major.
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    int64_t held = -1;
    std::vector<float> scratch;
    float *keys_by_feature = nullptr, *logits = nullptr, *by_key = nullptr;
    eventful_swap::ChangedKeys changed_keys{nullptr, nullptr, nullptr, nullptr, 0, dh};
    float rescales[WIDTH];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t pair = updated[task / blocks], first = (task % blocks) * ROW_BLOCK;
      const int64_t g = pair / heads, h = pair % heads;
      PairKeys& keys_of = packed[pair];
      const int64_t count = keys_of.count;
      if (pair != held) {
        changed_keys = {keys_of.new_keys.data(), nullptr, keys_of.old_keys.data(), nullptr,
                        count, dh};
        const int64_t padded = changed_keys.padded();
        scratch.assign(dh * padded + eventful_swap::swap_scratch_floats(padded) + LINE, 0.0f);
        keys_by_feature = aligned(scratch.data());
        logits = keys_by_feature + dh * padded;
        by_key = logits + WIDTH * padded;
        eventful_swap::lay_out_changed_keys(changed_keys, keys_by_feature);
        held = pair;
      }
      const int64_t last = std::min(length, first + ROW_BLOCK);
      for (int64_t start = first; start < last; start += WIDTH) {
        const int64_t chunk = std::min(WIDTH, last - start);
        eventful_swap::chunk_logits_by_key(changed_keys, keys_by_feature, queries.at(g, h, 0),
                                           queries.row, length, start, chunk, nullptr, logits,
                                           by_key);
        for (int64_t j = 0; j < count; ++j) {
          store(keys_of.new_logits + j * padded_length + start, load(by_key + j * WIDTH));
        }
        if (every_row) continue;  // every row's log-sum-exp is recomputed
        const int64_t at = sums_offset(pair, start);
        eventful_swap::swap_chunk_sums(by_key, count, chunk, changed.data() + g * length + start,
                                       denominators + at, shifts + at, rescales);
      }
    }
  });

  // 2. The rows whose log-sum-exp is recomputed: a group's changed rows, and its unchanged rows
  // whose denominator underflowed in any head; with `every_row`, all of a group's rows.
  auto lost = torch::zeros({groups}, index.options());
  int64_t* lost_counts = lost.data_ptr<int64_t>();
  std::vector<std::vector<int64_t>> recomputed(groups);
  for (int64_t g = 0; g < groups; ++g) {
    if (changed_rows[g].empty()) continue;
    recomputed[g] = eventful_attention::recomputed_rows(
        changed_rows[g], changed.data() + g * length, denominators + sums_offset(g * heads, 0),
        heads, length, every_row, underflow, lost_counts + g);
  }
  const int64_t keys_size = dh * padded_length;
  const int64_t updated_pairs = static_cast<int64_t>(updated.size());
  std::unique_ptr<float[]> laid_out(new float[updated_pairs * keys_size + LINE]);
  float* all_keys_by_feature = aligned(laid_out.get());
  at::parallel_for(0, updated_pairs, 1, [&](int64_t begin, int64_t end) {
    for (int64_t u = begin; u < end; ++u) {
      const int64_t g = updated[u] / heads, h = updated[u] % heads;
      eventful_attention::transpose_keys(keys.at(g, h, 0), keys.row, length, dh,
                                         all_keys_by_feature + u * keys_size, padded_length);
    }
  });
  std::vector<int64_t> rows_per_pair(updated_pairs);
  for (int64_t u = 0; u < updated_pairs; ++u) {
    rows_per_pair[u] = static_cast<int64_t>(recomputed[updated[u] / heads].size());
  }
  const auto tasks_of =
      eventful_attention::row_block_tasks(rows_per_pair, LOGSUMEXP_BLOCKS_PER_TASK);
  const int64_t logsumexp_tasks = static_cast<int64_t>(tasks_of.pair.size());
  at::parallel_for(0, logsumexp_tasks, 1, [&](int64_t begin, int64_t end) {
    constexpr int ROWS = eventful_attention::ROWS;
    std::vector<float> scratch(ROWS * padded_length + ROWS * dh + 2 * LINE);
    float* logits = aligned(scratch.data());
    float* rows_queries = aligned(logits + ROWS * padded_length);
    float logsumexp[ROWS];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t u = tasks_of.pair[task], pair = updated[u];
      const int64_t g = pair / heads, h = pair % heads;
      const std::vector<int64_t>& rows_of = recomputed[g];
      const int64_t total = static_cast<int64_t>(rows_of.size());
      const int64_t first_block = tasks_of.first_block[task];
      const int64_t last_row = std::min(total, (first_block + LOGSUMEXP_BLOCKS_PER_TASK) * ROWS);
      for (int64_t first = first_block * ROWS; first < last_row; first += ROWS) {
        const int count_rows = static_cast<int>(std::min<int64_t>(ROWS, last_row - first));
        for (int r = 0; r < count_rows; ++r) {
          std::memcpy(rows_queries + r * dh, queries.at(g, h, rows_of[first + r]),
                      dh * sizeof(float));
        }
        eventful_attention::Head head{};
        head.queries = rows_queries;
        head.query_stride = dh;
        head.keys_by_feature = all_keys_by_feature + u * keys_size;
        head.logsumexp = logsumexp;
        eventful_attention::attend_rows(head, count_rows, length, padded_length, dh, logits,
                                        /*values=*/false);
        for (int r = 0; r < count_rows; ++r) {
          const int64_t at = sums_offset(pair, rows_of[first + r]);
          shifts[at] = logsumexp[r];
          denominators[at] = 1.0f;
        }
      }
    }
  });

  // 3. The changed keys' new columns into the reference, and every row's product, tasks of
  // (pair, block of rows). Staged per chunk of rows, key-major in blocks of KEY_BLOCK keys: a
  // block's new columns, then their change negated (the swap's old keys' weights count
  // negatively); each row's product takes one block at a time, so that the block's values stay
  // in the first-level cache while every row of the chunk reads them.
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t pair = updated[task / blocks], first = (task % blocks) * ROW_BLOCK;
      const int64_t g = pair / heads;
      const PairKeys& keys_of = packed[pair];
      const int64_t count = keys_of.count;
      scratch.resize(2 * count * WIDTH + LINE);
      float* staged = aligned(scratch.data());
      const int64_t last = std::min(length, first + ROW_BLOCK);
      for (int64_t start = first; start < last; start += WIDTH) {
        const int64_t chunk = std::min(WIDTH, last - start);
        float lanes[WIDTH] = {}, more[WIDTH] = {};
        const int64_t at = sums_offset(pair, start);
        std::copy(shifts + at, shifts + at + chunk, lanes);
        std::fill(more, more + WIDTH, 1.0f);
        std::copy(denominators + at, denominators + at + chunk, more);
        const Vector logsumexp = load(lanes) + vector_log(load(more));
        for (int64_t j = 0; j < count; ++j) {
          float* column = references + (pair * length + changed_rows[g][j]) * length + start;
          // The next chunk's (its two cache lines): the columns are far apart.
          __builtin_prefetch(column + WIDTH, 1);
          __builtin_prefetch(column + 2 * WIDTH - 1, 1);
          const Vector new_column =
              vector_exp(load(keys_of.new_logits + j * padded_length + start) - logsumexp);
          const int64_t block = j / KEY_BLOCK * KEY_BLOCK;
          const int64_t in_block = std::min(KEY_BLOCK, count - block);
          float* new_weight = staged + (2 * block + j - block) * WIDTH;
          float* old_weight = new_weight + in_block * WIDTH;
          store(new_weight, new_column);
          if (chunk == WIDTH) {
            store(old_weight, load(column) - new_column);
            store(column, new_column);
            continue;
          }
          // The last rows: lanes past them read and write nothing.
          std::fill(more, more + WIDTH, 0.0f);
          std::copy(column, column + chunk, more);
          store(old_weight, load(more) - new_column);
          store(lanes, new_column);
          std::copy(lanes, lanes + chunk, column);
        }
        float* rows_product = products + sums_offset(pair, start) * dh;
        for (int64_t block = 0; block < count; block += KEY_BLOCK) {
          const int64_t in_block = std::min(KEY_BLOCK, count - block);
          const float* weights = staged + 2 * block * WIDTH;
          const float* value_change = keys_of.value_change.data() + block * dh;
          const float* old_values = keys_of.old_values.data() + block * dh;
          int64_t r = 0;
          for (; r + 2 <= chunk; r += 2) {
            eventful_swap::two_rows_values(rows_product + r * dh, rows_product + (r + 1) * dh,
                                           1.0f, 1.0f, weights + r, weights + r + 1, WIDTH,
                                           value_change, old_values, in_block, dh);
          }
          if (r < chunk) {
            eventful_swap::row_values(rows_product + r * dh, 1.0f, weights + r, WIDTH,
                                      value_change, weights + in_block * WIDTH + r, old_values,
                                      in_block, dh);
          }
        }
      }
    }
  });
  return lost;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(eventful, library) {
  library.def(
      "full_attention_update(Tensor(a!) product, Tensor(b!) reference, Tensor(c!) denominator, "
      "Tensor(d!) shift, Tensor q, Tensor k, Tensor v, Tensor old_keys, Tensor old_values, "
      "Tensor index, Tensor valid, float underflow, bool every_row) -> Tensor lost");
}

TORCH_LIBRARY_IMPL(eventful, CPU, library) {
  library.impl("full_attention_update", &full_attention_update);
}

// A gate's selected rows and a token buffer's update, each in one pass (float32, CPU).
//
// In PyTorch operators a gate gathers its selected rows (index_select) and then writes them into
// its reference (index_copy_), and a block writes a linear layer's rows into its token buffer
// (index_copy_) and then adds the buffer to the residual stream: two operators each, at every
// gate and twice per block, each with its fixed cost and the second pass over memory
// (BENCHMARKS.md, "roofline"). Here:
//
// - `commit_rows(current, reference, index, weight, bias, eps)`: rows = current at the flat token
//   indices, and the reference takes them; with `eps` > 0, the rows returned are their layer
//   normalisation (mean and variance over each row's features, in float32, then the weight and
//   bias where given), which a block runs next on them (its norm before the qkv projection and
//   before the MLP);
// - `add_rows(x, buffer, index, rows)`: the buffer takes the rows at the flat token indices, and
//   the result is x + buffer.
//
// The values are those of the PyTorch operators, bit for bit (copies, and one float addition per
// value), but the layer normalisation, whose sums round as PyTorch's do only up to float32
// rounding.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <cstring>

#include "operators.h"
#include "vectors.h"

namespace {

constexpr int64_t ROWS_PER_TASK = 16;

void check_tokens(const torch::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == torch::kFloat32 && t.is_contiguous() &&
                  t.dim() == 3,
              op, " expects ", name, " as a contiguous float32 CPU tensor (B, N, D), got ",
              t.scalar_type(), " on ", t.device(), " of shape ", t.sizes(),
              t.is_contiguous() ? "" : " (not contiguous)");
}

// The flat token indices, checked to lie in [0, tokens).
const int64_t* checked_index(const torch::Tensor& index, int64_t tokens, const char* op) {
  TORCH_CHECK(index.device().is_cpu() && index.scalar_type() == torch::kInt64 &&
                  index.dim() == 1 && index.is_contiguous(),
              op, " expects index as a contiguous 1-D int64 CPU tensor, got ",
              index.scalar_type(), " of shape ", index.sizes());
  const int64_t* flat = index.data_ptr<int64_t>();
  for (int64_t j = 0; j < index.size(0); ++j) {
    TORCH_CHECK(flat[j] >= 0 && flat[j] < tokens, op, " expects flat token indices in [0, ",
                tokens, "), got ", flat[j]);
  }
  return flat;
}

// `row` (dim floats) normalised into `out`: (x - mean) / sqrt(variance + eps), times the weight
// and plus the bias where given.
void layer_norm_row(const float* row, int64_t dim, const float* weight, const float* bias,
                    double eps, float* out) {
  using namespace eventful_vectors;
  const int64_t whole = dim / WIDTH * WIDTH;
  Vector total{};
  for (int64_t c = 0; c < whole; c += WIDTH) total += load(row + c);
  float sum = sum_of(total);
  for (int64_t c = whole; c < dim; ++c) sum += row[c];
  const float mean = sum / static_cast<float>(dim);
  Vector squares{};
  for (int64_t c = 0; c < whole; c += WIDTH) {
    const Vector centred = load(row + c) - splat(mean);
    squares = multiply_add(centred, centred, squares);
  }
  float square_sum = sum_of(squares);
  for (int64_t c = whole; c < dim; ++c) square_sum += (row[c] - mean) * (row[c] - mean);
  const float scale = 1.0f / std::sqrt(square_sum / static_cast<float>(dim) +
                                       static_cast<float>(eps));
  for (int64_t c = 0; c < dim; ++c) {
    float value = (row[c] - mean) * scale;
    if (weight != nullptr) value *= weight[c];
    if (bias != nullptr) value += bias[c];
    out[c] = value;
  }
}

const float* optional_features(const c10::optional<torch::Tensor>& t, int64_t dim,
                               const char* name) {
  if (!t.has_value() || !t->defined()) return nullptr;
  TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == torch::kFloat32 &&
                  t->is_contiguous() && t->numel() == dim,
              "commit_rows expects the norm's ", name, " as ", dim,
              " contiguous float32 CPU values, got ", t->scalar_type(), " of shape ", t->sizes());
  return t->data_ptr<float>();
}

}  // namespace

torch::Tensor eventful_kernels::commit_rows(const torch::Tensor& current, torch::Tensor reference,
                                            const torch::Tensor& index,
                                            const c10::optional<torch::Tensor>& weight,
                                            const c10::optional<torch::Tensor>& bias,
                                            double eps) {
  check_tokens(current, "commit_rows", "current");
  check_tokens(reference, "commit_rows", "reference");
  TORCH_CHECK(current.sizes() == reference.sizes(), "commit_rows expects the reference ",
              reference.sizes(), " to have the shape of the gate input ", current.sizes());
  const int64_t dim = current.size(2);
  const int64_t* flat = checked_index(index, current.size(0) * current.size(1), "commit_rows");
  TORCH_CHECK(eps >= 0, "commit_rows expects eps >= 0 (0: no normalisation), got ", eps);
  const float* weights = optional_features(weight, dim, "weight");
  const float* biases = optional_features(bias, dim, "bias");
  TORCH_CHECK(eps > 0 || (weights == nullptr && biases == nullptr),
              "commit_rows expects a norm's weight or bias only with eps > 0");
  const int64_t count = index.size(0);
  auto rows = torch::empty({count, dim}, current.options());
  const float* from = current.data_ptr<float>();
  float* to = reference.data_ptr<float>();
  float* out = rows.data_ptr<float>();
  at::parallel_for(0, count, ROWS_PER_TASK, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      const float* row = from + flat[j] * dim;
      std::memcpy(to + flat[j] * dim, row, dim * sizeof(float));
      if (eps > 0) {
        layer_norm_row(row, dim, weights, biases, eps, out + j * dim);
      } else {
        std::memcpy(out + j * dim, row, dim * sizeof(float));
      }
    }
  });
  return rows;
}

torch::Tensor eventful_kernels::add_rows(const torch::Tensor& x, torch::Tensor buffer,
                                         const torch::Tensor& index, const torch::Tensor& rows) {
  check_tokens(x, "add_rows", "x");
  check_tokens(buffer, "add_rows", "buffer");
  TORCH_CHECK(x.sizes() == buffer.sizes(), "add_rows expects the buffer ", buffer.sizes(),
              " to have the shape of x ", x.sizes());
  const int64_t tokens = x.size(0) * x.size(1), dim = x.size(2);
  const int64_t* flat = checked_index(index, tokens, "add_rows");
  const int64_t count = index.size(0);
  TORCH_CHECK(rows.device().is_cpu() && rows.scalar_type() == torch::kFloat32 &&
                  rows.is_contiguous() && rows.dim() == 2 && rows.size(0) == count &&
                  rows.size(1) == dim,
              "add_rows expects rows as a contiguous float32 CPU tensor of shape [", count, ", ",
              dim, "], got ", rows.scalar_type(), " of shape ", rows.sizes());
  float* buffers = buffer.data_ptr<float>();
  const float* news = rows.data_ptr<float>();
  at::parallel_for(0, count, ROWS_PER_TASK, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      std::memcpy(buffers + flat[j] * dim, news + j * dim, dim * sizeof(float));
    }
  });
  auto out = torch::empty_like(x);
  const float* xs = x.data_ptr<float>();
  float* ys = out.data_ptr<float>();
  at::parallel_for(0, tokens, ROWS_PER_TASK, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin * dim; i < end * dim; ++i) ys[i] = xs[i] + buffers[i];
  });
  return out;
}

TORCH_LIBRARY_FRAGMENT(eventful, library) {
  library.def(
      "commit_rows(Tensor current, Tensor(a!) reference, Tensor index, Tensor? weight=None, "
      "Tensor? bias=None, float eps=0.0) -> Tensor");
  library.def("add_rows(Tensor x, Tensor(a!) buffer, Tensor index, Tensor rows) -> Tensor");
}

TORCH_LIBRARY_IMPL(eventful, CPU, library) {
  library.impl("commit_rows", &eventful_kernels::commit_rows);
  library.impl("add_rows", &eventful_kernels::add_rows);
}

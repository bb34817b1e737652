// A token gate's error norms in one pass: || current - reference || (L2) per token, float32, CPU;
// and what the gate left unprocessed, from those norms and its selection.
//
// In PyTorch operators this is a subtraction that writes a full-size temporary and a norm that
// reads it back: two passes over memory and two operators' fixed costs at every gate, three
// gates per block (BENCHMARKS.md, "roofline"). Here each token's change is summed as it is
// read. Tokens are independent; threads share them.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <vector>

#include "operators.h"
#include "vectors.h"

namespace {

using namespace eventful_vectors;

constexpr int64_t TOKENS_PER_TASK = 32;

// The sum of squares of a - b over `dim` values: four vector sums, then the lanes, then the tail.
float squared_distance(const float* a, const float* b, int64_t dim) {
  Vector s0{}, s1{}, s2{}, s3{};
  int64_t c = 0;
  for (; c + 4 * WIDTH <= dim; c += 4 * WIDTH) {
    const Vector d0 = load(a + c) - load(b + c);
    const Vector d1 = load(a + c + WIDTH) - load(b + c + WIDTH);
    const Vector d2 = load(a + c + 2 * WIDTH) - load(b + c + 2 * WIDTH);
    const Vector d3 = load(a + c + 3 * WIDTH) - load(b + c + 3 * WIDTH);
    s0 += d0 * d0;
    s1 += d1 * d1;
    s2 += d2 * d2;
    s3 += d3 * d3;
  }
  for (; c + WIDTH <= dim; c += WIDTH) {
    const Vector d = load(a + c) - load(b + c);
    s0 += d * d;
  }
  float sum = sum_of((s0 + s1) + (s2 + s3));
  for (; c < dim; ++c) {
    const float d = a[c] - b[c];
    sum += d * d;
  }
  return sum;
}

}  // namespace

// current, reference (B, N, D) contiguous float32 -> (B, N) L2 norms of current - reference.
torch::Tensor eventful_kernels::gate_error_norms(const torch::Tensor& current, const torch::Tensor& reference) {
  for (const auto* t : {&current, &reference}) {
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == torch::kFloat32 &&
                    t->is_contiguous() && t->dim() == 3,
                "gate_error_norms expects contiguous float32 CPU tensors (B, N, D), got ",
                t->scalar_type(), " on ", t->device(), " of shape ", t->sizes(),
                t->is_contiguous() ? "" : " (not contiguous)");
  }
  TORCH_CHECK(current.sizes() == reference.sizes(), "gate_error_norms expects the reference ",
              reference.sizes(), " to have the shape of the gate input ", current.sizes());
  const int64_t tokens = current.size(0) * current.size(1), dim = current.size(2);
  auto norms = torch::empty({current.size(0), current.size(1)}, current.options());
  const float* a = current.data_ptr<float>();
  const float* b = reference.data_ptr<float>();
  float* out = norms.data_ptr<float>();
  at::parallel_for(0, tokens, TOKENS_PER_TASK, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      out[t] = std::sqrt(squared_distance(a + t * dim, b + t * dim, dim));
    }
  });
  return norms;
}

// A gate's unprocessed share per stream (B,): the error norms (B, N) of the tokens left out of
// the selection (flat indices b N + i, any order), summed in token order, over the gate's size
// max(scale, FLT_MIN) N. One call where PyTorch operators take six (a fill of the selected
// tokens, a sum, the size's clamp and product, a division) on a few hundred values.
torch::Tensor eventful_kernels::unprocessed_share(const torch::Tensor& error_norms,
                                                  const torch::Tensor& index,
                                                  const torch::Tensor& scale) {
  TORCH_CHECK(error_norms.device().is_cpu() && error_norms.scalar_type() == torch::kFloat32 &&
                  error_norms.is_contiguous() && error_norms.dim() == 2,
              "unprocessed_share expects error norms as a contiguous float32 CPU tensor (B, N), "
              "got ", error_norms.scalar_type(), " of shape ", error_norms.sizes());
  const int64_t streams = error_norms.size(0), tokens = error_norms.size(1);
  TORCH_CHECK(scale.device().is_cpu() && scale.scalar_type() == torch::kFloat32 &&
                  scale.dim() == 1 && scale.size(0) == streams,
              "unprocessed_share expects the scale as a float32 CPU tensor (", streams,
              ",), got ", scale.scalar_type(), " of shape ", scale.sizes());
  TORCH_CHECK(index.device().is_cpu() && index.scalar_type() == torch::kInt64 && index.dim() == 1,
              "unprocessed_share expects flat token indices as a 1-D int64 CPU tensor, got ",
              index.scalar_type(), " of shape ", index.sizes());
  const auto flat_index = index.contiguous();
  const int64_t* flat = flat_index.data_ptr<int64_t>();
  std::vector<uint8_t> selected(streams * tokens, 0);
  for (int64_t j = 0; j < flat_index.size(0); ++j) {
    TORCH_CHECK(flat[j] >= 0 && flat[j] < streams * tokens, "unprocessed_share expects flat ",
                "token indices in [0, ", streams * tokens, "), got ", flat[j]);
    selected[flat[j]] = 1;
  }
  const auto scales = scale.contiguous();
  const float* norms = error_norms.data_ptr<float>();
  const float* by = scales.data_ptr<float>();
  auto share = torch::empty({streams}, error_norms.options());
  float* out = share.data_ptr<float>();
  for (int64_t b = 0; b < streams; ++b) {
    float left = 0.0f;
    for (int64_t i = 0; i < tokens; ++i) {
      if (!selected[b * tokens + i]) left += norms[b * tokens + i];
    }
    out[b] = left / (std::max(by[b], FLT_MIN) * static_cast<float>(tokens));
  }
  return share;
}

TORCH_LIBRARY_FRAGMENT(eventful, library) {
  library.def("gate_error_norms(Tensor current, Tensor reference) -> Tensor");
  library.def("unprocessed_share(Tensor error_norms, Tensor index, Tensor scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(eventful, CPU, library) {
  library.impl("gate_error_norms", &eventful_kernels::gate_error_norms);
  library.impl("unprocessed_share", &eventful_kernels::unprocessed_share);
}

// A token gate's error norms in one pass: || current - reference || (L2) per token, float32, CPU.
//
// In PyTorch operators this is a subtraction that writes a full-size temporary and a norm that
// reads it back: two passes over memory and two operators' fixed costs at every gate, three
// gates per block (BENCHMARKS.md, "roofline"). Here each token's change is summed as it is
// read. Tokens are independent; threads share them.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>

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

// current, reference (B, N, D) contiguous float32 -> (B, N) L2 norms of current - reference.
torch::Tensor gate_error_norms(const torch::Tensor& current, const torch::Tensor& reference) {
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

}  // namespace

TORCH_LIBRARY_FRAGMENT(eventful, library) {
  library.def("gate_error_norms(Tensor current, Tensor reference) -> Tensor");
}

TORCH_LIBRARY_IMPL(eventful, CPU, library) {
  library.impl("gate_error_norms", &gate_error_norms);
}

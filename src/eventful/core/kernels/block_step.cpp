// One step of an eventful block at the exact level, in one call (float32, CPU): the work of
// `EventfulBlock._lean_forward` where each of the block's linear layers runs the small-rows
// kernel, as one operator instead of some fifteen calls from Python.
//
// At a few changed tokens a step of a ViT-S block takes about 0.8 ms, of which the Python between
// its kernels took about a fifth (BENCHMARKS.md, "roofline": "other operators" and the wall time
// beyond the profiled operators). Here the same kernels run in the same order on the same
// tensors, called as C++ functions (operators.h):
//
// 1. the qkv gate: each token's error to the gate's reference (gate_error_norms), each stream's
//    `count` tokens of largest error (topk), their rows committed to the reference and
//    normalised by the first LayerNorm (commit_rows);
// 2. the qkv projection of those rows (small_rows_linear), the attention's update
//    (exact_attention_update), which writes the rows into the qkv buffer;
// 3. the proj gate on the attention output, the projection, the rows written into the proj
//    buffer and the residual added (add_rows);
// 4. the mlp gate with the second LayerNorm, fc1 with its GELU, fc2, the mlp buffer and the
//    residual.
//
// So the caches and the output are those of the lean step, bit for bit. Each gate's flat token
// indices, its rows and, where asked (`measure`), its unprocessed share per stream are returned
// for the step's trace.

#include <torch/extension.h>

#include <cstdint>
#include <tuple>
#include <vector>

#include "operators.h"

namespace {

using OptionalTensor = c10::optional<torch::Tensor>;

struct GateStep {
  torch::Tensor index;  // (B, count) token indices per stream
  torch::Tensor flat;   // (B count,) flat indices b N + i, stream by stream
  torch::Tensor rows;   // (B count, D): the selected rows, normalised where the gate has a norm
  torch::Tensor share;  // (B,) the unprocessed share, where measured
};

// One gate: the `count` tokens of largest L2 error per stream (unsorted, as `lean_gate` takes
// them), committed to the reference, through the norm where eps > 0.
GateStep gate(const torch::Tensor& current, const torch::Tensor& reference,
              const torch::Tensor& scale, int64_t count, const OptionalTensor& weight,
              const OptionalTensor& bias, double eps, bool measure) {
  const auto error_norms = eventful_kernels::gate_error_norms(current, reference);
  GateStep step;
  step.index = std::get<1>(error_norms.topk(count, 1, true, false));
  const int64_t batch = current.size(0), tokens = current.size(1);
  if (batch == 1) {  // the flat indices are the token indices
    step.flat = step.index.reshape({-1});
  } else {
    const auto offsets = torch::arange(batch, step.index.options()).unsqueeze(1) * tokens;
    step.flat = (step.index + offsets).reshape({-1});
  }
  step.rows = eventful_kernels::commit_rows(current, reference, step.flat, weight, bias, eps);
  if (measure) step.share = eventful_kernels::unprocessed_share(error_norms, step.flat, scale);
  return step;
}

// One linear layer's operands for the small-rows kernel.
struct Layer {
  const torch::Tensor& panels;
  const OptionalTensor& bias;
  const OptionalTensor& scale;
  int64_t out;
};

torch::Tensor linear(const torch::Tensor& rows, const Layer& layer, c10::string_view activation) {
  return eventful_kernels::small_rows_linear(rows, layer.panels, layer.bias, layer.out,
                                             layer.scale, activation);
}

// x (B, N, D) -> the block's output (B, N, D), the lost rows per stream (B,) of the attention's
// update, and per gate (qkv, proj, mlp) its token indices (B, count), its rows and, where
// `measure`, its unprocessed share (B,) (else an undefined tensor).
std::tuple<torch::Tensor, torch::Tensor, std::vector<torch::Tensor>> exact_block_step(
    const torch::Tensor& x, torch::Tensor qkv_reference, torch::Tensor qkv,
    torch::Tensor proj_reference, torch::Tensor proj, torch::Tensor mlp_reference,
    torch::Tensor mlp, torch::Tensor numerator, torch::Tensor denominator, torch::Tensor shift,
    const torch::Tensor& qkv_scale, const torch::Tensor& proj_scale,
    const torch::Tensor& mlp_scale, const OptionalTensor& norm1_weight,
    const OptionalTensor& norm1_bias, double norm1_eps, const OptionalTensor& norm2_weight,
    const OptionalTensor& norm2_bias, double norm2_eps, const torch::Tensor& qkv_panels,
    const OptionalTensor& qkv_bias, const OptionalTensor& qkv_panel_scale,
    const torch::Tensor& proj_panels, const OptionalTensor& proj_bias,
    const OptionalTensor& proj_panel_scale, const torch::Tensor& fc1_panels,
    const OptionalTensor& fc1_bias, const OptionalTensor& fc1_panel_scale,
    const torch::Tensor& fc2_panels, const OptionalTensor& fc2_bias,
    const OptionalTensor& fc2_panel_scale, int64_t hidden, int64_t count, int64_t heads,
    int64_t dense_from, double underflow, bool measure) {
  TORCH_CHECK(x.dim() == 3, "exact_block_step expects x as (B, N, D), got ", x.sizes());
  TORCH_CHECK(count > 0 && count < x.size(1), "exact_block_step expects a count in [1, ",
              x.size(1), "), got ", count);
  const int64_t dim = x.size(2);
  const OptionalTensor none;
  const Layer qkv_layer{qkv_panels, qkv_bias, qkv_panel_scale, 3 * dim};
  const Layer proj_layer{proj_panels, proj_bias, proj_panel_scale, dim};
  const Layer fc1_layer{fc1_panels, fc1_bias, fc1_panel_scale, hidden};
  const Layer fc2_layer{fc2_panels, fc2_bias, fc2_panel_scale, dim};

  const GateStep qkv_gate = gate(x, qkv_reference, qkv_scale, count, norm1_weight, norm1_bias,
                                 norm1_eps, measure);
  const auto qkv_rows = linear(qkv_gate.rows, qkv_layer, "none");
  auto [attended, lost] = eventful_kernels::exact_attention_update(
      qkv, qkv_rows, qkv_gate.flat, numerator, denominator, shift, heads, dense_from, underflow);

  const GateStep proj_gate = gate(attended, proj_reference, proj_scale, count, none, none, 0.0,
                                  measure);
  const auto proj_rows = linear(proj_gate.rows, proj_layer, "none");
  const auto y = eventful_kernels::add_rows(x, proj, proj_gate.flat, proj_rows);

  const GateStep mlp_gate = gate(y, mlp_reference, mlp_scale, count, norm2_weight, norm2_bias,
                                 norm2_eps, measure);
  const auto mlp_rows = linear(linear(mlp_gate.rows, fc1_layer, "gelu"), fc2_layer, "none");
  auto out = eventful_kernels::add_rows(y, mlp, mlp_gate.flat, mlp_rows);

  std::vector<torch::Tensor> gates;
  for (const GateStep* step : {&qkv_gate, &proj_gate, &mlp_gate}) {
    gates.push_back(step->index);
    gates.push_back(step->rows);
    gates.push_back(step->share);
  }
  return {out, lost, gates};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(eventful, library) {
  library.def(
      "exact_block_step(Tensor x, Tensor(a!) qkv_reference, Tensor(b!) qkv, "
      "Tensor(c!) proj_reference, Tensor(d!) proj, Tensor(e!) mlp_reference, Tensor(f!) mlp, "
      "Tensor(g!) numerator, Tensor(h!) denominator, Tensor(i!) shift, Tensor qkv_scale, "
      "Tensor proj_scale, Tensor mlp_scale, Tensor? norm1_weight, Tensor? norm1_bias, "
      "float norm1_eps, Tensor? norm2_weight, Tensor? norm2_bias, float norm2_eps, "
      "Tensor qkv_panels, Tensor? qkv_bias, Tensor? qkv_panel_scale, Tensor proj_panels, "
      "Tensor? proj_bias, Tensor? proj_panel_scale, Tensor fc1_panels, Tensor? fc1_bias, "
      "Tensor? fc1_panel_scale, Tensor fc2_panels, Tensor? fc2_bias, Tensor? fc2_panel_scale, "
      "int hidden, int count, int heads, int dense_from, float underflow, "
      "bool measure) -> (Tensor output, Tensor lost, Tensor[] gates)");
}

TORCH_LIBRARY_IMPL(eventful, CPU, library) {
  library.impl("exact_block_step", &exact_block_step);
}

// One step of an eventful block in one call (float32 tokens, CPU): the work of
// `EventfulBlock._lean_forward` where each of the block's linear layers runs the small-rows
// kernel, as one operator instead of some fifteen calls from Python.
//
// At a few changed tokens a step of a ViT-S block takes about 0.8 ms at the exact level, of which
// the Python between its kernels took about a fifth (BENCHMARKS.md, "roofline": "other
// operators" and the wall time beyond the profiled operators). Here the same kernels run in the
// same order on the same tensors, called as C++ functions (operators.h):
//
// 1. the qkv gate: each token's error to the gate's reference (gate_error_norms), each stream's
//    `count` tokens of largest error (topk), their rows committed to the reference and
//    normalised by the first LayerNorm (commit_rows);
// 2. the qkv projection of those rows (small_rows_linear), then attention:
//    - given the running sums, the exact level's update (exact_attention_update), which writes
//      the rows into the qkv buffer;
//    - without them, the tokenwise level: the rows written into the qkv buffer (rounded to its
//      dtype), and attention of every row over the whole sequence: a float32 buffer on the
//      engine's kernel (attention_rows), a bfloat16 one on PyTorch's fused attention in
//      bfloat16, its output back to float32;
// 3. the proj gate on the attention output, the projection, the rows written into the proj
//    buffer and the residual added (add_rows);
// 4. the mlp gate with the second LayerNorm, fc1 with its GELU, fc2, the mlp buffer and the
//    residual.
//
// So the caches and the output are those of the lean step, bit for bit. Each gate's token
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

// What a block's step needs besides its attention: the state it updates, the gates' scales, the
// norms and the linear layers.
struct Block {
  const torch::Tensor& x;
  const torch::Tensor& qkv_reference;
  const torch::Tensor& proj_reference;
  const torch::Tensor& proj;
  const torch::Tensor& mlp_reference;
  const torch::Tensor& mlp;
  const torch::Tensor& qkv_scale;
  const torch::Tensor& proj_scale;
  const torch::Tensor& mlp_scale;
  const OptionalTensor& norm1_weight;
  const OptionalTensor& norm1_bias;
  double norm1_eps;
  const OptionalTensor& norm2_weight;
  const OptionalTensor& norm2_bias;
  double norm2_eps;
  Layer qkv_layer, proj_layer, fc1_layer, fc2_layer;
  int64_t count;
  bool measure;
};

// The qkv gate and projection: the gate's step and the new qkv rows (B count, 3 D).
std::tuple<GateStep, torch::Tensor> qkv_rows(const Block& block) {
  GateStep step = gate(block.x, block.qkv_reference, block.qkv_scale, block.count,
                       block.norm1_weight, block.norm1_bias, block.norm1_eps, block.measure);
  auto rows = linear(step.rows, block.qkv_layer, "none");
  return {std::move(step), std::move(rows)};
}

// After attention: the proj gate, projection and residual, then the mlp gate, MLP and residual.
// Returns the block's output; `gates` takes each gate's index, rows and share, qkv's first.
torch::Tensor after_attention(const Block& block, const torch::Tensor& attended,
                              const GateStep& qkv_gate, std::vector<torch::Tensor>& gates) {
  const GateStep proj_gate = gate(attended, block.proj_reference, block.proj_scale, block.count,
                                  c10::nullopt, c10::nullopt, 0.0, block.measure);
  const auto proj_rows = linear(proj_gate.rows, block.proj_layer, "none");
  const auto y = eventful_kernels::add_rows(block.x, block.proj, proj_gate.flat, proj_rows);

  const GateStep mlp_gate = gate(y, block.mlp_reference, block.mlp_scale, block.count,
                                 block.norm2_weight, block.norm2_bias, block.norm2_eps,
                                 block.measure);
  const auto hidden = linear(mlp_gate.rows, block.fc1_layer, "gelu");
  const auto mlp_rows = linear(hidden, block.fc2_layer, "none");
  auto out = eventful_kernels::add_rows(y, block.mlp, mlp_gate.flat, mlp_rows);

  for (const GateStep* step : {&qkv_gate, &proj_gate, &mlp_gate}) {
    gates.push_back(step->index);
    gates.push_back(step->rows);
    gates.push_back(step->share);
  }
  return out;
}

// The tokenwise level's qkv buffer checked before the step writes anything: (B, N, 3 D) for x
// (B, N, D), contiguous, float32 or bfloat16, its width split into `heads`.
void check_every_row_buffer(const torch::Tensor& qkv, const torch::Tensor& x, int64_t heads) {
  const int64_t dim = x.size(2);
  TORCH_CHECK(qkv.sizes() == torch::IntArrayRef({x.size(0), x.size(1), 3 * dim}) &&
                  qkv.is_contiguous(),
              "block_step expects a contiguous qkv buffer (", x.size(0), ", ", x.size(1), ", ",
              3 * dim, "), got ", qkv.sizes());
  TORCH_CHECK(qkv.scalar_type() == torch::kFloat32 || qkv.scalar_type() == torch::kBFloat16,
              "block_step expects a float32 or bfloat16 qkv buffer, got ", qkv.scalar_type());
  TORCH_CHECK(heads > 0 && dim % heads == 0, "block_step expects heads to divide the model ",
              "width ", dim, ", got ", heads);
}

// Attention of the tokenwise level: the new qkv rows written into the buffer (B, N, 3 D,
// `check_every_row_buffer`) rounded to its dtype, then every row over the whole sequence, the
// output (B, N, D) in float32.
torch::Tensor attend_every_row(const torch::Tensor& qkv, const torch::Tensor& rows,
                               const torch::Tensor& flat, int64_t heads) {
  const int64_t batch = qkv.size(0), tokens = qkv.size(1), dim = qkv.size(2) / 3;
  const bool bfloat16 = qkv.scalar_type() == torch::kBFloat16;
  auto buffer = qkv;  // the same tensor: written in place
  buffer.view({-1, 3 * dim}).index_copy_(0, flat, rows.to(qkv.scalar_type()));
  // q, k, v (B, H, N, dh): views of the buffer, as `EventfulBlock._split_heads` takes them.
  const auto heads_of = qkv.view({batch, tokens, 3, heads, dim / heads}).permute({2, 0, 3, 1, 4});
  const auto q = heads_of[0], k = heads_of[1], v = heads_of[2];
  torch::Tensor out;
  if (bfloat16) {
    out = at::scaled_dot_product_attention(q, k, v, {}, 0.0, false, 1.0).to(torch::kFloat32);
  } else {
    out = std::get<0>(eventful_kernels::attention_rows(q, k, v, c10::nullopt));
  }
  return out.transpose(1, 2).reshape({batch, tokens, dim});
}

// x (B, N, D) -> the block's output (B, N, D), the lost rows per stream (B,) of the exact
// level's update (zeros at the tokenwise level), and per gate (qkv, proj, mlp) its token indices
// (B, count), its rows and, where `measure`, its unprocessed share (B,) (else an undefined
// tensor). With the running sums (numerator, denominator, shift) the exact level's step, without
// them the tokenwise level's; `dense_from` and `underflow` are the exact level's.
std::tuple<torch::Tensor, torch::Tensor, std::vector<torch::Tensor>> block_step(
    const torch::Tensor& x, const torch::Tensor& qkv_reference, const torch::Tensor& qkv,
    const torch::Tensor& proj_reference, const torch::Tensor& proj,
    const torch::Tensor& mlp_reference, const torch::Tensor& mlp, const OptionalTensor& numerator,
    const OptionalTensor& denominator, const OptionalTensor& shift, const torch::Tensor& qkv_scale,
    const torch::Tensor& proj_scale, const torch::Tensor& mlp_scale,
    const OptionalTensor& norm1_weight, const OptionalTensor& norm1_bias, double norm1_eps,
    const OptionalTensor& norm2_weight, const OptionalTensor& norm2_bias, double norm2_eps,
    const torch::Tensor& qkv_panels, const OptionalTensor& qkv_bias,
    const OptionalTensor& qkv_panel_scale, const torch::Tensor& proj_panels,
    const OptionalTensor& proj_bias, const OptionalTensor& proj_panel_scale,
    const torch::Tensor& fc1_panels, const OptionalTensor& fc1_bias,
    const OptionalTensor& fc1_panel_scale, const torch::Tensor& fc2_panels,
    const OptionalTensor& fc2_bias, const OptionalTensor& fc2_panel_scale, int64_t hidden,
    int64_t count, int64_t heads, int64_t dense_from, double underflow, bool measure) {
  TORCH_CHECK(x.dim() == 3, "block_step expects x as (B, N, D), got ", x.sizes());
  TORCH_CHECK(count > 0 && count < x.size(1), "block_step expects a count in [1, ", x.size(1),
              "), got ", count);
  const int sums = numerator.has_value() + denominator.has_value() + shift.has_value();
  TORCH_CHECK(sums == 0 || sums == 3, "block_step expects the three running sums (the exact ",
              "level) or none (the tokenwise level), got ", sums);
  if (sums == 0) check_every_row_buffer(qkv, x, heads);
  const int64_t dim = x.size(2);
  const Block block{x,
                    qkv_reference,
                    proj_reference,
                    proj,
                    mlp_reference,
                    mlp,
                    qkv_scale,
                    proj_scale,
                    mlp_scale,
                    norm1_weight,
                    norm1_bias,
                    norm1_eps,
                    norm2_weight,
                    norm2_bias,
                    norm2_eps,
                    {qkv_panels, qkv_bias, qkv_panel_scale, 3 * dim},
                    {proj_panels, proj_bias, proj_panel_scale, dim},
                    {fc1_panels, fc1_bias, fc1_panel_scale, hidden},
                    {fc2_panels, fc2_bias, fc2_panel_scale, dim},
                    count,
                    measure};
  auto [qkv_gate, rows] = qkv_rows(block);
  torch::Tensor attended, lost;
  if (sums == 3) {
    std::tie(attended, lost) = eventful_kernels::exact_attention_update(
        qkv, rows, qkv_gate.flat, *numerator, *denominator, *shift, heads, dense_from, underflow);
  } else {
    attended = attend_every_row(qkv, rows, qkv_gate.flat, heads);
    lost = torch::zeros({x.size(0)}, qkv_gate.index.options());
  }
  std::vector<torch::Tensor> gates;
  auto out = after_attention(block, attended, qkv_gate, gates);
  return {out, lost, gates};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(eventful, library) {
  library.def(
      "block_step(Tensor x, Tensor(a!) qkv_reference, Tensor(b!) qkv, "
      "Tensor(c!) proj_reference, Tensor(d!) proj, Tensor(e!) mlp_reference, Tensor(f!) mlp, "
      "Tensor(g!)? numerator, Tensor(h!)? denominator, Tensor(i!)? shift, Tensor qkv_scale, "
      "Tensor proj_scale, Tensor mlp_scale, Tensor? norm1_weight, Tensor? norm1_bias, "
      "float norm1_eps, Tensor? norm2_weight, Tensor? norm2_bias, float norm2_eps, "
      "Tensor qkv_panels, Tensor? qkv_bias, Tensor? qkv_panel_scale, Tensor proj_panels, "
      "Tensor? proj_bias, Tensor? proj_panel_scale, Tensor fc1_panels, Tensor? fc1_bias, "
      "Tensor? fc1_panel_scale, Tensor fc2_panels, Tensor? fc2_bias, Tensor? fc2_panel_scale, "
      "int hidden, int count, int heads, int dense_from, float underflow, "
      "bool measure) -> (Tensor output, Tensor lost, Tensor[] gates)");
}

TORCH_LIBRARY_IMPL(eventful, CPU, library) { library.impl("block_step", &block_step); }

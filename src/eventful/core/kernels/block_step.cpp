// One step of an eventful block in one call (float32 tokens, CPU): the work of
// `EventfulBlock._lean_forward` where each of the block's linear layers runs one kernel call
// (`PackedLinear.step_operands`), as one operator instead of some fifteen calls from Python.
//
// At a few changed tokens a step of a ViT-S block takes about 0.8 ms at the exact level, of which
// the Python between its kernels took about a fifth (BENCHMARKS.md, "roofline": "other
// operators" and the wall time beyond the profiled operators). Here the same kernels run in the
// same order on the same tensors, called as C++ functions (operators.h):
//
// 1. the qkv gate: each token's error to the gate's reference (gate_error_norms), each stream's
//    `count` tokens of largest error (topk), their rows committed to the reference and
//    normalised by the first LayerNorm (commit_rows);
// 2. the qkv projection of those rows, then attention:
//    - given the running sums, the exact level's update (exact_attention_update), which writes
//      the rows into the qkv buffer; or, where attention runs in bfloat16 (precision "bf16")
//      and the step recomputes every row (`dense_from` changes or more), the rows written and
//      every row recomputed in bfloat16 (the AMX kernel where it pays, else PyTorch's fused
//      attention), the sums set from it;
//    - without them, the tokenwise level: the rows written into the qkv buffer (rounded to its
//      dtype), and attention of every row over the whole sequence: a float32 buffer on the
//      engine's kernel (attention_rows), a bfloat16 one on the AMX kernel where it pays
//      (bfloat16_attention) or PyTorch's fused attention in bfloat16, its output in float32;
// 3. the proj gate on the attention output, the projection, the rows written into the proj
//    buffer and the residual added (add_rows);
// 4. the mlp gate with the second LayerNorm, fc1 with its GELU, fc2, the mlp buffer and the
//    residual.
//
// Each linear layer runs the small-rows kernel (small_rows_linear), or at precision "bf16" the
// tiles kernel (tiles_linear) or above the small-rows kernel's rows oneDNN's prepacked bfloat16
// linear (through the dispatcher, as Python calls it), the MLP's hidden rows then in bfloat16
// between fc1 and fc2.
//
// So the caches and the output are those of the lean step, bit for bit. Each gate's token
// indices, its rows and, where asked (`measure`), its unprocessed share per stream are returned
// for the step's trace. `blocks_step` runs consecutive blocks' steps in one call.

#include <torch/extension.h>

#include <cstdint>
#include <cstring>
#include <tuple>
#include <vector>

#include "bfloat16.h"
#include "operators.h"

namespace {

using OptionalTensor = c10::optional<torch::Tensor>;
using eventful_bfloat16::to_bfloat16;
using eventful_bfloat16::to_float32;

// Attention's output (B, H, N, dh) in bfloat16 as the tokens' rows (B, N, H dh) in float32.
// PyTorch's fused attention writes the heads side by side, so that the rows are contiguous.
torch::Tensor output_rows(const torch::Tensor& out) {
  const int64_t batch = out.size(0), tokens = out.size(2), dim = out.size(1) * out.size(3);
  const auto rows = out.transpose(1, 2);
  if (!rows.is_contiguous()) {
    return out.to(torch::kFloat32).transpose(1, 2).reshape({batch, tokens, dim});
  }
  return to_float32(rows).view({batch, tokens, dim});
}

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

// One linear layer's operands (`PackedLinear.step_operands`): the small-rows kernel's panels
// (3-D, or 4-D in bfloat16 pairs), the tiles kernel's (4-D int32), or oneDNN's prepacked
// bfloat16 weight (2-D) with a bfloat16 bias.
struct Layer {
  const torch::Tensor& panels;
  const OptionalTensor& bias;
  const OptionalTensor& scale;
  int64_t out;
  bool prepacked() const { return panels.dim() == 2; }
};

// oneDNN's prepacked linear (`torch.ops.mkldnn._linear_pointwise`) of bfloat16 rows, the
// activation ("none" or "gelu", the exact GELU) fused into it as `PackedLinear._post_op` has it;
// the output in bfloat16.
torch::Tensor prepacked_bfloat16(const torch::Tensor& rows, const Layer& layer,
                                 c10::string_view activation) {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::_linear_pointwise", "");
  const bool gelu = activation == "gelu";
  torch::jit::Stack stack{rows,
                          layer.panels,
                          layer.bias,
                          std::string(gelu ? "gelu" : "none"),
                          c10::List<c10::optional<at::Scalar>>(),
                          std::string(gelu ? "none" : "")};
  op.callBoxed(&stack);
  return stack[0].toTensor();
}

// A layer on float32 rows, its output in float32, as `PackedLinear.rows_forward` computes it:
// the small-rows kernel, the tiles kernel (int32 panels), or the rows rounded to bfloat16
// through oneDNN's prepacked linear.
torch::Tensor linear(const torch::Tensor& rows, const Layer& layer, c10::string_view activation) {
  if (layer.panels.scalar_type() == torch::kInt32) {
    return eventful_kernels::tiles_linear(rows, layer.panels, layer.bias, layer.out, activation);
  }
  if (layer.prepacked()) {
    return to_float32(prepacked_bfloat16(to_bfloat16(rows), layer, activation));
  }
  return eventful_kernels::small_rows_linear(rows, layer.panels, layer.bias, layer.out,
                                             layer.scale, activation);
}

// fc2(GELU(fc1(rows))) as `mlp_forward` computes it: where both layers are oneDNN's, the hidden
// rows stay in bfloat16 between them.
torch::Tensor mlp(const torch::Tensor& rows, const Layer& fc1, const Layer& fc2) {
  if (fc1.prepacked() && fc2.prepacked()) {
    const auto hidden = prepacked_bfloat16(to_bfloat16(rows), fc1, "gelu");
    return to_float32(prepacked_bfloat16(hidden, fc2, "none"));
  }
  return linear(linear(rows, fc1, "gelu"), fc2, "none");
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
  const auto mlp_rows = mlp(mlp_gate.rows, block.fc1_layer, block.fc2_layer);
  auto out = eventful_kernels::add_rows(y, block.mlp, mlp_gate.flat, mlp_rows);

  for (const GateStep* step : {&qkv_gate, &proj_gate, &mlp_gate}) {
    gates.push_back(step->index);
    gates.push_back(step->rows);
    gates.push_back(step->share);
  }
  return out;
}

// rows (M, W) written at the flat row indices `flat` (M,) of buffer (R, W) (contiguous), rounded
// to the buffer's dtype where it is bfloat16: a copy per row, where `index_copy_` went element by
// element.
void write_rows(const torch::Tensor& buffer, const torch::Tensor& flat,
                const torch::Tensor& rows) {
  const auto values =
      (buffer.scalar_type() == torch::kBFloat16 ? to_bfloat16(rows) : rows).contiguous();
  TORCH_CHECK(buffer.is_contiguous() && values.scalar_type() == buffer.scalar_type() &&
                  values.dim() == 2 && values.size(1) == buffer.size(-1) &&
                  flat.scalar_type() == torch::kInt64 && flat.numel() == values.size(0),
              "block_step expects rows (M, ", buffer.size(-1), ") of the buffer's dtype ",
              buffer.scalar_type(), " for M flat indices, got ", values.scalar_type(), " ",
              values.sizes(), " for ", flat.numel());
  const auto indices = flat.contiguous();
  const int64_t* at = indices.data_ptr<int64_t>();
  const int64_t count = values.size(0), width = values.size(1), limit = buffer.numel() / width;
  const int64_t bytes = width * static_cast<int64_t>(values.element_size());
  auto* to = static_cast<char*>(buffer.data_ptr());
  const auto* from = static_cast<const char*>(values.data_ptr());
  for (int64_t j = 0; j < count; ++j) {
    TORCH_CHECK(at[j] >= 0 && at[j] < limit, "block_step expects flat row indices in [0, ",
                limit, "), got ", at[j]);
    std::memcpy(to + at[j] * bytes, from + j * bytes, bytes);
  }
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
  write_rows(qkv, flat, rows);  // in place
  // q, k, v (B, H, N, dh): views of the buffer, as `EventfulBlock._split_heads` takes them.
  const auto heads_of = qkv.view({batch, tokens, 3, heads, dim / heads}).permute({2, 0, 3, 1, 4});
  const auto q = heads_of[0], k = heads_of[1], v = heads_of[2];
  if (bfloat16 && eventful_kernels::bfloat16_attention_pays(tokens, dim / heads)) {
    const auto out = std::get<0>(eventful_kernels::bfloat16_attention(q, k, v));
    return out.transpose(1, 2).reshape({batch, tokens, dim});
  }
  if (bfloat16) {
    return output_rows(at::scaled_dot_product_attention(q, k, v, {}, 0.0, false, 1.0));
  }
  const auto out = std::get<0>(eventful_kernels::attention_rows(q, k, v, c10::nullopt));
  return out.transpose(1, 2).reshape({batch, tokens, dim});
}

// The exact level's buffer and running sums checked before a recompute in bfloat16 writes
// anything: for x (B, N, D), qkv (B, N, 3 D), numerator (B, H, N, D / H), denominator and shift
// (B, H, N), contiguous float32.
void check_exact_state(const torch::Tensor& x, const torch::Tensor& qkv,
                       const torch::Tensor& numerator, const torch::Tensor& denominator,
                       const torch::Tensor& shift, int64_t heads) {
  const int64_t batch = x.size(0), tokens = x.size(1), dim = x.size(2);
  TORCH_CHECK(heads > 0 && dim % heads == 0, "block_step expects heads to divide the model ",
              "width ", dim, ", got ", heads);
  const std::vector<std::tuple<const torch::Tensor*, const char*, std::vector<int64_t>>> checked{
      {&qkv, "qkv", {batch, tokens, 3 * dim}},
      {&numerator, "numerator", {batch, heads, tokens, dim / heads}},
      {&denominator, "denominator", {batch, heads, tokens}},
      {&shift, "shift", {batch, heads, tokens}}};
  for (const auto& [tensor, name, shape] : checked) {
    TORCH_CHECK(tensor->scalar_type() == torch::kFloat32 && tensor->is_contiguous() &&
                    tensor->sizes() == torch::IntArrayRef(shape),
                "block_step expects ", name, " as a contiguous float32 tensor of shape ",
                torch::IntArrayRef(shape), ", got ", tensor->scalar_type(), " ",
                tensor->sizes());
  }
}

// The exact level's step where it recomputes every row in bfloat16 (precision "bf16", from
// `dense_from` changed tokens on), as `EventfulBlock._attend_cached` does (`check_exact_state`
// first): the new rows written into the float32 qkv buffer (B, N, 3 D), the buffer rounded to
// bfloat16, attention over it with each row's log-sum-exp (the engine's AMX kernel where it
// pays, else PyTorch's fused attention), which the running sums take (the output as the
// numerator, a denominator of 1, the log-sum-exp as the shift). Returns the output (B, N, D) in
// float32.
torch::Tensor recompute_in_bfloat16(const torch::Tensor& qkv, const torch::Tensor& rows,
                                    const torch::Tensor& flat, torch::Tensor numerator,
                                    torch::Tensor denominator, torch::Tensor shift,
                                    int64_t heads) {
  const int64_t batch = qkv.size(0), tokens = qkv.size(1), dim = qkv.size(2) / 3;
  write_rows(qkv, flat, rows);  // in place
  // The engine's kernel where it pays, as `attention.bfloat16_attention_kernel` decides: on the
  // float32 buffer, which it rounds as it reads, the output written into the numerator too.
  if (eventful_kernels::bfloat16_attention_pays(tokens, dim / heads)) {
    const auto heads_of =
        qkv.view({batch, tokens, 3, heads, dim / heads}).permute({2, 0, 3, 1, 4});
    const auto [out, logsumexp] =
        eventful_kernels::bfloat16_attention(heads_of[0], heads_of[1], heads_of[2], numerator);
    denominator.fill_(1.0);
    shift.copy_(logsumexp);
    return out.transpose(1, 2).reshape({batch, tokens, dim});
  }
  const auto heads_of =
      to_bfloat16(qkv).view({batch, tokens, 3, heads, dim / heads}).permute({2, 0, 3, 1, 4});
  const auto attention = at::_scaled_dot_product_flash_attention_for_cpu(
      heads_of[0], heads_of[1], heads_of[2], 0.0, false, c10::nullopt, 1.0);
  auto attended = output_rows(std::get<0>(attention));
  numerator.copy_(attended.view({batch, tokens, heads, dim / heads}).transpose(1, 2));
  denominator.fill_(1.0);
  shift.copy_(std::get<1>(attention));  // each row's log-sum-exp
  return attended;
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
    int64_t count, int64_t heads, int64_t dense_from, double underflow, bool bfloat16_attention,
    bool measure) {
  TORCH_CHECK(x.dim() == 3, "block_step expects x as (B, N, D), got ", x.sizes());
  TORCH_CHECK(count > 0 && count < x.size(1), "block_step expects a count in [1, ", x.size(1),
              "), got ", count);
  const int sums = numerator.has_value() + denominator.has_value() + shift.has_value();
  TORCH_CHECK(sums == 0 || sums == 3, "block_step expects the three running sums (the exact ",
              "level) or none (the tokenwise level), got ", sums);
  if (sums == 0) check_every_row_buffer(qkv, x, heads);
  const bool recomputes_in_bfloat16 = sums == 3 && bfloat16_attention && count >= dense_from;
  if (recomputes_in_bfloat16) {
    check_exact_state(x, qkv, *numerator, *denominator, *shift, heads);
  }
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
  if (recomputes_in_bfloat16) {
    attended = recompute_in_bfloat16(qkv, rows, qkv_gate.flat, *numerator, *denominator, *shift,
                                     heads);
    lost = torch::zeros({x.size(0)}, qkv_gate.index.options());
  } else if (sums == 3) {
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

// Slots of one block in `blocks_step`'s flat arguments: its tensors in `block_step`'s order (x
// left out), its two LayerNorms' eps, and its integers (hidden, count, heads, dense_from,
// bfloat16_attention).
constexpr size_t TENSORS_PER_BLOCK = 28;
constexpr size_t EPS_PER_BLOCK = 2;
constexpr size_t INTEGERS_PER_BLOCK = 5;

// Consecutive blocks' steps in one call: `block_step` of each block in turn, each block's output
// the next one's input, so that the Python between blocks (some 60 us a block at ViT-S's size,
// its objects evicted from the caches by the block before) runs once per step. Returns the last
// block's output, the outputs of the blocks listed in `taps` (numbered from 1, in that order)
// and, where `measure`, per block its lost rows and its nine gate tensors (`block_step`'s), one
// block after another; else nothing more, so that no tensor the step does not need goes back to
// Python.
std::tuple<torch::Tensor, std::vector<torch::Tensor>, std::vector<torch::Tensor>> blocks_step(
    const torch::Tensor& x, const c10::List<OptionalTensor>& tensors, c10::ArrayRef<double> eps,
    c10::IntArrayRef integers, c10::IntArrayRef taps, double underflow, bool measure) {
  const size_t blocks = integers.size() / INTEGERS_PER_BLOCK;
  TORCH_CHECK(blocks > 0 && integers.size() == blocks * INTEGERS_PER_BLOCK &&
                  tensors.size() == blocks * TENSORS_PER_BLOCK &&
                  eps.size() == blocks * EPS_PER_BLOCK,
              "blocks_step expects per block ", TENSORS_PER_BLOCK, " tensors, ", EPS_PER_BLOCK,
              " eps and ", INTEGERS_PER_BLOCK, " integers, got ", tensors.size(), ", ", eps.size(),
              " and ", integers.size());
  for (const int64_t tap : taps) {
    TORCH_CHECK(tap >= 1 && tap <= static_cast<int64_t>(blocks),
                "blocks_step expects taps in [1, ", blocks, "], got ", tap);
  }
  // Every block's required tensors are there before any block runs. (Each block checks the
  // rest as it starts; a model whose step fails midway resets its streams.)
  std::vector<OptionalTensor> all(tensors.begin(), tensors.end());
  const std::vector<size_t> required_slots{0, 1, 2, 3, 4, 5, 9, 10, 11, 16, 19, 22, 25};
  for (size_t b = 0; b < blocks; ++b) {
    for (const size_t slot : required_slots) {
      const auto& given = all[b * TENSORS_PER_BLOCK + slot];
      TORCH_CHECK(given.has_value() && given->defined(), "blocks_step expects a tensor in slot ",
                  slot, " of block ", b, ", got None");
    }
  }
  auto required = [&](size_t slot) -> const torch::Tensor& { return *all[slot]; };
  torch::Tensor out = x;
  std::vector<torch::Tensor> tapped(taps.size()), traced;
  for (size_t b = 0; b < blocks; ++b) {
    const size_t t = b * TENSORS_PER_BLOCK;
    const int64_t* ints = integers.data() + b * INTEGERS_PER_BLOCK;
    auto [output, lost, gates] = block_step(
        out, required(t), required(t + 1), required(t + 2), required(t + 3), required(t + 4),
        required(t + 5), all[t + 6], all[t + 7], all[t + 8], required(t + 9), required(t + 10),
        required(t + 11), all[t + 12], all[t + 13], eps[b * EPS_PER_BLOCK], all[t + 14],
        all[t + 15], eps[b * EPS_PER_BLOCK + 1], required(t + 16), all[t + 17], all[t + 18],
        required(t + 19), all[t + 20], all[t + 21], required(t + 22), all[t + 23], all[t + 24],
        required(t + 25), all[t + 26], all[t + 27], ints[0], ints[1], ints[2], ints[3],
        underflow, ints[4] != 0, measure);
    out = std::move(output);
    for (size_t i = 0; i < taps.size(); ++i) {
      if (taps[i] == static_cast<int64_t>(b + 1)) tapped[i] = out;
    }
    if (measure) {
      traced.push_back(std::move(lost));
      for (auto& gate : gates) traced.push_back(std::move(gate));
    }
  }
  return {out, tapped, traced};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(eventful, library) {
  library.def(
      "blocks_step(Tensor x, Tensor(a!)?[] tensors, float[] eps, int[] integers, int[] taps, "
      "float underflow, bool measure) -> (Tensor output, Tensor[] tapped, Tensor[] traced)");
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
      "bool bfloat16_attention, bool measure) -> (Tensor output, Tensor lost, Tensor[] gates)");
}

TORCH_LIBRARY_IMPL(eventful, CPU, library) {
  library.impl("block_step", &block_step);
  library.impl("blocks_step", &blocks_step);
}

// oneDNN's prepacked weights are tensors of the MkldnnCPU backend, which then picks the kernel.
TORCH_LIBRARY_IMPL(eventful, MkldnnCPU, library) {
  library.impl("block_step", &block_step);
  library.impl("blocks_step", &blocks_step);
}

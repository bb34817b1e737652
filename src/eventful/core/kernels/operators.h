// The operators that `block_step.cpp` composes, callable from C++ without the dispatcher: each is
// the function registered as `torch.ops.eventful.<name>` by the source named beside it.

#pragma once

#include <torch/extension.h>

#include <tuple>

namespace eventful_kernels {

// gate_error_norms.cpp
torch::Tensor gate_error_norms(const torch::Tensor& current, const torch::Tensor& reference);
torch::Tensor unprocessed_share(const torch::Tensor& error_norms, const torch::Tensor& index,
                                const torch::Tensor& scale);

// token_rows.cpp
torch::Tensor commit_rows(const torch::Tensor& current, torch::Tensor reference,
                          const torch::Tensor& index, const c10::optional<torch::Tensor>& weight,
                          const c10::optional<torch::Tensor>& bias, double eps);
torch::Tensor add_rows(const torch::Tensor& x, torch::Tensor buffer, const torch::Tensor& index,
                       const torch::Tensor& rows);

// small_rows_linear.cpp
torch::Tensor small_rows_linear(const torch::Tensor& x, const torch::Tensor& panels,
                                const c10::optional<torch::Tensor>& bias, int64_t out,
                                const c10::optional<torch::Tensor>& scale,
                                c10::string_view activation);

// attention_rows.cpp
std::tuple<torch::Tensor, torch::Tensor> attention_rows(const torch::Tensor& q,
                                                        const torch::Tensor& k,
                                                        const torch::Tensor& v,
                                                        const c10::optional<torch::Tensor>& bias);

// exact_update.cpp
std::tuple<torch::Tensor, torch::Tensor> exact_attention_update(
    torch::Tensor qkv, const torch::Tensor& rows, const torch::Tensor& index,
    torch::Tensor numerator, torch::Tensor denominator, torch::Tensor shift, int64_t heads,
    int64_t dense_from, double underflow);

// bfloat16_attention.cpp
bool tiles_available();
bool bfloat16_attention_pays(int64_t tokens, int64_t head_features);
std::tuple<torch::Tensor, torch::Tensor> bfloat16_attention(
    const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
    const c10::optional<torch::Tensor>& heads_out = c10::nullopt);

// tiles_linear.cpp
torch::Tensor tiles_linear(const torch::Tensor& x, const torch::Tensor& panels,
                           const c10::optional<torch::Tensor>& bias, int64_t out,
                           c10::string_view activation);

}  // namespace eventful_kernels

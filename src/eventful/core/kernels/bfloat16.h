// Float32 to bfloat16 and back for the kernels of this folder.
//
// Rounded as PyTorch rounds (to nearest, ties to even, from the float32 bit pattern; a NaN to
// the pattern 0xffff, as PyTorch's vectorised conversion writes it), so that a kernel's
// conversion is `.to(torch.bfloat16)` bit for bit, without a dispatcher call and its checks:
// in the one-call block step at precision "bf16" (ViT-S/14, k = 64 and 128) these conversions
// measured 1.02-1.035x the step with PyTorch's (interleaved, 2 threads, Intel Xeon).
// Widening a bfloat16 back to float32 is exact.

#pragma once

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cstdint>
#include <cstring>

#include "vectors.h"

namespace eventful_bfloat16 {

using eventful_vectors::WIDTH;

typedef uint32_t Words __attribute__((vector_size(WIDTH * sizeof(uint32_t))));
typedef uint16_t Halves __attribute__((vector_size(WIDTH * sizeof(uint16_t))));

constexpr int64_t GRAIN = 16384;  // values per task of the threads

// The bfloat16 bits of one float32 bit pattern: rounded to nearest, ties to even; a NaN 0xffff.
inline uint16_t rounded(uint32_t bits) {
  if ((bits & 0x7fffffffu) > 0x7f800000u) return 0xffffu;
  return static_cast<uint16_t>((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}

// `count` floats rounded to bfloat16 bits.
inline void round_values(const float* from, uint16_t* to, int64_t count) {
  int64_t i = 0;
  for (; i + WIDTH <= count; i += WIDTH) {
    Words bits;
    std::memcpy(&bits, from + i, sizeof(Words));
    const Words nearest = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
    const Words nan = (Words)((bits & 0x7fffffffu) > 0x7f800000u);  // all ones at a NaN
    const Halves halves = __builtin_convertvector(nearest | nan, Halves);
    std::memcpy(to + i, &halves, sizeof(Halves));
  }
  for (; i < count; ++i) {
    uint32_t bits;
    std::memcpy(&bits, from + i, sizeof(bits));
    to[i] = rounded(bits);
  }
}

// `count` bfloat16 bits widened to floats.
inline void widen_values(const uint16_t* from, float* to, int64_t count) {
  int64_t i = 0;
  for (; i + WIDTH <= count; i += WIDTH) {
    Halves halves;
    std::memcpy(&halves, from + i, sizeof(Halves));
    const Words bits = __builtin_convertvector(halves, Words) << 16;
    std::memcpy(to + i, &bits, sizeof(Words));
  }
  for (; i < count; ++i) {
    const uint32_t bits = static_cast<uint32_t>(from[i]) << 16;
    std::memcpy(to + i, &bits, sizeof(bits));
  }
}

// A float32 tensor rounded to bfloat16, in a new contiguous tensor of its shape.
inline torch::Tensor to_bfloat16(const torch::Tensor& x) {
  const auto values = x.contiguous();
  auto out = torch::empty(values.sizes(), values.options().dtype(torch::kBFloat16));
  const float* from = values.data_ptr<float>();
  auto* to = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  at::parallel_for(0, values.numel(), GRAIN, [&](int64_t begin, int64_t end) {
    round_values(from + begin, to + begin, end - begin);
  });
  return out;
}

// A bfloat16 tensor widened to float32, in a new contiguous tensor of its shape.
inline torch::Tensor to_float32(const torch::Tensor& x) {
  const auto values = x.contiguous();
  auto out = torch::empty(values.sizes(), values.options().dtype(torch::kFloat32));
  const auto* from = reinterpret_cast<const uint16_t*>(values.data_ptr<at::BFloat16>());
  float* to = out.data_ptr<float>();
  at::parallel_for(0, values.numel(), GRAIN, [&](int64_t begin, int64_t end) {
    widen_values(from + begin, to + begin, end - begin);
  });
  return out;
}

}  // namespace eventful_bfloat16

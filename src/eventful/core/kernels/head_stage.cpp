// A convolutional head's stage (`LocalStack`) around its product, float32 on the CPU:
//
// - `head_stage`, a sparse stage after its product: the contributions of the changed input
//   positions added into the stage's cached pre-activation where they reach, the pointwise layers
//   on the output positions touched, and their change against the cached output;
// - `head_pointwise`, a dense stage after its convolution: the pointwise layers on every position,
//   written into the cached output in one pass (and, from a bfloat16 convolution, its output
//   widened into the cached pre-activation in the same pass);
// - `head_rows_product`, a 1x1 convolution after a sparse stack recomputed at the positions its
//   input moved (`LocalStack._without_own_changes`) into its output kept as rows: gather,
//   product, bias and scatter in one call instead of four;
// - `head_input_change`, what a step passes on from the head's input
//   (`LocalStack._input_change`): the positions of largest change per stream, their rows' deltas,
//   and the cached input brought up to date there. In PyTorch operators that is some ten calls
//   on a few rows, each slow in a step (their code and data are cold after the encoder's):
//   about 0.33 ms a step on the saliency decoder at 13 of 256 positions.
//
// In PyTorch operators a sparse stage is some twenty calls on a few hundred rows (the reach of
// each position, a scatter-add, the distinct touched rows, gathers, the pointwise layers, the
// difference, a scatter, the rows that moved), each with its fixed cost and the Python between
// them: on the saliency decoder at 4 of 257 tokens, its three sparse stages took about 2.4 ms a
// step with their products, about 1.9 ms with this kernel (2 threads, Intel Xeon). A dense stage
// is a pass over the output per pointwise layer, and one more to widen a bfloat16 output.
//
// The values are those of the Python stage, bit for bit: the contributions are added one after
// the other in the order `index_add_` takes them (position, then kernel row, then kernel column),
// one float addition each; a batch norm in eval mode is `addcmul` of its shift, the rows and its
// scale, rounded as PyTorch's CPU kernel rounds it (`fused`: once, a fused multiply-add, as its
// kernels built for AVX2 and above do; else the product, then the sum); a ReLU is
// `clamp_min(x, 0)` (a NaN stays). The contributions are first sorted by the output row they
// land on (their order kept); threads then take spans of touched rows of about equal work, each
// row added into, through the pointwise layers and compared in one visit.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <vector>

#include "operators.h"
#include "vectors.h"

namespace {

// Below this many float additions a stage runs on one thread: splitting costs more.
constexpr int64_t SERIAL_WORK = 32768;
// Rows per task of the passes over touched or all output rows.
constexpr int64_t ROWS_PER_TASK = 256;

// Where an input coordinate `at` reaches along one axis through kernel offset `offset`: the
// output coordinate, or -1 outside the output (of `size`). A transposed convolution's input i
// feeds outputs i * stride - padding + offset * dilation; a convolution's output o reads inputs
// o * stride - padding + offset * dilation.
inline int64_t reached(bool transposed, int64_t at, int64_t offset, int64_t stride,
                       int64_t padding, int64_t dilation, int64_t size) {
  if (transposed) {
    const int64_t to = at * stride - padding + offset * dilation;
    return to >= 0 && to < size ? to : -1;
  }
  const int64_t shifted = at + padding - offset * dilation;
  if (shifted < 0 || shifted % stride != 0) return -1;
  const int64_t to = shifted / stride;
  return to < size ? to : -1;
}

inline float widened(float value) { return value; }
inline float widened(at::BFloat16 value) { return static_cast<float>(value); }  // exact

// The pointwise layers, in order, as per-channel scales and shifts: a batch norm where `scales`
// holds one (x * scale + shift, rounded once where `fused`), else a ReLU.
struct Pointwise {
  std::vector<const float*> scales, shifts;
  bool fused = true;

  // A row of `channels` values from `from` through the layers into `to` (which may be `from`),
  // layer after layer: each value rounded after each operation, as the operators round it.
  template <typename T>
  void apply(const T* from, float* to, int64_t channels) const {
    for (int64_t c = 0; c < channels; ++c) to[c] = widened(from[c]);
    for (size_t layer = 0; layer < scales.size(); ++layer) {
      const float* scale = scales[layer];
      const float* shift = shifts[layer];
      if (scale != nullptr && fused) {
        for (int64_t c = 0; c < channels; ++c) to[c] = std::fma(to[c], scale[c], shift[c]);
      } else if (scale != nullptr) {
        for (int64_t c = 0; c < channels; ++c) {
          // Through memory: rounded there, the compiler cannot fuse it with the sum.
          const volatile float product = to[c] * scale[c];
          to[c] = shift[c] + product;
        }
      } else {
        for (int64_t c = 0; c < channels; ++c) {
          to[c] = to[c] < 0.0f ? 0.0f : to[c];  // a NaN and -0 stay, as clamp_min(x, 0) keeps
        }
      }
    }
  }
};

// Contiguous CPU rows (P, C) of float32, or with `bfloat16` of either dtype.
void check_rows(const torch::Tensor& t, const char* op, const char* name,
                bool bfloat16 = false) {
  const bool dtype = t.scalar_type() == torch::kFloat32 ||
                     (bfloat16 && t.scalar_type() == torch::kBFloat16);
  TORCH_CHECK(t.device().is_cpu() && dtype && t.dim() == 2 && t.is_contiguous(), op, " expects ",
              name, " as contiguous ", bfloat16 ? "float32 or bfloat16" : "float32",
              " CPU rows (P, C), got ", t.scalar_type(), " on ", t.device(), " of shape ",
              t.sizes());
}

Pointwise pointwise_layers(const c10::List<c10::optional<torch::Tensor>>& scales,
                           const c10::List<c10::optional<torch::Tensor>>& shifts, bool fused,
                           int64_t channels, const char* op) {
  TORCH_CHECK(scales.size() == shifts.size(), op, " expects a shift per scale, got ",
              scales.size(), " scales and ", shifts.size(), " shifts");
  Pointwise layers;
  layers.fused = fused;
  for (size_t layer = 0; layer < scales.size(); ++layer) {
    const c10::optional<torch::Tensor> scale = scales.get(layer), shift = shifts.get(layer);
    const bool has_scale = scale.has_value() && scale->defined();
    const bool has_shift = shift.has_value() && shift->defined();
    TORCH_CHECK(has_scale == has_shift, op, " expects pointwise layer ", layer,
                " to have a scale and a shift (a batch norm) or neither (a ReLU)");
    if (!has_scale) {
      layers.scales.push_back(nullptr);
      layers.shifts.push_back(nullptr);
      continue;
    }
    for (const auto* t : {&*scale, &*shift}) {
      TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == torch::kFloat32 &&
                      t->is_contiguous() && t->numel() == channels,
                  op, " expects the batch norm of pointwise layer ", layer, " to have ",
                  channels, " contiguous float32 scales and shifts, got ", scale->numel(),
                  " and ", shift->numel());
    }
    layers.scales.push_back(scale->data_ptr<float>());
    layers.shifts.push_back(shift->data_ptr<float>());
  }
  return layers;
}

// Where the contributions land: each output row they touch (ascending) and, in `index_add_`'s
// order (changed position, then kernel row, then kernel column), the contributions it takes.
struct Landing {
  std::vector<int64_t> touched;  // output rows touched, ascending
  std::vector<int64_t> first;    // (touched + 1): each touched row's span of `sources`
  std::vector<int64_t> sources;  // contribution rows (i x offsets + offset), row after row
};

// The landing of the contributions of the changed positions `at` (count,) on `rows` output rows:
// a counting sort of their targets, which keeps each row's contributions in their order.
Landing landing(const int64_t* at, int64_t count, int64_t rows, bool transposed,
                c10::IntArrayRef kernel, c10::IntArrayRef stride, c10::IntArrayRef padding,
                c10::IntArrayRef dilation, c10::IntArrayRef in_size, c10::IntArrayRef out_size) {
  const int64_t offsets = kernel[0] * kernel[1], in_positions = in_size[0] * in_size[1];
  std::vector<int64_t> target(count * offsets, -1);
  std::vector<int64_t> slot(rows, 0);  // contributions per row, then its index in `touched`
  for (int64_t i = 0; i < count; ++i) {
    const int64_t stream = at[i] / in_positions, rest = at[i] % in_positions;
    const int64_t row = rest / in_size[1], column = rest % in_size[1];
    for (int64_t ky = 0; ky < kernel[0]; ++ky) {
      const int64_t to_row =
          reached(transposed, row, ky, stride[0], padding[0], dilation[0], out_size[0]);
      if (to_row < 0) continue;
      for (int64_t kx = 0; kx < kernel[1]; ++kx) {
        const int64_t to_column =
            reached(transposed, column, kx, stride[1], padding[1], dilation[1], out_size[1]);
        if (to_column < 0) continue;
        const int64_t to = (stream * out_size[0] + to_row) * out_size[1] + to_column;
        target[i * offsets + ky * kernel[1] + kx] = to;
        ++slot[to];
      }
    }
  }
  Landing landed;
  landed.first.push_back(0);
  for (int64_t p = 0; p < rows; ++p) {
    if (slot[p] == 0) continue;
    landed.first.push_back(landed.first.back() + slot[p]);
    slot[p] = static_cast<int64_t>(landed.touched.size());
    landed.touched.push_back(p);
  }
  landed.sources.resize(landed.first.back());
  std::vector<int64_t> next(landed.first.begin(), landed.first.end() - 1);
  for (int64_t j = 0; j < count * offsets; ++j) {
    if (target[j] >= 0) landed.sources[next[slot[target[j]]]++] = j;
  }
  return landed;
}

// How far ahead rows are fetched: the contributions, read in the order of the rows they land on,
// scattered over memory where the hardware does not fetch ahead; the touched rows of the
// pre-activation and the cached output, ascending but apart. Measured on the saliency decoder's
// stages on a still camera (Intel Xeon, 2 threads): 0.63-0.75 of the time without them.
constexpr int64_t AHEAD = 32;
constexpr int64_t ROWS_AHEAD = 8;

// Asks for the cache lines of a row of `channels` values ahead of its use.
template <typename T>
inline void fetch(const T* row, int64_t channels) {
  const char* bytes = reinterpret_cast<const char*>(row);
  for (int64_t at = 0; at < channels * static_cast<int64_t>(sizeof(T)); at += 64) {
    __builtin_prefetch(bytes + at);
  }
}

// Bounds (parts + 1) that split the touched rows into `parts` spans of about equal work: the
// additions of their contributions and a pass of the pointwise layers per row.
std::vector<int64_t> balanced_spans(const Landing& landed, int64_t parts) {
  const int64_t rows = static_cast<int64_t>(landed.touched.size());
  const int64_t work = landed.first.back() + 2 * rows;
  std::vector<int64_t> bounds{0};
  int64_t r = 0;
  for (int64_t part = 1; part < parts; ++part) {
    const int64_t until = work * part / parts;
    while (r < rows && landed.first[r + 1] + 2 * (r + 1) <= until) ++r;
    bounds.push_back(r);
  }
  bounds.push_back(rows);
  return bounds;
}

// changed (m,) flat input positions (stream, row, column of the input grid `in_size`);
// contributions (m, kernel rows x kernel columns x C), float32 or bfloat16: what each changed
// position adds to each output channel through each kernel offset; pre and cached (B x out rows x
// out columns, C): the stage's pre-activation and its output after the pointwise layers, both
// updated in place. The pointwise layers, in order: a batch norm where `scales[i]` is given
// (x * scale + shift, rounded once where `fused`), else a ReLU. Returns the output positions whose value changed
// (ascending), their changes (new minus old, nonzero or NaN somewhere in each row), and (2,)
// the contributions added and the positions touched.
std::tuple<torch::Tensor, torch::Tensor, torch::Tensor> head_stage(
    const torch::Tensor& changed, const torch::Tensor& contributions, torch::Tensor pre,
    torch::Tensor cached, const c10::List<c10::optional<torch::Tensor>>& scales,
    const c10::List<c10::optional<torch::Tensor>>& shifts, bool fused, bool transposed,
    c10::IntArrayRef kernel, c10::IntArrayRef stride, c10::IntArrayRef padding,
    c10::IntArrayRef dilation, c10::IntArrayRef in_size, c10::IntArrayRef out_size) {
  check_rows(contributions, "head_stage", "contributions", true);
  check_rows(pre, "head_stage", "pre");
  check_rows(cached, "head_stage", "cached");
  for (const auto* values : {&kernel, &stride, &padding, &dilation, &in_size, &out_size}) {
    TORCH_CHECK(values->size() == 2, "head_stage expects two values per geometry argument, got ",
                *values);
  }
  TORCH_CHECK(stride[0] > 0 && stride[1] > 0, "head_stage expects positive strides, got ",
              stride);
  const int64_t channels = pre.size(1), offsets = kernel[0] * kernel[1];
  const int64_t in_positions = in_size[0] * in_size[1];
  const int64_t out_positions = out_size[0] * out_size[1];
  TORCH_CHECK(cached.sizes() == pre.sizes() && pre.size(0) % out_positions == 0,
              "head_stage expects pre and cached of the same shape (B x ", out_positions, ", C), ",
              "got ", pre.sizes(), " and ", cached.sizes());
  const int64_t streams = pre.size(0) / out_positions;
  TORCH_CHECK(changed.device().is_cpu() && changed.scalar_type() == torch::kInt64 &&
                  changed.dim() == 1,
              "head_stage expects changed positions as a 1-D int64 CPU tensor, got ",
              changed.scalar_type(), " of shape ", changed.sizes());
  const int64_t count = changed.size(0);
  TORCH_CHECK(contributions.size(0) == count && contributions.size(1) == offsets * channels,
              "head_stage expects contributions of shape [", count, ", ", offsets * channels,
              "], got ", contributions.sizes());
  const Pointwise layers = pointwise_layers(scales, shifts, fused, channels, "head_stage");
  const auto positions = changed.contiguous();
  const int64_t* at = positions.data_ptr<int64_t>();
  for (int64_t i = 0; i < count; ++i) {
    TORCH_CHECK(at[i] >= 0 && at[i] < streams * in_positions, "head_stage expects changed ",
                "positions in [0, ", streams * in_positions, "), got ", at[i]);
  }

  // Per touched row, ascending: its contributions added into the pre-activation in
  // `index_add_`'s order, the pointwise layers, the change against the cached output, which
  // takes the new values; each row once, while it is in cache. Threads take spans of rows of
  // about equal work. Then the rows that moved. Usually every touched row moved (a row stays put
  // only where each of its channels does, a ReLU clamping all of them, say): then the changes
  // are returned as they were written, without a copy of them (1 MB in the saliency decoder's
  // last stage on a still camera).
  const Landing landed = landing(at, count, pre.size(0), transposed, kernel, stride, padding,
                                 dilation, in_size, out_size);
  const int64_t added = landed.first.back();
  const int64_t rows = static_cast<int64_t>(landed.touched.size());
  const int64_t parts = added * channels < SERIAL_WORK ? 1 : at::get_num_threads();
  const std::vector<int64_t> spans = balanced_spans(landed, parts);
  float* sums = pre.data_ptr<float>();
  float* kept = cached.data_ptr<float>();
  auto changes = torch::empty({rows, channels}, pre.options());
  float* difference = changes.data_ptr<float>();
  std::vector<uint8_t> moves(rows, 0);
  auto update = [&](const auto* adds) {
    at::parallel_for(0, parts, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> news(channels);
      for (int64_t r = spans[begin]; r < spans[end]; ++r) {
        if (r + ROWS_AHEAD < spans[end]) {
          fetch(sums + landed.touched[r + ROWS_AHEAD] * channels, channels);
          fetch(kept + landed.touched[r + ROWS_AHEAD] * channels, channels);
        }
        float* sum = sums + landed.touched[r] * channels;
        for (int64_t s = landed.first[r]; s < landed.first[r + 1]; ++s) {
          if (s + AHEAD < added) fetch(adds + landed.sources[s + AHEAD] * channels, channels);
          const auto* from = adds + landed.sources[s] * channels;
          for (int64_t c = 0; c < channels; ++c) sum[c] += widened(from[c]);
        }
        float* old = kept + landed.touched[r] * channels;
        float* change = difference + r * channels;
        layers.apply(sum, news.data(), channels);
        bool moved = false;
        for (int64_t c = 0; c < channels; ++c) {
          change[c] = news[c] - old[c];
          moved |= !(change[c] == 0.0f);  // a NaN moves too
        }
        std::memcpy(old, news.data(), channels * sizeof(float));
        moves[r] = moved;
      }
    });
  };
  if (contributions.scalar_type() == torch::kBFloat16) {
    update(contributions.data_ptr<at::BFloat16>());
  } else {
    update(contributions.data_ptr<float>());
  }
  const std::vector<int64_t>& touched = landed.touched;
  std::vector<int64_t> moved;
  for (int64_t r = 0; r < rows; ++r) {
    if (moves[r]) moved.push_back(r);
  }
  const int64_t moving = static_cast<int64_t>(moved.size());
  auto counts = torch::tensor({added, rows}, positions.options());
  if (moving == rows) {
    auto touched_positions = torch::empty({rows}, positions.options());
    std::copy(touched.begin(), touched.end(), touched_positions.data_ptr<int64_t>());
    return {touched_positions, changes, counts};
  }
  auto moved_positions = torch::empty({moving}, positions.options());
  auto moved_changes = torch::empty({moving, channels}, pre.options());
  int64_t* moved_at = moved_positions.data_ptr<int64_t>();
  float* moved_by = moved_changes.data_ptr<float>();
  at::parallel_for(0, moving, ROWS_PER_TASK, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      moved_at[j] = touched[moved[j]];
      std::memcpy(moved_by + j * channels, difference + moved[j] * channels,
                  channels * sizeof(float));
    }
  });
  return {moved_positions, moved_changes, counts};
}

// source (P, C), float32 or bfloat16: a dense stage's convolution output as rows. Writes the
// pointwise layers of it into `output` (P, C) float32, and where `pre` (P, C) float32 is given,
// source itself into it (widened). The layers as in `head_stage`.
void head_pointwise(const torch::Tensor& source, const c10::optional<torch::Tensor>& pre,
                    torch::Tensor output, const c10::List<c10::optional<torch::Tensor>>& scales,
                    const c10::List<c10::optional<torch::Tensor>>& shifts, bool fused) {
  check_rows(source, "head_pointwise", "source", true);
  check_rows(output, "head_pointwise", "output");
  const bool widen = pre.has_value() && pre->defined();
  if (widen) check_rows(*pre, "head_pointwise", "pre");
  TORCH_CHECK(output.sizes() == source.sizes() && (!widen || pre->sizes() == source.sizes()),
              "head_pointwise expects source, pre and output of the same shape, got ",
              source.sizes(), ", ", widen ? pre->sizes() : source.sizes(), " and ",
              output.sizes());
  const int64_t rows = source.size(0), channels = source.size(1);
  const Pointwise layers = pointwise_layers(scales, shifts, fused, channels, "head_pointwise");
  float* out = output.data_ptr<float>();
  float* wide = widen ? pre->data_ptr<float>() : nullptr;
  auto run = [&](auto* from) {
    at::parallel_for(0, rows, ROWS_PER_TASK, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        if (wide != nullptr) {
          for (int64_t c = 0; c < channels; ++c) {
            wide[r * channels + c] = widened(from[r * channels + c]);
          }
        }
        layers.apply(from + r * channels, out + r * channels, channels);
      }
    });
  };
  if (source.scalar_type() == torch::kBFloat16) {
    run(source.data_ptr<at::BFloat16>());
  } else {
    run(source.data_ptr<float>());
  }
}

// rows (P, C): a 1x1 convolution's input as rows; moved (M,) int64: the positions to recompute;
// weight (O, C) and bias (O,) or none; kept (P, O): the convolution's output as rows, written at
// the moved positions. Each output is one sum over the input channels in a fixed order (the
// lanes of a vector, then across them), plus the bias: a row's value depends on neither the
// rows beside it nor the threads. All float32, contiguous, on the CPU.
void head_rows_product(const torch::Tensor& rows, const torch::Tensor& moved,
                       const torch::Tensor& weight, const c10::optional<torch::Tensor>& bias,
                       torch::Tensor kept) {
  check_rows(rows, "head_rows_product", "rows");
  check_rows(weight, "head_rows_product", "weight");
  check_rows(kept, "head_rows_product", "kept");
  const int64_t positions = rows.size(0), channels = rows.size(1), outs = weight.size(0);
  TORCH_CHECK(weight.size(1) == channels && kept.size(0) == positions && kept.size(1) == outs,
              "head_rows_product expects weight (O, ", channels, ") and kept (", positions,
              ", O), got ", weight.sizes(), " and ", kept.sizes());
  TORCH_CHECK(moved.dim() == 1 && moved.scalar_type() == torch::kInt64 && moved.device().is_cpu(),
              "head_rows_product expects moved as 1-D int64 CPU positions, got ",
              moved.scalar_type(), " of shape ", moved.sizes());
  const bool biased = bias.has_value() && bias->defined();
  if (biased) {
    TORCH_CHECK(bias->scalar_type() == torch::kFloat32 && bias->is_contiguous() &&
                    bias->numel() == outs,
                "head_rows_product expects a contiguous float32 bias of ", outs,
                " values, got ", bias->sizes());
  }
  const auto at = moved.contiguous();
  const int64_t* position = at.data_ptr<int64_t>();
  const int64_t count = at.size(0);
  for (int64_t j = 0; j < count; ++j) {
    TORCH_CHECK(position[j] >= 0 && position[j] < positions, "head_rows_product expects ",
                "positions in [0, ", positions, "), got ", position[j]);
  }
  const float* from = rows.data_ptr<float>();
  const float* w = weight.data_ptr<float>();
  const float* b = biased ? bias->data_ptr<float>() : nullptr;
  float* out = kept.data_ptr<float>();
  const int64_t whole = channels / eventful_vectors::WIDTH * eventful_vectors::WIDTH;
  at::parallel_for(0, count, ROWS_PER_TASK, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      const float* row = from + position[j] * channels;
      for (int64_t o = 0; o < outs; ++o) {
        const float* column = w + o * channels;
        eventful_vectors::Vector sum = eventful_vectors::splat(0.0f);
        for (int64_t c = 0; c < whole; c += eventful_vectors::WIDTH) {
          sum = eventful_vectors::multiply_add(eventful_vectors::load(row + c),
                                               eventful_vectors::load(column + c), sum);
        }
        float value = eventful_vectors::sum_of(sum);
        for (int64_t c = whole; c < channels; ++c) value = std::fma(row[c], column[c], value);
        out[position[j] * outs + o] = b == nullptr ? value : value + b[o];
      }
    }
  });
}

// current and cached (P, C) float32 rows, contiguous: a head's input this step and as last
// passed on, P = streams x positions. Per stream s, with counts given (one per stream), the
// counts[s] positions of largest L2 change (`topk`, unsorted, as the Python stage takes them,
// so that their order, which orders the sums after them, is the same), those that changed at
// all (norm > 0) in that order; without counts, every position whose norm is not 0 (a NaN
// included), in order. Returns those flat positions and their rows' deltas current - cached, and
// writes current into cached there.
std::tuple<torch::Tensor, torch::Tensor> head_input_change(const torch::Tensor& current,
                                                           torch::Tensor cached,
                                                           at::IntArrayRef counts) {
  check_rows(current, "head_input_change", "current");
  check_rows(cached, "head_input_change", "cached");
  TORCH_CHECK(current.sizes() == cached.sizes(), "head_input_change expects current and cached ",
              "of the same shape, got ", current.sizes(), " and ", cached.sizes());
  const int64_t positions = current.size(0), channels = current.size(1);
  const auto norms =
      eventful_kernels::gate_error_norms(current.unsqueeze(0), cached.unsqueeze(0)).squeeze(0);
  std::vector<int64_t> changed;
  if (counts.empty()) {
    const float* norm = norms.data_ptr<float>();
    for (int64_t p = 0; p < positions; ++p) {
      if (norm[p] != 0.0f) changed.push_back(p);
    }
  } else {
    const int64_t streams = static_cast<int64_t>(counts.size());
    TORCH_CHECK(positions % streams == 0, "head_input_change expects ", positions,
                " positions to split evenly into ", streams, " streams");
    const int64_t each = positions / streams;
    const auto per_stream = norms.view({streams, each});
    for (int64_t s = 0; s < streams; ++s) {
      TORCH_CHECK(counts[s] >= 1 && counts[s] <= each, "head_input_change expects counts in [1, ",
                  each, "], got ", counts[s]);
      const auto top = per_stream[s].topk(counts[s], -1, true, false);
      const auto values = std::get<0>(top).contiguous();
      const auto indices = std::get<1>(top).contiguous();
      const float* value = values.data_ptr<float>();
      const int64_t* index = indices.data_ptr<int64_t>();
      for (int64_t j = 0; j < counts[s]; ++j) {
        if (value[j] > 0.0f) changed.push_back(index[j] + s * each);
      }
    }
  }
  const int64_t count = static_cast<int64_t>(changed.size());
  auto positions_out = torch::empty({count}, current.options().dtype(torch::kInt64));
  auto difference = torch::empty({count, channels}, current.options());
  std::copy(changed.begin(), changed.end(), positions_out.data_ptr<int64_t>());
  const float* now = current.data_ptr<float>();
  float* before = cached.data_ptr<float>();
  float* delta = difference.data_ptr<float>();
  for (int64_t j = 0; j < count; ++j) {
    const float* from = now + changed[j] * channels;
    float* to = before + changed[j] * channels;
    for (int64_t c = 0; c < channels; ++c) delta[j * channels + c] = from[c] - to[c];
    std::memcpy(to, from, channels * sizeof(float));
  }
  return {positions_out, difference};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(eventful, library) {
  library.def(
      "head_stage(Tensor changed, Tensor contributions, Tensor(a!) pre, Tensor(b!) cached, "
      "Tensor?[] scales, Tensor?[] shifts, bool fused, bool transposed, int[] kernel, "
      "int[] stride, int[] padding, int[] dilation, int[] in_size, int[] out_size) -> "
      "(Tensor moved, Tensor changes, Tensor counts)");
  library.def(
      "head_pointwise(Tensor source, Tensor(a!)? pre, Tensor(b!) output, Tensor?[] scales, "
      "Tensor?[] shifts, bool fused) -> ()");
  library.def(
      "head_rows_product(Tensor rows, Tensor moved, Tensor weight, Tensor? bias, "
      "Tensor(a!) kept) -> ()");
  library.def(
      "head_input_change(Tensor current, Tensor(a!) cached, int[] counts) -> "
      "(Tensor changed, Tensor difference)");
}

TORCH_LIBRARY_IMPL(eventful, CPU, library) {
  library.impl("head_stage", &head_stage);
  library.impl("head_pointwise", &head_pointwise);
  library.impl("head_rows_product", &head_rows_product);
  library.impl("head_input_change", &head_input_change);
}

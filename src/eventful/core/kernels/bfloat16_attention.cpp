// Softmax attention of every query row over every key in bfloat16 on AMX tiles (CPU): the
// attention of the tokenwise level and of a recompute of every row at precision "bf16".
//
// PyTorch's fused attention in bfloat16 took 322 us for ViT-S/14's 6 heads of 257 tokens (2
// threads, Intel Xeon with AMX): about 315 GFLOP/s, a fifth of the bfloat16 matmul peak that
// BENCHMARKS.md's section "roofline" measures; this kernel took 217 us, most of it the softmax's
// exponentials, about one cycle per logit. q, k and v are bfloat16, or float32 rounded to
// bfloat16 as they are read (the exact level's float32 qkv buffer, without a rounded copy of it).
// Here, per head, the keys are laid out once as AMX tiles want them (pairs of features of 16
// keys), as are the values (pairs of keys); then each block of 16 query rows:
//
// 1. its logits against every key: two tile products per block of 16 keys (64 features as two
//    halves of 32), into a row of float32 logits;
// 2. per row, the largest logit m, the weights exp(l - m) in float32, their sum Z, and the
//    weights rounded to bfloat16 (the tile product's input);
// 3. the weights times the values, four tiles of 16 features, summed over the keys in blocks of
//    32; each output row divided by its Z, written in float32 with the heads side by side (the
//    tokens' layout), and where asked a second time head by head (`heads_out`: the exact level's
//    numerator), and its log-sum-exp m + ln Z.
//
// The arithmetic of a row does not depend on the rows or heads beside it, nor on the threads.
// Built where the compiler targets AMX-BF16 (with AVX512-BF16); used where the kernel also
// grants the process the tiles' state (tiles.h, `tiles_available`). The logits take no scale: it is
// folded into q. Heads of 64 features.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <vector>

#include "bfloat16.h"
#include "operators.h"
#include "tiles.h"

namespace {

constexpr int64_t HEAD = 64;  // features per head

// Up to this many tokens the kernel runs where it is available (`bfloat16_attention_pays`),
// above PyTorch's fused attention: interleaved, a block's step from Python took 0.91-0.94x its
// time with PyTorch's at ViT-S/14's 257 tokens and 0.98x at ViT-B/16's 197, and 1.01x at
// ViT-B/16 @ 384's 577 (2 threads, Intel Xeon with AMX), where the longer rows' softmax weighs
// as much as the tiles save.
constexpr int64_t MOST_TOKENS = 400;

#if EVENTFUL_TILES

constexpr int64_t BLOCK = 16;            // query rows of a task, keys of a logit tile
constexpr int64_t CHUNK = 32;            // keys of a weight tile
constexpr int64_t KEY_TILE = 512;        // uint32 per block of keys: 32 feature pairs x 16 keys
constexpr int64_t VALUE_CHUNK = 1024;    // uint32 per chunk of values: 4 x (16 key pairs x 16)

// 16 rows of 16 32-bit values turned into their 16 columns, in registers.
inline void transpose_16(__m512i rows[16]) {
  __m512i a[16], b[16];
  for (int i = 0; i < 8; ++i) {
    a[2 * i] = _mm512_unpacklo_epi32(rows[2 * i], rows[2 * i + 1]);
    a[2 * i + 1] = _mm512_unpackhi_epi32(rows[2 * i], rows[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    b[4 * i] = _mm512_unpacklo_epi64(a[4 * i], a[4 * i + 2]);
    b[4 * i + 1] = _mm512_unpackhi_epi64(a[4 * i], a[4 * i + 2]);
    b[4 * i + 2] = _mm512_unpacklo_epi64(a[4 * i + 1], a[4 * i + 3]);
    b[4 * i + 3] = _mm512_unpackhi_epi64(a[4 * i + 1], a[4 * i + 3]);
  }
  for (int m = 0; m < 4; ++m) {
    const __m512i c0 = _mm512_shuffle_i32x4(b[m], b[4 + m], 0x88);
    const __m512i c1 = _mm512_shuffle_i32x4(b[m], b[4 + m], 0xdd);
    const __m512i c2 = _mm512_shuffle_i32x4(b[8 + m], b[12 + m], 0x88);
    const __m512i c3 = _mm512_shuffle_i32x4(b[8 + m], b[12 + m], 0xdd);
    rows[m] = _mm512_shuffle_i32x4(c0, c2, 0x88);
    rows[8 + m] = _mm512_shuffle_i32x4(c0, c2, 0xdd);
    rows[4 + m] = _mm512_shuffle_i32x4(c1, c3, 0x88);
    rows[12 + m] = _mm512_shuffle_i32x4(c1, c3, 0xdd);
  }
}

// e^x for x <= 0: 2^n e^r with |r| <= ln 2 / 2, e^r by its series to r^5 (relative error below
// 3e-6, far below the bfloat16 rounding of the weights); x below -87 counts as -87.
inline __m512 exp_of_nonpositive(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693147182464599609375f), x);
  __m512 p = _mm512_set1_ps(1.0f / 120.0f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

// 32 features in bfloat16 from bfloat16 or float32 ones (these rounded to nearest, ties to even,
// as PyTorch rounds finite values).
inline __m512i bfloat16_32(const uint16_t* at) { return _mm512_loadu_si512(at); }
inline __m512i bfloat16_32(const float* at) {
  return (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(at + 16), _mm512_loadu_ps(at));
}

// 16 features in bfloat16, each widened to 32 bits (its bits in the low half).
inline __m512i bfloat16_16_widened(const uint16_t* at) {
  return _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(at)));
}
inline __m512i bfloat16_16_widened(const float* at) {
  return _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(at)));
}

// One head's keys (tokens rows `stride` elements apart, bfloat16 or float32) as logit tiles: per
// block of 16 keys, (32 feature pairs, 16 keys) of 32-bit pairs; keys past `tokens` zero.
template <typename T>
void lay_out_keys(const T* keys, int64_t stride, int64_t tokens, uint32_t* to) {
  const int64_t blocks = (tokens + BLOCK - 1) / BLOCK;
  for (int64_t block = 0; block < blocks; ++block) {
    for (int half = 0; half < 2; ++half) {  // features [0, 32) and [32, 64): pairs 0-15, 16-31
      __m512i rows[16];
      for (int j = 0; j < 16; ++j) {
        const int64_t key = block * BLOCK + j;
        rows[j] = key < tokens ? bfloat16_32(keys + key * stride + half * 32)
                               : _mm512_setzero_si512();
      }
      transpose_16(rows);
      for (int pair = 0; pair < 16; ++pair) {
        _mm512_storeu_si512(to + block * KEY_TILE + (half * 16 + pair) * 16, rows[pair]);
      }
    }
  }
}

// One head's values (bfloat16 or float32) as weight-product tiles: per chunk of 32 keys and block
// of 16 features, (16 key pairs, 16 features) of pairs (key 2 p, key 2 p + 1); keys past `tokens`
// zero.
template <typename T>
void lay_out_values(const T* values, int64_t stride, int64_t tokens, uint32_t* to) {
  const int64_t padded = (tokens + CHUNK - 1) / CHUNK * CHUNK;
  for (int64_t key = 0; key < padded; key += 2) {
    for (int feature_block = 0; feature_block < 4; ++feature_block) {
      auto features = [&](int64_t of) {  // 16 features of key `of` widened to 32 bits
        if (of >= tokens) return _mm512_setzero_si512();
        return bfloat16_16_widened(values + of * stride + feature_block * 16);
      };
      const __m512i low = features(key), high = features(key + 1);
      uint32_t* at =
          to + (key / CHUNK) * VALUE_CHUNK + feature_block * 256 + (key % CHUNK) / 2 * 16;
      _mm512_storeu_si512(at, _mm512_or_si512(low, _mm512_slli_epi32(high, 16)));
    }
  }
}

template <typename T>
struct Head {
  const T* queries;         // row 0 of the head's queries (bfloat16 or float32)
  int64_t query_stride;     // elements between rows
  const uint32_t* keys;     // lay_out_keys
  const uint32_t* values;   // lay_out_values
  float* out;               // row 0 of the head's output
  int64_t out_stride;       // floats between rows
  float* logsumexp;         // per row
  float* heads_out;         // row 0 of the head's rows (N, 64) of a second output, or null
};

// Scratch of one thread: a block's logits (16 x padded keys), weights (16 x keys in chunks of
// 32, bfloat16), output sums (16 x 64) and padded queries (16 x 64 bfloat16).
struct Scratch {
  std::vector<float> logits, sums;
  std::vector<uint16_t> weights, queries;
  Scratch(int64_t tokens)
      : logits(BLOCK * ((tokens + BLOCK - 1) / BLOCK * BLOCK)),
        sums(BLOCK * HEAD),
        weights(BLOCK * ((tokens + CHUNK - 1) / CHUNK * CHUNK), 0),
        queries(BLOCK * HEAD, 0) {}
};

// A block's query rows (`rows` of them from `from`, rows `stride` elements apart) in bfloat16
// into scratch (16 x 64), zero rows after them.
inline void copy_queries(const uint16_t* from, int64_t stride, int64_t rows, uint16_t* to) {
  for (int64_t r = 0; r < rows; ++r) std::memcpy(to + r * HEAD, from + r * stride, 2 * HEAD);
}
inline void copy_queries(const float* from, int64_t stride, int64_t rows, uint16_t* to) {
  for (int64_t r = 0; r < rows; ++r) {
    eventful_bfloat16::round_values(from + r * stride, to + r * HEAD, HEAD);
  }
}

// Query rows [first, first + 16) of a head (fewer at the end) over its `tokens` keys.
template <typename T>
void attend_block(const Head<T>& head, int64_t tokens, int64_t first, Scratch& scratch) {
  const int64_t blocks = (tokens + BLOCK - 1) / BLOCK, padded = blocks * BLOCK;
  const int64_t chunks = (tokens + CHUNK - 1) / CHUNK, weight_stride = chunks * CHUNK;
  const int64_t rows = std::min<int64_t>(BLOCK, tokens - first);
  const T* block_queries = head.queries + first * head.query_stride;
  const uint16_t* queries = scratch.queries.data();
  int64_t query_bytes = 2 * HEAD;
  if (std::is_same<T, uint16_t>::value && rows == BLOCK) {  // bfloat16 rows read in place
    queries = reinterpret_cast<const uint16_t*>(block_queries);
    query_bytes = head.query_stride * 2;
  } else {  // float32 rows rounded, and a last block's rows beside zero rows, in scratch
    if (rows < BLOCK) std::fill(scratch.queries.begin(), scratch.queries.end(), 0);
    copy_queries(block_queries, head.query_stride, rows, scratch.queries.data());
  }
  float* logits = scratch.logits.data();
  _tile_loadd(1, queries, query_bytes);
  _tile_loadd(2, queries + 32, query_bytes);
  int64_t block = 0;
  for (; block + 2 <= blocks; block += 2) {  // two blocks of keys in flight
    const uint32_t* keys = head.keys + block * KEY_TILE;
    _tile_zero(0);
    _tile_zero(5);
    _tile_loadd(3, keys, 64);
    _tile_loadd(6, keys + KEY_TILE, 64);
    _tile_dpbf16ps(0, 1, 3);
    _tile_dpbf16ps(5, 1, 6);
    _tile_loadd(4, keys + 256, 64);
    _tile_loadd(7, keys + KEY_TILE + 256, 64);
    _tile_dpbf16ps(0, 2, 4);
    _tile_dpbf16ps(5, 2, 7);
    _tile_stored(0, logits + block * BLOCK, padded * 4);
    _tile_stored(5, logits + (block + 1) * BLOCK, padded * 4);
  }
  if (block < blocks) {
    const uint32_t* keys = head.keys + block * KEY_TILE;
    _tile_zero(0);
    _tile_loadd(3, keys, 64);
    _tile_loadd(4, keys + 256, 64);
    _tile_dpbf16ps(0, 1, 3);
    _tile_dpbf16ps(0, 2, 4);
    _tile_stored(0, logits + block * BLOCK, padded * 4);
  }

  float shifts[BLOCK], totals[BLOCK];
  const int64_t whole = tokens / 16 * 16;
  const __mmask16 tail = static_cast<__mmask16>((1u << (tokens - whole)) - 1u);
  for (int64_t r = 0; r < BLOCK; ++r) {
    const float* row = logits + r * padded;
    uint16_t* weights = scratch.weights.data() + r * weight_stride;
    // Four running maxima: one alone waits for each maximum before the next (a maximum is
    // exact in any order).
    __m512 most = _mm512_set1_ps(-INFINITY), most1 = most, most2 = most, most3 = most;
    int64_t j4 = 0;
    for (; j4 + 64 <= whole; j4 += 64) {
      most = _mm512_max_ps(most, _mm512_loadu_ps(row + j4));
      most1 = _mm512_max_ps(most1, _mm512_loadu_ps(row + j4 + 16));
      most2 = _mm512_max_ps(most2, _mm512_loadu_ps(row + j4 + 32));
      most3 = _mm512_max_ps(most3, _mm512_loadu_ps(row + j4 + 48));
    }
    for (; j4 < whole; j4 += 16) most = _mm512_max_ps(most, _mm512_loadu_ps(row + j4));
    most = _mm512_max_ps(_mm512_max_ps(most, most1), _mm512_max_ps(most2, most3));
    if (tail) {
      const __m512 rest = _mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), tail, row + whole);
      most = _mm512_max_ps(most, rest);
    }
    const float shift = _mm512_reduce_max_ps(most);
    const __m512 minus = _mm512_set1_ps(shift);
    __m512 total = _mm512_setzero_ps();
    for (int64_t j = 0; j < whole; j += 16) {
      const __m512 weight = exp_of_nonpositive(_mm512_sub_ps(_mm512_loadu_ps(row + j), minus));
      total = _mm512_add_ps(total, weight);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(weights + j),
                          (__m256i)_mm512_cvtneps_pbh(weight));
    }
    int64_t j = whole;
    if (tail) {
      const __m512 logits = _mm512_maskz_loadu_ps(tail, row + j);
      const __m512 weight =
          _mm512_maskz_mov_ps(tail, exp_of_nonpositive(_mm512_sub_ps(logits, minus)));
      total = _mm512_add_ps(total, weight);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(weights + j),
                          (__m256i)_mm512_cvtneps_pbh(weight));
      j += 16;
    }
    std::fill(weights + j, weights + weight_stride, 0);  // keys past the last whole block
    shifts[r] = shift;
    totals[r] = _mm512_reduce_add_ps(total);
  }

  _tile_zero(4);
  _tile_zero(5);
  _tile_zero(6);
  _tile_zero(7);
  for (int64_t chunk = 0; chunk < chunks; ++chunk) {
    const uint32_t* values = head.values + chunk * VALUE_CHUNK;
    _tile_loadd(0, scratch.weights.data() + chunk * CHUNK, weight_stride * 2);
    _tile_loadd(1, values, 64);
    _tile_dpbf16ps(4, 0, 1);
    _tile_loadd(2, values + 256, 64);
    _tile_dpbf16ps(5, 0, 2);
    _tile_loadd(3, values + 512, 64);
    _tile_dpbf16ps(6, 0, 3);
    _tile_loadd(1, values + 768, 64);
    _tile_dpbf16ps(7, 0, 1);
  }
  float* sums = scratch.sums.data();
  _tile_stored(4, sums, HEAD * 4);
  _tile_stored(5, sums + 16, HEAD * 4);
  _tile_stored(6, sums + 32, HEAD * 4);
  _tile_stored(7, sums + 48, HEAD * 4);
  for (int64_t r = 0; r < rows; ++r) {
    const __m512 by = _mm512_set1_ps(1.0f / totals[r]);
    float* out = head.out + (first + r) * head.out_stride;
    float* second = head.heads_out == nullptr ? nullptr : head.heads_out + (first + r) * HEAD;
    for (int64_t c = 0; c < HEAD; c += 16) {
      const __m512 value = _mm512_mul_ps(_mm512_loadu_ps(sums + r * HEAD + c), by);
      _mm512_storeu_ps(out + c, value);
      if (second != nullptr) _mm512_storeu_ps(second + c, value);
    }
    head.logsumexp[first + r] = shifts[r] + std::log(totals[r]);
  }
}

// The kernel on q, k, v of element type T (uint16_t: bfloat16 bits, or float), their (G, H, N,
// dh) strides in elements; out (G, N, H, dh), logsumexp (G, H, N) and heads_out (G, H, N, dh) or
// null, contiguous float32.
template <typename T>
void attend_every_row(const T* q, const T* k, const T* v, at::IntArrayRef q_strides,
                      at::IntArrayRef k_strides, at::IntArrayRef v_strides, int64_t groups,
                      int64_t heads, int64_t tokens, float* outs, float* sums,
                      float* heads_outs) {
  const int64_t pairs = groups * heads, blocks = (tokens + BLOCK - 1) / BLOCK;
  const int64_t chunks = (tokens + CHUNK - 1) / CHUNK;
  const int64_t per_pair = blocks * KEY_TILE + chunks * VALUE_CHUNK;
  std::vector<uint32_t> laid_out(pairs * per_pair);
  auto offset = [](at::IntArrayRef strides, int64_t g, int64_t h) {
    return g * strides[0] + h * strides[1];
  };
  at::parallel_for(0, pairs, 1, [&](int64_t begin, int64_t end) {
    for (int64_t pair = begin; pair < end; ++pair) {
      const int64_t g = pair / heads, h = pair % heads;
      uint32_t* keys = laid_out.data() + pair * per_pair;
      lay_out_keys(k + offset(k_strides, g, h), k_strides[2], tokens, keys);
      lay_out_values(v + offset(v_strides, g, h), v_strides[2], tokens, keys + blocks * KEY_TILE);
    }
  });
  at::parallel_for(0, pairs * blocks, 1, [&](int64_t begin, int64_t end) {
    eventful_tiles::configure();
    Scratch scratch(tokens);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t pair = task / blocks, g = pair / heads, h = pair % heads;
      const uint32_t* keys = laid_out.data() + pair * per_pair;
      const Head<T> head{q + offset(q_strides, g, h),
                         q_strides[2],
                         keys,
                         keys + blocks * KEY_TILE,
                         outs + (g * tokens * heads + h) * HEAD,
                         heads * HEAD,
                         sums + pair * tokens,
                         heads_outs == nullptr ? nullptr : heads_outs + pair * tokens * HEAD};
      attend_block(head, tokens, (task % blocks) * BLOCK, scratch);
    }
    _tile_release();
  });
}

#endif  // EVENTFUL_TILES

}  // namespace

bool eventful_kernels::tiles_available() {
#if EVENTFUL_TILES
  return eventful_tiles::permitted();
#else
  return false;
#endif
}

bool eventful_kernels::bfloat16_attention_pays(int64_t tokens, int64_t head_features) {
  return head_features == HEAD && tokens <= MOST_TOKENS && tiles_available();
}

std::tuple<torch::Tensor, torch::Tensor> eventful_kernels::bfloat16_attention(
    const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
    const c10::optional<torch::Tensor>& heads_out) {
  TORCH_CHECK(tiles_available(),
              "bfloat16_attention needs AMX-BF16 tiles, which this build or process lacks");
  TORCH_CHECK(q.dim() == 4 && k.sizes() == q.sizes() && v.sizes() == q.sizes(),
              "bfloat16_attention expects q, k, v of one shape (G, H, N, dh), got ", q.sizes(),
              ", ", k.sizes(), ", ", v.sizes());
  TORCH_CHECK(q.size(3) == HEAD, "bfloat16_attention expects heads of ", HEAD,
              " features, got ", q.size(3));
  for (const auto* t : {&q, &k, &v}) {
    TORCH_CHECK((t->scalar_type() == torch::kBFloat16 || t->scalar_type() == torch::kFloat32) &&
                    t->scalar_type() == q.scalar_type() && t->device().is_cpu() &&
                    t->stride(3) == 1,
                "bfloat16_attention expects bfloat16 (or float32) CPU tensors of one dtype with ",
                "contiguous features, got ", t->scalar_type(), " on ", t->device());
  }
  const int64_t groups = q.size(0), heads = q.size(1), tokens = q.size(2);
  float* heads_outs = nullptr;
  if (heads_out.has_value() && heads_out->defined()) {
    TORCH_CHECK(heads_out->scalar_type() == torch::kFloat32 && heads_out->is_contiguous() &&
                    heads_out->sizes() == q.sizes(),
                "bfloat16_attention expects heads_out as a contiguous float32 tensor of shape ",
                q.sizes(), ", got ", heads_out->scalar_type(), " ", heads_out->sizes());
    heads_outs = heads_out->data_ptr<float>();
  }
  auto out = torch::empty({groups, tokens, heads, HEAD}, q.options().dtype(torch::kFloat32));
  auto logsumexp = torch::empty({groups, heads, tokens}, out.options());
#if EVENTFUL_TILES
  float* outs = out.data_ptr<float>();
  float* sums = logsumexp.data_ptr<float>();
  if (q.scalar_type() == torch::kFloat32) {
    attend_every_row(q.data_ptr<float>(), k.data_ptr<float>(), v.data_ptr<float>(), q.strides(),
                     k.strides(), v.strides(), groups, heads, tokens, outs, sums, heads_outs);
  } else {
    auto bits = [](const torch::Tensor& t) {
      return reinterpret_cast<const uint16_t*>(t.data_ptr<at::BFloat16>());
    };
    attend_every_row(bits(q), bits(k), bits(v), q.strides(), k.strides(), v.strides(), groups,
                     heads, tokens, outs, sums, heads_outs);
  }
#endif
  return {out.transpose(1, 2), logsumexp};
}

TORCH_LIBRARY_FRAGMENT(eventful, library) {
  library.def(
      "bfloat16_attention(Tensor q, Tensor k, Tensor v, Tensor(a!)? heads_out=None) -> "
      "(Tensor output, Tensor logsumexp)");
  library.def("tiles_available() -> bool");  // for this kernel and tiles_linear.cpp's
  library.def("bfloat16_attention_pays(int tokens, int head_features) -> bool");
}

TORCH_LIBRARY_IMPL(eventful, CPU, library) {
  library.impl("bfloat16_attention", &eventful_kernels::bfloat16_attention);
}

TORCH_LIBRARY_IMPL(eventful, CatchAll, library) {
  library.impl("tiles_available", &eventful_kernels::tiles_available);
  library.impl("bfloat16_attention_pays", &eventful_kernels::bfloat16_attention_pays);
}

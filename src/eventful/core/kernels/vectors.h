// Vectors of floats for the kernels of this folder, in GCC's and Clang's vector extensions:
// 16 floats where the CPU the library is built for has AVX-512 (one register), else 8 (AVX2's
// registers; Arm's NEON takes them as pairs). The compiler picks the instructions for the CPU it
// builds for (-march=native). Kernels are written for any WIDTH: sums run in a fixed order for a
// given build, so a row's result never depends on the rows beside it, but builds of different
// widths round differently.

#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

#if defined(__AVX__)
#include <immintrin.h>
#endif

namespace eventful_vectors {

#if defined(__AVX512F__)
constexpr int64_t WIDTH = 16;  // floats per vector
#else
constexpr int64_t WIDTH = 8;
#endif
constexpr int64_t LINE = 16;  // floats per cache line

typedef float Vector __attribute__((vector_size(WIDTH * sizeof(float))));
typedef int32_t Integers __attribute__((vector_size(WIDTH * sizeof(int32_t))));

inline Vector load(const float* from) {
  Vector value;
  std::memcpy(&value, from, sizeof(Vector));
  return value;
}

inline void store(float* to, Vector value) { std::memcpy(to, &value, sizeof(Vector)); }

// Written out lane by lane: a loop over the lanes compiles to one masked move per lane.
inline Vector splat(float v) {
#if defined(__AVX512F__)
  return Vector{v, v, v, v, v, v, v, v, v, v, v, v, v, v, v, v};
#else
  return Vector{v, v, v, v, v, v, v, v};
#endif
}

// a * b + c. One fused instruction wherever the CPU has one, so that a sum takes the same
// roundings in every function that forms it (the compiler fuses `a * b + c` in some places and
// not in others).
// (Vector types of one size convert to each other by a cast, which keeps them in registers; a
// copy through memory made the compiler spill a loop's sums to the stack at every step.)
inline Vector multiply_add(Vector a, Vector b, Vector c) {
#if defined(__AVX512F__)
  return (Vector)_mm512_fmadd_ps((__m512)a, (__m512)b, (__m512)c);
#elif defined(__FMA__)
  return (Vector)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)c);
#else
  return a * b + c;
#endif
}

inline Vector lane_index() {
#if defined(__AVX512F__)
  return Vector{0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
#else
  return Vector{0, 1, 2, 3, 4, 5, 6, 7};
#endif
}

// Lanes whose column c + lane is below `count`: all ones, else zeros.
inline Integers lanes_below(int64_t c, int64_t count) {
  return lane_index() + splat(static_cast<float>(c)) < splat(static_cast<float>(count));
}

inline Vector max(Vector a, Vector b) { return a > b ? a : b; }

#if defined(__AVX__)
// The lanes of v folded in halves by `fold` (lane i with lane i + WIDTH / 2, and so on down to
// one lane): the same order for every vector, in a few shuffles.
template <typename Fold256, typename Fold128>
inline float folded(Vector v, Fold256 fold256, Fold128 fold128) {
#if defined(__AVX512F__)
  __m512 all;
  std::memcpy(&all, &v, sizeof(Vector));
  const __m256 eight = fold256(_mm512_castps512_ps256(all),
                               _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(all), 1)));
#else
  __m256 eight;
  std::memcpy(&eight, &v, sizeof(Vector));
#endif
  const __m128 four = fold128(_mm256_castps256_ps128(eight), _mm256_extractf128_ps(eight, 1));
  const __m128 two = fold128(four, _mm_movehl_ps(four, four));
  return _mm_cvtss_f32(fold128(two, _mm_shuffle_ps(two, two, 1)));
}
#endif

// The sum of the lanes, folded in halves.
inline float sum_of(Vector v) {
#if defined(__AVX__)
  return folded(v, _mm256_add_ps, _mm_add_ps);
#else
  float lanes[WIDTH];
  std::memcpy(lanes, &v, sizeof(Vector));
  for (int64_t half = WIDTH / 2; half > 0; half /= 2) {
    for (int64_t lane = 0; lane < half; ++lane) lanes[lane] += lanes[lane + half];
  }
  return lanes[0];
#endif
}

// The largest lane, folded in halves.
inline float max_of(Vector v) {
#if defined(__AVX__)
  return folded(v, _mm256_max_ps, _mm_max_ps);
#else
  float lanes[WIDTH];
  std::memcpy(lanes, &v, sizeof(Vector));
  for (int64_t half = WIDTH / 2; half > 0; half /= 2) {
    for (int64_t lane = 0; lane < half; ++lane) {
      lanes[lane] = std::max(lanes[lane], lanes[lane + half]);
    }
  }
  return lanes[0];
#endif
}

// The first cache line boundary at or after `at` (buffers are allocated LINE floats longer).
inline float* aligned(float* at) {
  const auto address = reinterpret_cast<std::uintptr_t>(at);
  const auto line = static_cast<std::uintptr_t>(LINE * sizeof(float));
  return reinterpret_cast<float*>((address + line - 1) / line * line);
}

// e^x of each lane. x = n ln 2 + r with n the nearest integer to x / ln 2 and |r| <= ln 2 / 2;
// e^r by its Taylor series to degree 7 (relative error below 1e-8 on that interval, so float32
// rounding dominates); 2^n written into the exponent bits. x is clamped to [-87, 88], where
// 2^n stays a normal float: e^-87 is about 1.6e-38, which counts as nothing beside any weight
// that matters here.
inline Vector vector_exp(Vector x) {
  const Vector high = splat(88.0f), low = splat(-87.0f);
  x = x < high ? x : high;
  x = x > low ? x : low;
  const Vector round_shift = splat(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
  const Vector n = (x * splat(1.44269504088896341f) + round_shift) - round_shift;
  const Vector r = (x - n * splat(0.693145751953125f)) - n * splat(1.42860682030941723e-6f);
  Vector p = splat(1.0f / 5040.0f);
  p = p * r + splat(1.0f / 720.0f);
  p = p * r + splat(1.0f / 120.0f);
  p = p * r + splat(1.0f / 24.0f);
  p = p * r + splat(1.0f / 6.0f);
  p = p * r + splat(0.5f);
  p = p * r + splat(1.0f);
  p = p * r + splat(1.0f);
  const Integers exponent = (__builtin_convertvector(n, Integers) + 127) << 23;
  Vector scale;
  std::memcpy(&scale, &exponent, sizeof(Vector));
  return p * scale;
}

// ln x of each lane, x a positive normal float. x = 2^e m with m in [sqrt(1/2), sqrt(2)); ln m =
// 2 atanh(s), s = (m - 1) / (m + 1), |s| <= 0.172, by its series to s^9 (relative error below
// 3e-9, so float32 rounding dominates).
inline Vector vector_log(Vector x) {
  Integers bits;
  std::memcpy(&bits, &x, sizeof(Vector));
  Integers exponent = ((bits >> 23) & 0xff) - 127;
  const Integers mantissa_bits = (bits & 0x7fffff) | 0x3f800000;  // m in [1, 2)
  Vector m;
  std::memcpy(&m, &mantissa_bits, sizeof(Vector));
  const Integers above = m > splat(1.41421356f);  // all ones where m is halved
  m = above ? m * splat(0.5f) : m;
  exponent -= above;  // minus -1
  const Vector s = (m - splat(1.0f)) / (m + splat(1.0f));
  const Vector s2 = s * s;
  Vector p = splat(1.0f / 9.0f);
  p = p * s2 + splat(1.0f / 7.0f);
  p = p * s2 + splat(1.0f / 5.0f);
  p = p * s2 + splat(1.0f / 3.0f);
  p = p * s2 + splat(1.0f);
  return __builtin_convertvector(exponent, Vector) * splat(0.693147180559945309f) +
         splat(2.0f) * s * p;
}

// erfc(z) of each lane, z >= 0, to a relative error of about 1.2e-7: the Chebyshev fit of
// Numerical Recipes (Press et al., 2nd ed., section 6.2), t = 1 / (1 + z / 2),
// erfc(z) = t exp(-z^2 - 1.26551223 + t (1.00002368 + t (0.37409196 + ... + t 0.17087277))).
inline Vector vector_erfc(Vector z) {
  const Vector t = splat(1.0f) / (splat(1.0f) + splat(0.5f) * z);
  Vector p = splat(0.17087277f);
  p = p * t + splat(-0.82215223f);
  p = p * t + splat(1.48851587f);
  p = p * t + splat(-1.13520398f);
  p = p * t + splat(0.27886807f);
  p = p * t + splat(-0.18628806f);
  p = p * t + splat(0.09678418f);
  p = p * t + splat(0.37409196f);
  p = p * t + splat(1.00002368f);
  p = p * t + splat(-1.26551223f);
  return t * vector_exp(p - z * z);
}

// GELU with the exact error function, x Phi(x) = x / 2 (1 + erf(x / sqrt(2))), of each lane:
// from erfc(|x| / sqrt(2)), so that the tail of negative x keeps its relative precision.
inline Vector vector_gelu(Vector x) {
  const Vector magnitude = x < splat(0.0f) ? -x : x;
  const Vector c = vector_erfc(magnitude * splat(0.70710678118654752f));
  return splat(0.5f) * x * (x < splat(0.0f) ? c : splat(2.0f) - c);
}

// GELU of `count` floats in place: whole vectors, then the rest through one vector.
inline void gelu_in_place(float* values, int64_t count) {
  int64_t c = 0;
  for (; c + WIDTH <= count; c += WIDTH) store(values + c, vector_gelu(load(values + c)));
  if (c < count) {
    float rest[WIDTH] = {};
    std::memcpy(rest, values + c, (count - c) * sizeof(float));
    store(rest, vector_gelu(load(rest)));
    std::memcpy(values + c, rest, (count - c) * sizeof(float));
  }
}

// R rows of a (each a + r * a_stride) times V vectors of b's columns from column c (b's rows
// b_stride apart), over `depth` terms: out[r * out_stride + c + lane] = scale_r * sum_i
// a[r * a_stride + i] b[i * b_stride + c + lane], scale_r = scale[r] where `scale` is given, else
// 1 (a product by 1 is exact). Each loaded vector of b serves the R rows from registers; every
// sum runs over i in order. Never inlined: inlined into a large kernel, the compiler kept the
// sums in memory and stored them at every step of the loop (1.3x slower).
template <int R, int V>
__attribute__((noinline)) void rows_times_columns(const float* a, int64_t a_stride, const float* b, int64_t b_stride,
                               int64_t depth, int64_t c, float* out, int64_t out_stride,
                               const float* scale = nullptr) {
  Vector sums[R][V];
  for (int r = 0; r < R; ++r) {
    for (int u = 0; u < V; ++u) sums[r][u] = Vector{};
  }
  // Rows of b a page or more apart (a head's values in the qkv buffer): the hardware does not
  // fetch ahead across pages, so each row's lines are asked for AHEAD rows early. Without it,
  // the exact level's recompute of 13 of 257 rows waited on these loads for most of its time, and
  // with it the whole update takes 0.97-0.98 of its time (Intel Xeon, AVX-512, 1 and 2 threads,
  // interleaved).
  const bool far_apart = b_stride * static_cast<int64_t>(sizeof(float)) >= 4096;
  constexpr int64_t AHEAD = 8;
  for (int64_t i = 0; i < depth; ++i) {
    const float* row = b + i * b_stride + c;
    if (far_apart && i + AHEAD < depth) {
      for (int u = 0; u < V; ++u) __builtin_prefetch(row + AHEAD * b_stride + u * WIDTH);
    }
    Vector columns[V];
    for (int u = 0; u < V; ++u) columns[u] = load(row + u * WIDTH);
    for (int r = 0; r < R; ++r) {
      const Vector value = splat(a[r * a_stride + i]);
      for (int u = 0; u < V; ++u) sums[r][u] = multiply_add(value, columns[u], sums[r][u]);
    }
  }
  for (int r = 0; r < R; ++r) {
    const Vector factor = splat(scale == nullptr ? 1.0f : scale[r]);
    for (int u = 0; u < V; ++u) store(out + r * out_stride + c + u * WIDTH, sums[r][u] * factor);
  }
}

// Logits of R query rows (each q + r * row_stride) for all keys, held transposed (dh, padded, a
// multiple of WIDTH): logits[r * padded + j] = q_r . key j. V vectors of keys per pass while V
// fit (R x V sums in flight, enough to hide the latency of a multiply-add), then two, then one.
template <int R, int V>
inline void rows_logits(const float* q, int64_t row_stride, const float* keys_by_feature,
                        int64_t dh, int64_t padded, float* logits) {
  int64_t c = 0;
  for (; c + V * WIDTH <= padded; c += V * WIDTH) {
    rows_times_columns<R, V>(q, row_stride, keys_by_feature, padded, dh, c, logits, padded);
  }
  for (; V > 2 && c + 2 * WIDTH <= padded; c += 2 * WIDTH) {
    rows_times_columns<R, 2>(q, row_stride, keys_by_feature, padded, dh, c, logits, padded);
  }
  for (; c < padded; c += WIDTH) {
    rows_times_columns<R, 1>(q, row_stride, keys_by_feature, padded, dh, c, logits, padded);
  }
}

// to[c * to_stride + r] = from[r * from_stride + c] for r < rows, c < columns. Blocks of 8 rows
// by 8 columns go through registers where the CPU has AVX.
inline void transpose(const float* from, int64_t from_stride, int64_t rows, int64_t columns,
                      float* to, int64_t to_stride) {
  int64_t r = 0;
#if defined(__AVX__)
  for (; r + 8 <= rows; r += 8) {
    int64_t c = 0;
    for (; c + 8 <= columns; c += 8) {
      __m256 x[8], t[8], s[8];
      for (int i = 0; i < 8; ++i) x[i] = _mm256_loadu_ps(from + (r + i) * from_stride + c);
      for (int i = 0; i < 8; i += 2) {
        t[i] = _mm256_unpacklo_ps(x[i], x[i + 1]);
        t[i + 1] = _mm256_unpackhi_ps(x[i], x[i + 1]);
      }
      for (int i = 0; i < 8; i += 4) {
        s[i] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
        s[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
        s[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
        s[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
      }
      for (int i = 0; i < 4; ++i) {
        const __m256 low = _mm256_permute2f128_ps(s[i], s[i + 4], 0x20);
        _mm256_storeu_ps(to + (c + i) * to_stride + r, low);
        _mm256_storeu_ps(to + (c + i + 4) * to_stride + r,
                         _mm256_permute2f128_ps(s[i], s[i + 4], 0x31));
      }
    }
    for (; c < columns; ++c) {
      for (int i = 0; i < 8; ++i) to[c * to_stride + r + i] = from[(r + i) * from_stride + c];
    }
  }
#endif
  for (; r < rows; ++r) {
    for (int64_t c = 0; c < columns; ++c) to[c * to_stride + r] = from[r * from_stride + c];
  }
}

}  // namespace eventful_vectors

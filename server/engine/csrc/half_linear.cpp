// A half-precision linear layer at decode shapes for CPUs without native bf16 (server/engine/half_linear.py routes
// the torch engine's layers here): y = x W^T (+ b), W bf16 or fp16 (out, in) row-major, x a few rows.
//
// A decode step reads every weight once, so at batch 1 its ceiling is memory bandwidth. ATen's bf16/fp16 gemv on an
// AVX2 CPU converts element by element and read 8192 x 2048 weights at ~2.5 GB/s here, against ~7.5 GB/s for the
// float32 gemv on the same bytes. This kernel widens 8 weights per instruction (bf16: a 16-bit shift into the high
// half of a float32; fp16: F16C's vcvtph2ps), multiplies with FMA into float32 accumulators, and reads each weight
// row once for all rows of x: a tile of weight rows is streamed from memory for the first group of x rows and
// re-read from L1/L2 for the others.
//
// Numerics, as ATen's CPU kernels do it: x is widened to float32 (exactly), every product of two half-precision
// numbers is exact in float32, the sums are float32 (8 lanes then a horizontal add, so ~in/8 + 3 additions deep),
// the bias is added in float32 and the result is rounded once, to nearest even, to the weight's dtype.

#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

// AVX2, FMA and F16C (x86 since 2013); built elsewhere (arm64, older x86) the library has no half_linear and
// server.engine.half_linear leaves the layers to F.linear.
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>

namespace {

inline __m256 widen8(const at::BFloat16* p) {
  const __m128i bits = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16));
}

inline __m256 widen8(const at::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

inline float sum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

// acc[o][j] += w[o][k, k + 8) * x[j][k, k + 8), the 8 weights of each row widened once for all X rows.
template <int O, int X, typename T>
inline void fma_step(const T* w, const float* x, int64_t in, int64_t k, __m256 (&acc)[O][X]) {
  __m256 wv[O];
#pragma GCC unroll 8
  for (int o = 0; o < O; ++o) wv[o] = widen8(w + o * in + k);
#pragma GCC unroll 8
  for (int j = 0; j < X; ++j) {
    const __m256 xv = _mm256_loadu_ps(x + j * in + k);
#pragma GCC unroll 8
    for (int o = 0; o < O; ++o) acc[o][j] = _mm256_fmadd_ps(wv[o], xv, acc[o][j]);
  }
}

// sums[o * X + j] = w[o] . x[j] for O consecutive weight rows and X rows of x (float32, row stride `in`). O * X
// accumulators, O widened weight vectors and one x vector stay in the 16 ymm registers. Each 64-byte line of the
// O rows comes with a prefetch of the same line of the next O rows, the ones read next: a row is one 4 KB page at
// in = 2048, and the hardware prefetchers, which stop at page ends, restart on every row (one thread streaming an
// 8192 x 2048 bf16 matrix from memory: 12.0 GB/s without, 14.5 with, into L2; one-off check on this CPU).
template <int O, int X, typename T>
inline void dot_tile(const T* w, const float* x, int64_t in, float* sums) {
  constexpr int64_t kLine = 64 / sizeof(T);
  __m256 acc[O][X];
#pragma GCC unroll 16
  for (int i = 0; i < O * X; ++i) acc[i / X][i % X] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + kLine <= in; k += kLine) {
#pragma GCC unroll 8
    for (int o = 0; o < O; ++o) _mm_prefetch(reinterpret_cast<const char*>(w + (o + O) * in + k), _MM_HINT_T1);
#pragma GCC unroll 4
    for (int64_t step = 0; step < kLine; step += 8) fma_step<O, X>(w, x, in, k + step, acc);
  }
  for (; k + 8 <= in; k += 8) fma_step<O, X>(w, x, in, k, acc);
  for (int o = 0; o < O; ++o) {
    for (int j = 0; j < X; ++j) {
      float s = sum8(acc[o][j]);
      for (int64_t t = k; t < in; ++t) s += static_cast<float>(w[o * in + t]) * x[j * in + t];
      sums[o * X + j] = s;
    }
  }
}

// O * X accumulators within the registers: 4 weight rows for 1-2 rows of x, 2 (or 1) for 3-4.
template <int O, typename T>
void dot_group(const T* w, const float* x, int64_t in, int x_rows, float* sums) {
  if constexpr (O == 4) {
    return x_rows == 1 ? dot_tile<4, 1>(w, x, in, sums) : dot_tile<4, 2>(w, x, in, sums);
  } else {
    switch (x_rows) {
      case 1: return dot_tile<O, 1>(w, x, in, sums);
      case 2: return dot_tile<O, 2>(w, x, in, sums);
      case 3: return dot_tile<O, 3>(w, x, in, sums);
      default: return dot_tile<O, 4>(w, x, in, sums);
    }
  }
}

constexpr int64_t kTile = 4;   // weight rows a task streams together
constexpr int64_t kGroup = 4;  // rows of x per pass over the tile
constexpr int64_t kRowBlock = 64;

// Weight rows [first, first + count) against every row of x into y (rows, out), count <= kTile.
template <typename T>
void linear_tile(const T* w, const T* bias, const float* x, int64_t rows, int64_t in, int64_t out, int64_t first,
                 int64_t count, T* y) {
  float sums[kTile * kGroup];
  for (int64_t j0 = 0; j0 < rows; j0 += kGroup) {
    const int group = static_cast<int>(std::min(kGroup, rows - j0));
    const float* xg = x + j0 * in;
    for (int64_t o0 = 0; o0 < count;) {
      const int64_t step = count - o0 < 2 ? 1 : (group <= 2 && count - o0 == 4 ? 4 : 2);
      const T* wt = w + (first + o0) * in;
      if (step == 4) dot_group<4>(wt, xg, in, group, sums);
      else if (step == 2) dot_group<2>(wt, xg, in, group, sums);
      else dot_group<1>(wt, xg, in, group, sums);
      for (int64_t o = 0; o < step; ++o) {
        const int64_t row = first + o0 + o;
        const float b = bias ? static_cast<float>(bias[row]) : 0.f;
        for (int j = 0; j < group; ++j) y[(j0 + j) * out + row] = static_cast<T>(sums[o * group + j] + b);
      }
      o0 += step;
    }
  }
}

// x (..., in) any float dtype; weight (out, in) bf16/fp16, contiguous; bias (out) of the weight's dtype or None ->
// (..., out) in the weight's dtype. Rows of x go in blocks of kRowBlock, each widened to float32 (at most
// kRowBlock x in floats: 3.7 MB for an 8B model's down projection, L3-resident) while every weight streams past it
// once: a long prefill chunk reads the weights rows / kRowBlock times and holds no float32 copy of all of x.
at::Tensor half_linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(weight.dim() == 2 && weight.is_contiguous() && weight.device().is_cpu(),
              "half_linear: weight must be a contiguous 2-D CPU tensor");
  const auto dtype = weight.scalar_type();
  TORCH_CHECK(dtype == at::kBFloat16 || dtype == at::kHalf, "half_linear: weight must be bfloat16 or float16");
  const int64_t out = weight.size(0), in = weight.size(1);
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == in && x.device().is_cpu(), "half_linear: x must be (..., in) on CPU");
  TORCH_CHECK(!bias || (bias->numel() == out && bias->scalar_type() == dtype), "half_linear: bias (out) of W's dtype");
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = out;
  const at::Tensor rows_of_x = x.reshape({-1, in});
  const int64_t rows = rows_of_x.size(0), tiles = (out + kTile - 1) / kTile;
  at::Tensor y = at::empty({rows, out}, weight.options());
  const at::Tensor b = bias ? bias->contiguous() : at::Tensor();
  AT_DISPATCH_REDUCED_FLOATING_TYPES(dtype, "half_linear", [&] {
    const scalar_t* w = weight.data_ptr<scalar_t>();
    const scalar_t* bp = bias ? b.data_ptr<scalar_t>() : nullptr;
    for (int64_t first = 0; first < rows; first += kRowBlock) {
      const int64_t count = std::min(kRowBlock, rows - first);
      const at::Tensor xf = rows_of_x.narrow(0, first, count).to(at::kFloat).contiguous();
      const float* xp = xf.data_ptr<float>();
      scalar_t* yp = y.data_ptr<scalar_t>() + first * out;
      // Split over threads only for tasks worth a fork (~64k multiply-adds): tiny layers stay serial.
      const int64_t grain = std::max<int64_t>(1, 65536 / (kTile * in * count));
      at::parallel_for(0, tiles, grain, [&](int64_t begin, int64_t end) {
        for (int64_t t = begin; t < end; ++t) {
          linear_tile<scalar_t>(w, bp, xp, count, in, out, t * kTile, std::min(kTile, out - t * kTile), yp);
        }
      });
    }
  });
  return y.reshape(shape);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mergeserve, m) {
  m.def("half_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor", half_linear);
}
#endif

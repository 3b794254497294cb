// Fused CPU kernels for a decode step over the KV slab (server/engine/fused_decode.py drives them).
//
// An eager decoder layer is ~150 small ATen calls besides its 7 linear layers; on a 2-core CPU their dispatch and
// Python cost ~0.5 ms a layer, which is 20-45 % of a decode step of SmolLM2-135M. These kernels do the same
// arithmetic in 4 calls a layer: a residual add with RMSNorm, rotary embedding with the K/V write into the slab,
// attention of each token over its own slot's columns, and SiLU(gate) * up.
//
// Numerics follow transformers' Llama modules: the residual add and every module output are rounded to the model's
// dtype, RMSNorm and attention compute in float32 (the slab holds float32 K/V), rotary embedding computes in float32
// and rounds once (transformers rounds each of its three ops in half precision; identical in float32).

// The few ATen headers used, not <ATen/ATen.h>: it is ~100k more lines to parse, ~3 s of each first-boot build.
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

// exp(x) for float32 in branch-free arithmetic that the compiler vectorizes (std::exp is a scalar libm call per
// element: ~10 ns, which made SiLU over 8 x 1536 values and each softmax the slowest part of these kernels).
// Cephes' expf: x = n ln2 + r with |r| <= ln2/2 (ln2 split in two constants so n ln2 is exact), exp(r) by a degree-6
// polynomial, 2^n built in the exponent bits. Relative error ~2e-7, under 2 ulp; inputs are clamped to the range
// where 2^n is a normal float, so exp(-inf) of a masked score is 2^-126 * p, not NaN.
inline float exp_approx(float x) {
  x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

template <typename T>
inline float f32(T x) {
  return static_cast<float>(x);
}

template <typename T>
inline float rounded(float x) {  // x as the model's dtype would hold it
  return static_cast<float>(static_cast<T>(x));
}

// hidden (N, d) += delta (N, d) when given, rounded to T; out (N, d) = weight * T(x / rms(x)).
template <typename T>
void add_rms_norm_rows(T* hidden, const T* delta, const T* weight, T* out, int64_t rows, int64_t d, float eps) {
  std::vector<float> x(d);
  for (int64_t i = 0; i < rows; ++i) {
    T* h = hidden + i * d;
    float squares = 0.f;
    for (int64_t j = 0; j < d; ++j) {
      float v = delta ? rounded<T>(f32(h[j]) + f32(delta[i * d + j])) : f32(h[j]);
      x[j] = v;
      squares += v * v;
    }
    if (delta) {
      for (int64_t j = 0; j < d; ++j) h[j] = static_cast<T>(x[j]);
    }
    const float scale = 1.f / std::sqrt(squares / static_cast<float>(d) + eps);
    for (int64_t j = 0; j < d; ++j) out[i * d + j] = static_cast<T>(f32(weight[j]) * rounded<T>(x[j] * scale));
  }
}

std::vector<at::Tensor> add_rms_norm(at::Tensor hidden, const std::optional<at::Tensor>& delta,
                                     const at::Tensor& weight, double eps) {
  TORCH_CHECK(hidden.is_contiguous() && hidden.device().is_cpu(), "add_rms_norm: hidden must be contiguous, on CPU");
  const int64_t d = hidden.size(-1), rows = hidden.numel() / d;
  TORCH_CHECK(weight.numel() == d && (!delta || delta->sizes() == hidden.sizes()), "add_rms_norm: shape mismatch");
  at::Tensor out = at::empty_like(hidden);
  at::Tensor w = weight.to(hidden.scalar_type()).contiguous();
  at::Tensor dl = delta ? delta->to(hidden.scalar_type()).contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, hidden.scalar_type(), "add_rms_norm", [&] {
    add_rms_norm_rows<scalar_t>(hidden.data_ptr<scalar_t>(), delta ? dl.data_ptr<scalar_t>() : nullptr,
                                w.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), rows, d, static_cast<float>(eps));
  });
  return {hidden, out};
}

// x (D) rotated by the half-split convention (transformers' rotate_half): x * cos + [-x2, x1] * sin.
template <typename T>
inline void rotate(const T* x, const T* cos, const T* sin, int64_t dim, float* out) {
  const int64_t half = dim / 2;
  for (int64_t j = 0; j < dim; ++j) {
    const float partner = j < half ? -f32(x[j + half]) : f32(x[j - half]);
    out[j] = rounded<T>(f32(x[j]) * f32(cos[j]) + partner * f32(sin[j]));
  }
}

struct Slab {
  float* keys;
  float* values;
  int64_t kv_heads, capacity, dim;
  float* at(float* base, int64_t slot, int64_t head, int64_t column) const {
    return base + ((slot * kv_heads + head) * capacity + column) * dim;
  }
};

// Token i: q (H x D), k/v (Hkv x D) rows of the projections; writes rotated k and v at (slots[i], :, columns[i])
// and rotated q into q_out (N, H, D).
template <typename T>
void rope_store_tokens(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const T* cos, const T* sin,
                       const Slab& slab, const int64_t* slots, const int64_t* columns, int64_t heads, float* q_out) {
  const int64_t tokens = q.size(0), dim = slab.dim;
  const T *qp = q.data_ptr<T>(), *kp = k.data_ptr<T>(), *vp = v.data_ptr<T>();
  for (int64_t i = 0; i < tokens; ++i) {
    const T *c = cos + i * dim, *s = sin + i * dim;
    for (int64_t h = 0; h < heads; ++h) rotate(qp + i * q.stride(0) + h * dim, c, s, dim, q_out + (i * heads + h) * dim);
    for (int64_t h = 0; h < slab.kv_heads; ++h) {
      rotate(kp + i * k.stride(0) + h * dim, c, s, dim, slab.at(slab.keys, slots[i], h, columns[i]));
      float* value = slab.at(slab.values, slots[i], h, columns[i]);
      const T* source = vp + i * v.stride(0) + h * dim;
      for (int64_t j = 0; j < dim; ++j) value[j] = f32(source[j]);
    }
  }
}

Slab slab_of(at::Tensor& keys, at::Tensor& values) {
  TORCH_CHECK(keys.scalar_type() == at::kFloat && values.scalar_type() == at::kFloat, "the slab must be float32");
  TORCH_CHECK(keys.is_contiguous() && values.is_contiguous() && keys.sizes() == values.sizes(), "slab layout");
  return Slab{keys.data_ptr<float>(), values.data_ptr<float>(), keys.size(1), keys.size(2), keys.size(3)};
}

void check_places(const at::Tensor& slots, const at::Tensor& columns, int64_t tokens, const at::Tensor& keys) {
  TORCH_CHECK(slots.scalar_type() == at::kLong && columns.scalar_type() == at::kLong, "slots/columns must be int64");
  TORCH_CHECK(slots.numel() == tokens && columns.numel() == tokens, "one slot and column per token");
  const int64_t* s = slots.data_ptr<int64_t>();
  const int64_t* c = columns.data_ptr<int64_t>();
  for (int64_t i = 0; i < tokens; ++i) {
    TORCH_CHECK(s[i] >= 0 && s[i] < keys.size(0) && c[i] >= 0 && c[i] < keys.size(2), "slot/column out of the slab");
  }
}

// q (N, H*D), k/v (N, Hkv*D), cos/sin (N, D) -> rotated q (N, H, D) float32; K/V written into the slab.
at::Tensor rope_store(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cos,
                      const at::Tensor& sin, at::Tensor keys, at::Tensor values, const at::Tensor& slots,
                      const at::Tensor& columns, int64_t heads) {
  Slab slab = slab_of(keys, values);
  const int64_t tokens = q.size(0);
  TORCH_CHECK(q.dim() == 2 && q.size(1) == heads * slab.dim && k.size(1) == slab.kv_heads * slab.dim, "q/k shape");
  TORCH_CHECK(q.stride(1) == 1 && k.stride(1) == 1 && v.stride(1) == 1, "projections must be row-contiguous");
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), "q/k/v dtypes differ");
  check_places(slots, columns, tokens, keys);
  at::Tensor c = cos.to(q.scalar_type()).reshape({tokens, slab.dim}).contiguous();
  at::Tensor s = sin.to(q.scalar_type()).reshape({tokens, slab.dim}).contiguous();
  at::Tensor out = at::empty({tokens, heads, slab.dim}, q.options().dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "rope_store", [&] {
    rope_store_tokens<scalar_t>(q, k, v, c.data_ptr<scalar_t>(), s.data_ptr<scalar_t>(), slab,
                                slots.data_ptr<int64_t>(), columns.data_ptr<int64_t>(), heads, out.data_ptr<float>());
  });
  return out;
}

// One query head over `length` keys of one KV head: softmax(q.K^T * scale) V into out (D), float32 throughout.
void attend_head(const float* q, const float* keys, const float* values, int64_t length, int64_t dim, float scale,
                 float* scores, float* out) {
  float top = -INFINITY;
  for (int64_t c = 0; c < length; ++c) {
    const float* key = keys + c * dim;
    float dot = 0.f;
#pragma omp simd reduction(+ : dot)
    for (int64_t j = 0; j < dim; ++j) dot += q[j] * key[j];
    scores[c] = dot * scale;
    top = std::max(top, scores[c]);
  }
  float total = 0.f;
#pragma omp simd reduction(+ : total)
  for (int64_t c = 0; c < length; ++c) {
    scores[c] = exp_approx(scores[c] - top);
    total += scores[c];
  }
  std::fill(out, out + dim, 0.f);
  for (int64_t c = 0; c < length; ++c) {
    const float weight = scores[c] / total;
    const float* value = values + c * dim;
#pragma omp simd
    for (int64_t j = 0; j < dim; ++j) out[j] += weight * value[j];
  }
}

// q (N, H, D) float32: token i attends columns 0..columns[i] of slot slots[i] (its own row, causal) -> (N, H*D).
at::Tensor slab_attend(const at::Tensor& q, at::Tensor keys, at::Tensor values, const at::Tensor& slots,
                       const at::Tensor& columns, double scale, at::ScalarType dtype) {
  Slab slab = slab_of(keys, values);
  const int64_t tokens = q.size(0), heads = q.size(1), dim = slab.dim;
  TORCH_CHECK(q.scalar_type() == at::kFloat && q.is_contiguous() && q.size(2) == dim, "q must be (N, H, D) float32");
  TORCH_CHECK(heads % slab.kv_heads == 0, "query heads must be a multiple of the KV heads");
  check_places(slots, columns, tokens, keys);
  const int64_t group = heads / slab.kv_heads;
  const int64_t *slot = slots.data_ptr<int64_t>(), *column = columns.data_ptr<int64_t>();
  const int64_t longest = *std::max_element(column, column + tokens) + 1;
  at::Tensor out = at::empty({tokens, heads * dim}, q.options());
  const float* qp = q.data_ptr<float>();
  float* op = out.data_ptr<float>();
  // One task per (token, KV head); split across threads only when a task reads enough keys to pay the fork.
  const int64_t grain = std::max<int64_t>(1, 32768 / (group * longest * dim));
  at::parallel_for(0, tokens * slab.kv_heads, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(longest);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t i = task / slab.kv_heads, g = task % slab.kv_heads;
      const float* k = slab.at(slab.keys, slot[i], g, 0);
      const float* v = slab.at(slab.values, slot[i], g, 0);
      for (int64_t h = g * group; h < (g + 1) * group; ++h) {
        attend_head(qp + (i * heads + h) * dim, k, v, column[i] + 1, dim, static_cast<float>(scale), scores.data(),
                    op + (i * heads + h) * dim);
      }
    }
  });
  return out.to(dtype);
}

template <typename T>
void silu_mul_values(const T* gate, const T* up, T* out, int64_t count) {
  for (int64_t i = 0; i < count; ++i) {
    const float g = f32(gate[i]);
    out[i] = static_cast<T>(rounded<T>(g / (1.f + exp_approx(-g))) * f32(up[i]));
  }
}

// float32 on its own, out of line and with unaliased pointers: GCC vectorizes this loop, and not the template's
// copy inlined into the dispatch lambda (8 x 1536 values: ~65 us scalar).
__attribute__((noinline)) void silu_mul_float(const float* __restrict gate, const float* __restrict up,
                                              float* __restrict out, int64_t count) {
  for (int64_t i = 0; i < count; ++i) out[i] = gate[i] / (1.f + exp_approx(-gate[i])) * up[i];
}

// SiLU(gate) * up, each rounded to the dtype as transformers' two ops round.
at::Tensor silu_mul(const at::Tensor& gate, const at::Tensor& up) {
  TORCH_CHECK(gate.sizes() == up.sizes() && gate.scalar_type() == up.scalar_type(), "gate/up shape or dtype");
  at::Tensor g = gate.contiguous(), u = up.contiguous();
  at::Tensor out = at::empty_like(g);
  if (g.scalar_type() == at::kFloat) {
    silu_mul_float(g.data_ptr<float>(), u.data_ptr<float>(), out.data_ptr<float>(), g.numel());
    return out;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, g.scalar_type(), "silu_mul", [&] {
    silu_mul_values<scalar_t>(g.data_ptr<scalar_t>(), u.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), g.numel());
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(mergeserve, m) {
  m.def("add_rms_norm(Tensor(a!) hidden, Tensor? delta, Tensor weight, float eps) -> Tensor[]", add_rms_norm);
  m.def(
      "rope_store(Tensor q, Tensor k, Tensor v, Tensor cos, Tensor sin, Tensor(a!) keys, Tensor(b!) values, "
      "Tensor slots, Tensor columns, int heads) -> Tensor",
      rope_store);
  m.def("slab_attend(Tensor q, Tensor keys, Tensor values, Tensor slots, Tensor columns, float scale, "
        "ScalarType dtype) -> Tensor",
        slab_attend);
  m.def("silu_mul(Tensor gate, Tensor up) -> Tensor", silu_mul);
}

// One decoding step of every windowed head of a layer, for every sequence, in one call: each (sequence, head) row
// writes its new key and value into its ring, then attends to the filled slots where they lie.
//
// Row i's ring is `windows[i]` consecutive rows of `keys` / `values` from `first[i]`; the token at `position` goes
// to slot position % W, and the ring holds min(position + 1, W) filled slots. Rows never share a ring, so they run
// in parallel without locks.
//
// Built with -O3 for the machine's own vector unit, but without -ffast-math: the reductions keep LANES partial
// sums (which the compiler vectorizes as plain element-wise loops) and exp is computed here in arithmetic that
// vectorizes, instead of relying on fast-math to reorder sums and call a vector exp. Head sizes 32, 64 and 128 are
// compiled for their size, which keeps a row's output sums in registers (2x faster at head size 32, batch 16, than
// with the size read at run time); others take the same code with a run-time size.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace {

constexpr int64_t LANES = 8;

// exp(x) for x <= 0 (a score minus the largest score), within ~2 float ulps: 2^n * e^r with n = round(x / ln 2),
// |r| <= ln(2) / 2, e^r from its degree-6 Taylor polynomial, 2^n put straight into the exponent bits. Arguments
// below -87 (exp under 1.6e-38 of the largest term) are clamped there; NaN stays NaN.
inline float exp_nonpositive(float x) {
  const bool nan = x != x;
  x = x < -87.0f ? -87.0f : x;
  const float shifter = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer, without a rounding call
  const float n = (x * 1.44269504f + shifter) - shifter;
  const float r = (x - n * 0.693145752f) - n * 1.42860677e-06f;  // ln 2 in two parts, so r keeps its precision
  float p = 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return nan ? x : p * scale;
}

template <int64_t DIM>
inline float dot(const float* a, const float* b, int64_t dim) {
  if constexpr (DIM > 0) dim = DIM;
  float part[LANES] = {};
  int64_t c = 0;
  for (; c + LANES <= dim; c += LANES)
    for (int64_t l = 0; l < LANES; ++l) part[l] += a[c + l] * b[c + l];
  for (int64_t width = LANES / 2; width >= 1; width /= 2)
    for (int64_t l = 0; l < width; ++l) part[l] += part[l + width];
  float total = part[0];
  for (; c < dim; ++c) total += a[c] * b[c];
  return total;
}

template <int64_t DIM>
void attend_row(const float* q, const float* keys, const float* values, int64_t length, int64_t dim, float scale,
                float* scores, float* out) {
  if constexpr (DIM > 0) dim = DIM;
  for (int64_t j = 0; j < length; ++j) scores[j] = scale * dot<DIM>(q, keys + j * dim, dim);
  float largest = scores[0];
  for (int64_t j = 1; j < length; ++j) largest = scores[j] > largest ? scores[j] : largest;
  float part[LANES] = {};
  int64_t j = 0;
  for (; j + LANES <= length; j += LANES)
    for (int64_t l = 0; l < LANES; ++l) {
      scores[j + l] = exp_nonpositive(scores[j + l] - largest);
      part[l] += scores[j + l];
    }
  float total = 0.0f;
  for (; j < length; ++j) {
    scores[j] = exp_nonpositive(scores[j] - largest);
    total += scores[j];
  }
  for (int64_t l = 0; l < LANES; ++l) total += part[l];
  const float inverse = 1.0f / total;
  for (int64_t j = 0; j < length; ++j) scores[j] *= inverse;  // the probabilities, kept for a backward
  if constexpr (DIM > 0) {
    float sum[DIM] = {};
    for (int64_t j = 0; j < length; ++j) {
      const float* value = values + j * DIM;
      for (int64_t c = 0; c < DIM; ++c) sum[c] += scores[j] * value[c];
    }
    std::copy(sum, sum + DIM, out);
  } else {
    std::fill(out, out + dim, 0.0f);
    for (int64_t j = 0; j < length; ++j) {
      const float* value = values + j * dim;
      for (int64_t c = 0; c < dim; ++c) out[c] += scores[j] * value[c];
    }
  }
}

// call(std::integral_constant<int64_t, DIM>{}) with DIM = dim for the head sizes compiled for their size, else
// DIM = 0 (the size read at run time).
template <typename Call>
void for_head_size(int64_t dim, const Call& call) {
  if (dim == 32) return call(std::integral_constant<int64_t, 32>{});
  if (dim == 64) return call(std::integral_constant<int64_t, 64>{});
  if (dim == 128) return call(std::integral_constant<int64_t, 128>{});
  call(std::integral_constant<int64_t, 0>{});
}

}  // namespace

// q, k, v: (rows, dim) float32, row i = (sequence, windowed head), sequence-major; keys, values: the layer's ring
// buffers (slots, dim); first, windows: (rows,) int64; order: the rows by `first`, the order their rings lie in
// memory, in which they run: a stream the hardware prefetches, where the rows' own order jumps between the window
// groups' buffers and leaves each small ring waiting on memory. Returns the attention outputs (rows, dim).
torch::Tensor ring_step(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor keys, torch::Tensor values,
                        torch::Tensor first, torch::Tensor windows, torch::Tensor order, int64_t position,
                        double scale) {
  TORCH_CHECK(q.scalar_type() == torch::kFloat32 && q.is_contiguous() && k.is_contiguous() && v.is_contiguous() &&
                  keys.is_contiguous() && values.is_contiguous() && first.is_contiguous() &&
                  windows.is_contiguous() && order.is_contiguous(),
              "ring_step takes contiguous float32 rows and int64 ring bounds");
  const int64_t rows = q.size(0), dim = q.size(1);
  TORCH_CHECK(first.size(0) == rows && windows.size(0) == rows && order.size(0) == rows,
              "ring_step takes one ring (first, window, place in order) per row");
  auto out = torch::empty_like(q);
  const float *q_data = q.data_ptr<float>(), *k_data = k.data_ptr<float>(), *v_data = v.data_ptr<float>();
  float *key_data = keys.data_ptr<float>(), *value_data = values.data_ptr<float>(), *out_data = out.data_ptr<float>();
  const int64_t *first_data = first.data_ptr<int64_t>(), *window_data = windows.data_ptr<int64_t>(),
                *order_data = order.data_ptr<int64_t>();
  int64_t pairs = 0;
  for (int64_t i = 0; i < rows; ++i) pairs += std::min(window_data[i], position + 1);
  // rows per task: about 64k multiply-adds each, so that a small layer runs on the calling thread alone
  const int64_t grain = std::max<int64_t>(1, rows * 65536 / std::max<int64_t>(1, pairs * dim));
  for_head_size(dim, [&](auto size) {
    at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
      std::vector<float> scores;
      for (int64_t r = begin; r < end; ++r) {
        const int64_t i = order_data[r], window = window_data[i], ring = first_data[i] * dim, slot = ring + (position % window) * dim;
        std::memcpy(key_data + slot, k_data + i * dim, dim * sizeof(float));
        std::memcpy(value_data + slot, v_data + i * dim, dim * sizeof(float));
        const int64_t length = std::min(window, position + 1);
        scores.resize(length);
        attend_row<decltype(size)::value>(q_data + i * dim, key_data + ring, value_data + ring, length, dim,
                                          static_cast<float>(scale), scores.data(), out_data + i * dim);
      }
    });
  });
  return out;
}

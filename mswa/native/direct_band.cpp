// Direct attention for the blocked kernel's bands of small windows (mswa/attention/blocked.py: DIRECT_WINDOW):
// each query scores only its own min(W, i + 1) keys. A block of B queries scores B + reach keys per query, most of
// them outside a small window (at W = 8, 32 for 8), in products too small for the GEMM library to run well: per
// computed pair, W = 8 and 16 cost about twice what W = 128 does. Uses dot, attend_row and exp_nonpositive of
// ring_step.cpp, and its for_head_size (the sources compile as one unit, in mswa/native/__init__.py's SOURCES order).
//
// Positions p = 0.. run over the band's layout rows back to back (n_padded each); `keys` and `values` point at
// the key row that position 0's span starts at, so position p's key at lag l is row p + reach - l. probs holds
// W floats per position: the probabilities of its keys, oldest first, right-aligned (zeros before them).

namespace {

// y += a * x over dim floats that do not overlap (so that the loop vectorizes).
template <int64_t DIM>
inline void add_scaled(float* __restrict__ y, const float* __restrict__ x, float a, int64_t dim) {
  if constexpr (DIM > 0) dim = DIM;
  for (int64_t c = 0; c < dim; ++c) y[c] += a * x[c];
}

template <int64_t DIM>
void direct_forward_positions(const float* queries, const float* keys, const float* values, float* out, float* probs,
                              int64_t begin, int64_t end, int64_t n_padded, int64_t window, int64_t reach,
                              int64_t dim, float scale) {
  if constexpr (DIM > 0) dim = DIM;
  for (int64_t p = begin; p < end; ++p) {
    const int64_t length = std::min(window, p % n_padded + 1), first = p + reach - (length - 1);
    float* row = probs + p * window;
    std::fill(row, row + window - length, 0.0f);
    attend_row<DIM>(queries + p * dim, keys + first * dim, values + first * dim, length, dim, scale,
                    row + window - length, out + p * dim);
  }
}

// The gradients of positions [begin, end): writes their query gradients, adds into the key and value gradients
// (grad_keys, grad_values: laid out as keys and values, this worker's own buffers).
template <int64_t DIM>
void direct_backward_positions(const float* queries, const float* keys, const float* values, const float* probs,
                               const float* grad_out, float* grad_queries, float* grad_keys, float* grad_values,
                               int64_t begin, int64_t end, int64_t n_padded, int64_t window, int64_t reach,
                               int64_t dim, float scale) {
  if constexpr (DIM > 0) dim = DIM;
  std::vector<float> grad_scores(window);
  for (int64_t p = begin; p < end; ++p) {
    const int64_t length = std::min(window, p % n_padded + 1), first = p + reach - (length - 1);
    const float *prob = probs + p * window + window - length, *grad = grad_out + p * dim, *query = queries + p * dim;
    float expected = 0.0f;  // sum over keys of prob * (grad . value): the softmax's backward subtracts it
    for (int64_t t = 0; t < length; ++t) {
      grad_scores[t] = dot<DIM>(grad, values + (first + t) * dim, dim);
      expected += prob[t] * grad_scores[t];
    }
    float grad_query[DIM > 0 ? DIM : 1024] = {};  // run-time sizes up to 1024 (checked by the caller)
    for (int64_t t = 0; t < length; ++t) {
      const float score_grad = prob[t] * (grad_scores[t] - expected) * scale;
      add_scaled<DIM>(grad_query, keys + (first + t) * dim, score_grad, dim);
      add_scaled<DIM>(grad_keys + (first + t) * dim, query, score_grad, dim);
      add_scaled<DIM>(grad_values + (first + t) * dim, grad, prob[t], dim);
    }
    std::copy(grad_query, grad_query + dim, grad_queries + p * dim);
  }
}

}  // namespace

// Positions [begin, end) of a direct band (see above); every tensor float32 and laid out as the blocked kernel's rows.
void direct_forward(const torch::Tensor& queries, const torch::Tensor& keys, const torch::Tensor& values,
                    const torch::Tensor& out, const torch::Tensor& probs, int64_t begin, int64_t end, int64_t n_padded,
                    int64_t window, int64_t reach, double scale) {
  const int64_t dim = queries.size(-1);
  for_head_size(dim, [&](auto size) {
    direct_forward_positions<decltype(size)::value>(
        queries.data_ptr<float>(), keys.data_ptr<float>(), values.data_ptr<float>(), out.data_ptr<float>(),
        probs.data_ptr<float>(), begin, end, n_padded, window, reach, dim, static_cast<float>(scale));
  });
}

void direct_backward(const torch::Tensor& queries, const torch::Tensor& keys, const torch::Tensor& values,
                     const torch::Tensor& probs, const torch::Tensor& grad_out, const torch::Tensor& grad_queries,
                     float* grad_keys, float* grad_values, int64_t begin, int64_t end, int64_t n_padded,
                     int64_t window, int64_t reach, double scale) {
  const int64_t dim = queries.size(-1);
  TORCH_CHECK(dim <= 1024, "direct attention takes head sizes up to 1024");
  for_head_size(dim, [&](auto size) {
    direct_backward_positions<decltype(size)::value>(
        queries.data_ptr<float>(), keys.data_ptr<float>(), values.data_ptr<float>(), probs.data_ptr<float>(),
        grad_out.data_ptr<float>(), grad_queries.data_ptr<float>(), grad_keys, grad_values, begin, end, n_padded,
        window, reach, dim, static_cast<float>(scale));
  });
}

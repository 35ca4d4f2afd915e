// One chunk of the blocked kernel's forward or backward (mswa/attention/blocked.py), the same torch operations as
// its Python chunk bodies, here so that a chunk is one call that runs without Python's lock: the kernel's worker
// threads then compute chunks at the same time instead of taking turns between operations.
#include <torch/extension.h>

namespace {

using torch::Tensor;

// The first blocks of a row see keys before position 0: add the -inf mask of those keys to their scores.
void mask_before_row_start(Tensor& scores, const Tensor& before_start, int64_t rows, int64_t first_in_row,
                           int64_t reach_blocks) {
  const int64_t per_row = scores.size(0) / rows;
  const int64_t early = std::min(reach_blocks - first_in_row, per_row);
  if (early > 0)
    scores.view({rows, per_row, scores.size(1), scores.size(2)})
        .narrow(1, 0, early)
        .add_(before_start.narrow(0, first_in_row, early));
}

// grad_rows[keys of each span] += alpha * weights^T @ block_values, one span tile at a time (see blocked.py).
void accumulate_tiles(Tensor& grad_rows, const Tensor& weights, const Tensor& block_values, int64_t first_key,
                      int64_t block, double alpha) {
  const int64_t blocks = weights.size(0), dim = grad_rows.size(1), tiles = weights.size(2) / block;
  auto targets = grad_rows.as_strided({tiles, blocks, block, dim}, {block * dim, block * dim, dim, 1},
                                      grad_rows.storage_offset() + first_key * dim);
  auto weight_tiles = weights.view({blocks, block, tiles, block}).permute({2, 0, 3, 1});
  for (int64_t t = 0; t < tiles; ++t) targets[t].baddbmm_(weight_tiles[t], block_values, 1.0, alpha);
}

}  // namespace

// Blocks [start, stop) of a band: scores (the stored probabilities) = softmax(mask + scale q k^T), out = scores v.
void band_forward_chunk(Tensor probs, Tensor queries, Tensor keys, Tensor values, Tensor out, Tensor mask,
                        Tensor before_start, int64_t start, int64_t stop, int64_t rows, int64_t first_in_row,
                        int64_t reach_blocks, double scale) {
  auto scores = probs.slice(0, start, stop);
  at::baddbmm_out(scores, mask, queries.slice(0, start, stop), keys.slice(0, start, stop).mT(), 1.0, scale);
  mask_before_row_start(scores, before_start, rows, first_in_row, reach_blocks);
  at::_softmax_out(scores, scores, -1, false);
  auto out_blocks = out.slice(0, start, stop);
  at::bmm_out(out_blocks, scores, values.slice(0, start, stop));
}

// Blocks [start, stop) of a band's backward: adds their key and value gradients into this worker's buffers
// (grad_k, grad_v, from row first_key on) and writes their query gradients.
void band_backward_chunk(Tensor probs, Tensor queries, Tensor keys, Tensor values, Tensor grad_blocks,
                         Tensor grad_queries, Tensor grad_k, Tensor grad_v, int64_t start, int64_t stop,
                         int64_t first_key, int64_t block, double scale) {
  auto prob = probs.slice(0, start, stop), grad_out = grad_blocks.slice(0, start, stop);
  auto query_blocks = queries.slice(0, start, stop);
  accumulate_tiles(grad_v, prob, grad_out, first_key, block, 1.0);
  auto grad_scores = at::bmm(grad_out, values.slice(0, start, stop).mT());
  at::_softmax_backward_data_out(grad_scores, grad_scores, prob, -1, prob.scalar_type());
  grad_queries.slice(0, start, stop).baddbmm_(grad_scores, keys.slice(0, start, stop), 0.0, scale);
  accumulate_tiles(grad_k, grad_scores, query_blocks, first_key, block, scale);
}

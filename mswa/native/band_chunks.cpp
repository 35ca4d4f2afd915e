// The blocked kernel's chunk loops (mswa/attention/blocked.py): the same torch operations per chunk as its Python
// chunk bodies, run by torch's own threads, each taking the next chunk when done with one. Python's pool of worker
// threads took turns on Python's lock between operations, and ran beside the team of threads that torch keeps
// spinning after every parallel operation (its matmuls between the attention layers), so that a 2-core machine
// had 3-4 busy threads. Here the chunks run on that same team, without the lock.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>

#include <atomic>

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

// work(worker) on `threads` of torch's threads (worker = 0..threads-1), each with the caller's grad and inference
// modes; work takes chunks from a shared counter, so a thread that the OS deschedules delays only its own chunk.
template <typename Work>
void on_workers(int64_t threads, const Work& work) {
  const at::ThreadLocalState caller;
  at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
    at::ThreadLocalStateGuard modes(caller);
    for (int64_t worker = begin; worker < end; ++worker) work(worker);
  });
}

// Blocks [start, stop) of a band: scores (the stored probabilities) = softmax(mask + scale q k^T), out = scores v.
void forward_chunk(Tensor probs, Tensor queries, Tensor keys, Tensor values, Tensor out, Tensor mask,
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
void backward_chunk(Tensor probs, Tensor queries, Tensor keys, Tensor values, Tensor grad_blocks,
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

}  // namespace

// Every chunk of a layer's forward. Per band b: its stored probabilities, query blocks, key and value spans, output
// blocks, window mask and before-row-start mask, and its reach in blocks; chunks: (count, 5) int64 rows of (band,
// first block, end block, rows of the layout, first block's index in its row), in the order to take them.
void band_forward(std::vector<Tensor> probs, std::vector<Tensor> queries, std::vector<Tensor> keys,
                  std::vector<Tensor> values, std::vector<Tensor> outs, std::vector<Tensor> masks,
                  std::vector<Tensor> before_starts, std::vector<int64_t> reach_blocks, Tensor chunks, double scale,
                  int64_t threads) {
  const int64_t* table = chunks.data_ptr<int64_t>();
  std::atomic<int64_t> next{0};
  on_workers(threads, [&](int64_t) {
    for (int64_t i; (i = next++) < chunks.size(0);) {
      const int64_t* c = table + 5 * i;
      const int64_t b = c[0];
      forward_chunk(probs[b], queries[b], keys[b], values[b], outs[b], masks[b], before_starts[b], c[1], c[2], c[3],
                    c[4], reach_blocks[b], scale);
    }
  });
}

// Every chunk of a layer's backward: per band as band_forward, plus output-gradient and query-gradient blocks, the
// row of its first span's first key and its block size; grad_k and grad_v: one buffer per worker, zeroed by its
// worker when it takes its first chunk. Returns which workers took any (their buffers hold sums).
std::vector<bool> band_backward(std::vector<Tensor> probs, std::vector<Tensor> queries, std::vector<Tensor> keys,
                                std::vector<Tensor> values, std::vector<Tensor> grad_blocks,
                                std::vector<Tensor> grad_queries, std::vector<Tensor> grad_k,
                                std::vector<Tensor> grad_v, std::vector<int64_t> first_keys,
                                std::vector<int64_t> block_sizes, Tensor chunks, double scale, int64_t threads) {
  const int64_t* table = chunks.data_ptr<int64_t>();
  std::atomic<int64_t> next{0};
  std::vector<char> started(threads, 0);
  on_workers(threads, [&](int64_t worker) {
    for (int64_t i; (i = next++) < chunks.size(0);) {
      if (!started[worker]) {
        grad_k[worker].zero_();
        grad_v[worker].zero_();
        started[worker] = 1;
      }
      const int64_t* c = table + 5 * i;
      const int64_t b = c[0], block = block_sizes[b];
      backward_chunk(probs[b], queries[b], keys[b], values[b], grad_blocks[b], grad_queries[b], grad_k[worker],
                     grad_v[worker], c[1], c[2], first_keys[b] + c[1] * block, block, scale);
    }
  });
  return std::vector<bool>(started.begin(), started.end());
}

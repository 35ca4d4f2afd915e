// The blocked kernel's chunk loops (mswa/attention/blocked.py): the same torch operations per chunk as its Python
// chunk bodies, on a pool of threads that each take the next chunk when done with one, as its Python pool does, but
// without Python's lock, on which the Python workers took turns between operations. Not on torch's own OpenMP team:
// that team waits for its slowest thread at the end of every region, spinning, so that beside one busy process
// two threads took 2x the time of one (measured); blocked waits here let the busy process and the workers share.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>

#include <pthread.h>

#include <atomic>
#include <condition_variable>
#include <exception>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

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

// Threads that wait for work blocked (not spinning) and run torch single-threaded, as the kernel's workers 1..n-1
// (the calling thread is worker 0). Rebuilt when the count changes; forgotten, not joined, in a forked child, where
// its threads do not exist.
class Pool {
 public:
  static Pool& with(int64_t workers) {
    static std::once_flag fork_handler;
    std::call_once(fork_handler, [] { pthread_atfork(nullptr, nullptr, [] { current() = nullptr; }); });
    if (current() == nullptr || current()->workers_ != workers) {
      delete current();
      current() = new Pool(workers);
    }
    return *current();
  }

  ~Pool() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stopping_ = true;
    }
    wake_.notify_all();
    for (auto& thread : threads_) thread.join();
  }

  // work(worker) on every worker, the calling thread as worker 0; returns when all have returned. The first
  // exception thrown by any worker is rethrown here.
  void run(const std::function<void(int64_t)>& work) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      work_ = &work;
      running_ = workers_ - 1;
      error_ = nullptr;
      ++generation_;
    }
    wake_.notify_all();
    call(work, 0);
    std::unique_lock<std::mutex> lock(mutex_);
    done_.wait(lock, [&] { return running_ == 0; });
    work_ = nullptr;
    if (error_) std::rethrow_exception(error_);
  }

 private:
  explicit Pool(int64_t workers) : workers_(workers) {
    for (int64_t worker = 1; worker < workers; ++worker) threads_.emplace_back([this, worker] { serve(worker); });
  }

  static Pool*& current() {
    static Pool* pool = nullptr;
    return pool;
  }

  void serve(int64_t worker) {
    at::set_num_threads(1);  // this thread's OpenMP and MKL settings: one worker, one thread
    int64_t seen = 0;
    while (true) {
      std::unique_lock<std::mutex> lock(mutex_);
      wake_.wait(lock, [&] { return stopping_ || generation_ != seen; });
      if (stopping_) return;
      seen = generation_;
      const auto* work = work_;
      lock.unlock();
      call(*work, worker);
      lock.lock();
      if (--running_ == 0) done_.notify_all();
    }
  }

  void call(const std::function<void(int64_t)>& work, int64_t worker) {
    try {
      work(worker);
    } catch (...) {
      std::lock_guard<std::mutex> lock(mutex_);
      if (!error_) error_ = std::current_exception();
    }
  }

  const int64_t workers_;
  std::vector<std::thread> threads_;
  std::mutex mutex_;
  std::condition_variable wake_, done_;
  const std::function<void(int64_t)>* work_ = nullptr;
  int64_t running_ = 0, generation_ = 0;
  bool stopping_ = false;
  std::exception_ptr error_;
};

// work(worker) on `workers` threads (worker = 0..workers-1), each with the caller's grad and inference modes; work
// takes chunks from a shared counter, so a thread that the OS deschedules delays only its own chunk. The caller
// runs torch single-threaded meanwhile (mswa/attention/blocked.py: _workers_only).
void on_workers(int64_t workers, const std::function<void(int64_t)>& work) {
  if (workers <= 1) return work(0);
  const at::ThreadLocalState caller;
  Pool::with(workers).run([&](int64_t worker) {
    at::ThreadLocalStateGuard modes(caller);
    work(worker);
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

// A chunk table row: (kind, band, start, end, layout rows, first block's index in its row). Kind 0: blocks [start,
// end) of a blocked band; kind 1: positions [start, end) of a direct band (direct_band.cpp).
constexpr int64_t CHUNK_COLUMNS = 6;

// Every chunk of a layer's forward. Per band b: its stored probabilities, query blocks, key and value spans, output
// blocks, window mask and before-row-start mask, window, reach and block size; chunks in the order to take them.
void band_forward(std::vector<Tensor> probs, std::vector<Tensor> queries, std::vector<Tensor> keys,
                  std::vector<Tensor> values, std::vector<Tensor> outs, std::vector<Tensor> masks,
                  std::vector<Tensor> before_starts, std::vector<int64_t> windows, std::vector<int64_t> reaches,
                  std::vector<int64_t> block_sizes, int64_t n_padded, Tensor chunks, double scale, int64_t threads) {
  const int64_t* table = chunks.data_ptr<int64_t>();
  std::atomic<int64_t> next{0};
  on_workers(threads, [&](int64_t) {
    for (int64_t i; (i = next++) < chunks.size(0);) {
      const int64_t *c = table + CHUNK_COLUMNS * i, b = c[1];
      if (c[0] == 1)
        direct_forward(queries[b], keys[b], values[b], outs[b], probs[b], c[2], c[3], n_padded, windows[b],
                       reaches[b], scale);
      else
        forward_chunk(probs[b], queries[b], keys[b], values[b], outs[b], masks[b], before_starts[b], c[2], c[3], c[4],
                      c[5], reaches[b] / block_sizes[b], scale);
    }
  });
}

// Every chunk of a layer's backward: per band as band_forward, plus output-gradient and query-gradient blocks and
// the row of its first span's first key; grad_k and grad_v: one buffer per worker, zeroed by its worker when it
// takes its first chunk, as neighbouring chunks' keys overlap. Returns the worker whose buffers hold the sum of
// all: those started are summed at the end in row pieces shared out to the same workers (on the calling thread
// alone, this sum was ~5% of a two-thread step at 1k).
int64_t band_backward(std::vector<Tensor> probs, std::vector<Tensor> queries, std::vector<Tensor> keys,
                      std::vector<Tensor> values, std::vector<Tensor> grad_blocks, std::vector<Tensor> grad_queries,
                      std::vector<Tensor> grad_k, std::vector<Tensor> grad_v, std::vector<int64_t> windows,
                      std::vector<int64_t> reaches, std::vector<int64_t> block_sizes, std::vector<int64_t> first_keys,
                      int64_t n_padded, Tensor chunks, double scale, int64_t threads) {
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
      const int64_t *c = table + CHUNK_COLUMNS * i, b = c[1], block = block_sizes[b];
      if (c[0] == 1) {
        const int64_t first_key = first_keys[b] * grad_k[worker].size(1);
        direct_backward(queries[b], keys[b], values[b], probs[b], grad_blocks[b], grad_queries[b],
                        grad_k[worker].data_ptr<float>() + first_key, grad_v[worker].data_ptr<float>() + first_key,
                        c[2], c[3], n_padded, windows[b], reaches[b], scale);
      } else {
        backward_chunk(probs[b], queries[b], keys[b], values[b], grad_blocks[b], grad_queries[b], grad_k[worker],
                       grad_v[worker], c[2], c[3], first_keys[b] + c[2] * block, block, scale);
      }
    }
  });
  std::vector<int64_t> used;
  for (int64_t worker = 0; worker < threads; ++worker)
    if (started[worker]) used.push_back(worker);
  TORCH_CHECK(!used.empty(), "band_backward: no chunk to run");
  if (used.size() > 1) {
    const int64_t rows = grad_k[used[0]].size(0), piece = std::max<int64_t>(256, rows / (4 * threads) + 1);
    std::atomic<int64_t> next_piece{0};
    on_workers(threads, [&](int64_t) {
      for (int64_t start; (start = piece * next_piece++) < rows;) {
        const int64_t length = std::min(piece, rows - start);
        for (auto* grads : {&grad_k, &grad_v}) {
          auto total = (*grads)[used[0]].narrow(0, start, length);
          for (size_t j = 1; j < used.size(); ++j) total.add_((*grads)[used[j]].narrow(0, start, length));
        }
      }
    });
  }
  return used[0];
}

"""Benchmarks, one subcommand each: `python -m mswa.bench attention|model|eval|generate|data|hf [--tiny] ...`.

attention: the attention backends' time, memory and useful GFLOP/s against sequence length;
model: training tokens/s and memory of whole models; eval: evaluation targets/s at two strides;
generate: decoding cache bytes and per-token latency against context; data: the loaders' speed on
full-size stand-ins; hf: memory of a window-patched Hugging Face model against length. Every one
prints a table and writes JSON (bench_results/<name>.json); all time and measure memory through
`mswa.bench.timing`.
"""

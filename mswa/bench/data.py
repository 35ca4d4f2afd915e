"""Speed of the benchmark loaders on full-size stand-ins: ``python -m mswa.bench data``.

- enwik8: a 10^8-byte pseudo-random file (its own checksums passed as the expected ones, so the
  full verification path runs) -> verified, split, cached; then a cached load.
- WikiText-103: synthetic text of the same shape (articles of ``= Title =`` / ``= = Section = =``
  headings, empty lines, paragraphs of ~90 words drawn from a Zipf vocabulary of 267,733 words,
  ``<unk>`` among them; valid / test about 0.2% of train each, closed under the train vocabulary)
  -> tokenised from local files, and from a local Hugging Face dataset of the same rows; then cached loads.

Everything is generated in a temporary folder that is deleted afterwards (full size: ~1.5 GB on
disk, ~3 GB RAM). Prints a table (wall seconds, which decide the targets, and CPU seconds of all
threads, which show how much a busy machine slowed the wall clock) and writes JSON (default
bench_results/data.json).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

from mswa.atomic import write_atomic
from mswa.bench.timing import timed
from mswa.data import enwik8, wikitext
from mswa.data.corpus import SPLITS

WIKITEXT_103_VOCAB = 267_735  # Transformer-XL's WikiText-103 vocabulary, <eos> included
HELD_OUT_SHARE = 0.0021  # WikiText-103 valid / test are ~0.21% / 0.24% of train
UNK_RANK = 12  # <unk> is among the most frequent words of WikiText
CHUNK_WORDS = 2_000_000
CONSONANTS = "bcdfghjklmnprstvwz"


def synthetic_vocabulary(size: int = WIKITEXT_103_VOCAB - 2) -> np.ndarray:
    """Distinct words by frequency rank (+ the heading mark "=" + <eos> = WikiText-103's 267,735 at full size).

    A word is consonant-vowel syllables then a consonant, shorter for frequent ranks: 4.5 letters
    on average under the Zipf weights, like WikiText's ~4.3. Every 997th has an é; <unk> is frequent.
    """
    syllables = [c + v for c in CONSONANTS for v in "aeiou"]
    words = []
    for rank in range(size):
        word, n = "", rank + 1
        while n:
            n, digit = divmod(n - 1, len(syllables))
            word = syllables[digit] + word
        words.append(word + CONSONANTS[rank % len(CONSONANTS)] + ("é" if rank % 997 == 996 else ""))
    words[UNK_RANK] = "<unk>"
    return np.array(words, dtype=object)


def write_wikitext_like(path: Path, n_words: int, vocabulary: np.ndarray, seed: int, allowed: np.ndarray | None = None) -> np.ndarray:
    """Write ~``n_words`` words of WikiText-shaped text; return which vocabulary ranks occur.

    Ranks outside ``allowed`` (when given) become <unk>, as WikiText does for held-out splits.
    """
    rng = np.random.default_rng(seed)
    cdf = np.cumsum(1.0 / np.arange(1, len(vocabulary) + 1) ** 1.05)
    cdf /= cdf[-1]
    used = np.zeros(len(vocabulary), dtype=bool)
    written = 0
    with open(path, "w", encoding="utf-8", newline="\n") as out:
        while written < n_words:
            ranks = np.minimum(np.searchsorted(cdf, rng.random(min(CHUNK_WORDS, n_words - written))), len(cdf) - 1)
            if allowed is not None:
                ranks[~allowed[ranks]] = UNK_RANK
            used[ranks] = True
            lines = _article_lines(vocabulary[ranks].tolist(), rng)
            out.writelines(lines)
            written += sum(line.count(" ") - 1 for line in lines)  # every word has a space before it
    return used


def _article_lines(words: list[str], rng: np.random.Generator) -> list[str]:
    """Sections of a heading between empty lines, then 1-4 paragraphs of ~90 words, using up ``words``."""
    lines, position = [], 0
    while position < len(words):
        level, title_words = int(rng.integers(1, 4)), int(rng.integers(1, 5))
        marks = " ".join(["="] * level)
        lines += [" \n", f" {marks} {' '.join(words[position : position + title_words])} {marks} \n", " \n"]
        position += title_words
        for length in rng.poisson(90, size=int(rng.integers(1, 5))) + 1:
            if position < len(words):
                lines.append(f" {' '.join(words[position : position + length])} \n")
                position += length
    return lines


def write_hf_mirror(folder: Path, text_files: dict[str, Path], config: str) -> None:
    """A local dataset folder laid out like Salesforce/wikitext: one parquet file per split, rows = lines."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    (folder / config).mkdir(parents=True)
    yaml_splits = []
    for split, hf_split in wikitext.HF_SPLIT_NAMES.items():
        with open(text_files[split], encoding="utf-8", newline="\n") as f:
            rows = [line if line.strip() else "" for line in f]  # HF stores whitespace-only lines as ""
        pq.write_table(pa.table({"text": rows}), folder / config / f"{hf_split}-00000-of-00001.parquet", row_group_size=65_536)
        yaml_splits.append(f"  - split: {hf_split}\n    path: {config}/{hf_split}-*\n")
    (folder / "README.md").write_text(f"---\nconfigs:\n- config_name: {config}\n  data_files:\n{''.join(yaml_splits)}---\n")


def bench_enwik8(work: Path, n_bytes: int) -> list[dict]:
    raw = work / "enwik8"
    raw.write_bytes(np.random.default_rng(0).bytes(n_bytes))
    content = raw.read_bytes()
    checks = {"md5": hashlib.md5(content).hexdigest(), "sha256": hashlib.sha256(content).hexdigest(), "expected_size": n_bytes}
    del content
    corpus, build, build_cpu = timed(enwik8.load, work / "cache", path=raw, **checks)
    assert sum(len(corpus.splits[s]) for s in SPLITS) == n_bytes
    _, cached, cached_cpu = timed(enwik8.load, work / "cache", path=raw, **checks)
    size = f"{n_bytes:,} bytes"
    return [
        _row(
            "enwik8: raw file -> verified cached splits", size, build, build_cpu, f"{n_bytes / build / 1e6:.0f} MB/s", "< 30 s", build < 30
        ),
        _row("enwik8: cached load (verified, memmap)", size, cached, cached_cpu, "", "< 1 s", cached < 1),
    ]


def bench_wikitext(work: Path, n_words: int, hf: bool) -> list[dict]:
    vocabulary = synthetic_vocabulary()
    text = work / "wikitext"
    text.mkdir()
    files = {s: text / f"wiki.{s}.tokens" for s in SPLITS}
    start = time.perf_counter()
    train_words = write_wikitext_like(files["train"], n_words, vocabulary, seed=1)
    for seed, split in enumerate(("valid", "test"), start=2):
        write_wikitext_like(files[split], max(10_000, int(n_words * HELD_OUT_SHARE)), vocabulary, seed, allowed=train_words)
    megabytes = sum(f.stat().st_size for f in files.values()) / 1e6
    print(f"generated {megabytes:,.0f} MB of WikiText-shaped text in {time.perf_counter() - start:.0f} s")
    rows = _bench_word_source("files", work / "cache", path=text)
    if hf:
        mirror = work / "hf_mirror"
        write_hf_mirror(mirror, files, "wikitext-103-v1")
        hf_args = {"hf_dataset": str(mirror), "hf_cache_dir": work / "hf_cache"}
        import datasets  # prepare Hugging Face's own arrow cache first: only our tokenisation is timed

        datasets.load_dataset(str(mirror), "wikitext-103-v1", cache_dir=str(work / "hf_cache"))
        rows += _bench_word_source("Hugging Face dataset", work / "cache", **hf_args)
    return rows


def _bench_word_source(label: str, data_dir: Path, **source) -> list[dict]:
    corpus, build, build_cpu = timed(wikitext.load, data_dir, **source)
    tokens = sum(len(corpus.splits[s]) for s in SPLITS)
    words = tokens - sum(int((corpus.splits[s] == 0).sum()) for s in SPLITS)  # id 0 is <eos>
    rate = words / build
    _, cached, cached_cpu = timed(wikitext.load, data_dir, **source)
    size = f"{words:,} words + {tokens - words:,} <eos>, vocab {corpus.vocab_size:,}"
    return [
        _row(
            f"wikitext ({label}): text -> cached ids", size, build, build_cpu, f"{rate / 1e6:.2f} M words/s", ">= 1M words/s", rate >= 1e6
        ),
        _row(f"wikitext ({label}): cached load (verified, memmap)", size, cached, cached_cpu, "", "< 2 s", cached < 2),
    ]


def _row(step: str, size: str, seconds: float, cpu_seconds: float, rate: str, target: str, met: bool) -> dict:
    timing = {"seconds": round(seconds, 3), "cpu_seconds": round(cpu_seconds, 3)}
    return {"step": step, "size": size, **timing, "rate": rate, "target": target, "met": met}


def print_table(rows: list[dict]) -> None:
    columns = ["step", "size", "seconds", "cpu_seconds", "rate", "target", "met"]
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in columns}
    for cells in [dict(zip(columns, columns)), *rows]:
        print("  ".join(str(cells[c]).ljust(widths[c]) for c in columns))


def add_command(commands):
    bench = commands.add_parser("data", help="enwik8 split+cache and WikiText-103-sized tokenisation speed")
    bench.add_argument("--enwik8-bytes", type=int, default=enwik8.SIZE, help="size of the enwik8 stand-in (0 skips it)")
    bench.add_argument(
        "--wikitext-words", type=int, default=100_000_000, help="words of the WikiText-103 stand-in's train split (0 skips it)"
    )
    bench.add_argument("--no-hf", action="store_true", help="skip the Hugging Face dataset source")
    bench.add_argument("--workdir", type=Path, default=None, help="where the temporary folder goes (default: the system temp dir)")
    bench.add_argument("--output", "--out", type=Path, default=Path("bench_results/data.json"))
    bench.set_defaults(run=run)


def run(args) -> None:
    rows = []
    with tempfile.TemporaryDirectory(prefix="mswa-bench-data-", dir=args.workdir) as work:
        if args.enwik8_bytes:
            rows += bench_enwik8(Path(work), args.enwik8_bytes)
        if args.wikitext_words:
            rows += bench_wikitext(Path(work), args.wikitext_words, hf=not args.no_hf)
    print_table(rows)
    machine = {
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "load_average_1min": os.getloadavg()[0],
        "python": platform.python_version(),
    }
    settings = {k: str(v) for k, v in vars(args).items() if k != "run"}
    write_atomic(args.output, json.dumps({"args": settings, "machine": machine, "results": rows}, indent=2))
    print(f"wrote {args.output}")

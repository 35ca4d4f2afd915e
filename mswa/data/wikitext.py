"""WikiText-103 / WikiText-2 at word level, tokenised as Transformer-XL does.

Every line of a split (a row of the Hugging Face dataset, a line of ``wiki.<split>.tokens``) is split
on whitespace (Python's ``str.split()`` definition) and gets ``<eos>`` appended, empty lines
included: they become a lone ``<eos>``. This reproduces the published token counts (WikiText-2 valid:
213,886 words + 3,760 lines = 217,646 tokens). ``<unk>`` is an ordinary word of the text.

Vocabulary: ``<eos>`` is id 0, then every word of the training split by descending count, ties in
order of first occurrence in the training split; this is Transformer-XL's WikiText-103 vocabulary,
267,735 entries. A valid / test word absent from training is an error (tokenised WikiText has
none; the ``*-raw-*`` configs do).

Tokenisation runs in Arrow: batches of lines are split and dictionary-encoded in C++ on a few
threads; only each batch's distinct words go through Python, in order, to get corpus-wide ids.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from tqdm import tqdm

from mswa.data.cache import CacheContent, CacheFolder
from mswa.data.corpus import SPLITS, Corpus, DataError

EOS = "<eos>"
STANDARD_HF_CONFIGS = {"wikitext-103": "wikitext-103-v1", "wikitext-2": "wikitext-2-v1"}
HF_SPLIT_NAMES = {"train": "train", "valid": "validation", "test": "test"}
BATCH_BYTES = 32 << 20  # lines read per tokenisation batch from a local file
BATCH_ROWS = 100_000  # rows per tokenisation batch from a Hugging Face dataset (~30 MB of WikiText)
WORKERS = min(4, os.cpu_count() or 1)  # threads splitting batches (Arrow releases the GIL)


def load(
    data_dir: str | os.PathLike,
    name: str = "wikitext-103",
    path: str | os.PathLike | None = None,
    hf_dataset: str = "Salesforce/wikitext",
    hf_config: str | None = None,
    hf_cache_dir: str | os.PathLike | None = None,
) -> Corpus:
    """The word-level corpus ``name`` (ppl), tokenised into ``data_dir`` on first use and memory-mapped after.

    Source: the folder ``path`` holding ``wiki.{train,valid,test}.tokens`` when given, else
    ``datasets.load_dataset(hf_dataset, hf_config, cache_dir=hf_cache_dir)`` (a hub id or a local
    dataset folder). ``hf_config`` None picks the standard config of ``name`` (wikitext-103-v1 or
    wikitext-2-v1). The Hugging Face cache and HF_DATASETS_OFFLINE apply as usual; once the token
    cache exists, Hugging Face is not consulted again.
    """
    source = _FileLines(path) if path is not None else _HuggingFaceLines(name, hf_dataset, hf_config, hf_cache_dir)
    cache = CacheFolder(data_dir, name, source.identity)
    cached = cache.load_or_build(lambda: _build(source, name))
    vocab = cached.texts["vocab.txt"].split("\n")
    if len(vocab) != cached.info["vocab_size"]:
        raise cache.refuse(f"cache file {cache.path / 'vocab.txt'} lists {len(vocab):,} words, not {cached.info['vocab_size']:,}")
    return Corpus(name=name, splits={s: cached.arrays[s] for s in SPLITS}, vocab_size=len(vocab), unit="word", vocab=vocab)


def _build(source, name: str) -> CacheContent:
    ids, vocab = _tokenize(source, name)
    info = {"vocab_size": len(vocab), "tokens": {s: len(ids[s]) for s in SPLITS}, "eos": {s: int((ids[s] == 0).sum()) for s in SPLITS}}
    return CacheContent(arrays=ids, info=info, texts={"vocab.txt": "\n".join(vocab)})


def _tokenize(source, name: str) -> tuple[dict[str, np.ndarray], list[str]]:
    """int32 token ids of every split and the vocabulary (id -> word), by the rules of the module docstring."""
    first_seen = {EOS: 0}  # word -> id in order of first occurrence, training split first
    ids = {}
    with ThreadPoolExecutor(WORKERS) as pool:
        for split in SPLITS:
            encoded = _in_order(pool, partial(_split_and_encode, source, split), source.batches(split))
            ids[split] = np.concatenate([_first_seen_ids(batch, first_seen) for batch in encoded] or [np.zeros(0, np.int32)])
            if split == "train":
                train_types = len(first_seen)
            if len(ids[split]) == 0:
                raise DataError(f"{name} {split} split from {source.describe(split)} has no lines; check the source")
    if len(first_seen) > train_types:
        unseen = list(first_seen)[train_types:]
        raise DataError(
            f"{name} valid/test hold {len(unseen):,} words absent from its training split (e.g. {unseen[:5]}); "
            f"use the tokenised WikiText (configs wikitext-*-v1 or wiki.*.tokens, not the *-raw-* variants)"
        )
    counts = np.bincount(ids["train"], minlength=train_types)
    by_count = 1 + np.lexsort((np.arange(1, train_types), -counts[1:]))  # primary key last: count down, then first seen
    order = np.concatenate([[0], by_count])  # <eos> stays id 0
    new_id = np.empty(train_types, dtype=np.int32)
    new_id[order] = np.arange(train_types, dtype=np.int32)
    words = list(first_seen)
    return {s: new_id[ids[s]] for s in SPLITS}, [words[i] for i in order]


def _in_order(pool: ThreadPoolExecutor, function: Callable, items: Iterable) -> Iterator:
    """``map(function, items)`` run on ``pool``, at most one batch per worker read ahead."""
    pending = deque()
    for item in items:
        pending.append(pool.submit(function, item))
        if len(pending) > WORKERS:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def _split_and_encode(source, split: str, batch) -> pa.DictionaryArray:
    return pc.dictionary_encode(source.words(split, batch))  # dictionary in order of first occurrence


def _first_seen_ids(encoded: pa.DictionaryArray, first_seen: dict[str, int]) -> np.ndarray:
    """Corpus-wide first-seen ids of an encoded batch; adds its new words to ``first_seen``."""
    distinct = encoded.dictionary.to_pylist()
    to_global = np.fromiter((first_seen.setdefault(w, len(first_seen)) for w in distinct), dtype=np.int32, count=len(distinct))
    return to_global[encoded.indices.to_numpy()]


class _FileLines:
    """Lines of local ``wiki.<split>.tokens`` files; \\r\\n and \\r end lines too, as in Python's text mode."""

    def __init__(self, path: str | os.PathLike):
        folder = Path(path).expanduser().resolve()
        self.files = {s: folder / f"wiki.{s}.tokens" for s in SPLITS}
        missing = [str(f) for f in self.files.values() if not f.is_file()]
        if missing:
            raise DataError(
                f"WikiText files {missing} do not exist; point path at a folder holding wiki.train.tokens, wiki.valid.tokens "
                "and wiki.test.tokens"
            )
        stats = {s: f.stat() for s, f in self.files.items()}  # a changed file gets a new cache
        self.identity = {"source": "files", "path": str(folder), "files": {s: [st.st_size, st.st_mtime_ns] for s, st in stats.items()}}

    def describe(self, split: str) -> str:
        return str(self.files[split])

    def batches(self, split: str) -> Iterator[bytes]:
        """Blocks of whole lines."""
        path = self.files[split]
        bar = tqdm(total=path.stat().st_size, unit="B", unit_scale=True, desc=f"tokenising {path.name}")
        with open(path, "rb") as f, bar:
            while block := f.read(BATCH_BYTES):
                block += f.readline()  # end the block at a line end
                bar.update(len(block))
                yield block

    def words(self, split: str, block: bytes) -> pa.Array:
        if b"\r" in block:
            block = block.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        if not block.endswith(b"\n"):
            block += b"\n"  # a last line without a line end still counts
        try:
            text = pa.array([block.replace(b"\n", f" {EOS} ".encode())], type=pa.string())  # validates UTF-8
        except pa.ArrowInvalid as error:
            message = f"{self.files[split]} is not UTF-8 text ({error}); point path at the tokenised WikiText files"
            raise DataError(message) from error
        words = pc.list_flatten(pc.utf8_split_whitespace(text))
        # runs of whitespace split once; only a leading or trailing one leaves an empty word
        start, end = int(words[0].as_py() == ""), len(words) - int(words[-1].as_py() == "")
        return words.slice(start, end - start)


class _HuggingFaceLines:
    """Rows of a Hugging Face ``datasets`` dataset; each row is one line of the original file."""

    def __init__(self, name: str, hf_dataset: str, hf_config: str | None, hf_cache_dir: str | os.PathLike | None):
        if hf_config is None and name not in STANDARD_HF_CONFIGS:
            raise ValueError(f"hf_config is unset and name {name!r} has no standard config ({STANDARD_HF_CONFIGS}); set hf_config")
        self.dataset, self.config = hf_dataset, hf_config or STANDARD_HF_CONFIGS[name]
        self.cache_dir = None if hf_cache_dir is None else str(hf_cache_dir)
        self.identity = {"source": "huggingface", "dataset": self.dataset, "config": self.config}
        self._splits = None

    def describe(self, split: str) -> str:
        return f"Hugging Face {self.dataset} ({self.config}, split {HF_SPLIT_NAMES[split]})"

    def batches(self, split: str) -> Iterator[pa.Array]:
        """Arrays of rows."""
        rows = self._load()[HF_SPLIT_NAMES[split]]
        if "text" not in rows.column_names:
            raise DataError(
                f"{self.describe(split)} has columns {rows.column_names}, not 'text'; point hf_dataset at a WikiText-shaped dataset"
            )
        with tqdm(total=len(rows), unit=" lines", unit_scale=True, desc=f"tokenising {split}") as bar:
            for batch in rows.with_format("arrow").iter(batch_size=BATCH_ROWS):
                bar.update(batch.num_rows)
                yield batch.column("text").combine_chunks()

    @staticmethod
    def words(split: str, rows: pa.Array) -> pa.Array:
        # trimmed "<row> <eos>" is never empty and has no outer whitespace, so Arrow's split (which
        # yields "" at a leading or trailing space) gives exactly str.split() + ["<eos>"]
        terminated = pc.utf8_trim_whitespace(pc.binary_join_element_wise(rows, EOS, " "))
        return pc.list_flatten(pc.utf8_split_whitespace(terminated))

    def _load(self):
        if self._splits is None:
            import datasets  # heavy import, needed only to build the cache

            try:
                self._splits = datasets.load_dataset(self.dataset, self.config, cache_dir=self.cache_dir)
            except Exception as error:  # network, missing dataset or config: one message for all
                raise DataError(
                    f"loading Hugging Face dataset {self.dataset!r} config {self.config!r} failed ({error}); check the names, "
                    f"the network or HF cache, or pass path=<folder with wiki.*.tokens>"
                ) from error
            missing = [s for s in HF_SPLIT_NAMES.values() if s not in self._splits]
            if missing:
                raise DataError(
                    f"Hugging Face dataset {self.dataset!r} config {self.config!r} lacks splits {missing}; "
                    "point hf_dataset at a WikiText-shaped dataset"
                )
        return self._splits

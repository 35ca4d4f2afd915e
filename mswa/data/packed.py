"""Text documents tokenised with a pretrained model's tokenizer and packed into one EOS-joined stream.

Each document becomes ``tokenizer(text)`` (with the tokenizer's own special tokens, e.g. Llama's
BOS) followed by EOS, and the documents are concatenated; training then draws fixed-length chunks
aligned to ``seq_len`` from the stream (``aligned_chunks`` in the dataset config), which is the
"packed into 4096-token chunks" of the MSWA authors' fine-tuning recipe.

Source: a Hugging Face ``datasets`` dataset (hub id or local folder, one split), or local files
(``.txt``: one document per file; ``.json``/``.jsonl``/``.parquet``: one document per row), both
read by ``datasets``. Held-out documents: of every ``eval_every`` documents, the second-to-last goes
to valid and the last to test, so both sample the whole source, not its tail. ``max_tokens`` stops
tokenising once the training stream holds that many tokens (the recipe needs ~262M of the 1B in
the RedPajama sample).

The token arrays are a verified cache under ``data_dir`` (``mswa.data.cache``) keyed by the source,
the tokenizer and these settings: every load checks them against their manifest, then memory-maps them.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from mswa.data.cache import CacheContent, CacheFolder
from mswa.data.corpus import SPLITS, Corpus, DataError

FILE_BUILDERS = {".txt": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
BATCH_DOCUMENTS = 1000


def load(
    data_dir: str | os.PathLike,
    tokenizer: str | None,
    hf_dataset: str | None = None,
    hf_config: str | None = None,
    hf_split: str = "train",
    files: Sequence[str] | None = None,
    text_field: str = "text",
    eval_every: int = 100,
    max_tokens: int | None = None,
    streaming: bool = False,
    name: str = "packed",
) -> Corpus:
    """The packed token stream of the source (ppl per token); see the module docstring."""
    if (hf_dataset is None) == (not files):
        raise DataError("packed_text needs exactly one source: dataset.loader.hf_dataset=<name or folder> or dataset.loader.files=[...]")
    if not isinstance(eval_every, int) or eval_every < 3:
        raise DataError(f"eval_every={eval_every!r} must be an int >= 3 (one valid and one test document in every eval_every)")
    text_tokenizer = _load_tokenizer(tokenizer)
    source = _files_source(files) if files else {"source": "huggingface", "dataset": hf_dataset, "config": hf_config, "split": hf_split}
    identity = {
        **source,
        "tokenizer": _tokenizer_identity(text_tokenizer),
        "text_field": text_field,
        "eval_every": eval_every,
        "max_tokens": max_tokens,
    }
    cache = CacheFolder(data_dir, name, identity)
    cached = cache.load_or_build(lambda: _build(source, text_field, streaming, text_tokenizer, eval_every, max_tokens))
    return Corpus(name=name, splits={s: cached.arrays[s] for s in SPLITS}, vocab_size=cached.info["vocab_size"], unit="token")


def _build(source: dict, text_field: str, streaming: bool, tokenizer, eval_every: int, max_tokens: int | None) -> CacheContent:
    splits = _pack(_documents(source, text_field, streaming), tokenizer, eval_every, max_tokens)
    return CacheContent(arrays=splits, info={"vocab_size": len(tokenizer), "tokens": {s: len(splits[s]) for s in SPLITS}})


def _load_tokenizer(tokenizer: str | None):
    from transformers import AutoTokenizer

    if tokenizer is None:
        raise DataError("packed_text needs a tokenizer: use model=hf_causal_lm (its own) or set dataset.loader.tokenizer=<id or folder>")
    try:
        loaded = AutoTokenizer.from_pretrained(tokenizer)
    except (OSError, ValueError) as error:
        raise DataError(f"tokenizer {tokenizer!r} cannot be loaded ({error}); give a hub id or a local model folder") from error
    if loaded.eos_token_id is None:
        raise DataError(f"tokenizer {tokenizer!r} has no EOS token to join documents with; set dataset.loader.tokenizer to one that has")
    return loaded


def _tokenizer_identity(tokenizer) -> dict:
    """The vocabulary and rules, not the path: a moved copy of the same tokenizer keeps its cache."""
    rules = tokenizer.backend_tokenizer.to_str() if tokenizer.is_fast else repr(sorted(tokenizer.get_vocab().items()))
    return {
        "class": type(tokenizer).__name__,
        "size": len(tokenizer),
        "eos": tokenizer.eos_token_id,
        "sha256": hashlib.sha256(rules.encode()).hexdigest(),
    }


def _files_source(files: Sequence[str]) -> dict:
    paths = [Path(f).expanduser().resolve() for f in ([files] if isinstance(files, str) else files)]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise DataError(f"dataset.loader.files {missing} do not exist; give paths of .txt, .json(l) or .parquet files")
    builders = {FILE_BUILDERS.get(p.suffix) for p in paths}
    if None in builders or len(builders) > 1:
        raise DataError(
            f"dataset.loader.files must all be one kind of {sorted(FILE_BUILDERS)}, got suffixes {sorted({p.suffix for p in paths})}"
        )
    stats = [[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in paths]  # a changed file gets a new cache
    return {"source": "files", "builder": builders.pop(), "files": stats}


def _documents(source: dict, text_field: str, streaming: bool) -> Iterator[list[str]]:
    """Batches of document texts, in the source's order."""
    import datasets  # heavy import, needed only to build the cache

    if source["source"] == "files":
        options = {"sample_by": "document"} if source["builder"] == "text" else {}
        request = (source["builder"],), {"data_files": [f for f, _, _ in source["files"]], "split": "train", **options}
        described = f"files {[f for f, _, _ in source['files']]}"
    else:
        request = (source["dataset"], source["config"]), {"split": source["split"], "streaming": streaming}
        described = f"Hugging Face {source['dataset']!r} (config {source['config']!r}, split {source['split']!r})"
    try:
        rows = datasets.load_dataset(*request[0], **request[1])
    except Exception as error:  # network, missing dataset, config or split: one message for all
        raise DataError(f"loading {described} failed ({error}); check the names, the network or the HF cache") from error
    if text_field not in (rows.column_names or []):
        raise DataError(f"{described} has columns {rows.column_names}, not {text_field!r}; set dataset.loader.text_field")
    for batch in rows.iter(batch_size=BATCH_DOCUMENTS):
        yield batch[text_field]


def _pack(documents: Iterator[list[str]], tokenizer, eval_every: int, max_tokens: int | None) -> dict[str, np.ndarray]:
    """Tokenise, join by EOS and deal documents to the splits; stop once train holds ``max_tokens``."""
    dtype = np.uint16 if len(tokenizer) <= 1 << 16 else np.int32
    pieces = {s: [] for s in SPLITS}
    n_train, index = 0, 0
    eos = tokenizer.eos_token_id
    with tqdm(total=max_tokens, unit=" tok", unit_scale=True, desc="tokenising") as bar:
        for texts in documents:
            for ids in tokenizer(texts)["input_ids"]:
                if not ids or ids[-1] != eos:
                    ids = [*ids, eos]
                split = {eval_every - 2: "valid", eval_every - 1: "test"}.get(index % eval_every, "train")
                pieces[split].append(np.asarray(ids, dtype=dtype))
                index += 1
                if split == "train":
                    n_train += len(ids)
                    bar.update(len(ids))
            if max_tokens is not None and n_train >= max_tokens:
                break
    if not pieces["test"]:
        raise DataError(
            f"the source has {index} documents, too few to hold out one valid and one test document "
            f"(every {eval_every}); lower dataset.loader.eval_every or add documents"
        )
    splits = {s: np.concatenate(pieces[s]) for s in SPLITS}
    if max_tokens is not None:
        splits["train"] = splits["train"][:max_tokens]
    return splits

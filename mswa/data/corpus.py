"""What every dataset loader returns (a Corpus: token arrays per split plus what the metrics need to
know) and the one error it raises for bad data (DataError).

Loaders (``mswa.data.synthetic.load``, ``mswa.data.enwik8.load``, ``mswa.data.wikitext.load``,
``mswa.data.packed.load``; a dataset config's ``loader._target_``) are idempotent: the first call
downloads / generates and writes a verified cache (``mswa.data.cache``), later calls verify and
memory-map it. A run calls its loader before it builds the model, in every DDP process; files are
written under per-process temporary names and renamed when complete, so no process reads another's
half-written file.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

SPLITS = ("train", "valid", "test")


class DataError(ValueError):
    """A data file is missing, malformed, truncated or corrupted; the message names the file and the fix."""


@dataclass
class Corpus:
    name: str
    splits: dict[str, np.ndarray]  # "train" / "valid" / "test" -> 1-D token ids (uint8 or int32, memmap ok)
    vocab_size: int
    unit: str  # "byte" -> bits per byte/character (bpc); "word" or "token" (subwords) -> perplexity (ppl)
    entropy_floor_bpb: float | None = None  # known per-byte entropy of generated data, else None
    vocab: list[str] | None = field(default=None, repr=False)  # word-level corpora: id -> word
    # generated corpora that know what each token is (the synthetic corpus: word byte, copy at a scale):
    kind_names: list[str] | None = None  # kind id -> name
    kinds: dict[str, np.ndarray] | None = field(default=None, repr=False)  # "valid" / "test" -> kind id of every token
    kind_floor_bpb: dict[str, list[float | None]] | None = None  # "valid" / "test" -> entropy floor of each kind
    split_floor_bpb: dict[str, float] | None = None  # split -> entropy floor of its bytes
    source: dict | None = None  # a user's corpus (dataset=bytes): its name, path, files, bytes and sha256

    def __post_init__(self) -> None:
        if self.unit not in ("byte", "word", "token"):
            raise ValueError(f"Corpus.unit must be 'byte', 'word' or 'token', got {self.unit!r}")
        missing = [s for s in SPLITS if s not in self.splits]
        if missing:
            raise ValueError(f"corpus {self.name!r} lacks splits {missing}; a loader must return {list(SPLITS)}")
        for split, labels in (self.kinds or {}).items():
            if len(labels) != len(self.splits[split]):
                raise ValueError(f"corpus {self.name!r}: {split} has {len(self.splits[split])} tokens but {len(labels)} kind labels")

    @property
    def metric(self) -> str:
        return "bpc" if self.unit == "byte" else "ppl"

"""One verified cache under every loader (mswa.data.cache): a damaged file of any loader's cache is refused
in one sentence naming the folder to delete, and deleting it rebuilds the same corpus."""

import importlib.util
import shutil

import numpy as np
import pytest

from helpers.data import write_word_corpus
from mswa.data import enwik8, packed, synthetic, wikitext
from mswa.data.corpus import DataError

DAMAGES = {
    "truncated": lambda path: path.write_bytes(path.read_bytes()[:-7]),
    "corrupted": lambda path: path.write_bytes(path.read_bytes()[:-1] + bytes([path.read_bytes()[-1] ^ 0x10])),
    "missing": lambda path: path.unlink(),
}
DAMAGE_WORDS = {"truncated": "has .* bytes, not the .* \\(truncated or changed\\)", "corrupted": "sha256", "missing": "is missing"}


def _local_bytes(source):
    path = source / "bytes.bin"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    return {"path": path, "split_fractions": [0.8, 0.1, 0.1]}


def _tiny_tokenizer_and_documents(source):
    from mswa.hf.tiny import SAMPLE_TEXT, tiny_tokenizer

    tokenizer = source / "tokenizer"
    tiny_tokenizer().save_pretrained(tokenizer)
    documents = []
    for i in range(9):
        documents.append(source / f"doc{i}.txt")
        documents[-1].write_text(" ".join(SAMPLE_TEXT[i % len(SAMPLE_TEXT) :]))
    return {"tokenizer": str(tokenizer), "files": [str(d) for d in documents], "eval_every": 3}


LOADERS = {  # name -> (load function, its arguments from a folder for source files)
    "synthetic": (synthetic.load, lambda source: {"n_bytes": 20_000}),
    "enwik8 local bytes": (enwik8.load, _local_bytes),
    "wikitext local files": (wikitext.load, lambda source: {"path": write_word_corpus(source / "text")}),
    "packed text": (packed.load, _tiny_tokenizer_and_documents),
}
NEEDS = {"packed text": "transformers"}


@pytest.mark.parametrize("damage", DAMAGES)
@pytest.mark.parametrize("loader", LOADERS)
def test_every_loader_refuses_a_damaged_cache_with_the_folder_to_delete(tmp_path, loader, damage):
    if loader in NEEDS and importlib.util.find_spec(NEEDS[loader]) is None:
        pytest.skip(f"needs {NEEDS[loader]}")
    load, arguments = LOADERS[loader]
    source, data_dir = tmp_path / "source", tmp_path / "data"
    source.mkdir()
    kwargs = arguments(source)
    built = {split: np.array(tokens) for split, tokens in load(data_dir, **kwargs).splits.items()}  # copies: the maps close
    (folder,) = data_dir.iterdir()
    assert (folder / "manifest.json").is_file()
    assert np.array_equal(load(data_dir, **kwargs).splits["valid"], built["valid"])  # intact: opened again
    damaged = folder / "valid.npy"
    DAMAGES[damage](damaged)
    with pytest.raises(DataError) as refusal:
        load(data_dir, **kwargs)
    message = str(refusal.value)
    assert "\n" not in message and message.startswith(f"cache file {damaged} ")
    assert message.endswith(f"; delete {folder} and rerun to rebuild it")
    assert refusal.match(DAMAGE_WORDS[damage])
    shutil.rmtree(folder)  # the fix the sentence names
    rebuilt = load(data_dir, **kwargs)
    for split, tokens in built.items():
        assert np.array_equal(rebuilt.splits[split], tokens), split

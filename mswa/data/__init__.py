"""Datasets (synthetic, enwik8, WikiText, packed text for pretrained models): every loader returns a
Corpus of token arrays (corpus.py) kept in a verified cache (cache.py); batches.py cuts them into
training crops and evaluation chunks."""

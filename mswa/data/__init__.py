"""Datasets: synthetic, enwik8, WikiText; every loader returns a Corpus of token arrays."""

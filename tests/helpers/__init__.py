"""Helpers shared by the tests, imported as ``from helpers.<module> import ...`` (pyproject's pytest
``pythonpath`` puts tests/ on the path). No test imports conftest or another test module.

- runs: the real conf/ composed by Hydra, train.py in a subprocess, results.json of finished runs
- data: a local HTTP server, zips, tiny word corpora, the shared WikiText-2 text
- attention: attention inputs and the check of a kernel against the dense reference
- hf: tiny Hugging Face prompts, greedy decoding, a reference windowed attention
- lm_eval_task: a local lm_eval multiple-choice task
- report_runs: run folders as train.py writes them, for the report's tests
"""

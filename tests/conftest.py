"""Shared test helpers: tiny configs, a locally written BERT tokenizer, the ../shared fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

torch.set_num_threads(min(2, os.cpu_count() or 1))

from qformer.testing import (  # noqa: E402, F401  (the one set of tiny builders, shared with benchmarks/)
    WORDS,
    randomize_,
    write_bert_tokenizer,
    write_causal_tokenizer,
    write_seq2seq_tokenizer,
)


@pytest.fixture(scope="session")
def bert_tokenizer_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("bert_tok")
    write_bert_tokenizer(d)
    return d

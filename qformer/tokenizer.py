"""The Q-Former's text tokenizer: BERT WordPiece plus BLIP-2's ``[DEC]`` bos token."""

from __future__ import annotations

import os
from pathlib import Path

from transformers import AutoTokenizer, BertTokenizerFast, PreTrainedTokenizerBase

DEC_TOKEN = "[DEC]"


def load_qformer_tokenizer(path: str | os.PathLike, *, max_length: int | None = None) -> PreTrainedTokenizerBase:
    """Load a BERT tokenizer from a local directory (or a hub name, for users with network)
    and make sure it carries ``[DEC]`` as its bos token, as BLIP-2's ``init_tokenizer`` does.
    Truncation is on the right. Never enables ``trust_remote_code``."""
    if isinstance(path, Path) or os.path.isdir(str(path)):
        if not Path(path).is_dir():
            raise FileNotFoundError(f"tokenizer directory not found: {path}")
    if Path(path).is_dir() and not (Path(path) / "tokenizer_config.json").is_file() and (Path(path) / "vocab.txt").is_file():
        # A bare WordPiece vocabulary (as some BERT dumps ship): AutoTokenizer cannot tell its class.
        tok = BertTokenizerFast(vocab=str(Path(path) / "vocab.txt"), do_lower_case=True)
    else:
        tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
    if tok.bos_token != DEC_TOKEN:
        tok.add_special_tokens({"bos_token": DEC_TOKEN})
    tok.truncation_side = "right"
    tok.padding_side = "right"
    if max_length is not None:
        tok.model_max_length = max_length
    return tok


__all__ = ["DEC_TOKEN", "load_qformer_tokenizer"]

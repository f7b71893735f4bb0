"""The Q-Former's text tokenizer: BERT WordPiece plus BLIP-2's ``[DEC]`` bos token."""

from __future__ import annotations

import os
from pathlib import Path

from transformers import AutoTokenizer, BertTokenizerFast, PreTrainedTokenizerBase

DEC_TOKEN = "[DEC]"


def load_qformer_tokenizer(
    path: str | os.PathLike, *, max_length: int | None = None, add_dec: bool = True
) -> PreTrainedTokenizerBase:
    """Load a BERT tokenizer from a local directory (or a hub name, for users with network)
    and make sure it carries ``[DEC]`` as its bos token, as BLIP-2's ``init_tokenizer`` does
    (``add_dec=False``: as saved, for a Q-Former that only reads text, InstructBLIP's).
    Truncation is on the right. Never enables ``trust_remote_code``."""
    if isinstance(path, Path) or os.path.isdir(str(path)):
        if not Path(path).is_dir():
            raise FileNotFoundError(f"tokenizer directory not found: {path}")
    if Path(path).is_dir() and not (Path(path) / "tokenizer_config.json").is_file() and (Path(path) / "vocab.txt").is_file():
        # A bare WordPiece vocabulary (as some BERT dumps ship): AutoTokenizer cannot tell its class.
        tok = BertTokenizerFast(vocab=str(Path(path) / "vocab.txt"), do_lower_case=True)
    else:
        tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
    if add_dec and tok.bos_token != DEC_TOKEN:
        tok.add_special_tokens({"bos_token": DEC_TOKEN})
    tok.truncation_side = "right"
    tok.padding_side = "right"
    if max_length is not None:
        tok.model_max_length = max_length
    return tok


def instruction_tokens(tokenizer: PreTrainedTokenizerBase, prompts: list[str], *, max_length: int) -> dict:
    """Instructions in the Q-Former's tokens for an instruction-aware model (InstructBLIP):
    ``qformer_input_ids`` / ``qformer_attention_mask`` (B, L), padding longest, truncated on
    the left to ``max_length`` (as LAVIS, so a long instruction keeps its question)."""
    old = tokenizer.truncation_side
    tokenizer.truncation_side = "left"
    try:
        enc = tokenizer(list(prompts), padding="longest", truncation=True, max_length=max_length, return_tensors="pt")
    finally:
        tokenizer.truncation_side = old
    return dict(qformer_input_ids=enc["input_ids"], qformer_attention_mask=enc["attention_mask"])


__all__ = ["DEC_TOKEN", "instruction_tokens", "load_qformer_tokenizer"]

"""Shared test helpers: tiny configs, a locally written BERT tokenizer, the ../shared fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
ORACLE_FIXTURE = SHARED / "fixtures" / "lavis-oracle-seed0"

torch.set_num_threads(min(2, os.cpu_count() or 1))

# A small English vocabulary for WordPiece test tokenizers.
WORDS = (
    "a an the of on in at to with and is are two three dog dogs cat cats man woman red blue green "
    "white black small large big sitting playing riding photo picture sofa snow street bus car "
    "circle square triangle left right above below next"
).split()


def write_bert_tokenizer(directory: Path, *, words: list[str] = WORDS, size: int | None = None):
    """A BertTokenizerFast over a tiny vocab, with [DEC] added as bos (as BLIP-2 does)."""
    from transformers import BertTokenizerFast

    directory.mkdir(parents=True, exist_ok=True)
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    toks = special + list(".,!?'-") + letters + ["##" + c for c in letters] + [w for w in words if w not in letters]
    seen: list[str] = []
    for t in toks:
        if t not in seen:
            seen.append(t)
    while size is not None and len(seen) < size:
        seen.append(f"[unused{len(seen)}]")
    (directory / "vocab.txt").write_text("\n".join(seen) + "\n")
    tok = BertTokenizerFast(vocab=str(directory / "vocab.txt"), do_lower_case=True)
    tok.add_special_tokens({"bos_token": "[DEC]"})
    tok.save_pretrained(str(directory))
    return tok


@torch.no_grad()
def randomize_(module: torch.nn.Module, seed: int) -> None:
    """Non-trivial random weights (biases and LayerNorms included) so that parity tests
    exercise every parameter: matrices N(0, 1/fan_in), LayerNorm scales 1 + N(0, 0.1^2),
    everything else N(0, 0.1^2). ``temp`` is left alone."""
    g = torch.Generator().manual_seed(seed)
    seen = set()
    for name, p in module.named_parameters():
        if id(p) in seen or name.split(".")[-1] == "temp":
            continue
        seen.add(id(p))
        noise = torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype)
        leaf = name.split(".")[-1]
        if p.dim() >= 2 and leaf == "weight":
            p.copy_(noise / p[0].numel() ** 0.5)
        elif p.dim() == 1 and leaf == "weight":
            p.copy_(1.0 + 0.1 * noise)
        else:
            p.copy_(0.1 * noise)


def require_shared(path: Path = ORACLE_FIXTURE) -> Path:
    if not path.exists():
        pytest.skip(f"{path} is absent (the ../shared fixtures are not available here)")
    return path


def load_pt(path: Path):
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="session")
def bert_tokenizer_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("bert_tok")
    write_bert_tokenizer(d)
    return d


def _train_bpe(special: list[str], vocab_size: int = 400):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = [" ".join(WORDS), "a photo of " + " ".join(WORDS), "Question: what is it? Answer: a cat\n"] * 20
    tok.train_from_iterator(corpus, trainer)
    return tok


def write_causal_tokenizer(directory: Path):
    """An OPT-style tokenizer: byte-level BPE, "</s>" as BOS/EOS prepended to every text, "<pad>"."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    tok = _train_bpe(["<s>", "<pad>", "</s>", "<unk>"])
    bos = tok.token_to_id("</s>")
    tok.post_processor = processors.TemplateProcessing(single="</s> $A", pair="</s> $A $B", special_tokens=[("</s>", bos)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="</s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")
    directory.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(directory))
    return fast


def write_seq2seq_tokenizer(directory: Path):
    """A T5-style tokenizer: "<pad>"=0 (decoder start), "</s>"=1 appended to every text."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    tok = _train_bpe(["<pad>", "</s>", "<unk>"])
    eos = tok.token_to_id("</s>")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", eos)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    directory.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(directory))
    return fast

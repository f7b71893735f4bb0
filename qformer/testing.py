"""Tiny, local, seeded building blocks for tests and benchmarks: nothing is downloaded.

* :func:`write_bert_tokenizer` -- a BERT WordPiece tokenizer with ``[DEC]`` (the Q-Former's);
* :func:`write_causal_tokenizer` -- OPT-style byte-level BPE ("</s>" as BOS, "<pad>");
* :func:`write_seq2seq_tokenizer` -- T5-style ("<pad>" = 0, "</s>" = 1 appended);
* :func:`randomize_` -- non-trivial random weights, so parity checks exercise every parameter;
* :func:`pixels`, :func:`captions` -- seeded inputs.

The tests (``tests/conftest.py``) and the benchmarks (``benchmarks/_models.py``) both build on
these, so a tiny model means the same thing in both.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch

#: A small English vocabulary for the tiny tokenizers and random captions.
WORDS: tuple[str, ...] = tuple(dict.fromkeys((
    "a an the of on in at to with and is are was it its this that there his her two three some "
    "man woman men women person people boy girl child children dog dogs cat cats bird horse cow sheep "
    "bus car train truck bicycle bike street road city busy red blue green white black yellow brown "
    "small large big sitting standing riding playing eating walking running holding looking lying "
    "sofa couch table bed chair kitchen room window door snow grass water beach field park tree trees "
    "sky plate pizza food next while rains heavily down photo picture image front top near under over "
    "group together circle square triangle left right above below"
).split()))


@torch.no_grad()
def randomize_(module: torch.nn.Module, seed: int) -> None:
    """Non-trivial random weights (biases and LayerNorms included): matrices N(0, 1/fan_in),
    1-D ``weight``s (LayerNorm scales) 1 + N(0, 0.1^2), everything else N(0, 0.1^2). The
    ``temp`` scalar is left alone. Tied parameters are drawn once."""
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


def save_random_hf(model_class, config, directory: Path, tokenizer, *, seed: int = 0):
    """A transformers model of ``model_class`` built from ``config`` with :func:`randomize_`
    weights, saved with ``tokenizer`` to ``directory`` (what ``from_pretrained`` loads); returns it
    in eval mode."""
    torch.manual_seed(seed)
    model = model_class(config).eval()
    randomize_(model, seed)
    model.save_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))
    return model


def pixels(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """(n, 3, size, size) standard-normal "images"."""
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def captions(n: int, *, words: tuple[int, int], seed: int = 0) -> list[str]:
    """``n`` random captions of ``words[0]..words[1]`` words from :data:`WORDS`."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(*words))) for _ in range(n)]


def write_bert_tokenizer(directory: Path, *, words: tuple[str, ...] | list[str] = WORDS, size: int | None = None):
    """A ``BertTokenizerFast`` over ``words`` (+ ``[unusedN]`` up to ``size``), saved to
    ``directory``, with ``[DEC]`` added as bos (as BLIP-2 does)."""
    from transformers import BertTokenizerFast

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    toks = list(dict.fromkeys(special + list(".,!?'-") + letters + ["##" + c for c in letters] + list(words)))
    while size is not None and len(toks) < size:
        toks.append(f"[unused{len(toks)}]")
    (directory / "vocab.txt").write_text("\n".join(toks) + "\n")
    tok = BertTokenizerFast(vocab=str(directory / "vocab.txt"), do_lower_case=True)
    tok.add_special_tokens({"bos_token": "[DEC]"})
    tok.save_pretrained(str(directory))
    return tok


def train_bpe(special: list[str], *, vocab_size: int = 400):
    """A byte-level BPE ``tokenizers.Tokenizer`` fit on :data:`WORDS` and two prompt styles."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    corpus = [" ".join(WORDS), "a photo of " + " ".join(WORDS), "Question: what is it? Answer: a cat\n"] * 20
    tok.train_from_iterator(corpus, trainer)
    return tok


def write_causal_tokenizer(directory: Path, *, vocab_size: int = 400):
    """An OPT-style tokenizer: byte-level BPE, "</s>" as BOS/EOS prepended to every text, "<pad>"."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    tok = train_bpe(["<s>", "<pad>", "</s>", "<unk>"], vocab_size=vocab_size)
    bos = tok.token_to_id("</s>")
    tok.post_processor = processors.TemplateProcessing(single="</s> $A", pair="</s> $A $B", special_tokens=[("</s>", bos)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="</s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")
    Path(directory).mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(directory))
    return fast


def write_seq2seq_tokenizer(directory: Path, *, vocab_size: int = 400):
    """A T5-style tokenizer: "<pad>" = 0 (decoder start), "</s>" = 1 appended to every text."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    tok = train_bpe(["<pad>", "</s>", "<unk>"], vocab_size=vocab_size)
    eos = tok.token_to_id("</s>")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", eos)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    Path(directory).mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(directory))
    return fast


__all__ = [
    "WORDS",
    "captions",
    "pixels",
    "randomize_",
    "save_random_hf",
    "train_bpe",
    "write_bert_tokenizer",
    "write_causal_tokenizer",
    "write_seq2seq_tokenizer",
]

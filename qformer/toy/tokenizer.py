"""Tokenizers of the toy backbones, built from the toy world's closed vocabulary.

* The toy LM's: a byte-level BPE, OPT-style, fit on world captions.
* The Q-Former's: a WordPiece ``BertTokenizer`` over the world's words (plus single
  characters, so any lowercase text tokenizes without ``[UNK]``), with ``[PAD]`` = 0 and
  BLIP-2's added ``[DEC]`` bos token.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .language import caption_vocabulary
from .world import ToyWorld

__all__ = ["build_bert_tokenizer", "build_lm_tokenizer"]


def build_lm_tokenizer(world: ToyWorld, vocab_size: int = 512) -> Any:
    """A byte-level BPE tokenizer for the toy LM, OPT-style.

    Byte-level, like OPT/GPT-2: any text round-trips and nothing maps to ``<unk>``; the BPE
    merges are fit on world captions so each caption word is one token. Special tokens
    follow OPT's ids (``<s>``=0, ``<pad>``=1, ``</s>``=2, ``<unk>``=3) and ``</s>`` is both
    BOS and EOS; encoding with special tokens prepends ``</s>``, as OPT's tokenizer does.
    Captions end with ``"\\n"`` (its own token), BLIP-2's end-of-caption marker.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<s>", "<pad>", "</s>", "<unk>"]
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )

    def corpus() -> Iterator[str]:
        # Every word at the start of a line and after a space, plus real captions for
        # natural merge frequencies. Deterministic: the world is seeded.
        words = caption_vocabulary()
        yield from (w + "\n" for w in words)
        yield from (" " + w for w in words)
        for caps in world.iter_captions("train", 0, min(500, world.split_size("train"))):
            yield from (c + "\n" for c in caps)

    tok.train_from_iterator(corpus(), trainer=trainer)
    bos = tok.token_to_id("</s>")
    tok.post_processor = processors.TemplateProcessing(
        single="</s> $A", pair="</s> $A </s> $B", special_tokens=[("</s>", bos)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="</s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        padding_side="right",
        model_max_length=256,
    )


_BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
_EXTRA_CHARS = list("abcdefghijklmnopqrstuvwxyz0123456789") + list(".,!?;:'\"-()/&")


def build_bert_tokenizer(out_dir: str | Path) -> Any:
    """Write and return the Q-Former's WordPiece tokenizer (``BertTokenizer``).

    Vocabulary: ``[PAD]`` (id 0, the Q-Former's ``pad_token_id``), ``[UNK]``, ``[CLS]``,
    ``[SEP]``, ``[MASK]``, every caption word whole, then single characters and their
    ``##`` continuations so that words outside the world still tokenize (as characters)
    instead of collapsing to ``[UNK]``. ``[DEC]`` is added as the bos token, as BLIP-2 does
    to bert-base-uncased; it lands at the last id.
    """
    from transformers import BertTokenizer

    words = [w for w in caption_vocabulary() if w not in _EXTRA_CHARS]
    vocab = _BERT_SPECIALS + words + _EXTRA_CHARS + ["##" + c for c in _EXTRA_CHARS]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    tok = BertTokenizer(vocab=str(out / "vocab.txt"), do_lower_case=True, model_max_length=64)
    tok.add_special_tokens({"bos_token": "[DEC]"})
    tok.save_pretrained(out)
    return tok

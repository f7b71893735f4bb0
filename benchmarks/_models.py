"""Models, tokenizers and batches shared by the benchmarks (our venv only: transformers 5).

Everything is written locally and randomly initialised from seeds: no downloads.

* tokenizers: a BERT WordPiece tokenizer with ``[DEC]`` (the Q-Former's), an OPT-style
  byte-level BPE ("</s>" BOS, "<pad>"), a T5-style one ("<pad>"=0, "</s>"=1 appended);
* :func:`small_hf_blip2`: transformers' ``Blip2ForConditionalGeneration`` with the "small"
  configuration of ``../shared/docs/performance-notes.md`` (OPT or T5), saved to a directory
  that ``qformer.Blip2.from_pretrained`` loads; :func:`small_hf_instructblip`: the same shapes
  as ``InstructBlipForConditionalGeneration``;
* :func:`tiny_stage1_model`: a tiny ``qformer.Blip2`` for the retrieval benchmark.
"""

from __future__ import annotations

from pathlib import Path

import torch

from qformer.testing import WORDS, captions, pixels, randomize_, save_random_hf, write_bert_tokenizer  # noqa: F401
from qformer.testing import write_causal_tokenizer as _write_causal
from qformer.testing import write_seq2seq_tokenizer as _write_seq2seq


def write_causal_tokenizer(directory: Path):
    """OPT-style: byte-level BPE, "</s>" prepended as BOS, "<pad>" padding."""
    return _write_causal(directory, vocab_size=600)


def write_seq2seq_tokenizer(directory: Path):
    """T5-style: "<pad>"=0 (decoder start), "</s>"=1 appended to every text."""
    return _write_seq2seq(directory, vocab_size=600)


# ----------------------------------------------------------------------------- stage 2 models
SMALL_VISION = dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=6,
                    image_size=224, patch_size=16, qkv_bias=True)
SMALL_QFORMER = dict(vocab_size=1000, hidden_size=384, num_hidden_layers=4, num_attention_heads=6,
                     intermediate_size=1536, max_position_embeddings=64, encoder_hidden_size=384,
                     use_qformer_text_input=False, cross_attention_frequency=2)
NUM_QUERY = 32
IMAGE_SIZE = 224


def _text_config(kind: str, tok):
    from transformers import OPTConfig, T5Config

    if kind == "opt":
        return OPTConfig(vocab_size=50272, hidden_size=512, num_hidden_layers=4, ffn_dim=2048, num_attention_heads=8,
                         max_position_embeddings=2048, word_embed_proj_dim=512, pad_token_id=tok.pad_token_id,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, dropout=0.1)
    return T5Config(vocab_size=32128, d_model=512, d_ff=2048, d_kv=64, num_layers=4, num_decoder_layers=4, num_heads=8,
                    pad_token_id=0, eos_token_id=1, bos_token_id=0, decoder_start_token_id=0, dropout_rate=0.1,
                    feed_forward_proj="gated-gelu", tie_word_embeddings=False)


def small_hf_blip2(directory: Path, kind: str, seed: int = 0):
    """Write transformers' Blip2ForConditionalGeneration ("small", OPT or T5) with random
    weights and its tokenizer (an ``<image>`` token added) to ``directory``; returns
    (model, tokenizer, image_token_id)."""
    from transformers import Blip2Config, Blip2ForConditionalGeneration

    tok = (write_seq2seq_tokenizer if kind == "t5" else write_causal_tokenizer)(directory / "tok")
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    image_id = tok.convert_tokens_to_ids("<image>")
    cfg = Blip2Config(vision_config=dict(SMALL_VISION), qformer_config=dict(SMALL_QFORMER),
                      text_config=_text_config(kind, tok).to_dict(), num_query_tokens=NUM_QUERY,
                      image_token_index=image_id)
    return save_random_hf(Blip2ForConditionalGeneration, cfg, directory, tok, seed=seed), tok, image_id


def small_hf_instructblip(directory: Path, kind: str, seed: int = 0):
    """transformers' InstructBlipForConditionalGeneration with the same "small" shapes (its
    Q-Former reads text: BERT tokenizer in ``qformer_tokenizer/``, the hub layout); returns
    (model, tokenizer, image_token_id)."""
    from transformers import InstructBlipConfig, InstructBlipForConditionalGeneration

    tok = (write_seq2seq_tokenizer if kind == "t5" else write_causal_tokenizer)(directory / "tok")
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    image_id = tok.convert_tokens_to_ids("<image>")
    qtok = write_bert_tokenizer(directory / "qformer_tokenizer")
    qformer = {k: v for k, v in SMALL_QFORMER.items() if k != "use_qformer_text_input"}
    qformer.update(vocab_size=len(qtok), pad_token_id=qtok.pad_token_id)
    cfg = InstructBlipConfig(vision_config=dict(SMALL_VISION), qformer_config=qformer,
                             text_config=_text_config(kind, tok).to_dict(), num_query_tokens=NUM_QUERY,
                             image_token_index=image_id)
    model = save_random_hf(InstructBlipForConditionalGeneration, cfg, directory, tok, seed=seed)
    qtok.save_pretrained(str(directory / "qformer_tokenizer"))
    return model, tok, image_id


def hf_stage2_inputs(kind: str, batch: dict, image_id: int) -> dict:
    """Our collator's batch -> transformers' inputs: ``num_query_tokens`` ``<image>``
    placeholders before the text (as transformers 5 expects), labels shifted accordingly."""
    b = batch["input_ids"].shape[0]
    ids = torch.cat([torch.full((b, NUM_QUERY), image_id), batch["input_ids"]], 1)
    am = torch.cat([torch.ones(b, NUM_QUERY, dtype=torch.long), batch["attention_mask"]], 1)
    instruction = {k: batch[k] for k in ("qformer_input_ids", "qformer_attention_mask") if k in batch}
    if kind != "t5":
        labels = torch.cat([torch.full((b, NUM_QUERY), -100), batch["labels"]], 1)
        return dict(input_ids=ids, attention_mask=am, labels=labels, **instruction)
    return dict(input_ids=ids, attention_mask=am, labels=batch["labels"],
                decoder_attention_mask=batch["decoder_attention_mask"], **instruction)


# ----------------------------------------------------------------------------- stage 1 tiny
def tiny_stage1_model(directory: Path, seed: int = 0):
    """A tiny random qformer.Blip2 (ViT 48 wide / 3 blocks / 32 px, Q-Former 64 wide / 2 layers, 8 queries)."""
    from qformer import Blip2, Blip2Config, QFormerConfig, VisionConfig

    tok = write_bert_tokenizer(directory / "bert_tok")
    cfg = Blip2Config(
        vision=VisionConfig(backend="timm", name="eva_giant_patch14_clip_224",
                            model_kwargs=dict(embed_dim=48, depth=3, num_heads=4, patch_size=8, mlp_ratio=2.0),
                            image_size=32, feature_layer=-2),
        qformer=QFormerConfig(vocab_size=len(tok), hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128,
                              max_position_embeddings=48, encoder_width=48, num_query_tokens=8),
        embed_dim=32, max_txt_len=32,
    )
    torch.manual_seed(seed)
    model = Blip2(cfg, tokenizer=tok)
    randomize_(model, seed)
    return model.eval()


# ----------------------------------------------------------------------------- image search
def search_model(directory: Path, seed: int = 0):
    """A random qformer.Blip2 whose frozen tower dominates the image path, as EVA ViT-g does in
    BLIP-2 (timm ViT 192 wide / 8 blocks / 64 px / patch 8; Q-Former 128 wide / 2 layers / 8 queries: the
    Q-Former's image path is ~2.3 % of the tower's FLOPs, as BERT-base's against EVA ViT-g/14)."""
    from qformer import Blip2, Blip2Config, QFormerConfig, VisionConfig

    tok = write_bert_tokenizer(directory / "bert_tok")
    cfg = Blip2Config(
        vision=VisionConfig(backend="timm", name="vit_tiny_patch16_224", image_size=64, feature_layer=-1,
                            model_kwargs=dict(embed_dim=192, depth=8, num_heads=3, patch_size=8, mlp_ratio=4.0)),
        qformer=QFormerConfig(vocab_size=len(tok), hidden_size=128, num_layers=2, num_heads=4, intermediate_size=256,
                              max_position_embeddings=48, encoder_width=192, num_query_tokens=8,
                              cross_attention_freq=2),
        embed_dim=64, max_txt_len=32,
    )
    torch.manual_seed(seed)
    model = Blip2(cfg, tokenizer=tok)
    randomize_(model, seed)
    return model.eval()

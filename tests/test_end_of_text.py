"""Where generation stops. A checkpoint loaded from transformers stops where transformers stops
(its own eos_token_id), whatever its tokenizer does with "\\n" (LLaMA-style tokenizers split it in
two, word-level ones drop it); BLIP-2's "\\n" is only the convention of our own OPT training, and a
training config whose end of text is not one token is refused when the collator is built."""

from __future__ import annotations

import pytest
import torch
from test_stage2 import IMG, Q, make_hf_generation, pixels

from qformer import Blip2, Stage2TextCollator
from qformer.config import LLMConfig
from qformer.errors import ConfigError
from qformer.testing import WORDS


def newline_split_tokenizer():
    """LLaMA-style: metaspace + byte-fallback BPE; "\\n" is two tokens ("▁", "<0x0A>")."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>", "<pad>"]
                                  + [f"<0x{i:02X}>" for i in range(256)], show_progress=False)
    tok.train_from_iterator([" ".join(WORDS)] * 10, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>")
    assert len(fast("\n", add_special_tokens=False).input_ids) == 2
    return fast


def newline_free_tokenizer():
    """Word-level over whitespace-split words: "\\n" encodes to nothing at all."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<unk>", "<pad>", "<s>", "</s>", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>")
    assert fast("\n", add_special_tokens=False).input_ids == []
    return fast


def _hf_texts(hf, tok, image_id, px, prompt, **kw):
    ids = tok([prompt] * px.shape[0], return_tensors="pt").input_ids
    ids = torch.cat([torch.full((px.shape[0], Q), image_id), ids], 1)
    with torch.no_grad():
        out = hf.generate(pixel_values=px, input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                          pad_token_id=tok.pad_token_id, **kw)
    return out[:, ids.shape[1]:]


@pytest.mark.parametrize("make_tokenizer", [newline_split_tokenizer, newline_free_tokenizer], ids=["split", "absent"])
def test_transformers_checkpoint_stops_where_transformers_stops(tmp_path, make_tokenizer):
    from transformers import Blip2ForConditionalGeneration

    hf, tok, image_id = make_hf_generation(tmp_path, "llama", tokenizer=make_tokenizer())
    px, prompt = pixels(2, seed=3), "a photo of"
    # Make the checkpoint's eos a token this random model does generate (the first new one after
    # its first token), so that stopping there is visible; transformers' Blip2 generates with the
    # language model's own generation config, built from the text config.
    free = _hf_texts(hf, tok, image_id, px, prompt, max_new_tokens=8, min_new_tokens=8)[0].tolist()
    at = next(i for i in range(1, len(free)) if free[i] not in free[:i])
    stop = free[at]
    hf.config.text_config.eos_token_id = stop
    hf.save_pretrained(str(tmp_path))
    back = Blip2ForConditionalGeneration.from_pretrained(str(tmp_path)).eval()
    ref_ids = _hf_texts(back, tok, image_id, px, prompt, max_new_tokens=8)
    assert (ref_ids[0] == stop).nonzero()[0].item() == at  # transformers stopped at the checkpoint's eos
    ref = [t.strip() for t in tok.batch_decode(ref_ids, skip_special_tokens=True)]

    ours = Blip2.from_pretrained(tmp_path, llm_dtype="float32").eval()
    assert ours.config.llm.eos_token_id == stop
    assert ours.generate(px, prompt, num_beams=1, max_new_tokens=8) == ref
    # Our own format keeps it; the export writes it where transformers reads it.
    ours.save_pretrained(tmp_path / "ours")
    again = Blip2.from_pretrained(tmp_path / "ours", llm_dtype="float32").eval()
    assert again.generate(px, prompt, num_beams=1, max_new_tokens=8) == ref
    ours.export_transformers(tmp_path / "hf")
    exported = Blip2ForConditionalGeneration.from_pretrained(str(tmp_path / "hf")).eval()
    assert exported.config.text_config.eos_token_id == exported.generation_config.eos_token_id == stop
    assert [t.strip() for t in tok.batch_decode(_hf_texts(exported, tok, image_id, px, prompt, max_new_tokens=8),
                                                skip_special_tokens=True)] == ref


def test_opt_checkpoint_saying_newline_ends_captions_with_it(tmp_path):
    """Salesforce's BLIP-2 OPT configs say eos = the "\\n" token: then "\\n" ends generation and
    is what further training appends to captions."""
    hf, tok, image_id = make_hf_generation(tmp_path, "opt")
    newline = tok("\n", add_special_tokens=False).input_ids
    assert len(newline) == 1
    hf.config.text_config.eos_token_id = newline[0]
    hf.save_pretrained(str(tmp_path))
    ours = Blip2.from_pretrained(tmp_path, llm_dtype="float32")
    assert ours.config.llm.eos_token_id == newline[0] and ours.config.llm.end_of_text == "\n"
    batch = Stage2TextCollator(ours.llm_tokenizer, ours.config.llm, encoder_decoder=False)(["a cat"])
    assert batch["input_ids"][0, -1].item() == newline[0]


def test_own_training_refuses_an_end_of_text_that_is_not_one_token():
    tok = newline_split_tokenizer()
    with pytest.raises(ConfigError, match=r"end_of_text='\\n' is 2 tokens.*llm.end_of_text: null"):
        Stage2TextCollator(tok, LLMConfig(hf_config={"model_type": "llama"}, end_of_text="\n"), encoder_decoder=False)
    ok = Stage2TextCollator(tok, LLMConfig(hf_config={"model_type": "llama"}, end_of_text=None), encoder_decoder=False)
    assert ok(["a cat"])["input_ids"][0, -1].item() == tok.eos_token_id

"""Stage 2: soft prompts into a frozen OPT / T5; parity with transformers'
Blip2ForConditionalGeneration and LAVIS's Blip2OPT; export round trips; 8-bit, 4-bit and LoRA."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from conftest import randomize_, write_causal_tokenizer, write_seq2seq_tokenizer

from qformer.testing import save_random_hf
from qformer import Blip2, Blip2Config, QFormerConfig
from qformer.config import LLMConfig
from qformer.stage2 import Stage2Objective, Stage2TextCollator, split_prefix_lm

IMG, Q = 32, 8
CAPTIONS = ["a red cat on a sofa", "two dogs playing in the snow", "a man riding a bus in the city"]


def _text_config(kind: str, tok, vocab: int):
    from transformers import GPT2Config, LlamaConfig, OPTConfig, Qwen2Config, T5Config

    ids = dict(pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    if kind == "gpt2":
        return GPT2Config(vocab_size=vocab, n_embd=48, n_layer=2, n_head=4, n_positions=96, resid_pdrop=0.0,
                          embd_pdrop=0.0, attn_pdrop=0.0, **ids)
    if kind == "llama":
        return LlamaConfig(vocab_size=vocab, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=96, **ids)
    if kind == "qwen2":
        return Qwen2Config(vocab_size=vocab, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=96,
                           tie_word_embeddings=True, **ids)
    if kind == "opt":
        return OPTConfig(vocab_size=vocab, hidden_size=48, num_hidden_layers=2, ffn_dim=96, num_attention_heads=4,
                         max_position_embeddings=96, word_embed_proj_dim=48, pad_token_id=tok.pad_token_id,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, dropout=0.0)
    return T5Config(vocab_size=vocab, d_model=48, d_ff=96, d_kv=12, num_layers=2, num_decoder_layers=2, num_heads=4,
                    pad_token_id=0, eos_token_id=1, bos_token_id=0, decoder_start_token_id=0, dropout_rate=0.0,
                    feed_forward_proj="gated-gelu", tie_word_embeddings=False)


def make_hf_generation(directory: Path, kind: str, seed: int = 0, tokenizer=None):
    """A tiny random transformers Blip2ForConditionalGeneration saved to ``directory`` (with
    ``tokenizer`` as its LLM tokenizer, or a tiny OPT / T5 style one)."""
    from transformers import Blip2Config as HFBlip2Config
    from transformers import Blip2ForConditionalGeneration

    tok = tokenizer or (write_seq2seq_tokenizer if kind == "t5" else write_causal_tokenizer)(directory / "tok")
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    image_id = tok.convert_tokens_to_ids("<image>")
    cfg = HFBlip2Config(
        vision_config=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                           image_size=IMG, patch_size=8, qkv_bias=True),
        qformer_config=dict(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=128, max_position_embeddings=48, encoder_hidden_size=48,
                            use_qformer_text_input=False, cross_attention_frequency=2),
        text_config=_text_config(kind, tok, len(tok) + 8).to_dict(),
        num_query_tokens=Q,
        image_token_index=image_id,
    )
    return save_random_hf(Blip2ForConditionalGeneration, cfg, directory, tok, seed=seed), tok, image_id


def pixels(n=3, seed=0):
    return torch.randn(n, 3, IMG, IMG, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module", params=["opt", "t5", "gpt2", "llama", "qwen2"])
def hf_pair(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(request.param)
    hf, tok, image_id = make_hf_generation(d, request.param)
    ours, report = Blip2.from_pretrained(d, llm_dtype="float32", return_report=True)
    assert report.ok, str(report)
    return request.param, hf, ours.eval(), tok, image_id, d


def _hf_inputs(kind, batch, image_id):
    b = batch["input_ids"].shape[0]
    ids = torch.cat([torch.full((b, Q), image_id), batch["input_ids"]], 1)
    am = torch.cat([torch.ones(b, Q, dtype=torch.long), batch["attention_mask"]], 1)
    if kind != "t5":
        return dict(input_ids=ids, attention_mask=am, labels=torch.cat([torch.full((b, Q), -100), batch["labels"]], 1))
    return dict(input_ids=ids, attention_mask=am, labels=batch["labels"],
                decoder_attention_mask=batch["decoder_attention_mask"])


def test_loss_and_logits_match_transformers(hf_pair):
    kind, hf, ours, tok, image_id, _ = hf_pair
    collate = Stage2TextCollator(ours.llm_tokenizer, ours.config.llm, encoder_decoder=kind == "t5")
    batch = collate(CAPTIONS)
    px = pixels()
    with torch.no_grad():
        out = Stage2Objective(ours)(pixel_values=px, **batch)
        ref = hf(pixel_values=px, **_hf_inputs(kind, batch, image_id))
    assert abs(out.loss.item() - ref.loss.item()) < 1e-5, (out.loss, ref.loss)
    if kind != "t5":
        labels = _hf_inputs(kind, batch, image_id)["labels"]
        ref_logits = ref.logits[:, :-1][labels[:, 1:] != -100]
        assert out.logits.shape == ref_logits.shape and out.logits.shape[0] == (batch["labels"] != -100).sum()
        assert (out.logits - ref_logits).abs().max() < 1e-4
    else:
        assert (out.logits - ref.logits).abs().max() < 1e-4
    assert 1.0 < out.loss.item() < 20


@pytest.mark.parametrize("num_beams", [1, 3])
def test_generation_matches_transformers(hf_pair, num_beams):
    kind, hf, ours, tok, image_id, _ = hf_pair
    px = pixels(seed=1)
    prompt = "a photo of"
    ids = tok([prompt] * 3, return_tensors="pt").input_ids
    ids = torch.cat([torch.full((3, Q), image_id), ids], 1)
    with torch.no_grad():  # no eos given: both stop where the checkpoint says (tests/test_end_of_text.py)
        ref = hf.generate(pixel_values=px, input_ids=ids, attention_mask=torch.ones_like(ids), num_beams=num_beams,
                          max_new_tokens=7, min_new_tokens=0, pad_token_id=tok.pad_token_id, do_sample=False)
    if kind != "t5":
        ref = ref[:, ids.shape[1]:]
    ref_text = [t.strip() for t in tok.batch_decode(ref, skip_special_tokens=True)]
    got = ours.generate(px, prompt, num_beams=num_beams, max_new_tokens=7, min_new_tokens=0)
    assert got == ref_text
    assert any(len(t) > 0 for t in got)


@pytest.mark.parametrize("num_beams", [1, 3])
def test_vocab_head_fast_path_generates_the_same_tokens(hf_pair, num_beams):
    """The CPU decode path of VocabHead (forced on for this tiny vocabulary) changes no token,
    and keeps the head tied / its state-dict keys."""
    from qformer.llm import VocabHead, base_llm, use_vocab_head

    kind, hf, ours, tok, image_id, _ = hf_pair
    fast = copy.deepcopy(ours)
    lm = base_llm(fast.llm)
    keys = set(lm.state_dict())
    assert type(lm.get_output_embeddings()) is torch.nn.Linear  # tiny vocab: left alone by default
    assert use_vocab_head(lm, min_vocab=1)
    head = lm.get_output_embeddings()
    assert isinstance(head, VocabHead) and set(lm.state_dict()) == keys
    if kind in ("opt", "qwen2"):  # tied heads stay tied
        assert head.weight is lm.get_input_embeddings().weight
    calls = []
    head.register_forward_hook(lambda m, i, o: calls.append(i[0].shape))
    px = pixels(seed=1)
    a = ours.generate(px, "a photo of", num_beams=num_beams, max_new_tokens=7, min_new_tokens=3)
    b = fast.generate(px, "a photo of", num_beams=num_beams, max_new_tokens=7, min_new_tokens=3)
    assert a == b and calls
    assert all(s.numel() // s[-1] <= VocabHead.FAST_ROWS for s in map(torch.Size, calls))  # the fast path ran


def test_vocab_head_matches_linear():
    from qformer.llm import VocabHead

    torch.manual_seed(0)
    for bias in (False, True):
        lin = torch.nn.Linear(64, 9000, bias=bias)
        head = VocabHead.from_linear(lin)
        assert head.weight is lin.weight
        for shape in [(1, 64), (8, 1, 64), (5, 7, 64), (300, 64)]:  # 300 rows: nn.Linear's own path
            x = torch.randn(*shape)
            with torch.no_grad():
                got, ref = head(x), lin(x)
            assert got.shape == ref.shape and got.is_contiguous()
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
        x = torch.randn(4, 64, requires_grad=True)  # autograd: exactly nn.Linear
        assert torch.equal(head(x), lin(x))
        head(x).sum().backward()
        assert x.grad is not None


def test_batched_generation_with_different_prompt_lengths_equals_one_by_one(hf_pair):
    """Decoder-only LLMs are left padded for generation; results must not depend on batching."""
    kind, _, ours, *_ = hf_pair
    px = pixels(seed=2)
    prompts = ["a", "Question: what is the man riding? Answer:", "a photo of two"]
    batched = ours.generate(px, prompts, num_beams=2, max_new_tokens=5)
    single = [ours.generate(px[i : i + 1], prompts[i], num_beams=2, max_new_tokens=5)[0] for i in range(3)]
    assert batched == single


def test_generation_options(hf_pair):
    kind, _, ours, *_ = hf_pair
    px = pixels(2, seed=3)
    many = ours.generate(px, "a", num_beams=3, num_captions=3, max_new_tokens=4)
    assert len(many) == 6
    torch.manual_seed(0)
    s1 = ours.generate(px, "a", do_sample=True, top_p=0.9, num_captions=2, max_new_tokens=6)
    torch.manual_seed(0)
    s2 = ours.generate(px, "a", do_sample=True, top_p=0.9, num_captions=2, max_new_tokens=6)
    assert s1 == s2 and len(s1) == 4
    long = ours.generate(px, "a", num_beams=1, max_new_tokens=6, min_new_tokens=6, repetition_penalty=1.5)
    assert all(len(t) > 0 for t in long)
    assert len(ours.caption(px, num_beams=1, max_new_tokens=3)) == 2
    answers = ours.answer(px, ["what is it?", "what colour?"])
    assert len(answers) == 2


def test_export_round_trip(hf_pair, tmp_path):
    """ours -> transformers format -> transformers and ours again: identical outputs."""
    from transformers import Blip2ForConditionalGeneration

    kind, hf, ours, tok, image_id, _ = hf_pair
    ours.export_transformers(tmp_path / "export")
    back_hf = Blip2ForConditionalGeneration.from_pretrained(str(tmp_path / "export")).eval()
    back = Blip2.from_pretrained(tmp_path / "export", llm_dtype="float32").eval()
    collate = Stage2TextCollator(ours.llm_tokenizer, ours.config.llm, encoder_decoder=kind == "t5")
    batch = collate(CAPTIONS)
    px = pixels(seed=4)
    with torch.no_grad():
        a = Stage2Objective(ours)(pixel_values=px, **batch).loss
        b = Stage2Objective(back)(pixel_values=px, **batch).loss
        c = back_hf(pixel_values=px, **_hf_inputs(kind, batch, image_id)).loss
    assert abs(a - b) < 1e-6 and abs(a - c) < 1e-5
    assert ours.generate(px, "a", num_beams=2, max_new_tokens=5) == back.generate(px, "a", num_beams=2, max_new_tokens=5)


def test_to_transformers_holds_the_same_tensors(hf_pair):
    """The in-memory conversion (benchmarks/gpu.py runs both libraries on one set of weights):
    the Q-Former and LLM tensors are shared, not copied, and the loss is transformers' own."""
    from qformer.llm import base_llm
    from qformer.persistence import to_transformers

    kind, _, ours, *_ = hf_pair
    hf, tok = to_transformers(ours)
    assert hf.query_tokens.data_ptr() == ours.query_tokens.data_ptr()
    assert (hf.language_model.get_input_embeddings().weight.data_ptr()
            == base_llm(ours.llm).get_input_embeddings().weight.data_ptr())
    assert tok.convert_tokens_to_ids("<image>") == hf.config.image_token_index
    batch = Stage2TextCollator(ours.llm_tokenizer, ours.config.llm, encoder_decoder=kind == "t5")(CAPTIONS)
    px = pixels(seed=4)
    with torch.no_grad():
        a = Stage2Objective(ours.eval())(pixel_values=px, **batch).loss
        c = hf.eval()(pixel_values=px, **_hf_inputs(kind, batch, hf.config.image_token_index)).loss
    assert abs(a - c) < 1e-5


def test_our_format_round_trip_with_llm(hf_pair, tmp_path):
    kind, _, ours, *_ = hf_pair
    ours.save_pretrained(tmp_path / "m")
    assert (tmp_path / "m" / "llm" / "config.json").is_file()
    back = Blip2.from_pretrained(tmp_path / "m", llm_dtype="float32").eval()
    px = pixels(seed=5)
    assert back.generate(px, "a", max_new_tokens=5) == ours.generate(px, "a", max_new_tokens=5)
    # training checkpoints leave the frozen parts out and find them again through the config
    with pytest.raises(Exception, match="vision.pretrained"):
        ours.save_pretrained(tmp_path / "ckpt", include_frozen=False)


# ---------------------------------------------------------------------------- quantised / LoRA
def _tiny_opt_dir(tmp: Path, seed=0) -> Path:
    from transformers import OPTForCausalLM

    tok = write_causal_tokenizer(tmp / "opt")
    torch.manual_seed(seed)
    m = OPTForCausalLM(_text_config("opt", tok, len(tok) + 8))
    randomize_(m, seed)
    m.save_pretrained(str(tmp / "opt"))
    return tmp / "opt"


def _stage2_model(llm_dir: Path, **llm) -> Blip2:
    cfg = Blip2Config(
        vision=copy.deepcopy(_vision()),
        qformer=QFormerConfig(vocab_size=100, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128,
                              max_position_embeddings=48, encoder_width=48, num_query_tokens=Q, text_input=False),
        stage1_heads=False,
        llm=LLMConfig(path=str(llm_dir), **llm),
    )
    torch.manual_seed(0)
    return Blip2(cfg)


def _vision():
    from qformer import VisionConfig

    return VisionConfig(name="eva_giant_patch14_clip_224", image_size=IMG, feature_layer=-1,
                        model_kwargs=dict(embed_dim=48, depth=2, num_heads=4, patch_size=8, mlp_ratio=2.0))


def _train_step(model: Blip2):
    model.set_stage(2)
    model.train()
    batch = Stage2TextCollator(model.llm_tokenizer, model.config.llm, encoder_decoder=False)(CAPTIONS)
    params = [p for p in model.parameters() if p.requires_grad]
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW(params, lr=1e-3)
    out = Stage2Objective(model)(pixel_values=pixels(), **batch)
    out.loss.backward()
    opt.step()
    changed = {n for n, p in model.named_parameters() if n in before and not torch.equal(before[n], p.detach())}
    return out, changed, before


@pytest.mark.parametrize("quantization", ["8bit", "4bit"])
def test_quantized_llm_loads_and_trains_a_step(tmp_path, quantization):
    pytest.importorskip("bitsandbytes")
    model = _stage2_model(_tiny_opt_dir(tmp_path), quantization=quantization, dtype="float32")
    import bitsandbytes as bnb

    kinds = {type(m) for m in model.llm.modules()}
    assert kinds & {bnb.nn.Linear8bitLt, bnb.nn.Linear4bit}
    out, changed, before = _train_step(model)
    assert torch.isfinite(out.loss)
    assert not any(n.startswith("llm.") for n in before)  # nothing in the frozen LLM trains
    assert "language_projection.weight" in changed and "query_tokens" in changed


def test_lora_trains_only_its_own_parameters(tmp_path):
    model = _stage2_model(_tiny_opt_dir(tmp_path), dtype="float32",
                          lora=dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    out, changed, before = _train_step(model)
    llm_trainable = {n for n in before if n.startswith("llm.")}
    assert llm_trainable and all("lora_" in n for n in llm_trainable)
    assert {n for n in changed if n.startswith("llm.")} == {n for n in llm_trainable if "lora_B" in n} | {
        n for n in llm_trainable if "lora_A" in n}
    # a LoRA model saves and reloads with its adapters
    model.eval()
    model.save_pretrained(tmp_path / "m")
    back = Blip2.from_pretrained(tmp_path / "m").eval()
    px = pixels(seed=6)
    assert back.generate(px, "a", max_new_tokens=4) == model.generate(px, "a", max_new_tokens=4)


def test_every_stage2_trainable_parameter_gets_a_gradient(tmp_path):
    model = _stage2_model(_tiny_opt_dir(tmp_path), dtype="float32")
    model.set_stage(2)
    model.train()
    batch = Stage2TextCollator(model.llm_tokenizer, model.config.llm, encoder_decoder=False)(CAPTIONS)
    Stage2Objective(model)(pixel_values=pixels(), **batch).loss.backward()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(model.get_parameter(n).grad is not None for n in trainable)
    assert all(p.grad is None for n, p in model.named_parameters() if not p.requires_grad)
    assert not model.llm.training and not model.vision.model.training


# ---------------------------------------------------------------------------- text handling
def test_prefix_lm_split_edge_cases(tmp_path):
    g = torch.Generator().manual_seed(0)
    assert split_prefix_lm("cat", g) == ("", "cat")
    assert split_prefix_lm("   ", g) == ("", "")
    seen = set()
    for _ in range(200):
        prefix, suffix = split_prefix_lm("a b c d", g)
        assert suffix and (prefix + " " + suffix).strip() == "a b c d"
        seen.add(prefix)
    assert seen == {"", "a", "a b", "a b c"}
    tok = write_seq2seq_tokenizer(tmp_path / "t5")
    cfg = LLMConfig(hf_config={"model_type": "t5"}, text_mode="prefix_lm", max_txt_len=6)
    collate = Stage2TextCollator(tok, cfg, encoder_decoder=True, generator=torch.Generator().manual_seed(1))
    long = " ".join(["cat"] * 40)
    batch = collate(["dog", long])
    assert batch["input_ids"].shape[1] <= 6 and batch["labels"].shape[1] <= 6  # truncated, both sides
    assert batch["input_ids"][0].tolist()[0] == tok.eos_token_id  # one word: empty prefix
    assert tok.decode(batch["labels"][0][batch["labels"][0] != -100], skip_special_tokens=True).strip() == "dog"
    with pytest.raises(ValueError, match="encoder-decoder"):
        Stage2TextCollator(tok, cfg, encoder_decoder=False)


def test_causal_labels_mask_prompt_and_padding(tmp_path):
    tok = write_causal_tokenizer(tmp_path / "opt")
    cfg = LLMConfig(hf_config={"model_type": "opt"}, prompt="a photo of", max_txt_len=12)
    batch = Stage2TextCollator(tok, cfg, encoder_decoder=False)(["a cat", "two dogs in the snow"])
    ids, labels = batch["input_ids"], batch["labels"]
    prompt_len = len(tok("a photo of").input_ids)
    assert (labels[:, :prompt_len] == -100).all()
    assert tok.decode(labels[0][labels[0] != -100]) == " a cat\n"
    assert (labels[batch["attention_mask"] == 0] == -100).all() and ids[0, 0] == tok.bos_token_id


def test_flan_t5_untied_lm_head_survives_loading(tmp_path):
    """FlanT5 checkpoints hold an lm_head that differs from the input embeddings (and no
    output scaling). transformers 5 configures T5 as tied; both loaders must keep the head."""
    from safetensors.torch import load_file, save_file
    from transformers import Blip2ForConditionalGeneration

    d = tmp_path / "t5"
    make_hf_generation(d, "t5", seed=3)
    sd = load_file(str(d / "model.safetensors"))
    head = torch.randn_like(sd["language_model.shared.weight"]) * 0.05
    sd["language_model.lm_head.weight"] = head
    save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((d / "config.json").read_text())
    cfg["text_config"]["tie_word_embeddings"] = False
    (d / "config.json").write_text(json.dumps(cfg))
    hf = Blip2ForConditionalGeneration.from_pretrained(str(d)).eval()
    ours = Blip2.from_pretrained(d, llm_dtype="float32").eval()
    assert torch.equal(ours.llm.lm_head.weight, head) and ours.llm.lm_head.weight is not ours.llm.shared.weight
    assert torch.equal(hf.language_model.lm_head.weight, head)
    batch = Stage2TextCollator(ours.llm_tokenizer, ours.config.llm, encoder_decoder=True)(CAPTIONS)
    tok = ours.llm_tokenizer
    image_id = tok.convert_tokens_to_ids("<image>")
    with torch.no_grad():
        a = Stage2Objective(ours)(pixel_values=pixels(), **batch).loss
        b = hf(pixel_values=pixels(), **_hf_inputs("t5", batch, image_id)).loss
    assert abs(a.item() - b.item()) < 1e-5

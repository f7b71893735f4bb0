"""The MED (Q-Former stack): parity with transformers' Blip2QFormerModel on the same weights,
decoder-mode semantics, gradient checkpointing, and initialisation from a BERT checkpoint."""

from __future__ import annotations

import pytest
import torch
from conftest import randomize_

from qformer.errors import CheckpointError
from qformer.persistence import load_into
from qformer.config import QFormerConfig
from qformer.persistence import Converted, hf_retrieval_to_ours, ours_to_hf_retrieval
from qformer.med import MED, build_attention_mask

V, D, H, I, C, Q, N = 120, 64, 4, 128, 48, 6, 10


def tiny_config(**kw) -> QFormerConfig:
    base = dict(
        vocab_size=V, hidden_size=D, num_layers=3, num_heads=H, intermediate_size=I,
        max_position_embeddings=40, encoder_width=C, num_query_tokens=Q, cross_attention_freq=2,
    )
    base.update(kw)
    return QFormerConfig(**base)


def hf_pair(cfg: QFormerConfig, seed: int = 0):
    """transformers' Q-Former + text embeddings, random weights, and our MED with the same."""
    from transformers import Blip2QFormerConfig
    from transformers.models.blip_2.modeling_blip_2 import Blip2QFormerModel, Blip2TextEmbeddings

    hf_cfg = Blip2QFormerConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, intermediate_size=cfg.intermediate_size,
        max_position_embeddings=cfg.max_position_embeddings, cross_attention_frequency=cfg.cross_attention_freq,
        encoder_hidden_size=cfg.encoder_width, use_qformer_text_input=True, pad_token_id=0,
    )
    hf_cfg._attn_implementation = "eager"
    qf, emb = Blip2QFormerModel(hf_cfg).eval(), Blip2TextEmbeddings(hf_cfg).eval()
    randomize_(qf, seed)
    randomize_(emb, seed + 1)
    sd = {"qformer." + k: v for k, v in qf.state_dict().items()}
    sd.update({"embeddings." + k: v for k, v in emb.state_dict().items()})
    conv = hf_retrieval_to_ours(sd)
    ours = MED(cfg).eval()
    inner = Converted(
        state_dict={k[len("qformer."):]: v for k, v in conv.state_dict.items()}, dropped=conv.dropped,
        unrecognised=conv.unrecognised,
    )
    report = load_into(ours, inner, source="hf", fresh_ok={"lm_head.": "no LM head in transformers"})
    assert not report.missing and not report.unexpected
    return qf, emb, ours


def inputs(seed=0, b=3, length=9):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, V, (b, length), generator=g)
    ids[:, 0] = 2
    mask = torch.ones(b, length, dtype=torch.long)
    mask[1, 6:] = 0
    mask[2, 3:] = 0
    ids[mask == 0] = 0
    queries = torch.randn(b, Q, D, generator=g)
    image = torch.randn(b, N, C, generator=g)
    return ids, mask, queries, image


@pytest.mark.parametrize("freq", [1, 2])
def test_parity_with_transformers_qformer_all_encoder_modes(freq):
    cfg = tiny_config(cross_attention_freq=freq)
    qf, emb, ours = hf_pair(cfg, seed=freq)
    ids, mask, queries, image = inputs()
    with torch.no_grad():
        kv = ours.image_kv(image)
        # query-only pass
        ref = qf(query_embeds=queries, encoder_hidden_states=image).last_hidden_state
        got = ours(query_embeds=queries, image_kv=kv).hidden
        assert (ref - got).abs().max() < 1e-5
        # image-grounded encoder ([queries ; text], bidirectional)
        full_mask = torch.cat([torch.ones(3, Q, dtype=torch.long), mask], 1)
        ref = qf(query_embeds=emb(input_ids=ids, query_embeds=queries), query_length=Q,
                 attention_mask=full_mask, encoder_hidden_states=image).last_hidden_state
        got = ours(input_ids=ids, query_embeds=queries, attention_mask=full_mask, image_kv=kv).hidden
        real = full_mask.bool()
        assert (ref - got)[real].abs().max() < 1e-5
        # unimodal text encoder
        ref = qf(query_embeds=emb(input_ids=ids), query_length=0, attention_mask=mask).last_hidden_state
        got = ours(input_ids=ids, attention_mask=mask).hidden
        assert (ref - got)[mask.bool()].abs().max() < 1e-5
        # the outputs really depend on the image and on the text
        other = ours(query_embeds=queries, image_kv=ours.image_kv(image.flip(0))).hidden
        assert (other - ours(query_embeds=queries, image_kv=kv).hidden).abs().max() > 1e-2


def test_conversion_round_trip_to_transformers_names():
    cfg = tiny_config()
    _, _, ours = hf_pair(cfg)
    sd = {"qformer." + k: v for k, v in ours.state_dict().items()}
    back = hf_retrieval_to_ours(ours_to_hf_retrieval(sd))
    assert not back.unrecognised
    assert set(back.state_dict) == {k for k in sd if not k.startswith("qformer.lm_head.")}
    assert all(torch.equal(back.state_dict[k], sd[k]) for k in back.state_dict)


def test_decoder_with_past_query_kv_equals_single_causal_pass():
    """ITG reuses the queries' K/V from the query-only pass; that must equal one causal pass
    over [queries ; text] (queries see only queries, text sees queries + earlier text)."""
    cfg = tiny_config()
    ours = MED(cfg).eval()
    randomize_(ours, 3)
    ids, mask, queries, image = inputs(1)
    kv = ours.image_kv(image)
    qmask = torch.cat([torch.ones(3, Q, dtype=torch.long), mask], 1)
    with torch.no_grad():
        past = ours(query_embeds=queries, image_kv=kv, return_kv=True)
        dec = ours(input_ids=ids, attention_mask=qmask, causal=True, past_kv=past.kv, num_past_queries=Q).hidden
        joint = ours(input_ids=ids, query_embeds=queries, attention_mask=qmask, image_kv=kv, causal=True).hidden
    assert (joint[:, :Q] - past.hidden).abs().max() < 1e-5  # queries never see text
    assert ((joint[:, Q:] - dec)[mask.bool()]).abs().max() < 1e-5


def test_decoder_is_causal_and_incremental_decoding_matches():
    cfg = tiny_config()
    ours = MED(cfg).eval()
    randomize_(ours, 4)
    ids, _, queries, image = inputs(2)
    kv = ours.image_kv(image)
    with torch.no_grad():
        past = ours(query_embeds=queries, image_kv=kv, return_kv=True)
        full = ours(input_ids=ids, causal=True, past_kv=past.kv, num_past_queries=Q).hidden
        changed = ids.clone()
        changed[:, 5:] = 7
        part = ours(input_ids=changed, causal=True, past_kv=past.kv, num_past_queries=Q).hidden
        assert (full[:, :5] - part[:, :5]).abs().max() < 1e-6  # the future does not leak back
        assert (full[:, 5:] - part[:, 5:]).abs().max() > 1e-3
        # token-by-token with a growing cache gives the same states
        cache, steps = past.kv, []
        for t in range(ids.shape[1]):
            out = ours(input_ids=ids[:, t : t + 1], causal=True, past_kv=cache, num_past_queries=Q, return_kv=True)
            cache, steps = out.kv, steps + [out.hidden]
        assert (torch.cat(steps, 1) - full).abs().max() < 1e-5


def test_attention_mask_layouts():
    m = build_attention_mask(batch_size=1, num_past_queries=0, num_past_text=0, num_queries=2, num_text=3,
                             key_padding=None, causal=True, device=torch.device("cpu"))
    expected = torch.tensor([
        [1, 1, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0],
        [1, 1, 1, 1, 0],
        [1, 1, 1, 1, 1],
    ], dtype=torch.bool)
    assert torch.equal(m[0, 0], expected)
    pad = torch.tensor([[1, 1, 1, 1, 0]])
    m = build_attention_mask(batch_size=1, num_past_queries=0, num_past_text=0, num_queries=2, num_text=3,
                             key_padding=pad, causal=False, device=torch.device("cpu"))
    assert m.shape == (1, 1, 1, 5) and m[0, 0, 0].tolist() == [True, True, True, True, False]
    with pytest.raises(ValueError, match="cover every key"):
        build_attention_mask(batch_size=1, num_past_queries=0, num_past_text=0, num_queries=2, num_text=3,
                             key_padding=pad[:, :4], causal=False, device=torch.device("cpu"))


def test_gradient_checkpointing_same_outputs_and_grads():
    cfg = tiny_config(hidden_dropout=0.0, attention_dropout=0.0)
    a = MED(cfg).train()
    randomize_(a, 5)
    b = MED(cfg).train()
    b.load_state_dict(a.state_dict())
    b.set_gradient_checkpointing(True)
    ids, mask, queries, image = inputs(3)
    full_mask = torch.cat([torch.ones(3, Q, dtype=torch.long), mask], 1)
    outs = []
    for m in (a, b):
        h = m(input_ids=ids, query_embeds=queries, attention_mask=full_mask, image_kv=m.image_kv(image)).hidden
        (h * torch.linspace(-1, 1, D)).sum().backward()
        outs.append((h.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}))
    assert torch.allclose(outs[0][0], outs[1][0], atol=1e-6)
    assert outs[0][1].keys() == outs[1][1].keys()
    for k in outs[0][1]:
        assert torch.allclose(outs[0][1][k], outs[1][1][k], atol=1e-5), k


@pytest.mark.parametrize("checkpointing", [False, True])
def test_output_rows_equal_the_full_pass_rows_with_gradients(checkpointing):
    """output_rows (ITM: the queries; ITC: [CLS]) gives the full pass's first rows, and the
    same gradients as a loss on those rows of the full pass -- in every mode."""
    cfg = tiny_config(hidden_dropout=0.0, attention_dropout=0.0)
    ours = MED(cfg).train()
    randomize_(ours, 7)
    ours.set_gradient_checkpointing(checkpointing)
    ids, mask, queries, image = inputs(5)
    qmask = torch.cat([torch.ones(3, Q, dtype=torch.long), mask], 1)
    cases = {
        "itm: queries of [queries ; text]": (dict(input_ids=ids, query_embeds=queries, attention_mask=qmask), Q),
        "itc: [CLS] of text": (dict(input_ids=ids, attention_mask=mask), 1),
        "some text rows too": (dict(input_ids=ids, query_embeds=queries, attention_mask=qmask), Q + 4),
        "causal": (dict(input_ids=ids, query_embeds=queries, attention_mask=qmask, causal=True), Q + 2),
        "query-only": (dict(query_embeds=queries), 2),
    }
    for name, (kw, rows) in cases.items():
        grads = []
        for output_rows in (None, rows):
            ours.zero_grad()
            if "query_embeds" in kw:
                kw["image_kv"] = ours.image_kv(image)
            h = ours(**kw, output_rows=output_rows).hidden[:, :rows]  # the full pass: its first rows
            assert h.shape[1] == rows, name
            (h * torch.linspace(-1, 1, D)).sum().backward()
            grads.append((h.detach(), {n: p.grad.clone() for n, p in ours.named_parameters() if p.grad is not None}))
        (h0, g0), (h1, g1) = grads
        torch.testing.assert_close(h1, h0, rtol=0, atol=1e-6, msg=lambda m: f"{name}: {m}")
        assert set(g1) <= set(g0), name
        for k in g0:  # parameters the kept rows never reach get no gradient (the full pass: zeros)
            torch.testing.assert_close(g1.get(k, torch.zeros_like(g0[k])), g0[k], rtol=1e-5, atol=5e-5,
                                       msg=lambda m: f"{name}: {k}: {m}")
    with pytest.raises(ValueError, match="output_rows"):
        ours(input_ids=ids, attention_mask=mask, output_rows=ids.shape[1] + 1)


def test_dropout_is_active_in_training_and_off_in_eval():
    cfg = tiny_config()
    m = MED(cfg)
    ids, mask, _, _ = inputs(4)
    m.train()
    a = m(input_ids=ids, attention_mask=mask).hidden
    b = m(input_ids=ids, attention_mask=mask).hidden
    assert (a - b).abs().max() > 1e-3
    m.eval()
    assert torch.equal(m(input_ids=ids, attention_mask=mask).hidden, m(input_ids=ids, attention_mask=mask).hidden)


def test_too_long_text_is_a_clear_error():
    m = MED(tiny_config(max_position_embeddings=8)).eval()
    with pytest.raises(ValueError, match="max_position_embeddings"):
        m(input_ids=torch.ones(1, 9, dtype=torch.long))


def _save_tiny_bert(path, vocab=V - 1, lm=True):
    from transformers import BertConfig, BertForPreTraining, BertModel

    cfg = BertConfig(vocab_size=vocab, hidden_size=D, num_hidden_layers=3, num_attention_heads=H,
                     intermediate_size=I, max_position_embeddings=40)
    torch.manual_seed(0)
    model = BertForPreTraining(cfg) if lm else BertModel(cfg)
    randomize_(model, 11)
    if lm:
        model.tie_weights()
    model.save_pretrained(str(path))
    return model


def test_init_from_bert_checkpoint(tmp_path):
    """BLIP-2 initialises the Q-Former from bert-base-uncased (here a tiny local BERT): all
    BERT weights copied, the text FFN copied into the query FFN, the grown vocabulary row
    ([DEC]) and the cross-attention left fresh, the unused parts reported."""
    from qformer.persistence import init_qformer_from_bert
    from qformer.config import Blip2Config, VisionConfig

    bert = _save_tiny_bert(tmp_path / "bert")
    from qformer import Blip2

    cfg = Blip2Config(
        vision=VisionConfig(name="vit_base_patch16_224", model_kwargs=dict(embed_dim=C, depth=1, num_heads=4, patch_size=8),
                            image_size=16, feature_layer=-1),
        qformer=tiny_config(),
    )
    model = Blip2(cfg)
    fresh_dec_row = model.qformer.embeddings.word_embeddings.weight[V - 1].clone()
    report = init_qformer_from_bert(model, tmp_path / "bert")
    med, bsd = model.qformer, bert.state_dict()
    assert torch.equal(med.embeddings.word_embeddings.weight[: V - 1], bsd["bert.embeddings.word_embeddings.weight"])
    assert torch.equal(med.embeddings.word_embeddings.weight[V - 1], fresh_dec_row)
    for i in range(3):
        layer = med.layers[i]
        assert torch.equal(layer.self_attn.query.weight, bsd[f"bert.encoder.layer.{i}.attention.self.query.weight"])
        assert torch.equal(layer.ffn.fc1.weight, bsd[f"bert.encoder.layer.{i}.intermediate.dense.weight"])
        assert torch.equal(layer.ffn_query.fc1.weight, layer.ffn.fc1.weight)
        assert torch.equal(layer.ffn_query.layer_norm.bias, bsd[f"bert.encoder.layer.{i}.output.LayerNorm.bias"])
    assert torch.equal(med.lm_head.dense.weight, bsd["cls.predictions.transform.dense.weight"])
    assert torch.equal(med.lm_head.bias[: V - 1], bsd["cls.predictions.bias"])
    assert set(report.initialized) == {k for k in med.state_dict() if ".cross_attn." in k}
    assert any("token_type" in k for k in report.dropped) and any("pooler" in k for k in report.dropped)
    assert not report.missing and not report.unexpected


def test_init_from_bert_without_lm_head_is_strict(tmp_path):
    from qformer.persistence import init_qformer_from_bert
    from qformer.config import Blip2Config, VisionConfig
    from qformer import Blip2

    _save_tiny_bert(tmp_path / "bert", lm=False)
    cfg = Blip2Config(
        vision=VisionConfig(name="vit_base_patch16_224", model_kwargs=dict(embed_dim=C, depth=1, num_heads=4, patch_size=8),
                            image_size=16, feature_layer=-1),
        qformer=tiny_config(),
    )
    model = Blip2(cfg)
    with pytest.raises(CheckpointError, match="lm_head"):
        init_qformer_from_bert(model, tmp_path / "bert")
    report = init_qformer_from_bert(model, tmp_path / "bert", strict=False)
    assert {k for k in report.missing} == {"lm_head.dense.weight", "lm_head.dense.bias", "lm_head.layer_norm.weight",
                                           "lm_head.layer_norm.bias", "lm_head.bias"}

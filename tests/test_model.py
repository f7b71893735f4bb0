"""The Blip2 model: parity with transformers' Blip2ForImageTextRetrieval, the public API,
persistence (our format, transformers, LAVIS .pth), strict and safe loading, gradients."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from conftest import randomize_, write_bert_tokenizer
from PIL import Image

from qformer.testing import save_random_hf
from qformer import Blip2, Blip2Config, CheckpointError, QFormerConfig, Stage1Objective, UnsafeCheckpointError, VisionConfig
from qformer.persistence import ours_to_lavis

IMG = 32


def tiny_config(vocab: int, **qformer) -> Blip2Config:
    q = dict(vocab_size=vocab, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128,
             max_position_embeddings=48, encoder_width=48, num_query_tokens=8)
    q.update(qformer)
    return Blip2Config(
        vision=VisionConfig(backend="timm", name="eva_giant_patch14_clip_224",
                            model_kwargs=dict(embed_dim=48, depth=3, num_heads=4, patch_size=8, mlp_ratio=2.0),
                            image_size=IMG, feature_layer=-2),
        qformer=QFormerConfig(**q),
        embed_dim=32,
        max_txt_len=16,
    )


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return write_bert_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def model(tok):
    torch.manual_seed(0)
    m = Blip2(tiny_config(len(tok)), tokenizer=tok)
    randomize_(m, 0)
    return m.eval()


CAPTIONS = ["a red circle left of a blue square", "two dogs playing in the snow", "a cat", "a man riding a bus"]


def pixels(n=4, seed=0):
    return torch.randn(n, 3, IMG, IMG, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------- transformers parity
def _hf_retrieval(tmp: Path, tok, *, seed=0, image_token_index=None):
    from transformers import Blip2Config as HFBlip2Config
    from transformers import Blip2ForImageTextRetrieval

    cfg = HFBlip2Config(
        vision_config=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                           image_size=IMG, patch_size=8, qkv_bias=True),
        qformer_config=dict(vocab_size=len(tok), hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                            intermediate_size=128, max_position_embeddings=48, encoder_hidden_size=48,
                            use_qformer_text_input=True, cross_attention_frequency=2),
        num_query_tokens=8,
        image_text_hidden_size=32,
        image_token_index=image_token_index,
    )
    return save_random_hf(Blip2ForImageTextRetrieval, cfg, tmp, tok, seed=seed)


def test_parity_with_transformers_retrieval_model(tmp_path, tok):
    hf = _hf_retrieval(tmp_path, tok)
    ours, report = Blip2.from_pretrained(tmp_path, return_report=True)
    ours.eval()
    assert report.ok and set(report.initialized) == {"temp"} | {k for k in ours.state_dict() if "lm_head" in k}
    px = pixels(4)
    enc = tok(CAPTIONS, padding=True, return_tensors="pt")
    with torch.no_grad():
        ref_itm = hf(pixel_values=px, input_ids=enc.input_ids, attention_mask=enc.attention_mask,
                     use_image_text_matching_head=True).logits_per_image  # (4, 2), pairs
        ref_itc = hf(pixel_values=px, input_ids=enc.input_ids, attention_mask=enc.attention_mask).logits_per_image
        # our feature path
        embeds = ours.embed_image(px)
        ours_itm = ours.itm_logits(enc.input_ids, enc.attention_mask, ours.qformer.image_kv(embeds))
        # the public API on raw tensors and strings
        api_itc = ours.similarity(px, CAPTIONS)
        api_itm = ours.itm(px, CAPTIONS)
    assert (ours_itm - ref_itm).abs().max() < 1e-5
    assert (api_itc - ref_itc).abs().max() < 1e-5
    assert (api_itm - ref_itm.softmax(-1)[:, 1]).abs().max() < 1e-5
    # sanity: the scores vary across pairs (not a degenerate model)
    assert ref_itc.std() > 1e-3 and ref_itm.softmax(-1)[:, 1].std() > 1e-4
    # query outputs equal transformers' Q-Former on its own vision features
    with torch.no_grad():
        image_embeds = hf.vision_model(pixel_values=px).last_hidden_state
        q = hf.qformer(query_embeds=hf.query_tokens.expand(4, -1, -1), encoder_hidden_states=image_embeds).last_hidden_state
        assert (ours.encode_image(embeds).query_output - q).abs().max() < 1e-5
        assert (embeds - image_embeds).abs().max() < 1e-5


def test_parity_with_transformers_retrieval_model_with_image_tokens(tmp_path, tok):
    """transformers 5.x expects num_query_tokens placeholders when image_token_index is set."""
    tok2 = write_bert_tokenizer(tmp_path / "tok")
    tok2.add_special_tokens({"additional_special_tokens": ["<image>"]})
    image_token = tok2.convert_tokens_to_ids("<image>")
    hf = _hf_retrieval(tmp_path / "hf", tok2, seed=1, image_token_index=image_token)
    ours = Blip2.from_pretrained(tmp_path / "hf").eval()
    px = pixels(2, seed=1)
    enc = tok2(CAPTIONS[:2], padding=True, return_tensors="pt")
    ids = torch.cat([torch.full((2, 8), image_token), enc.input_ids], 1)
    am = torch.cat([torch.ones(2, 8, dtype=torch.long), enc.attention_mask], 1)
    with torch.no_grad():
        ref = hf(pixel_values=px, input_ids=ids, attention_mask=am).logits_per_image
        ref_itm = hf(pixel_values=px, input_ids=ids, attention_mask=am, use_image_text_matching_head=True).logits_per_image
    assert (ours.similarity(px, CAPTIONS[:2]) - ref).abs().max() < 1e-5
    assert (ours.itm(px, CAPTIONS[:2]) - ref_itm.softmax(-1)[:, 1]).abs().max() < 1e-5


# ---------------------------------------------------------------------------- API
def test_api_accepts_pil_images_and_paths(tmp_path, model):
    imgs = []
    for i, colour in enumerate(["red", "blue"]):
        im = Image.new("RGB", (40, 30), colour)
        im.save(tmp_path / f"{i}.png")
        imgs.append(im)
    paths = [tmp_path / "0.png", str(tmp_path / "1.png")]
    a = model.similarity(imgs, CAPTIONS)
    b = model.similarity(paths, CAPTIONS)
    c = model.similarity(model.vision.preprocess(imgs), CAPTIONS)
    assert a.shape == (2, 4) and torch.equal(a, b) and torch.equal(a, c)
    # one image against several texts, and one text against several images
    p1 = model.itm(imgs[0], CAPTIONS)
    p2 = model.itm([imgs[0]] * 4, CAPTIONS)
    assert p1.shape == (4,) and torch.allclose(p1, p2, atol=1e-6)
    assert torch.allclose(model.itm(imgs, CAPTIONS[1]), model.itm(imgs, [CAPTIONS[1]] * 2), atol=1e-6)
    assert ((p1 > 0) & (p1 < 1)).all()
    with pytest.raises(ValueError, match="2 images and 4 texts"):
        model.itm(imgs, CAPTIONS)
    # batching does not change results
    assert torch.allclose(model.similarity(imgs, CAPTIONS, batch_size=1), a, atol=1e-6)


def test_similarity_is_cosine_max_over_queries(model):
    px = pixels(3, seed=2)
    img = model.image_features_of(px)  # (3, Q, E)
    txt = model.text_features_of(CAPTIONS)  # (4, E)
    assert torch.allclose(img.norm(dim=-1), torch.ones(3, 8), atol=1e-5)
    s = model.similarity(px, CAPTIONS)
    manual = torch.stack([torch.stack([(img[i] @ txt[j]).max() for j in range(4)]) for i in range(3)])
    assert torch.allclose(s, manual, atol=1e-6) and s.abs().max() <= 1 + 1e-6


# ---------------------------------------------------------------------------- persistence
def test_save_and_load_round_trip(tmp_path, model):
    model.save_pretrained(tmp_path / "m")
    files = sorted(p.name for p in (tmp_path / "m").iterdir())
    assert "model.safetensors" in files and "config.json" in files and "tokenizer.json" in files
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left behind
    loaded = Blip2.from_pretrained(tmp_path / "m").eval()
    assert loaded.config == model.config
    px = pixels(2, seed=3)
    assert torch.equal(loaded.similarity(px, CAPTIONS), model.similarity(px, CAPTIONS))
    assert torch.equal(loaded.itm(px, CAPTIONS[:2]), model.itm(px, CAPTIONS[:2]))
    # saving again over an existing directory replaces it atomically
    model.save_pretrained(tmp_path / "m")
    assert Blip2.from_pretrained(tmp_path / "m").config == model.config


def test_strict_loading_names_missing_and_unexpected_keys(tmp_path, model):
    from safetensors.torch import load_file, save_file

    model.save_pretrained(tmp_path / "m")
    sd = load_file(str(tmp_path / "m" / "model.safetensors"))
    sd.pop("itm_head.bias")
    sd["extra.weight"] = torch.zeros(1)
    save_file(sd, str(tmp_path / "m" / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing \(1\): itm_head.bias") as err:
        Blip2.from_pretrained(tmp_path / "m")
    assert "unexpected (1): extra.weight" in str(err.value)
    loaded, report = Blip2.from_pretrained(tmp_path / "m", strict=False, return_report=True)
    assert report.missing == ["itm_head.bias"] and report.unexpected == ["extra.weight"]
    # a shape that does not fit the config is refused before anything is copied
    sd = load_file(str(tmp_path / "m" / "model.safetensors"))
    sd["query_tokens"] = torch.zeros(1, 9, 64)
    save_file(sd, str(tmp_path / "m" / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"query_tokens: file \(1, 9, 64\) vs model \(1, 8, 64\)"):
        Blip2.from_pretrained(tmp_path / "m", strict=False)


def test_malicious_pickle_is_refused_and_never_runs(tmp_path, model):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            import os

            return (os.system, (f"touch {marker}",))

    bad = tmp_path / "blip2_pretrained.pth"
    with open(bad, "wb") as f:
        torch.save({"model": {"query_tokens": torch.zeros(1)}, "payload": Evil()}, f)
    with pytest.raises(UnsafeCheckpointError, match="blip2_pretrained.pth"):
        Blip2.from_pretrained(bad, config=model.config)
    assert not marker.exists()
    # plain pickle files too (not zip): still refused
    raw = tmp_path / "raw.pth"
    raw.write_bytes(pickle.dumps(Evil()))
    with pytest.raises((UnsafeCheckpointError, CheckpointError)):
        Blip2.from_pretrained(raw, config=model.config)
    assert not marker.exists()


def test_lavis_pth_round_trip(tmp_path, model, tok):
    """A LAVIS-layout .pth (as blip2_pretrained.pth: trainable tensors only, no ViT) loads
    when the config says where the frozen tower comes from, and is refused otherwise."""
    sd = {k: v for k, v in ours_to_lavis(model.state_dict(), vision_prefix="vision.model.").items()
          if not k.startswith("visual_encoder.")}
    torch.save({"model": sd}, tmp_path / "blip2_pretrained.pth")
    tower = tmp_path / "tower.safetensors"
    from safetensors.torch import save_file

    save_file({k[len("vision.model."):]: v.contiguous() for k, v in model.state_dict().items()
               if k.startswith("vision.model.")}, str(tower))
    cfg = Blip2Config.from_dict(model.config.to_dict())
    with pytest.raises(CheckpointError, match="missing.*vision.model"):
        Blip2.from_pretrained(tmp_path / "blip2_pretrained.pth", config=cfg, tokenizer=tok)
    cfg.vision.pretrained = str(tower)
    loaded, report = Blip2.from_pretrained(tmp_path / "blip2_pretrained.pth", config=cfg, tokenizer=tok,
                                           return_report=True)
    assert report.ok and all(k.startswith("vision.model.") for k in report.initialized)
    px = pixels(2, seed=4)
    assert torch.allclose(loaded.eval().similarity(px, CAPTIONS), model.similarity(px, CAPTIONS), atol=1e-6)
    with pytest.raises(CheckpointError, match="carries no architecture"):
        Blip2.from_pretrained(tmp_path / "blip2_pretrained.pth")


def test_errors_name_the_problem(tmp_path, tok):
    with pytest.raises(CheckpointError, match="no config.json"):
        Blip2.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(CheckpointError, match="model_type='bert'"):
        Blip2.from_pretrained(tmp_path)
    with pytest.raises(Exception, match="encoder_width=64"):
        Blip2(tiny_config(len(tok), encoder_width=64))


# ---------------------------------------------------------------------------- training
def _batch(tok, n=4, seed=0):
    enc = tok(CAPTIONS[:n], padding="longest", truncation=True, max_length=16, return_tensors="pt")
    return dict(pixel_values=pixels(n, seed), input_ids=enc.input_ids, attention_mask=enc.attention_mask)


def test_every_trainable_parameter_gets_a_gradient_and_frozen_ones_none(tok):
    torch.manual_seed(1)
    m = Blip2(tiny_config(len(tok)), tokenizer=tok)
    randomize_(m, 1)
    m.train()
    assert not m.vision.model.training  # frozen tower stays in eval
    out = Stage1Objective(m)(**_batch(tok), generator=torch.Generator().manual_seed(0))
    out.loss.backward()
    frozen = [n for n, p in m.named_parameters() if n.startswith("vision.")]
    assert frozen and all(not p.requires_grad and p.grad is None for n, p in m.named_parameters() if n in frozen)
    trainable = [(n, p) for n, p in m.named_parameters() if p.requires_grad]
    no_grad = [n for n, p in trainable if p.grad is None or p.grad.abs().sum() == 0]
    assert no_grad == [], no_grad
    assert {n.split(".")[0] for n, _ in trainable} == {"ln_vision", "query_tokens", "qformer", "vision_proj",
                                                        "text_proj", "itm_head", "temp"}


def test_batch_size_one_and_image_ids(tok):
    torch.manual_seed(2)
    m = Blip2(tiny_config(len(tok)), tokenizer=tok)
    out = Stage1Objective(m)(**_batch(tok, n=1))
    assert torch.isfinite(out.loss) and out.itm_logits.shape == (3, 2)
    out.loss.backward()
    b = _batch(tok, n=4)
    ids = torch.tensor([0, 0, 1, 1])
    out = Stage1Objective(m)(**b, image_ids=ids)
    assert (ids[out.neg_image_idx] != ids).all() and (ids[out.neg_text_idx] != ids).all()


def test_stage1_loss_is_sane_and_decreases(tok):
    """A few AdamW steps on a fixed batch must drive all three losses down."""
    torch.manual_seed(3)
    m = Blip2(tiny_config(len(tok), hidden_dropout=0.0, attention_dropout=0.0), tokenizer=tok)
    randomize_(m.vision, 3)  # a default-initialised random ViT barely tells images apart
    obj = Stage1Objective(m)
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3)
    batch = _batch(tok)
    first = None
    for step in range(40):
        out = obj(**batch, generator=torch.Generator().manual_seed(step))
        if first is None:
            first = out.metrics()
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    last = out.metrics()
    # at init ITC is near log(B) (smoothed), ITM near CE of 1/3 positives, ITG near log(V)
    assert abs(first["loss_itc"] - torch.log(torch.tensor(4.0)).item()) < 0.3
    assert abs(first["loss_itg"] - torch.log(torch.tensor(float(len(tok)))).item()) < 1.0
    assert last["loss_itc"] < first["loss_itc"] - 0.3
    assert last["loss_itg"] < first["loss_itg"] - 1.0
    assert last["loss_itm"] < first["loss_itm"]


def test_loss_weights_scale_each_loss_and_default_is_the_plain_sum(tok):
    torch.manual_seed(3)
    m = Blip2(tiny_config(len(tok)), tokenizer=tok)
    randomize_(m, 3)
    m.eval()  # no dropout: the two runs must see the same network
    b, neg = _batch(tok), (torch.tensor([1, 2, 3, 0]), torch.tensor([3, 0, 1, 2]))
    plain = Stage1Objective(m)(**b, negatives=neg)
    assert plain.loss.item() == (plain.loss_itc + plain.loss_itm + plain.loss_itg).item()
    weighted = Stage1Objective(m, itc_weight=2.0, itm_weight=0.5, itg_weight=0.0)(**b, negatives=neg)
    # the reported losses are the unweighted ones, identical to the plain run
    for name in ("loss_itc", "loss_itm", "loss_itg"):
        assert getattr(weighted, name).item() == getattr(plain, name).item()
    expected = 2.0 * plain.loss_itc + 0.5 * plain.loss_itm
    assert abs(weighted.loss.item() - expected.item()) < 1e-6
    weighted.loss.backward()  # ITG weight 0: the LM head gets no gradient from the loss
    bias_grad = m.qformer.lm_head.bias.grad  # the LM head's bias is used by ITG only
    assert bias_grad is not None and bias_grad.abs().max().item() == 0.0
    with pytest.raises(ValueError, match="loss weights"):
        Stage1Objective(m, itm_weight=-1.0)


def test_loss_ramp_is_a_pure_function_of_the_step(tok):
    from qformer.stage1 import stage1_loss_weights

    assert stage1_loss_weights(0) == stage1_loss_weights(10**6) == (1.0, 1.0, 1.0)  # BLIP-2: constant
    assert stage1_loss_weights(0, ramp_steps=100) == (1.0, 0.0, 0.0)
    assert stage1_loss_weights(25, itm=2.0, ramp_steps=100) == (1.0, 0.5, 0.25)
    assert stage1_loss_weights(100, itg=0.5, ramp_steps=100) == stage1_loss_weights(500, itg=0.5, ramp_steps=100)
    with pytest.raises(ValueError):
        stage1_loss_weights(0, ramp_steps=-1)
    # per-call weights override the constructor's
    torch.manual_seed(4)
    m = Blip2(tiny_config(len(tok)), tokenizer=tok).eval()
    b, neg = _batch(tok), (torch.tensor([1, 2, 3, 0]), torch.tensor([3, 0, 1, 2]))
    out = Stage1Objective(m)(**b, negatives=neg, loss_weights=stage1_loss_weights(0, ramp_steps=10))
    assert out.loss.item() == pytest.approx(out.loss_itc.item(), abs=1e-7)

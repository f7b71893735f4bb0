"""Attention maps and Grad-CAM (qformer.explain, qformer.figures, recipes/visualize.py): the
explicit attention path against SDPA, the maps and Grad-CAM against naive re-implementations
(ALBEF's save-the-attention-and-its-gradient way), timm and transformers towers with grids of
several sizes and 0 / 1 / 5 prefix tokens, and a constructed model whose only object sits in a
corner: Grad-CAM of its caption must put most of its mass on that corner's patch."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, randomize_
from PIL import Image

from qformer import Blip2, Blip2Config, QFormerConfig, VisionConfig
from qformer.errors import ConfigError
from qformer.explain import attention_maps, gradcam
from qformer.med import MEDAttention
from qformer.testing import write_bert_tokenizer

sys.path.insert(0, str(REPO / "recipes"))
import visualize  # noqa: E402
from corner_model import COLORS, GRID, corner_model, save_scene, scene  # noqa: E402


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return write_bert_tokenizer(tmp_path_factory.mktemp("tok"))


def tiny(tok, vision: VisionConfig, *, layers=3, freq=2, queries=6, seed=0) -> Blip2:
    width = 48
    cfg = Blip2Config(vision=vision,
                      qformer=QFormerConfig(vocab_size=len(tok), hidden_size=64, num_layers=layers, num_heads=4,
                                            intermediate_size=128, max_position_embeddings=48, encoder_width=width,
                                            num_query_tokens=queries, cross_attention_freq=freq),
                      embed_dim=32, max_txt_len=16)
    torch.manual_seed(seed)
    model = Blip2(cfg, tokenizer=tok)
    randomize_(model, seed)
    return model.eval()


def timm_vision(size=32, patch=8, **extra) -> VisionConfig:
    return VisionConfig(backend="timm", name="vit_tiny_patch16_224", image_size=size, feature_layer=-1,
                        model_kwargs=dict(embed_dim=48, depth=2, num_heads=4, patch_size=patch, mlp_ratio=2.0, **extra))


def hf_vision(name: str, size: int, patch: int) -> VisionConfig:
    return VisionConfig(backend="hf", name=name, image_size=size, feature_layer=-1,
                        model_kwargs=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                                          num_attention_heads=4, patch_size=patch))


TEXTS = ["a red dog on the grass", "two cats", "a man riding a bus in the city"]


# ---------------------------------------------------------------------------- the explicit path
def test_explicit_attention_matches_sdpa_and_records_probabilities():
    torch.manual_seed(0)
    attn = MEDAttention(hidden_size=32, num_heads=4, kv_width=24, attention_dropout=0.0, hidden_dropout=0.0,
                        layer_norm_eps=1e-12).eval()
    randomize_(attn, 1)
    x, img = torch.randn(3, 5, 32), torch.randn(3, 7, 24)
    kv = attn.project_kv(img)
    mask = torch.rand(3, 1, 5, 7) > 0.4
    mask[..., 0] = True  # every row sees a key
    for m in (None, mask):
        fast = attn(x, kv, m)
        seen = []
        attn.probs_hook = lambda p: seen.append(p) or p
        slow = attn(x, kv, m)
        attn.probs_hook = None
        assert (fast - slow).abs().max() < 1e-5
        (probs,) = seen
        assert probs.shape == (3, 4, 5, 7)
        assert torch.allclose(probs.sum(-1), torch.ones(3, 4, 5), atol=1e-6)
        if m is not None:
            assert probs.masked_select(~m.expand_as(probs)).abs().max() == 0


# ---------------------------------------------------------------------------- naive references
def naive_query_maps(model: Blip2, pixels: torch.Tensor) -> torch.Tensor:
    """(B, L, Q, N): softmax(QK^T / sqrt(d)) by hand from each cross-attention's input, the
    default (SDPA) forward left as it is."""
    inputs = {}
    handles = [model.qformer.layers[i].cross_attn.register_forward_pre_hook(
        lambda mod, args, i=i: inputs.__setitem__(i, (args[0], args[1]))) for i in model.qformer.cross_attention_layers]
    with torch.no_grad():
        model.encode_image(model.embed_image(pixels))
    for h in handles:
        h.remove()
    out = []
    for i in model.qformer.cross_attention_layers:
        mod, (x, (k, _)) = model.qformer.layers[i].cross_attn, inputs[i]
        q = mod.query(x).view(x.shape[0], x.shape[1], mod.num_heads, mod.head_dim).transpose(1, 2)
        out.append(torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(mod.head_dim), dim=-1).mean(1))
    return torch.stack(out, 1)


def naive_gradcam(model: Blip2, pixels: torch.Tensor, text: str, layer: int, *, drop: list[int] = ()) -> torch.Tensor:
    """ALBEF's way, one pair at a time: that layer's cross-attention recomputed by hand, its
    probabilities kept with ``retain_grad``, ``backward`` of the match logit -> (N,) map."""
    mod = model.qformer.layers[layer].cross_attn
    kept = {}

    def forward(x, kv, mask):
        q = mod.query(x).view(x.shape[0], x.shape[1], mod.num_heads, mod.head_dim).transpose(1, 2)
        probs = torch.softmax(q @ kv[0].transpose(-1, -2) / math.sqrt(mod.head_dim), dim=-1)
        probs.retain_grad()
        kept["p"] = probs
        return mod.layer_norm(mod.dense((probs @ kv[1]).transpose(1, 2).reshape(x.shape)) + x)

    mod.forward = forward
    try:
        enc = model.tokenizer([text], return_tensors="pt")
        enc.attention_mask[0, list(drop)] = 0  # tokens removed from what the queries see
        logits = model.itm_logits(enc.input_ids, enc.attention_mask, model.image_kv(model.embed_image(pixels)))
        model.zero_grad()
        logits[0, 1].backward()
    finally:
        del mod.forward
    p = kept["p"]
    return (p.grad.clamp(min=0) * p).mean(dim=(1, 2))[0].detach()


@pytest.mark.parametrize("vision,prefix,grid", [
    (timm_vision(), 1, (4, 4)),
    (timm_vision(size=24), 1, (3, 3)),
    (timm_vision(reg_tokens=4), 5, (4, 4)),
    (hf_vision("blip_2_vision_model", 28, 7), 1, (4, 4)),
    (hf_vision("siglip_vision_model", 20, 4), 0, (5, 5)),
], ids=["timm-4x4", "timm-3x3", "timm-registers", "hf-blip2-4x4", "hf-siglip-5x5"])
def test_maps_and_gradcam_match_naive_references(tok, vision, prefix, grid):
    model = tiny(tok, vision)
    assert model.vision.grid_size == grid and model.vision.num_prefix_tokens == prefix
    pixels = torch.randn(3, 3, vision.image_size, vision.image_size, generator=torch.Generator().manual_seed(3))

    maps = model.attention_maps(pixels)
    assert maps.layers == [0, 2]
    assert maps.maps.shape == (3, 2, 6, *grid) and maps.prefix.shape == (3, 2, 6, prefix)
    full = torch.cat([maps.prefix, maps.maps.flatten(-2)], dim=-1)  # back in token order
    assert torch.allclose(full, naive_query_maps(model, pixels), atol=1e-6)
    assert torch.allclose(full.sum(-1), torch.ones(3, 2, 6), atol=1e-5)

    cam = model.gradcam(pixels, TEXTS, layer=2)  # three lengths in one padded batch
    assert cam.maps.shape == (3, *grid) and cam.prefix.shape == (3, prefix) and cam.layer == 2
    assert torch.allclose(cam.itm_score, model.itm(pixels, TEXTS), atol=1e-5)
    for i, text in enumerate(TEXTS):
        ref = naive_gradcam(model, pixels[i:i + 1], text, 2)
        got = torch.cat([cam.prefix[i], cam.maps[i].flatten()])
        assert ref.max() > 0 and torch.allclose(got, ref, atol=1e-7, rtol=1e-4), (got, ref)


def test_gradcam_broadcasts_one_image_and_checks_layers(tok):
    model = tiny(tok, timm_vision())
    pixels = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    cam = gradcam(model, pixels, TEXTS, batch_size=2)  # one image, three texts, two chunks
    assert cam.layer == 2  # the middle of the cross-attention layers [0, 2]
    for i, text in enumerate(TEXTS):
        ref = naive_gradcam(model, pixels, text, 2)
        assert torch.allclose(torch.cat([cam.prefix[i], cam.maps[i].flatten()]), ref, atol=1e-7, rtol=1e-4)
    with pytest.raises(ConfigError, match="layer 1 has no cross-attention"):
        gradcam(model, pixels, TEXTS, layer=1)
    with pytest.raises(ValueError, match="2 images and 3 texts"):
        gradcam(model, pixels.expand(2, -1, -1, -1), TEXTS)
    # the model's parameters need not require grad, and a no_grad caller still gets gradients
    model.requires_grad_(False)
    with torch.no_grad():
        again = gradcam(model, pixels, TEXTS)
    assert torch.allclose(again.maps, cam.maps, atol=1e-8, rtol=1e-5)


def test_word_maps_are_the_evidence_lost_by_masking_each_word(tok):
    model = tiny(tok, timm_vision())
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    texts = ["a red dog", "two cats on the sofa"]
    cam = gradcam(model, pixels, texts, words=True)
    assert cam.words == [["a", "red", "dog"], ["two", "cats", "on", "the", "sofa"]]
    enc = model.tokenizer(texts[1], return_tensors="pt")
    cats = [i for i, w in enumerate(enc.word_ids(0)) if w == 1]  # "cats": two word pieces
    mask = enc.attention_mask.clone()
    mask[0, cats] = 0
    masked = gradcam(model, pixels[1:], [texts[1]])  # the reference: the same pass with the word masked by hand
    kv = model.image_kv(model.embed_image(pixels[1:]))
    with torch.no_grad():
        logit_masked = model.itm_logits(enc.input_ids, mask, kv)[0, 1]
    assert torch.allclose(cam.word_scores[1][1], masked.itm_logit[0] - logit_masked, atol=1e-5)
    full, occluded = naive_gradcam(model, pixels[1:], texts[1], 2), naive_gradcam(model, pixels[1:], texts[1], 2, drop=cats)
    assert cam.word_maps[1].shape == (5, 4, 4)
    ref = (full - occluded).clamp(min=0)[1:].view(4, 4)
    assert ref.max() > 0 and torch.allclose(cam.word_maps[1][1], ref, atol=1e-7, rtol=1e-4)


# ---------------------------------------------------------------------------- the corner test
@pytest.mark.parametrize("row,col", [(0, GRID - 1), (GRID - 1, 0)], ids=["top-right", "bottom-left"])
def test_gradcam_of_the_caption_finds_the_only_object_in_its_corner(tok, row, col):
    model = corner_model(tok)
    names = list(COLORS)
    images = torch.stack([scene(c, row, col) for c in names])
    truth = [f"a {c} square" for c in names]
    wrong = [f"a {names[(i + 1) % len(names)]} square" for i in range(len(names))]
    cam = model.gradcam(images, truth, words=True)
    # the constructed model is meaningful: the right colour scores higher than a wrong one
    assert (cam.itm_logit > model.gradcam(images, wrong).itm_logit + 1.0).all()
    mass = cam.maps[:, row, col] / cam.maps.sum(dim=(1, 2))
    assert (mass > 0.9).all(), mass  # uniform would be 1/16; a transposed grid or a shifted CLS puts it elsewhere
    # masking the colour word costs the most
    for i, words in enumerate(cam.words):
        assert words == ["a", names[i], "square"]
        assert int(cam.word_scores[i].argmax()) == 1 and cam.word_scores[i][1] > 1.0
    # each query's attention map peaks there too (the maps' layout, not Grad-CAM's)
    maps = model.attention_maps(images).layer(0)  # (5, Q, h, w)
    assert (maps[:, :, row, col] > 0.5).all()


def test_visualize_recipe_writes_the_pictures(tok, tmp_path):
    model = corner_model(tok)
    model.save_pretrained(tmp_path / "model")
    paths = [save_scene(tmp_path / "red.png", "red", 0, GRID - 1), save_scene(tmp_path / "blue.png", "blue", GRID - 1, 0)]
    summary = visualize.main(["--model", str(tmp_path / "model"), "--images", *paths, "--texts", "a red square",
                              "a blue square", "--words", "--output-dir", str(tmp_path / "out")])
    assert summary == json.loads((tmp_path / "out" / "pictures.json").read_text())
    red, blue = summary["images"]
    assert [c["peak_cell"] for c in red["gradcam"]] == [[0, GRID - 1]] * 2
    assert [c["peak_cell"] for c in blue["gradcam"]] == [[GRID - 1, 0]] * 2
    assert red["gradcam"][0]["itm_logit"] > red["gradcam"][1]["itm_logit"] + 1.0
    assert blue["gradcam"][1]["itm_logit"] > blue["gradcam"][0]["itm_logit"] + 1.0
    itm = Blip2.from_pretrained(tmp_path / "model").eval().itm(paths[0], ["a red square", "a blue square"])
    assert [c["itm_score"] for c in red["gradcam"]] == pytest.approx(itm.tolist(), abs=1e-5)
    for entry in summary["images"]:
        for file in [entry["queries"]] + [c["file"] for c in entry["gradcam"]]:
            with Image.open(file) as im:
                assert im.format == "PNG" and min(im.size) > 100
    with pytest.raises(ConfigError, match="layer 3 has no cross-attention"):
        visualize.main(["--model", str(tmp_path / "model"), "--images", paths[0], "--layer", "3",
                        "--output-dir", str(tmp_path / "bad")])

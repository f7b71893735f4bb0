"""qformer.vision: the frozen tower, its preprocessing and the EVA key conversions.

Parity targets: the original LAVIS EVA ViT (shared oracle fixture), transformers'
Blip2VisionModel on converted weights, and the intermediates of the unpruned models.
Everything is tiny and random; nothing is downloaded.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file
from torch import nn

from qformer.config import ConfigError, VisionConfig
from qformer.errors import ImageLoadError, WeightsMismatchError
from qformer.images import ImagePreprocessor
from qformer.persistence import (
    blip2_vision_config_kwargs_from_eva,
    convert_blip2_hf_to_eva_timm,
    convert_eva_timm_to_blip2_hf,
    convert_lavis_eva_to_timm,
    lavis_eva_timm_kwargs,
    lavis_eva_vision_config,
)
from qformer.vision import build_vision_tower

FIXTURES = sorted((Path(__file__).resolve().parent / "fixtures").glob("lavis-*"))

# The oracle's cfg.vit (fixture config.json), inlined so that the architecture tests run without it.
ORACLE_VIT = dict(
    img_size=32, patch_size=8, use_mean_pooling=False, embed_dim=48, depth=2, num_heads=4,
    mlp_ratio=4.3637, qkv_bias=True, drop_path_rate=0.0, norm_layer="LayerNorm(eps=1e-6)", use_checkpoint=False,
)
# LAVIS create_eva_vit_g: 39 of EVA-g's 40 blocks.
LAVIS_EVA_G = dict(
    img_size=224, patch_size=14, use_mean_pooling=False, embed_dim=1408, depth=39, num_heads=1408 // 88,
    mlp_ratio=4.3637, qkv_bias=True, drop_path_rate=0.4, norm_layer="LayerNorm(eps=1e-6)", use_checkpoint=False,
)
TINY_VIT = dict(embed_dim=32, depth=3, num_heads=2, patch_size=8)
TINY_EVA = dict(embed_dim=48, depth=3, num_heads=4, patch_size=8, mlp_ratio=4.3637)
TINY_HF = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2, patch_size=8)
S = 32  # image size of every tiny tower


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def randomize_(module: nn.Module, seed: int = 0) -> nn.Module:
    """Give every tensor a non-trivial value (HF inits Blip2 vision weights with std 1e-10)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.ndim >= 2:
                p.copy_(noise * (p[0].numel() ** -0.5 if p.shape[0] > 1 else 1.0))
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * noise)
            else:
                p.copy_(0.2 * noise)
            if name.endswith("self_attn.qkv.bias"):  # EVA has no key bias
                p[p.shape[0] // 3 : 2 * p.shape[0] // 3] = 0
    return module


def images(b: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(b, 3, S, S, generator=torch.Generator().manual_seed(seed))  # (B, 3, S, S)


def timm_cfg(name: str, model_kwargs: dict, **kw) -> VisionConfig:
    return VisionConfig(backend="timm", name=name, model_kwargs=dict(model_kwargs), image_size=S, **kw)


def hf_cfg(name: str, model_kwargs: dict | None = None, **kw) -> VisionConfig:
    return VisionConfig(backend="hf", name=name, model_kwargs=dict(model_kwargs or {}), image_size=S, **kw)


# ------------------------------------------------------------------------------------------
# LAVIS oracle parity and the EVA architecture
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fixture", FIXTURES, ids=lambda p: p.name)
def test_lavis_oracle_vit_parity(fixture):
    """The repository's own LAVIS 1.0.2 dumps (tests/oracle): LAVIS's EVA ViT output."""
    from safetensors.torch import load_file

    cfg = json.loads((fixture / "config.json").read_text())["cfg"]["vit"]
    state = torch.load(fixture / "blip2_qformer.pth", weights_only=True)["model"]
    image = load_file(str(fixture / "inputs.safetensors"))["image"]  # (3, 3, 32, 32)
    vit_out = load_file(str(fixture / "stage1.safetensors"))["vit_out"]  # (3, 17, 48)

    tower = build_vision_tower(lavis_eva_vision_config(cfg))  # feature_layer=-1: the oracle ViT has 2 used blocks
    converted = convert_lavis_eva_to_timm(state)
    assert set(converted) == {k[len("visual_encoder."):] for k in state if k.startswith("visual_encoder.")}
    tower.load_weights(converted, source="LAVIS oracle fixture")

    out = tower(image)
    assert out.shape == vit_out.shape == (3, tower.num_tokens, tower.width) == (3, 17, 48)
    diff = (out - vit_out).abs().max().item()
    print(f"LAVIS EVA vs timm Eva tower: max abs diff {diff:.3g} (max |vit_out| {vit_out.abs().max():.3g})")
    assert diff < 1e-5


def test_timm_eva_is_lavis_eva():
    """timm's Eva with the converted kwargs has LAVIS's exact module structure."""
    tower = build_vision_tower(lavis_eva_vision_config(ORACLE_VIT))
    m = tower.model
    assert m.rope is None and m.pos_embed.shape == (1, 17, 48) and m.cls_token.shape == (1, 1, 48)
    assert isinstance(m.norm, nn.Identity) and isinstance(m.norm_pre, nn.Identity)
    for blk in m.blocks:
        assert blk.gamma_1 is None and blk.gamma_2 is None
        assert blk.norm1.eps == blk.norm2.eps == 1e-6
        assert isinstance(blk.mlp.act, nn.GELU) and blk.mlp.act.approximate == "none"
        assert blk.mlp.fc1.out_features == int(48 * 4.3637) == 209
        assert blk.attn.qkv.bias is None and blk.attn.q_bias is not None and blk.attn.v_bias is not None
        assert torch.count_nonzero(blk.attn.k_bias) == 0
        assert isinstance(blk.attn.norm, nn.Identity) and isinstance(blk.mlp.norm, nn.Identity)
    # The same structure, as a Blip2VisionConfig.
    assert blip2_vision_config_kwargs_from_eva(m) == dict(
        hidden_size=48, intermediate_size=209, num_hidden_layers=2, num_attention_heads=4, image_size=32,
        patch_size=8, layer_norm_eps=1e-6, qkv_bias=True, hidden_act="gelu",
    )


def test_full_size_eva_g_matches_lavis_and_transformers():
    """On the meta device (no memory): the default config, LAVIS's create_eva_vit_g and transformers'
    Blip2VisionConfig defaults all describe the same 39-block EVA ViT-g."""
    from transformers import Blip2VisionConfig

    default = VisionConfig()  # eva_giant_patch14_clip_224, feature_layer=-2
    with torch.device("meta"):
        ours = timm.create_model(default.name, pretrained=False, num_classes=0, img_size=default.image_size)
        kwargs, img = lavis_eva_timm_kwargs(LAVIS_EVA_G)
        lavis = timm.create_model(lavis_eva_vision_config(LAVIS_EVA_G).name, num_classes=0, img_size=img, **kwargs)
    ours.prune_intermediate_layers(indices=[default.feature_layer], prune_norm=True, prune_head=True)
    hf = Blip2VisionConfig()
    want = {k: getattr(hf, k) for k in blip2_vision_config_kwargs_from_eva(ours)}
    assert blip2_vision_config_kwargs_from_eva(ours) == blip2_vision_config_kwargs_from_eva(lavis) == want
    assert ours.patch_embed.num_patches + ours.num_prefix_tokens == 257


# ------------------------------------------------------------------------------------------
# timm Eva <-> transformers Blip2VisionModel
# ------------------------------------------------------------------------------------------


def test_eva_timm_hf_parity_both_directions():
    x = images(3)
    # timm -> HF
    eva = build_vision_tower(timm_cfg("eva_giant_patch14_clip_224", TINY_EVA, feature_layer=-1))
    randomize_(eva.model, seed=3)
    hf = build_vision_tower(hf_cfg("blip_2_vision_model", blip2_vision_config_kwargs_from_eva(eva.model), feature_layer=-1))
    hf.load_weights(convert_eva_timm_to_blip2_hf(eva.model.state_dict()), source="timm Eva")
    d1 = (eva(x) - hf(x)).abs().max().item()
    # HF -> timm
    hf2 = build_vision_tower(hf_cfg("blip_2_vision_model", blip2_vision_config_kwargs_from_eva(eva.model), feature_layer=-1))
    randomize_(hf2.model, seed=4)
    eva2 = build_vision_tower(timm_cfg("eva_giant_patch14_clip_224", TINY_EVA, feature_layer=-1))
    eva2.load_weights(convert_blip2_hf_to_eva_timm(hf2.model.state_dict()), source="Blip2VisionModel")
    d2 = (eva2(x) - hf2(x)).abs().max().item()
    print(f"timm Eva -> Blip2VisionModel: {d1:.3g}; Blip2VisionModel -> timm Eva: {d2:.3g}")
    assert eva(x).abs().max() > 1 and hf2(x).abs().max() > 1  # real signals, not near-zero
    assert d1 < 1e-5 and d2 < 1e-5
    # The two conversions are inverse to each other.
    back = convert_blip2_hf_to_eva_timm(convert_eva_timm_to_blip2_hf(eva.model.state_dict()))
    assert back.keys() == eva.model.state_dict().keys()
    assert all(torch.equal(back[k], v) for k, v in eva.model.state_dict().items())


def test_conversions_refuse_what_they_cannot_hold():
    hf = build_vision_tower(hf_cfg("blip_2_vision_model", TINY_HF, feature_layer=-1))
    sd = randomize_(hf.model).state_dict()
    sd["encoder.layers.1.self_attn.qkv.bias"][40] = 0.5  # a key bias: EVA has none
    with pytest.raises(WeightsMismatchError, match=r"encoder\.layers\.1\.self_attn\.qkv\.bias.*key part"):
        convert_blip2_hf_to_eva_timm(sd)
    with pytest.raises(WeightsMismatchError, match=r"vision_model\.post_layernorm\.weight.*ln_vision"):
        convert_blip2_hf_to_eva_timm({"vision_model.post_layernorm.weight": torch.ones(4)}, prefix="vision_model.")
    with pytest.raises(WeightsMismatchError, match=r"norm\.weight"):
        convert_eva_timm_to_blip2_hf({"norm.weight": torch.ones(4)})
    with pytest.raises(WeightsMismatchError, match=r"visual_encoder\.blocks\.0\.gamma_1"):
        convert_lavis_eva_to_timm({"visual_encoder.blocks.0.gamma_1": torch.ones(4)})
    with pytest.raises(ValueError, match="rotary"):
        blip2_vision_config_kwargs_from_eva(
            timm.create_model("eva02_tiny_patch14_224", num_classes=0, img_size=S, patch_size=8, depth=1)
        )
    with pytest.raises(ValueError, match="LayerNorm"):
        lavis_eva_timm_kwargs(dict(ORACLE_VIT, norm_layer="LayerNorm(eps=1e-5)"))


# ------------------------------------------------------------------------------------------
# feature_layer: the tower returns the chosen block of the unpruned model, all tokens, no norm
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "kwargs", "fmt"),
    [("vit_base_patch16_224", TINY_VIT, "safetensors"), ("eva_giant_patch14_clip_224", TINY_EVA, "pth")],
)
@pytest.mark.parametrize("feature_layer", [-1, -2, 0])
def test_feature_layer_timm(tmp_path, name, kwargs, fmt, feature_layer):
    full = randomize_(timm.create_model(name, pretrained=False, num_classes=0, img_size=S, **kwargs).eval())
    path = tmp_path / f"weights.{fmt}"
    sd = {k: v.contiguous() for k, v in full.state_dict().items()}
    save_file(sd, str(path)) if fmt == "safetensors" else torch.save({"model": sd}, path)

    tower = build_vision_tower(timm_cfg(name, kwargs, feature_layer=feature_layer, pretrained=str(path)))
    assert len(tower.model.blocks) == tower.num_blocks == feature_layer % 3 + 1

    x = images()
    with torch.no_grad():
        [(spatial, prefix)] = full.forward_intermediates(
            x, indices=[feature_layer], output_fmt="NLC", intermediates_only=True, return_prefix_tokens=True
        )
        ref = torch.cat([prefix, spatial], dim=1)  # (B, 1 + 16, C)
        normed = full.forward_features(x)  # last block + final norm
    out = tower(x)
    assert out.shape == (2, tower.num_tokens, tower.width) == (2, 17, kwargs["embed_dim"])
    assert (out - ref).abs().max().item() < 1e-6
    assert not torch.allclose(out, normed, atol=1e-3)  # the final norm is not applied


HF_TYPES = ["blip_2_vision_model", "clip_vision_model", "siglip_vision_model"]


def _hf_full_model(name: str, **extra):
    from qformer.vision import hf_vision_classes as _hf_classes

    config_cls, model_cls = _hf_classes(name)
    return randomize_(model_cls(config_cls(image_size=S, **TINY_HF, **extra)).eval(), seed=5)


@pytest.mark.parametrize("name", HF_TYPES)
@pytest.mark.parametrize("feature_layer", [-1, -2])
def test_feature_layer_hf(tmp_path, name, feature_layer):
    full = _hf_full_model(name)
    full.save_pretrained(tmp_path)
    tower = build_vision_tower(hf_cfg(name, pretrained=str(tmp_path), feature_layer=feature_layer))
    assert len(tower.model.encoder.layers) == tower.model.config.num_hidden_layers == 3 + feature_layer + 1
    assert isinstance(tower.model.post_layernorm, nn.Identity)
    if name == "clip_vision_model":  # CLIP's pre-LN belongs to the embeddings stage and stays
        assert torch.equal(tower.model.pre_layrnorm.weight, full.pre_layrnorm.weight)
        assert not torch.allclose(full.pre_layrnorm.weight, torch.ones(32))

    x = images()
    with torch.no_grad():
        ref_out = full(pixel_values=x, output_hidden_states=True)
    ref = ref_out.hidden_states[feature_layer]  # hidden_states[0] is the embeddings: [-1] = last layer
    out = tower(x)
    tokens = 16 if name == "siglip_vision_model" else 17  # SigLIP has no CLS token
    assert out.shape == (2, tower.num_tokens, tower.width) == (2, tokens, 32)
    assert (out - ref).abs().max().item() < 1e-5
    if feature_layer == -1:
        if name == "clip_vision_model":  # CLIP's post-LN only touches the pooled output
            assert torch.allclose(out, ref_out.last_hidden_state, atol=1e-5)
        else:  # BLIP-2 (ln_vision) and SigLIP apply post_layernorm to the sequence: we are before it
            assert not torch.allclose(out, ref_out.last_hidden_state, atol=1e-2)
            assert torch.allclose(full.post_layernorm(out), ref_out.last_hidden_state, atol=1e-5)


@pytest.mark.parametrize("kind", ["blip2", "clip"])
def test_hf_tower_from_full_model_directory(tmp_path, kind):
    """A whole BLIP-2 / CLIP checkpoint directory: only its vision_model.* tensors are read.
    (Blip2VisionModel.from_pretrained on such a directory silently loads nothing.)"""
    import transformers as tf

    vision = dict(TINY_HF, image_size=S)
    if kind == "blip2":
        name = "blip_2_vision_model"
        config = tf.Blip2Config(
            vision_config=vision,
            qformer_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                encoder_hidden_size=32, vocab_size=99),
            text_config=dict(model_type="opt", hidden_size=32, num_hidden_layers=1, ffn_dim=64, num_attention_heads=2,
                             vocab_size=99, word_embed_proj_dim=32),
            num_query_tokens=4,
        )
        full = tf.Blip2ForConditionalGeneration(config)
    else:
        name = "clip_vision_model"
        full = tf.CLIPModel(tf.CLIPConfig(vision_config=vision, text_config=dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=99,
            bos_token_id=0, eos_token_id=2)))
    randomize_(full.eval(), seed=6)
    full.save_pretrained(tmp_path)
    tower = build_vision_tower(hf_cfg(name, pretrained=str(tmp_path), feature_layer=-2))
    x = images()
    with torch.no_grad():
        ref = full.vision_model(pixel_values=x, output_hidden_states=True).hidden_states[-2]
    assert (tower(x) - ref).abs().max().item() < 1e-5


# ------------------------------------------------------------------------------------------
# Frozen, deterministic, dtype
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "config",
    [
        timm_cfg("eva_giant_patch14_clip_224", dict(TINY_EVA, proj_drop_rate=0.5, attn_drop_rate=0.5,
                                                      drop_path_rate=0.5, pos_drop_rate=0.5)),
        timm_cfg("vit_base_patch16_224", dict(TINY_VIT, drop_rate=0.5, proj_drop_rate=0.5, attn_drop_rate=0.5,
                                                drop_path_rate=0.5)),
        hf_cfg("blip_2_vision_model", dict(TINY_HF, attention_dropout=0.5)),
        hf_cfg("clip_vision_model", dict(TINY_HF, attention_dropout=0.5, dropout=0.5)),
    ],
    ids=["eva", "vit", "blip2", "clip"],
)
def test_frozen_eval_and_deterministic(config):
    tower = build_vision_tower(config)
    randomize_(tower.model)
    parent = nn.ModuleDict({"tower": tower, "ln_vision": nn.LayerNorm(tower.width)})
    parent.train()  # as a training loop would
    assert tower.training and parent["ln_vision"].training
    assert not any(m.training for m in tower.model.modules())
    assert not any(p.requires_grad for p in tower.parameters())

    x = images()
    a, b = tower(x), tower(x)
    assert torch.equal(a, b)
    assert not a.requires_grad and a.dtype == torch.float32
    parent["ln_vision"](a).square().sum().backward()  # the features feed a trainable LayerNorm
    assert parent["ln_vision"].weight.grad is not None
    assert all(p.grad is None for p in tower.parameters())


def test_bfloat16_tower_returns_float32():
    cfg32 = lavis_eva_vision_config(ORACLE_VIT)
    t32 = build_vision_tower(cfg32)
    randomize_(t32.model)
    t16 = build_vision_tower(lavis_eva_vision_config(ORACLE_VIT, dtype="bfloat16"))
    t16.load_weights(t32.model.state_dict())
    assert t16.dtype == torch.bfloat16 and all(p.dtype == torch.bfloat16 for p in t16.parameters())
    x = images()
    out16, out32 = t16(x), t32(x)
    assert out16.dtype == torch.float32 and out16.shape == out32.shape
    rel = ((out16 - out32).norm() / out32.norm()).item()
    print(f"bf16 vs fp32 tower: relative error {rel:.3g}")
    assert rel < 2e-2


def test_strict_loading_names_keys(tmp_path):
    tower = build_vision_tower(timm_cfg("eva_giant_patch14_clip_224", TINY_EVA, feature_layer=-2))
    sd = dict(tower.model.state_dict())
    before = sd["cls_token"].clone()
    sd.pop("blocks.1.mlp.fc2.bias")
    sd["blocks.0.attn.gamma"] = torch.zeros(3)
    sd["cls_token"] = torch.ones(1, 1, 48)
    sd["pos_embed"] = torch.zeros(1, 5, 48)
    with pytest.raises(WeightsMismatchError) as err:
        tower.load_weights(sd, source="my checkpoint")
    msg = str(err.value)
    for needle in ("my checkpoint", "blocks.1.mlp.fc2.bias", "blocks.0.attn.gamma", "pos_embed", "(1, 5, 48)"):
        assert needle in msg
    assert torch.equal(tower.model.cls_token, before)  # nothing was copied

    # A weights file for a different architecture: the error names the file and the keys.
    other = timm.create_model("eva_giant_patch14_clip_224", num_classes=0, img_size=S, **dict(TINY_EVA, depth=4))
    path = tmp_path / "deeper.safetensors"
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(path))
    with pytest.raises(WeightsMismatchError, match=r"deeper\.safetensors.*blocks\.3\."):
        build_vision_tower(timm_cfg("eva_giant_patch14_clip_224", TINY_EVA, pretrained=str(path)))


def test_config_errors():
    with pytest.raises(ConfigError, match="feature_layer=-4"):
        build_vision_tower(timm_cfg("vit_base_patch16_224", TINY_VIT, feature_layer=-4))
    with pytest.raises(ConfigError, match="feature_layer=3"):
        build_vision_tower(hf_cfg("clip_vision_model", TINY_HF, feature_layer=3))
    with pytest.raises(ConfigError, match="not a supported transformers"):
        build_vision_tower(hf_cfg("vit", TINY_HF))
    with pytest.raises(ConfigError, match="img_size"):
        build_vision_tower(timm_cfg("vit_base_patch16_224", dict(TINY_VIT, img_size=64)))
    tower = build_vision_tower(timm_cfg("vit_base_patch16_224", TINY_VIT))
    with pytest.raises(ValueError, match=r"\(B, 3, 32, 32\)"):
        tower(torch.zeros(1, 3, 16, 16))


# ------------------------------------------------------------------------------------------
# Preprocessing
# ------------------------------------------------------------------------------------------

MEAN = torch.tensor(VisionConfig().mean).view(3, 1, 1)
STD = torch.tensor(VisionConfig().std).view(3, 1, 1)


def _palette_image(transparent: bool) -> Image.Image:
    im = Image.new("P", (20, 12), 1)
    im.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    if transparent:
        im.info["transparency"] = 1
    return im


# (image, expected RGB in 0..255): solid colours, so the bicubic resize is exact.
MODES = {
    "RGB": (Image.new("RGB", (20, 12), (255, 0, 0)), (255, 0, 0)),
    "L": (Image.new("L", (20, 12), 128), (128, 128, 128)),
    "RGBA-transparent": (Image.new("RGBA", (20, 12), (255, 0, 0, 0)), (255, 255, 255)),  # over white
    "RGBA-half": (Image.new("RGBA", (20, 12), (0, 0, 0, 128)), (127, 127, 127)),
    "LA": (Image.new("LA", (20, 12), (0, 0)), (255, 255, 255)),
    "P": (_palette_image(False), (10, 200, 30)),
    "P-transparent": (_palette_image(True), (255, 255, 255)),
    "CMYK": (Image.new("CMYK", (20, 12), (0, 255, 0, 0)), (255, 0, 255)),
    "I;16": (Image.fromarray(np.full((12, 20), 40000, dtype=np.uint16)), (40000 / 65535 * 255,) * 3),
    "1": (Image.new("1", (20, 12), 1), (255, 255, 255)),
}


def _expected(rgb255) -> torch.Tensor:
    return ((torch.tensor(rgb255, dtype=torch.float32).view(3, 1, 1) / 255 - MEAN) / STD).expand(3, S, S)


@pytest.mark.parametrize("mode", list(MODES))
def test_preprocess_modes(tmp_path, mode):
    image, rgb = MODES[mode]
    pre = ImagePreprocessor.from_config(VisionConfig(image_size=S))
    assert mode.split("-")[0] == image.mode
    out = pre(image)
    assert out.shape == (1, 3, S, S) and out.dtype == torch.float32
    assert (out[0] - _expected(rgb)).abs().max().item() < 1e-4
    # Through a file on disk (TIFF keeps CMYK losslessly, PNG the rest incl. 16-bit and palettes).
    path = tmp_path / ("image.tiff" if image.mode == "CMYK" else "image.png")
    image.save(path)
    from_file = pre([str(path), path])
    assert from_file.shape == (2, 3, S, S)
    assert (from_file - _expected(rgb)).abs().max().item() < 1e-4


def test_preprocess_matches_lavis_eval_transform():
    """For RGB images the transform is LAVIS's blip_image_eval: Resize((S,S), bicubic), ToTensor, Normalize."""
    from torchvision import transforms as T

    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (45, 70, 3), dtype=np.uint8))
    lavis = T.Compose([
        T.Resize((S, S), interpolation=T.InterpolationMode.BICUBIC), T.ToTensor(),
        T.Normalize(VisionConfig().mean, VisionConfig().std),
    ])
    tower = build_vision_tower(timm_cfg("vit_base_patch16_224", TINY_VIT))
    assert torch.equal(tower.preprocess(image)[0], lavis(image))


def test_preprocess_tensors_and_errors(tmp_path):
    pre = ImagePreprocessor.from_config(VisionConfig(image_size=S))
    batch = torch.randn(2, 3, S, S)
    assert pre(batch) is batch
    assert torch.equal(pre(batch[0]), batch[:1])
    assert pre([batch[0], MODES["RGB"][0]]).shape == (2, 3, S, S)
    with pytest.raises(ValueError, match="already preprocessed"):
        pre(torch.zeros(3, S, S, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"\(B, 3, 32, 32\)"):
        pre(torch.zeros(1, 3, 16, 16))

    missing = tmp_path / "nope" / "missing.jpg"
    with pytest.raises(FileNotFoundError) as err:
        pre([MODES["RGB"][0], missing])
    assert str(missing) in str(err.value)
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(ImageLoadError, match="corrupt.png"):
        pre(str(corrupt))
    with pytest.raises(ImageLoadError, match="'F'"):
        pre(Image.new("F", (4, 4), 0.5))
    assert math.isclose(pre.mean[0], 0.48145466)

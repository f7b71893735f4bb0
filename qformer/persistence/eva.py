"""Key maps of the EVA ViT between its three layouts, and the rebuild of LAVIS's EVA in timm.

Layouts of the same EVA ViT (``checkpoint key`` examples):

- LAVIS ``visual_encoder.blocks.0.attn.q_bias`` -- timm ``Eva`` is the same without the prefix;
- timm ``blocks.0.attn.q_bias`` + ``v_bias`` -- transformers ``Blip2VisionModel``
  ``encoder.layers.0.self_attn.qkv.bias = cat(q, zeros, v)``.

:func:`convert_lavis_eva_to_timm`, :func:`convert_eva_timm_to_blip2_hf` and
:func:`convert_blip2_hf_to_eva_timm` translate between them; :func:`blip2_vision_config_kwargs_from_eva`
gives the ``Blip2VisionConfig`` of a timm EVA; :func:`lavis_eva_vision_config` gives the
:class:`~qformer.config.VisionConfig` that rebuilds a LAVIS EVA ViT (``create_eva_vit_g`` or a
tiny one) as a timm tower.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..config import VisionConfig
from ..errors import WeightsMismatchError
from ..weights import short_list as _short_list

#: The timm architecture that rebuilds LAVIS's EVA ViT. Any timm ``eva_giant_*`` entry builds
#: the same ``timm.models.eva.Eva`` (abs pos embed, no RoPE, no layer scale, fused qkv with
#: q/v bias, LayerNorm eps 1e-6, exact GELU); this one is also the default
#: ``VisionConfig.name``. It differs from ``eva_giant_patch14_224`` only in the pooling head,
#: which the tower removes.
LAVIS_EVA_TIMM_NAME = "eva_giant_patch14_clip_224"

_EVA_TOP = {"cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"}
_EVA_BLOCK = re.compile(
    r"^blocks\.(\d+)\.(norm1\.(?:weight|bias)|norm2\.(?:weight|bias)|attn\.q_bias|attn\.v_bias|attn\.k_bias|"
    r"attn\.qkv\.weight|attn\.proj\.(?:weight|bias)|mlp\.fc1\.(?:weight|bias)|mlp\.fc2\.(?:weight|bias))$"
)
_TIMM_TO_HF_TOP = {
    "cls_token": "embeddings.class_embedding",
    "pos_embed": "embeddings.position_embedding",
    "patch_embed.proj.weight": "embeddings.patch_embedding.weight",
    "patch_embed.proj.bias": "embeddings.patch_embedding.bias",
}
_TIMM_TO_HF_BLOCK = {
    "norm1.weight": "layer_norm1.weight",
    "norm1.bias": "layer_norm1.bias",
    "norm2.weight": "layer_norm2.weight",
    "norm2.bias": "layer_norm2.bias",
    "attn.qkv.weight": "self_attn.qkv.weight",
    "attn.proj.weight": "self_attn.projection.weight",
    "attn.proj.bias": "self_attn.projection.bias",
    "mlp.fc1.weight": "mlp.fc1.weight",
    "mlp.fc1.bias": "mlp.fc1.bias",
    "mlp.fc2.weight": "mlp.fc2.weight",
    "mlp.fc2.bias": "mlp.fc2.bias",
}
_HF_TO_TIMM_TOP = {v: k for k, v in _TIMM_TO_HF_TOP.items()}
_HF_TO_TIMM_BLOCK = {v: k for k, v in _TIMM_TO_HF_BLOCK.items()}
_HF_LAYER = re.compile(r"^encoder\.layers\.(\d+)\.(.+)$")


def _select_prefix(state_dict: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    if not prefix:
        return dict(state_dict)
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}


def convert_lavis_eva_to_timm(
    state_dict: Mapping[str, torch.Tensor], *, prefix: str = "visual_encoder."
) -> dict[str, torch.Tensor]:
    """LAVIS EVA ViT keys -> timm ``Eva`` keys (the names are the same once ``prefix`` is removed).

    Only keys under ``prefix`` are taken, so a whole LAVIS BLIP-2 state dict can be passed; use
    ``prefix=""`` for LAVIS's bare ``eva_vit_g.pth``. Keys of EVA variants that timm's plain EVA
    cannot hold (layer scale ``gamma_*``, relative position bias) are refused by name rather than
    dropped. Tensors are shared, not copied; dtypes are kept.
    """
    vit = _select_prefix(state_dict, prefix)
    if not vit:
        raise WeightsMismatchError(f"no keys under prefix {prefix!r}: not a LAVIS EVA state dict")
    unknown = sorted(k for k in vit if k not in _EVA_TOP and not _EVA_BLOCK.match(k))
    if unknown:
        raise WeightsMismatchError(
            f"LAVIS EVA keys that timm's Eva (abs pos embed, no layer scale, no relative position bias) "
            f"cannot hold: {_short_list([prefix + k for k in unknown])}"
        )
    return {k: v for k, v in vit.items() if not k.endswith("attn.k_bias")}


def convert_eva_timm_to_blip2_hf(
    state_dict: Mapping[str, torch.Tensor], *, prefix: str = ""
) -> dict[str, torch.Tensor]:
    """timm ``Eva`` keys -> transformers ``Blip2VisionModel`` keys (without ``post_layernorm``).

    ``blocks.i.attn.{q_bias, v_bias}`` become ``encoder.layers.i.self_attn.qkv.bias =
    cat(q_bias, zeros, v_bias)``; every other tensor is renamed (reference doc, section 4).
    The result has no ``post_layernorm.*``: in BLIP-2 that is ``ln_vision``, which belongs to the
    model; load it there. Keys of a final norm / head (``norm.*``, ``fc_norm.*``, ``head.*``) and of
    EVA features HF lacks are refused by name.
    """
    sd = _select_prefix(state_dict, prefix)
    out: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    biases: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in sd.items():
        if key in _TIMM_TO_HF_TOP:
            out[_TIMM_TO_HF_TOP[key]] = value
            continue
        m = _EVA_BLOCK.match(key)
        if not m:
            unknown.append(prefix + key)
            continue
        i, rest = int(m.group(1)), m.group(2)
        if rest in ("attn.q_bias", "attn.v_bias", "attn.k_bias"):
            biases.setdefault(i, {})[rest.split(".")[1][0]] = value
        else:
            out[f"encoder.layers.{i}.{_TIMM_TO_HF_BLOCK[rest]}"] = value
    if unknown:
        raise WeightsMismatchError(f"timm Eva keys with no Blip2VisionModel counterpart: {_short_list(sorted(unknown))}")
    for i, b in sorted(biases.items()):
        if set(b) - {"k"} != {"q", "v"}:
            raise WeightsMismatchError(f"blocks.{i}.attn has q_bias/v_bias only partly: {sorted(b)}")
        if "k" in b and torch.count_nonzero(b["k"]):
            raise WeightsMismatchError(f"blocks.{i}.attn.k_bias is not zero; EVA has no key bias")
        out[f"encoder.layers.{i}.self_attn.qkv.bias"] = torch.cat([b["q"], torch.zeros_like(b["q"]), b["v"]])
    return out


def convert_blip2_hf_to_eva_timm(
    state_dict: Mapping[str, torch.Tensor], *, prefix: str = ""
) -> dict[str, torch.Tensor]:
    """transformers ``Blip2VisionModel`` keys -> timm ``Eva`` keys.

    Pass ``prefix="vision_model."`` to take the vision part of a whole BLIP-2 state dict. The fused
    ``qkv.bias`` is split into ``q_bias`` and ``v_bias``; its key third must be exactly zero (EVA
    has no key bias), else the conversion is refused. ``post_layernorm.*`` is refused too: it is
    BLIP-2's ``ln_vision``, which belongs to the model, not to the tower — remove it from the
    input (and load it into ``ln_vision``) before converting.
    """
    sd = _select_prefix(state_dict, prefix)
    out: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    post = sorted(prefix + k for k in sd if k.startswith("post_layernorm."))
    if post:
        raise WeightsMismatchError(
            f"{post} is BLIP-2's ln_vision, not part of the EVA tower: pop it and load it into the "
            "model's ln_vision, then convert the rest"
        )
    for key, value in sd.items():
        if key in _HF_TO_TIMM_TOP:
            out[_HF_TO_TIMM_TOP[key]] = value
            continue
        m = _HF_LAYER.match(key)
        if not m:
            unknown.append(prefix + key)
            continue
        i, rest = int(m.group(1)), m.group(2)
        if rest == "self_attn.qkv.bias":
            if value.ndim != 1 or value.shape[0] % 3:
                raise WeightsMismatchError(f"{prefix + key} has shape {tuple(value.shape)}, not (3 * width,)")
            q, k, v = value.chunk(3)
            if torch.count_nonzero(k):
                raise WeightsMismatchError(
                    f"{prefix + key}: the key part of the qkv bias is not zero (max |k_bias| = "
                    f"{k.abs().max().item():.3g}); timm's Eva and LAVIS's EVA have no key bias, so this "
                    "checkpoint cannot be converted without changing its outputs"
                )
            out[f"blocks.{i}.attn.q_bias"] = q.clone()
            out[f"blocks.{i}.attn.v_bias"] = v.clone()
        elif rest in _HF_TO_TIMM_BLOCK:
            out[f"blocks.{i}.{_HF_TO_TIMM_BLOCK[rest]}"] = value
        else:
            unknown.append(prefix + key)
    if unknown:
        raise WeightsMismatchError(f"Blip2VisionModel keys with no timm Eva counterpart: {_short_list(sorted(unknown))}")
    return out


def blip2_vision_config_kwargs_from_eva(model: nn.Module) -> dict[str, Any]:
    """``Blip2VisionConfig`` kwargs for the architecture of a timm ``Eva`` (e.g. ``tower.model``).

    Also a check that the Eva is the plain EVA of LAVIS / BLIP-2 (class token, absolute position
    embeddings, pre-norm blocks, no RoPE, no layer scale, no sub-LayerNorms, no SwiGLU, fused qkv,
    exact GELU, one LayerNorm eps): anything else cannot be expressed as a Blip2VisionModel and is
    refused with the offending feature named. ``num_hidden_layers`` is the number of blocks the
    model holds (after pruning).
    """
    from timm.models.eva import Eva, EvaAttention, EvaBlock
    from timm.layers import Mlp

    if not isinstance(model, Eva):
        raise TypeError(f"expected a timm Eva, got {type(model).__name__}")
    problems = []
    if model.cls_token is None or model.reg_token is not None or model.no_embed_class:
        problems.append("needs exactly one class token with a position embedding (no register tokens)")
    if model.pos_embed is None:
        problems.append("needs absolute position embeddings")
    if model.rope is not None:
        problems.append("uses rotary position embeddings")
    if not isinstance(model.norm_pre, nn.Identity):
        problems.append("has a pre-transformer norm")
    if model.patch_embed.proj.bias is None:
        problems.append("patch embedding without bias")
    img_h, img_w = model.patch_embed.img_size
    patch_h, patch_w = model.patch_embed.patch_size
    if img_h != img_w or patch_h != patch_w:
        problems.append(f"non-square image {model.patch_embed.img_size} or patch {model.patch_embed.patch_size}")
    eps = set()
    heads, mlp_hidden, qkv_bias = set(), set(), set()
    for i, blk in enumerate(model.blocks):
        if type(blk) is not EvaBlock:
            problems.append(f"block {i} is {type(blk).__name__}, not a pre-norm EvaBlock")
            continue
        attn, mlp = blk.attn, blk.mlp
        if blk.gamma_1 is not None or blk.gamma_2 is not None:
            problems.append(f"block {i} has layer scale")
        if type(attn) is not EvaAttention or attn.qkv is None:
            problems.append(f"block {i} attention is not EVA's fused-qkv attention")
            continue
        if not (isinstance(attn.q_norm, nn.Identity) and isinstance(attn.norm, nn.Identity)) or attn.gate is not None:
            problems.append(f"block {i} attention has qk-norm, an inner scale norm or a gate")
        if attn.head_dim * attn.num_heads != model.embed_dim:
            problems.append(f"block {i} head_dim x heads != width")
        if type(mlp) is not Mlp or not isinstance(mlp.norm, nn.Identity):
            problems.append(f"block {i} MLP is {type(mlp).__name__} (needs a plain Mlp without norm)")
            continue
        if not (isinstance(mlp.act, nn.GELU) and mlp.act.approximate == "none"):
            problems.append(f"block {i} MLP activation is {mlp.act}, not exact GELU")
        for norm in (blk.norm1, blk.norm2):
            if type(norm) not in (nn.LayerNorm,) and not issubclass(type(norm), nn.LayerNorm):
                problems.append(f"block {i} uses {type(norm).__name__}, not LayerNorm")
            else:
                eps.add(norm.eps)
        heads.add(attn.num_heads)
        mlp_hidden.add(mlp.fc1.out_features)
        qkv_bias.add(attn.q_bias is not None)
    if len(eps) > 1 or len(heads) > 1 or len(mlp_hidden) > 1 or len(qkv_bias) > 1:
        problems.append("blocks differ in LayerNorm eps, heads, MLP width or qkv bias")
    if problems:
        raise ValueError("this timm Eva is not the plain EVA a Blip2VisionModel can hold: " + "; ".join(problems))
    return dict(
        hidden_size=int(model.embed_dim),
        intermediate_size=int(mlp_hidden.pop()),
        num_hidden_layers=len(model.blocks),
        num_attention_heads=int(heads.pop()),
        image_size=int(img_h),
        patch_size=int(patch_h),
        layer_norm_eps=float(eps.pop()),
        qkv_bias=bool(qkv_bias.pop()),
        hidden_act="gelu",
    )


# ----------------------------------------------------------------------------------------------
# LAVIS's EVA ViT rebuilt in timm
# ----------------------------------------------------------------------------------------------

# LAVIS VisionTransformer kwargs that have no effect on the tower's eval-mode output.
_LAVIS_NO_EFFECT = {"use_mean_pooling", "use_checkpoint", "num_classes"}


def lavis_eva_timm_kwargs(vit_cfg: Mapping[str, Any]) -> tuple[dict[str, Any], int]:
    """timm ``Eva`` kwargs (JSON-able) and image size that rebuild a LAVIS ``eva_vit.VisionTransformer``.

    ``vit_cfg`` holds LAVIS's constructor kwargs, e.g. the oracle fixture's ``cfg.vit``
    (``img_size 32, patch_size 8, embed_dim 48, depth 2, num_heads 4, mlp_ratio 4.3637, qkv_bias``)
    or ``create_eva_vit_g``'s (``224, 14, 1408, 39, 16, 4.3637, qkv_bias``). timm's ``Eva`` with its
    defaults is then exactly LAVIS's module: LayerNorm eps 1e-6, exact GELU, absolute position
    embeddings, no RoPE, no layer scale, fused qkv with q/v bias and a zero key bias; the MLP width
    is ``int(embed_dim * mlp_ratio)`` in both. Options LAVIS's EVA-g never uses (relative position
    bias, layer scale, ``qk_scale``) are refused. Dropout/drop-path are carried over although the
    frozen tower never runs them.
    """
    cfg = dict(vit_cfg)
    unknown = set(cfg) - {
        "img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads", "mlp_ratio", "qkv_bias",
        "qk_scale", "drop_rate", "attn_drop_rate", "drop_path_rate", "norm_layer", "init_values",
        "use_abs_pos_emb", "use_rel_pos_bias", "use_shared_rel_pos_bias", "init_scale",
    } - _LAVIS_NO_EFFECT
    if unknown:
        raise ValueError(f"unknown LAVIS EVA ViT option(s) {sorted(unknown)}")
    if cfg.get("qk_scale") is not None:
        raise ValueError("LAVIS EVA qk_scale other than head_dim**-0.5 has no timm Eva equivalent")
    if cfg.get("use_rel_pos_bias") or cfg.get("use_shared_rel_pos_bias"):
        raise ValueError("LAVIS EVA with relative position bias has no timm Eva equivalent")
    if not cfg.get("use_abs_pos_emb", True):
        raise ValueError("LAVIS EVA without absolute position embeddings is not supported")
    if cfg.get("init_values") not in (None, 0, 0.0):
        raise ValueError("LAVIS EVA with layer scale (init_values) is not BLIP-2's EVA and is not supported here")
    norm = cfg.get("norm_layer")
    if norm is not None and not _is_layernorm_eps_1e6(norm):
        raise ValueError(f"LAVIS EVA norm_layer {norm!r}: only LayerNorm(eps=1e-6) matches timm's Eva")
    kwargs: dict[str, Any] = dict(
        patch_size=int(cfg.get("patch_size", 16)),
        embed_dim=int(cfg.get("embed_dim", 768)),
        depth=int(cfg.get("depth", 12)),
        num_heads=int(cfg.get("num_heads", 12)),
        mlp_ratio=float(cfg.get("mlp_ratio", 4.0)),
        qkv_bias=bool(cfg.get("qkv_bias", False)),
        # no effect in the frozen (eval-mode) tower; kept for a faithful architecture record
        proj_drop_rate=float(cfg.get("drop_rate", 0.0)),
        attn_drop_rate=float(cfg.get("attn_drop_rate", 0.0)),
        drop_path_rate=float(cfg.get("drop_path_rate", 0.0)),
    )
    if "in_chans" in cfg:
        kwargs["in_chans"] = int(cfg["in_chans"])
    return kwargs, int(cfg.get("img_size", 224))


def _is_layernorm_eps_1e6(norm: Any) -> bool:
    """``norm_layer`` as a string (``"LayerNorm(eps=1e-6)"``, as the oracle records it) or a constructor."""
    if isinstance(norm, str):
        return re.fullmatch(r"(nn\.)?LayerNorm\(eps=1e-0?6\)", norm.replace(" ", "")) is not None
    layer = norm(8)
    return isinstance(layer, nn.LayerNorm) and layer.eps == 1e-6


def lavis_eva_vision_config(vit_cfg: Mapping[str, Any], **overrides: Any) -> VisionConfig:
    """The :class:`VisionConfig` of a timm tower equal to a LAVIS EVA ViT (see :func:`lavis_eva_timm_kwargs`).

    ``feature_layer`` is -1: LAVIS builds its ViT with exactly the blocks it uses (39 of EVA-g's 40).
    ``overrides`` replace VisionConfig fields (``dtype``, ``pretrained``, ...).
    """
    kwargs, img_size = lavis_eva_timm_kwargs(vit_cfg)
    fields = dict(backend="timm", name=LAVIS_EVA_TIMM_NAME, model_kwargs=kwargs, image_size=img_size, feature_layer=-1)
    fields.update(overrides)
    return VisionConfig(**fields)




__all__ = [
    "LAVIS_EVA_TIMM_NAME",
    "blip2_vision_config_kwargs_from_eva",
    "convert_blip2_hf_to_eva_timm",
    "convert_eva_timm_to_blip2_hf",
    "convert_lavis_eva_to_timm",
    "lavis_eva_timm_kwargs",
    "lavis_eva_vision_config",
]

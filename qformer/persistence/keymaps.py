"""State-dict key conversion between qformer and the layouts of LAVIS, transformers and BERT.

Pure functions on ``dict[str, Tensor]``. Each ``*_to_ours`` returns a :class:`Converted`:
the renamed tensors, the source keys it dropped on purpose (with the reason), and the
source keys it did not recognise (which a strict load reports as unexpected). Nothing is
silently discarded.

Our Q-Former names (under ``qformer.``)::

    embeddings.{word_embeddings,position_embeddings,layer_norm}
    layers.N.{self_attn,cross_attn}.{query,key,value,dense,layer_norm}
    layers.N.{ffn,ffn_query}.{fc1,fc2,layer_norm}
    lm_head.{dense,layer_norm,bias}      (decoder tied to the word embeddings)
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

# (source suffix, our suffix) inside one BERT layer; the source side covers LAVIS / BERT
# ("attention.self.") and transformers' Blip2 ("attention.attention.").
_LAYER_PARTS: list[tuple[str, str]] = [
    ("attention.self.", "self_attn."),
    ("attention.attention.", "self_attn."),
    ("attention.output.dense.", "self_attn.dense."),
    ("attention.output.LayerNorm.", "self_attn.layer_norm."),
    ("crossattention.self.", "cross_attn."),
    ("crossattention.attention.", "cross_attn."),
    ("crossattention.output.dense.", "cross_attn.dense."),
    ("crossattention.output.LayerNorm.", "cross_attn.layer_norm."),
    ("intermediate_query.dense.", "ffn_query.fc1."),
    ("output_query.dense.", "ffn_query.fc2."),
    ("output_query.LayerNorm.", "ffn_query.layer_norm."),
    ("intermediate.dense.", "ffn.fc1."),
    ("output.dense.", "ffn.fc2."),
    ("output.LayerNorm.", "ffn.layer_norm."),
]
_LAYER_RE = re.compile(r"^encoder\.layer\.(\d+)\.(.+)$")
_OUR_LAYER_RE = re.compile(r"^layers\.(\d+)\.(.+)$")


@dataclass
class Converted:
    state_dict: dict[str, torch.Tensor]
    dropped: dict[str, str] = field(default_factory=dict)  # source key -> why it is not needed
    unrecognised: list[str] = field(default_factory=list)  # source keys with no place in our model


def _bert_layer_key(rest: str) -> str | None:
    """``encoder.layer.N.<part>`` (LAVIS/BERT/transformers) -> ``layers.N.<ours>``."""
    m = _LAYER_RE.match(rest)
    if not m:
        return None
    idx, tail = m.groups()
    for src, ours in _LAYER_PARTS:
        if tail.startswith(src):
            return f"layers.{idx}.{ours}{tail[len(src):]}"
    return None


def _our_layer_key(rest: str, *, flavor: str) -> str | None:
    """Inverse of :func:`_bert_layer_key`; ``flavor`` "lavis" or "hf" picks the attention name
    (LAVIS/BERT ``attention.self``, transformers ``attention.attention``)."""
    m = _OUR_LAYER_RE.match(rest)
    if not m:
        return None
    idx, tail = m.groups()
    other = "attention.attention." if flavor == "lavis" else "attention.self."
    # Longest of our suffixes first, so "self_attn.dense." wins over "self_attn.".
    inverse = sorted(((ours, src) for src, ours in _LAYER_PARTS if not src.endswith(other)),
                     key=lambda pair: -len(pair[0]))
    for ours, src in inverse:
        if tail.startswith(ours):
            return f"encoder.layer.{idx}.{src}{tail[len(ours):]}"
    return None


def _check_tied(sd: dict[str, torch.Tensor], key: str, other: str, out: Converted) -> None:
    """A tied duplicate (LM decoder weight / bias) is dropped, but only if it really equals
    the tensor it is tied to — an untied checkpoint would otherwise lose information."""
    if other in sd and sd[key].shape == sd[other].shape and torch.equal(sd[key], sd[other]):
        out.dropped[key] = f"tied to {other}"
    else:
        out.unrecognised.append(key)


# ---------------------------------------------------------------------------- LAVIS
def lavis_to_ours(sd: dict[str, torch.Tensor], *, vision_prefix: str | None = "vision.") -> Converted:
    """LAVIS ``Blip2Qformer`` (``blip2_pretrained.pth``) -> ours.

    ``visual_encoder.*`` keys (present only when the file holds the ViT) are returned under
    ``vision_prefix`` with LAVIS's EVA names, which equal timm ``Eva``'s; pass
    ``vision_prefix=None`` to drop them.
    """
    out = Converted(state_dict={})
    word = "Qformer.bert.embeddings.word_embeddings.weight"
    for key, value in sd.items():
        new: str | None = None
        if key in ("query_tokens", "temp") or key.split(".")[0] in ("ln_vision", "vision_proj", "text_proj", "itm_head"):
            new = key
        elif key.startswith("visual_encoder."):
            if vision_prefix is None:
                out.dropped[key] = "vision tower weights not requested"
                continue
            new = vision_prefix + key[len("visual_encoder.") :]
        elif key == "Qformer.bert.embeddings.position_ids":
            out.dropped[key] = "buffer (positions are computed)"
            continue
        elif key.startswith("Qformer.bert.embeddings."):
            tail = key[len("Qformer.bert.embeddings.") :].replace("LayerNorm.", "layer_norm.")
            new = "qformer.embeddings." + tail
        elif key.startswith("Qformer.bert."):
            layer = _bert_layer_key(key[len("Qformer.bert.") :])
            new = None if layer is None else "qformer." + layer
        elif key == "Qformer.cls.predictions.decoder.weight":
            _check_tied(sd, key, word, out)
            continue
        elif key == "Qformer.cls.predictions.decoder.bias":
            _check_tied(sd, key, "Qformer.cls.predictions.bias", out)
            continue
        elif key == "Qformer.cls.predictions.bias":
            new = "qformer.lm_head.bias"
        elif key.startswith("Qformer.cls.predictions.transform."):
            tail = key[len("Qformer.cls.predictions.transform.") :].replace("LayerNorm.", "layer_norm.")
            new = "qformer.lm_head." + tail
        if new is None:
            out.unrecognised.append(key)
        else:
            out.state_dict[new] = value
    return out


def ours_to_lavis(
    sd: dict[str, torch.Tensor], *, vision_prefix: str = "vision.", projection: str | None = None
) -> dict[str, torch.Tensor]:
    """Ours -> LAVIS names (for LAVIS users and the oracle tests): ``Blip2Qformer``; with
    ``projection`` ("opt_proj", "t5_proj", "llm_proj") ``language_projection`` gets the name of
    LAVIS's ``Blip2OPT`` / ``Blip2T5`` / ``Blip2VicunaInstruct`` and ``Blip2T5Instruct``
    (the instruct models keep the Q-Former's text-input parts and have no ``Qformer.cls``)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if projection is not None and key.startswith("language_projection."):
            out[projection + "." + key[len("language_projection."):]] = value
            continue
        if key.startswith("qformer.embeddings."):
            out["Qformer.bert.embeddings." + key[len("qformer.embeddings.") :].replace("layer_norm.", "LayerNorm.")] = value
        elif key.startswith("qformer.layers."):
            out["Qformer.bert." + _our_layer_key(key[len("qformer.") :], flavor="lavis")] = value
        elif key == "qformer.lm_head.bias":
            out["Qformer.cls.predictions.bias"] = value
            out["Qformer.cls.predictions.decoder.bias"] = value
        elif key.startswith("qformer.lm_head."):
            tail = key[len("qformer.lm_head.") :].replace("layer_norm.", "LayerNorm.")
            out["Qformer.cls.predictions.transform." + tail] = value
        elif key.startswith(vision_prefix):
            out["visual_encoder." + key[len(vision_prefix) :]] = value
        else:
            out[key] = value
    if "qformer.embeddings.word_embeddings.weight" in sd and "qformer.lm_head.bias" in sd:
        out["Qformer.cls.predictions.decoder.weight"] = sd["qformer.embeddings.word_embeddings.weight"]
    return out


# ---------------------------------------------------------------------------- transformers
def hf_retrieval_to_ours(sd: dict[str, torch.Tensor], *, vision_prefix: str = "vision.") -> Converted:
    """transformers ``Blip2ForImageTextRetrieval`` (or the non-LLM part of
    ``Blip2ForConditionalGeneration``) -> ours.

    ``vision_model.post_layernorm`` is BLIP-2's ``ln_vision``; the rest of ``vision_model.*``
    goes under ``vision_prefix`` unchanged (our "hf" tower wraps ``Blip2VisionModel``).
    transformers keeps no ``temp`` and no LM head: a load reports them as initialised.
    """
    out = Converted(state_dict={})
    for key, value in sd.items():
        new: str | None = None
        if key == "query_tokens" or key.startswith(("itm_head.", "language_projection.")):
            new = key
        elif key.startswith("vision_model.post_layernorm."):
            new = "ln_vision." + key[len("vision_model.post_layernorm.") :]
        elif key.startswith("vision_model."):
            new = vision_prefix + key[len("vision_model.") :]
        elif key.startswith("vision_projection."):
            new = "vision_proj." + key[len("vision_projection.") :]
        elif key.startswith("text_projection."):
            new = "text_proj." + key[len("text_projection.") :]
        elif key == "embeddings.position_ids":
            out.dropped[key] = "buffer (positions are computed)"
            continue
        elif key.startswith("embeddings."):
            new = "qformer." + key
        elif key.startswith("qformer.layernorm."):
            new = "qformer.embeddings.layer_norm." + key[len("qformer.layernorm.") :]
        elif key.startswith("qformer."):
            layer = _bert_layer_key(key[len("qformer.") :])
            new = None if layer is None else "qformer." + layer
        if new is None:
            out.unrecognised.append(key)
        else:
            out.state_dict[new] = value
    return out


def ours_to_hf_retrieval(sd: dict[str, torch.Tensor], *, vision_prefix: str = "vision.") -> dict[str, torch.Tensor]:
    """Ours -> transformers ``Blip2ForImageTextRetrieval`` (drops ``temp`` and the LM head,
    which that class does not have)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if key.startswith("ln_vision."):
            out["vision_model.post_layernorm." + key[len("ln_vision.") :]] = value
        elif key.startswith(vision_prefix):
            out["vision_model." + key[len(vision_prefix) :]] = value
        elif key.startswith("vision_proj."):
            out["vision_projection." + key[len("vision_proj.") :]] = value
        elif key.startswith("text_proj."):
            out["text_projection." + key[len("text_proj.") :]] = value
        elif key.startswith("qformer.embeddings.layer_norm."):
            out["qformer.layernorm." + key[len("qformer.embeddings.layer_norm.") :]] = value
        elif key.startswith("qformer.embeddings."):
            out[key[len("qformer.") :]] = value
        elif key.startswith("qformer.layers."):
            out["qformer." + _our_layer_key(key[len("qformer.") :], flavor="hf")] = value
        elif key == "temp" or key.startswith("qformer.lm_head."):
            continue
        else:
            out[key] = value
    return out


# ---------------------------------------------------------------------------- BERT
def bert_to_qformer(sd: dict[str, torch.Tensor]) -> Converted:
    """A transformers BERT checkpoint (``BertModel``, ``BertForPreTraining``,
    ``BertLMHeadModel``, with or without the ``bert.`` prefix) -> our Q-Former keys
    *relative to* ``qformer.``. The query FFN is NOT filled here (see
    :func:`qformer.checkpoint.init_qformer_from_bert`, which copies the text FFN into it)."""
    out = Converted(state_dict={})
    for key, value in sd.items():
        k = key[len("bert.") :] if key.startswith("bert.") else key
        new: str | None = None
        if k in ("embeddings.position_ids",) or k.startswith(("embeddings.token_type_embeddings.", "pooler.")):
            out.dropped[key] = "not used by the Q-Former (no token types, no pooler)"
            continue
        if k.startswith("cls.seq_relationship."):
            out.dropped[key] = "next-sentence head, not used"
            continue
        if k.startswith("embeddings."):
            new = k.replace("LayerNorm.", "layer_norm.")
        elif k.startswith("encoder.layer."):
            new = _bert_layer_key(k)
        elif k == "cls.predictions.decoder.weight":
            _check_tied(sd, key, "bert.embeddings.word_embeddings.weight" if "bert.embeddings.word_embeddings.weight" in sd else "embeddings.word_embeddings.weight", out)
            continue
        elif k == "cls.predictions.decoder.bias":
            _check_tied(sd, key, "cls.predictions.bias", out)
            continue
        elif k == "cls.predictions.bias":
            new = "lm_head.bias"
        elif k.startswith("cls.predictions.transform."):
            new = "lm_head." + k[len("cls.predictions.transform.") :].replace("LayerNorm.", "layer_norm.")
        if new is None:
            out.unrecognised.append(key)
        else:
            out.state_dict[new] = value
    return out


__all__ = [
    "Converted",
    "bert_to_qformer",
    "hf_retrieval_to_ours",
    "lavis_to_ours",
    "ours_to_hf_retrieval",
    "ours_to_lavis",
]

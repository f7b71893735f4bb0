"""A Blip2 with weights set by hand for tests of attention maps, Grad-CAM and search: its ITM
head tells whether a caption's colour word is the colour of the image's only object (a square
on one cell of a 4x4 patch grid). See :func:`corner_model`."""

from __future__ import annotations

import torch

from qformer import Blip2, Blip2Config, QFormerConfig, VisionConfig

COLORS = {"red": (1, -1, -1), "green": (-1, 1, -1), "blue": (-1, -1, 1), "yellow": (1, 1, -1), "white": (1, 1, 1)}
SIZE, PATCH = 32, 8
GRID = SIZE // PATCH


def scene(color: str, row: int, col: int) -> torch.Tensor:
    """A black (-1) image with one coloured PATCH x PATCH square on grid cell (row, col)."""
    img = torch.full((3, SIZE, SIZE), -1.0)
    img[:, row * PATCH:(row + 1) * PATCH, col * PATCH:(col + 1) * PATCH] = torch.tensor(COLORS[color])[:, None, None]
    return img


@torch.no_grad()
def corner_model(tok) -> Blip2:
    """A real Blip2 (timm ViT, one-layer Q-Former) with weights set by hand so that its ITM head
    tells whether the caption's colour word is the colour of the image's object:

    * the ViT's block is the identity and its patch embedding the mean colour of each patch
      (channels 0-2), the class token looks like background; a fixed zero-mean pattern on
      channels 16-31 (also in the query tokens) keeps every LayerNorm nearly linear;
    * self-attention averages the text, whose colour words carry their colour code (dims 8-10);
    * cross-attention: a constant query meets keys measuring brightness, so the query attends to
      the object (~0.9); the values carry the patch colour (dims 11-13);
    * the query FFN computes sum_i |text_i + image_i| (6 when the colours agree) in dim 14 and the
      ITM head reads it. Its input scales are measured on the five matching pairs.

    Nothing here knows where the object is: Grad-CAM must find it through the attention."""
    vision = VisionConfig(backend="timm", name="vit_tiny_patch16_224", image_size=SIZE, feature_layer=-1,
                          mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),  # files: 0 -> -1, 255 -> 1 (a scene)
                          model_kwargs=dict(embed_dim=32, depth=1, num_heads=2, patch_size=PATCH, mlp_ratio=2.0))
    cfg = Blip2Config(vision=vision, qformer=QFormerConfig(
        vocab_size=len(tok), hidden_size=32, num_layers=1, num_heads=2, intermediate_size=8, max_position_embeddings=16,
        encoder_width=32, num_query_tokens=2, cross_attention_freq=1), embed_dim=16, max_txt_len=8)
    model = Blip2(cfg, tokenizer=tok).eval()
    text_dims, image_dims, agree = 8, 11, 14
    anchor = torch.tensor([1.0, -1.0] * 8)
    for p in model.parameters():
        p.zero_()
    for module in model.modules():
        if isinstance(module, torch.nn.LayerNorm):
            module.weight.fill_(1.0)
    vit = model.vision.model
    for c in range(3):
        vit.patch_embed.proj.weight[c, c] = 1.0 / PATCH**2
    vit.patch_embed.proj.bias[16:] = anchor
    vit.cls_token[0, 0, :3], vit.cls_token[0, 0, 16:] = -1.0, anchor
    model.query_tokens[0, :, 16:] = anchor
    for word, code in COLORS.items():
        model.qformer.embeddings.word_embeddings.weight[tok.convert_tokens_to_ids(word), text_dims:text_dims + 3] = (
            torch.tensor(code, dtype=torch.float))
    layer = model.qformer.layers[0]
    ca = layer.cross_attn
    ca.query.bias[:] = 1.0
    ca.key.weight[:, :3] = 0.5
    for i in range(3):
        layer.self_attn.value.weight[text_dims + i, text_dims + i] = 1.0
        layer.self_attn.dense.weight[text_dims + i, text_dims + i] = 1.0
        ca.value.weight[image_dims + i, i] = 1.0
        ca.dense.weight[image_dims + i, image_dims + i] = 0.3
    # Measure how the two codes arrive at the FFN (x ~ a * code + b per dim) on the matching pairs.
    seen = {}
    hook = layer.ffn_query.register_forward_pre_hook(lambda mod, args: seen.__setitem__("x", args[0][:, 0]))
    names = list(COLORS)
    model.itm_logits(*(lambda e: (e.input_ids, e.attention_mask))(tok([f"a {c} square" for c in names],
                                                                     return_tensors="pt", padding=True)),
                     model.image_kv(model.embed_image(torch.stack([scene(c, 1, 1) for c in names]))))
    hook.remove()
    codes = torch.tensor([COLORS[c] for c in names], dtype=torch.float)
    k = 4.0
    ffn = layer.ffn_query
    for i in range(3):
        design = torch.stack([codes[:, i], torch.ones(len(names))], 1)
        (a_t, b_t), (a_c, b_c) = (torch.linalg.lstsq(design, seen["x"][:, d + i:d + i + 1]).solution[:, 0].tolist()
                                  for d in (text_dims, image_dims))
        for j, sign in enumerate((1.0, -1.0)):  # |z| = (gelu(kz) + gelu(-kz)) / k
            ffn.fc1.weight[2 * i + j, text_dims + i] = sign * k / a_t
            ffn.fc1.weight[2 * i + j, image_dims + i] = sign * k / a_c
            ffn.fc1.bias[2 * i + j] = -sign * k * (b_t / a_t + b_c / a_c)
            ffn.fc2.weight[agree, 2 * i + j] = 0.25 / k
    model.itm_head.weight[1, agree] = 4.0
    return model


def save_scene(path, color: str, row: int, col: int) -> str:
    """:func:`scene` as a PNG (the model's preprocessing maps 0 -> -1 and 255 -> 1 back)."""
    from PIL import Image

    pixels = ((scene(color, row, col) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    Image.fromarray(pixels).save(path)
    return str(path)

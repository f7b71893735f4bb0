"""Tiny local models for the demo's tests, saved as the demo loads them: a stage-2 caption model
(random OPT), an instruction-aware one, and :func:`corner_model.corner_model` as the stage-1
model (it tells colours, so search and Grad-CAM have right answers), plus a folder of scenes."""

from __future__ import annotations

from pathlib import Path

import torch
from corner_model import COLORS, GRID, corner_model, save_scene

from qformer import Blip2, Blip2Config, LLMConfig, QFormerConfig, VisionConfig
from qformer.testing import randomize_, write_bert_tokenizer, write_causal_tokenizer


def _tiny_opt(directory: Path) -> Path:
    from transformers import OPTConfig, OPTForCausalLM

    tok = write_causal_tokenizer(directory)
    cfg = OPTConfig(vocab_size=len(tok) + 8, hidden_size=48, num_hidden_layers=2, ffn_dim=96, num_attention_heads=4,
                    max_position_embeddings=96, word_embed_proj_dim=48, pad_token_id=tok.pad_token_id,
                    bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, dropout=0.0)
    torch.manual_seed(0)
    model = OPTForCausalLM(cfg)
    randomize_(model, 0)
    model.save_pretrained(str(directory))
    return directory


def stage2_model(root: Path, *, instruction_aware: bool = False, seed: int = 0) -> Blip2:
    """A tiny stage-2 model (no stage-1 heads); instruction-aware ones read text in the Q-Former."""
    llm = root / "opt"
    if not (llm / "config.json").is_file():
        _tiny_opt(llm)
    tok = write_bert_tokenizer(root / "bert") if instruction_aware else None
    cfg = Blip2Config(
        vision=VisionConfig(backend="timm", name="vit_tiny_patch16_224", image_size=32, feature_layer=-1,
                            model_kwargs=dict(embed_dim=48, depth=2, num_heads=4, patch_size=8, mlp_ratio=2.0)),
        qformer=QFormerConfig(vocab_size=len(tok) if tok else 100, hidden_size=64, num_layers=2, num_heads=4,
                              intermediate_size=128, max_position_embeddings=48, encoder_width=48, num_query_tokens=4,
                              text_input=instruction_aware, lm_head=False),
        stage1_heads=False, instruction_aware=instruction_aware, llm=LLMConfig(path=str(llm), max_txt_len=16))
    torch.manual_seed(seed)
    model = Blip2(cfg, tokenizer=tok)
    randomize_(model, seed)
    return model.eval()


def write_scenes(folder: Path) -> dict[str, list[str]]:
    """Three scenes per colour (the object on another cell each time): colour -> file names."""
    folder.mkdir(parents=True, exist_ok=True)
    out: dict[str, list[str]] = {}
    for c, color in enumerate(COLORS):
        for cell in range(3):
            name = f"{color}_{cell}.png"
            save_scene(folder / name, color, cell, (cell + c) % GRID)
            out.setdefault(color, []).append(name)
    return out


def write_demo_models(root: Path) -> dict[str, Path]:
    """Saved models and scenes under ``root``: {"stage2", "instruct", "stage1", "images"}."""
    paths = {name: root / name for name in ("stage2", "instruct", "stage1", "images")}
    stage2_model(root).save_pretrained(paths["stage2"])
    stage2_model(root, instruction_aware=True, seed=1).save_pretrained(paths["instruct"])
    corner_model(write_bert_tokenizer(root / "corner-tok")).save_pretrained(paths["stage1"])
    write_scenes(paths["images"])
    return paths

"""A tiny, fully local adapter card for recipe tests: a timm tower saved to safetensors, the
test BERT tokenizer, a tiny OPT with its tokenizer, and imagefolder datasets of coloured
shapes with captions (plus some bad files)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from conftest import randomize_, write_bert_tokenizer, write_causal_tokenizer
from PIL import Image, ImageDraw

COLOURS = {"red": (220, 40, 40), "blue": (40, 60, 220), "green": (40, 180, 60), "white": (240, 240, 240)}
SHAPES = ["circle", "square"]


def write_shapes_folder(directory: Path, n: int, *, seed: int, bad: bool = False, references: bool = False) -> Path:
    """``n`` 32 px images of a coloured circle or square with a caption ("a red circle"); with
    ``references``, also a ``captions`` list of three (as COCO files and toy exports have)."""
    g = torch.Generator().manual_seed(seed)
    (directory / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        colour = list(COLOURS)[int(torch.randint(len(COLOURS), (1,), generator=g))]
        shape = SHAPES[int(torch.randint(2, (1,), generator=g))]
        im = Image.new("RGB", (32, 32), (20, 20, 20))
        d = ImageDraw.Draw(im)
        (d.ellipse if shape == "circle" else d.rectangle)([6, 6, 26, 26], fill=COLOURS[colour])
        name = f"images/{i:04d}.png"
        im.save(directory / name)
        row = {"file_name": name, "text": f"a {colour} {shape}"}
        if references:
            row["captions"] = [row["text"], f"the {shape} is {colour}", f"one {colour} {shape}"]
        rows.append(row)
    if bad:
        (directory / "images" / "corrupt.png").write_bytes(b"not a png at all")
        rows.append({"file_name": "images/corrupt.png", "text": "a broken image"})
        Image.new("RGB", (2, 2)).save(directory / "images" / "tiny.png")
        rows.append({"file_name": "images/tiny.png", "text": "a tiny image"})
        rows.append({"file_name": "images/0000.png", "text": "   "})
    (directory / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return directory


def write_shape_questions(folder: Path, *, bad: bool = False) -> Path:
    """``vqa.jsonl`` beside a shapes folder: a colour and a shape question per image, with
    question types (and, with ``bad``, a malformed line and a question about a missing image)."""
    rows = []
    for line in (folder / "metadata.jsonl").read_text().splitlines():
        row = json.loads(line)
        words = row["text"].split()
        if len(words) != 3 or not (folder / row["file_name"]).is_file():
            continue
        _, colour, shape = words
        n = len(rows)
        rows.append({"question_id": n, "image": row["file_name"], "question": "what colour is the shape?",
                     "answers": [colour] * 10, "question_type": "colour"})
        rows.append({"question_id": n + 1, "image": row["file_name"], "question": "what shape is it?",
                     "answers": [shape] * 10, "question_type": "shape"})
    lines = [json.dumps(r) for r in rows]
    if bad:
        lines += ["{not json", json.dumps({"question_id": "gone", "image": "images/missing.png", "question": "what?",
                                           "answers": ["x"] * 10})]
    (folder / "vqa.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "vqa.jsonl"


def make_tiny_card(root: Path, *, train_size: int = 48, eval_size: int = 16, llm: bool = True) -> Path:
    """Write everything a recipe run needs under ``root`` and return the card's path."""
    import timm
    from safetensors.torch import save_file
    from transformers import OPTConfig, OPTForCausalLM

    tok = write_bert_tokenizer(root / "bert")
    tower = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32, patch_size=8,
                              embed_dim=48, depth=2, num_heads=4)
    randomize_(tower, 0)
    save_file({k: v.contiguous() for k, v in tower.state_dict().items()}, str(root / "tower.safetensors"))
    card = {
        "name": "tiny",
        "description": "tiny local pairing for recipe tests",
        "tokenizer": str(root / "bert"),
        "qformer_init": None,
        "model": {
            "vision": {"backend": "timm", "name": "vit_tiny_patch16_224", "pretrained": str(root / "tower.safetensors"),
                       "model_kwargs": {"patch_size": 8, "embed_dim": 48, "depth": 2, "num_heads": 4},
                       "feature_layer": -1, "image_size": 32},
            "qformer": {"vocab_size": len(tok), "hidden_size": 64, "num_layers": 2, "num_heads": 4,
                        "intermediate_size": 128, "max_position_embeddings": 40, "encoder_width": 48,
                        "num_query_tokens": 8, "hidden_dropout": 0.1, "attention_dropout": 0.1},
            "embed_dim": 32,
            "max_txt_len": 16,
        },
        "data": {
            "augment": False,
            "cache_features": True,
            "stage1": {"train": str(write_shapes_folder(root / "train", train_size, seed=0, bad=True)),
                       "eval": str(write_shapes_folder(root / "val", eval_size, seed=1, references=True))},
            "stage2": {"train": str(root / "train"), "eval": str(root / "val")},
        },
        "instruct": {"lr": 1e-3, "min_lr": 1e-4, "warmup_steps": 2, "batch_size": 8, "max_steps": 6, "log_every": 1,
                     "eval_every": 3, "save_every": 3, "num_workers": 0, "mixed_precision": "no"},
        "stage1": {"lr": 1e-3, "min_lr": 1e-4, "warmup_steps": 2, "batch_size": 8, "max_steps": 6, "log_every": 1,
                   "eval_every": 3, "save_every": 3, "num_workers": 0, "mixed_precision": "no"},
        "stage2": {"lr": 1e-3, "min_lr": 1e-4, "warmup_steps": 2, "batch_size": 8, "max_steps": 6, "log_every": 1,
                   "eval_every": 3, "save_every": 3, "num_workers": 0, "mixed_precision": "no"},
        "eval": {"stage1": {"k": 4, "max_images": eval_size},
                 "stage2": {"num_beams": 2, "max_new_tokens": 6, "max_images": 8},
                 "instruct": {"num_beams": 2, "max_new_tokens": 4, "max_images": 12}},
    }
    card["data"]["instruct"] = {
        "train": [str(write_shape_questions(root / "train", bad=True)), {"path": str(root / "train"), "task": "caption"}],
        "eval": str(write_shape_questions(root / "val")),
    }
    if llm:
        lm_tok = write_causal_tokenizer(root / "opt")
        torch.manual_seed(0)
        opt = OPTForCausalLM(OPTConfig(vocab_size=len(lm_tok), hidden_size=48, num_hidden_layers=2, ffn_dim=96,
                                       num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=48,
                                       pad_token_id=lm_tok.pad_token_id, bos_token_id=lm_tok.bos_token_id,
                                       eos_token_id=lm_tok.eos_token_id))
        opt.save_pretrained(str(root / "opt"))
        card["model"]["llm"] = {"path": str(root / "opt"), "dtype": "float32", "prompt": "a photo of", "max_txt_len": 16}
    import yaml

    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump(card, sort_keys=False))
    return path

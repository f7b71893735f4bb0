"""Instruction-tuning data: instruction rows, LLaVA conversations, VQA and caption datasets
through InstructBLIP's templates, the square-root mixture, per-row prompts in the collator, and
video records."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from conftest import write_causal_tokenizer
from PIL import Image

from qformer.config import LLMConfig, VisionConfig
from qformer.data import Stage2Collator, open_instruction_dataset
from qformer.data.sources import BadRecord, CaptionRecord, FileCaptionSource
from qformer.data.sources.instruct import (CAPTION_TEMPLATES, VQA_TEMPLATES, InstructionMixture, InstructionSource,
                                           main_answer)
from qformer.stage2 import Stage2TextCollator

VISION = VisionConfig(backend="timm", name="vit_tiny_patch16_224", image_size=32, feature_layer=-1,
                      model_kwargs={"patch_size": 8, "embed_dim": 48, "depth": 1, "num_heads": 4})


def _images(root: Path, n: int) -> list[str]:
    root.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(n):
        Image.new("RGB", (32, 32), (10 * i, 100, 200)).save(root / f"{i}.png")
        names.append(f"{i}.png")
    return names


def _write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_instruction_rows_llava_and_vqa(tmp_path):
    names = _images(tmp_path, 3)
    inst = _write_jsonl(tmp_path / "inst.jsonl", [
        {"image": names[0], "instruction": "Describe the colour.", "answer": "Blue!"},
        {"image": names[1], "question": "how many?", "answers": ["two", "2", "two"], "instruction": "Count: how many?"},
        "{not json",
        {"instruction": "no image here", "answer": "x"},
    ])
    src = InstructionSource.from_file(inst)
    good = [r for r in src.records if isinstance(r, CaptionRecord)]
    assert [(r.prompt, r.caption) for r in good] == [("Describe the colour.", "Blue!"), ("Count: how many?", "two")]
    assert sum(isinstance(r, BadRecord) for r in src.records) == 2
    assert good[0].image == str(tmp_path / names[0]) and not good[0].video

    llava = tmp_path / "llava.json"
    llava.write_text(json.dumps([{"id": "a", "image": names[2], "conversations": [
        {"from": "human", "value": "<image>\nWhat is in the picture?"}, {"from": "gpt", "value": "A square."},
        {"from": "human", "value": "Which colour?"}, {"from": "gpt", "value": "Blue."}]}]))
    pairs = [(r.prompt, r.caption) for r in InstructionSource.from_file(llava).records]
    assert pairs == [("What is in the picture?", "A square."), ("Which colour?", "Blue.")]

    vqa = _write_jsonl(tmp_path / "vqa.jsonl", [{"image": names[0], "question": f"q{i}?", "answers": ["yes"] * 10,
                                                 "question_id": i} for i in range(40)])
    recs = InstructionSource.from_file(vqa).records  # auto: question + answers -> VQA templates
    used = Counter(next(t for t in VQA_TEMPLATES if t.format(f"q{i}?") == r.prompt) for i, r in enumerate(recs))
    assert len(used) >= 5 and all(r.caption == "yes" for r in recs)
    again = InstructionSource.from_file(vqa).records
    assert [r.prompt for r in again] == [r.prompt for r in recs]  # templates fixed by the key
    assert main_answer([{"answer": "b"}, {"answer": "a"}, {"answer": "a"}]) == "a" and main_answer(["x", "y"]) == "x"


def test_captions_and_the_square_root_mixture(tmp_path):
    names = _images(tmp_path, 2)
    caps = _write_jsonl(tmp_path / "caps.jsonl", [{"image": names[i % 2], "text": f"caption {i}"} for i in range(100)])
    vqa = _write_jsonl(tmp_path / "vqa.jsonl", [{"image": names[0], "question": "q?", "answers": ["a"] * 3,
                                                 "question_id": i} for i in range(400)])
    a = InstructionSource.from_captions(FileCaptionSource(caps))
    assert all(r.prompt in CAPTION_TEMPLATES for r in a.records)
    b = InstructionSource.from_file(vqa)
    mix = InstructionMixture([a, b], seed=0)
    assert len(mix) == 500
    assert mix.probabilities == pytest.approx([10 / 30, 20 / 30])  # sqrt(100) : sqrt(400)
    drawn = Counter(mix.record(i).key.split(":")[0] for i in range(len(mix)))
    assert abs(drawn["0"] / 500 - 1 / 3) < 0.06
    keys = [mix.record(i).key for i in range(len(mix)) if mix.record(i).key.startswith("0:")]
    assert len(set(keys)) == 100  # every caption drawn before any repeats (a small dataset cycles)
    assert [mix.record(i).key for i in range(20)] == [InstructionMixture([a, b], seed=0).record(i).key for i in range(20)]
    weighted = InstructionMixture([a, b], weights=[1, 0], seed=0)
    assert all(weighted.record(i).key.startswith("0:") for i in range(len(weighted)))
    with pytest.raises(Exception, match="weights"):
        InstructionMixture([a, b], weights=[1])

    with pytest.raises(Exception, match="weight to every"):
        open_instruction_dataset([str(vqa), {"path": str(caps), "task": "caption", "weight": 1.0}], vision=VISION)
    ds = open_instruction_dataset([str(vqa), str(caps)], vision=VISION, train=False)
    assert len(ds) == 500
    sample = ds[0]
    assert sample.prompt is not None and sample.pixel_values.shape == (3, 32, 32)


def test_collator_masks_each_rows_own_prompt(tmp_path):
    tok = write_causal_tokenizer(tmp_path / "tok")
    cfg = LLMConfig(path=str(tmp_path / "tok"), prompt="a photo of", max_txt_len=40)
    collate = Stage2TextCollator(tok, cfg, encoder_decoder=False)
    prompts = ["Question: what colour is it? Answer:", None, "a"]
    batch = collate(["red", "a cat", "dog"], prompts=prompts)
    for i, p in enumerate(prompts):
        p = cfg.prompt if p is None else p
        n_prompt = len(tok(p).input_ids)
        labels, ids = batch["labels"][i], batch["input_ids"][i]
        assert (labels[:n_prompt] == -100).all()
        kept = ids[labels != -100]
        assert tok.decode(kept).strip() == ["red", "a cat", "dog"][i]
    with pytest.raises(ValueError, match="prompts"):
        collate(["a", "b"], prompts=["x"])
    # too long: the instruction loses its start (BOS kept), the answer stays whole
    short = Stage2TextCollator(tok, LLMConfig(path=str(tmp_path / "tok"), max_txt_len=8), encoder_decoder=False)
    long_prompt = "Question: " + "what colour is the big red cat on the sofa " * 3 + "Answer:"
    b = short(["red cat"], prompts=[long_prompt])
    ids, labels = b["input_ids"][0], b["labels"][0]
    assert len(ids) == 8 and ids[0] == tok.bos_token_id
    assert tok.decode(ids[labels != -100]).strip() == "red cat"
    kept = tok.decode(ids[1:][labels[1:] == -100])
    assert kept and long_prompt.endswith(kept)  # the instruction's end survives


def test_video_records_become_clips(tmp_path):
    """A video row (a frame folder) is T sampled frames; a batch of images and clips fails clearly."""
    folder = tmp_path / "clip"
    _images(folder, 6)
    _images(tmp_path / "img", 1)
    rows = [{"video": "clip", "instruction": "what happens?", "answer": "it changes colour"},
            {"video": "missing_clip", "instruction": "what happens?", "answer": "x"}]
    inst = _write_jsonl(tmp_path / "video.jsonl", rows)
    ds = open_instruction_dataset(str(inst), vision=VISION, train=False, num_frames=3)
    items = [ds[i] for i in range(len(ds))]
    clips = [s for s in items if hasattr(s, "pixel_values") and s.pixel_values is not None]
    skipped = [s for s in items if not hasattr(s, "pixel_values")]
    assert len(clips) == 1 and clips[0].pixel_values.shape == (3, 3, 32, 32) and clips[0].prompt == "what happens?"
    assert len(skipped) == 1 and skipped[0].reason == "missing_image"
    tok = write_causal_tokenizer(tmp_path / "tok")
    text = Stage2TextCollator(tok, LLMConfig(path=str(tmp_path / "tok")), encoder_decoder=False)
    batch = Stage2Collator(text)([clips[0], clips[0]])
    assert batch["pixel_values"].shape == (2, 3, 3, 32, 32)
    img = _write_jsonl(tmp_path / "img.jsonl", [{"image": "img/0.png", "instruction": "colour?", "answer": "blue"}])
    image_sample = open_instruction_dataset(str(img), vision=VISION, train=False)[0]
    with pytest.raises(ValueError, match="different shapes"):
        Stage2Collator(text)([clips[0], image_sample])
    assert ds.source.has_video and not open_instruction_dataset(str(img), vision=VISION, train=False).source.has_video
    with pytest.raises(Exception, match="video clips are not in the feature cache"):
        open_instruction_dataset(str(inst), vision=VISION, train=False, feature_cache=object())

"""InstructBLIP: the instruction-aware Q-Former, transformers' InstructBlip and InstructBlipVideo
checkpoints (parity: loss, logits, greedy and beam generations; export round trips), LAVIS's
*_instruct .pth layout, video inputs, and what trains."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import write_bert_tokenizer, write_causal_tokenizer, write_seq2seq_tokenizer
from test_stage2 import _text_config

from qformer import Blip2
from qformer.stage2 import Stage2Objective, Stage2TextCollator
from qformer.testing import save_random_hf

IMG, Q, FRAMES = 32, 8, 3
INSTRUCTIONS = ["what colour is the cat?", "Question: how many dogs are there? Short answer:", "describe the image"]
ANSWERS = ["red", "two dogs", "a man riding a bus in the city"]


def make_hf_instructblip(directory: Path, kind: str, *, video: bool = False, seed: int = 0):
    """A tiny random transformers InstructBlip(Video)ForConditionalGeneration saved in the hub
    layout (LLM tokenizer at the top, the Q-Former's in qformer_tokenizer/)."""
    import transformers

    tok = (write_seq2seq_tokenizer if kind == "t5" else write_causal_tokenizer)(directory / "tok")
    placeholder = "<video>" if video else "<image>"
    tok.add_special_tokens({"additional_special_tokens": [placeholder]})
    token_id = tok.convert_tokens_to_ids(placeholder)
    qtok = write_bert_tokenizer(directory / "qformer_tokenizer")
    family = "InstructBlipVideo" if video else "InstructBlip"
    cfg = getattr(transformers, f"{family}Config")(
        vision_config=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                           image_size=IMG, patch_size=8, qkv_bias=True),
        qformer_config=dict(vocab_size=len(qtok), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=128, max_position_embeddings=64, encoder_hidden_size=48,
                            cross_attention_frequency=2, pad_token_id=qtok.pad_token_id),
        text_config=_text_config(kind, tok, len(tok) + 8).to_dict(),
        num_query_tokens=Q,
        **({"video_token_index": token_id} if video else {"image_token_index": token_id}),
    )
    hf = save_random_hf(getattr(transformers, f"{family}ForConditionalGeneration"), cfg, directory, tok, seed=seed)
    qtok.save_pretrained(str(directory / "qformer_tokenizer"))
    return hf, tok, qtok, token_id


def pixels(n=3, seed=0, frames=None):
    shape = (n, 3, IMG, IMG) if frames is None else (n, frames, 3, IMG, IMG)
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module", params=[("llama", False), ("t5", False), ("llama", True)],
                ids=["instructblip-llama", "instructblip-t5", "instructblipvideo-llama"])
def pair(request, tmp_path_factory):
    kind, video = request.param
    d = tmp_path_factory.mktemp(f"{kind}-{video}")
    hf, tok, qtok, token_id = make_hf_instructblip(d, kind, video=video)
    ours, report = Blip2.from_pretrained(d, llm_dtype="float32", return_report=True)
    assert report.ok, str(report)
    return kind, video, hf, ours.eval(), tok, qtok, token_id, d


def _visual(video, n=3, seed=0):
    return pixels(n, seed, frames=FRAMES if video else None)


def _hf_batch(kind, video, batch, token_id, qtok, instructions):
    b = batch["input_ids"].shape[0]
    slots = Q * (FRAMES if video else 1)
    q = qtok(instructions, padding="longest", return_tensors="pt")
    ids = torch.cat([torch.full((b, slots), token_id), batch["input_ids"]], 1)
    am = torch.cat([torch.ones(b, slots, dtype=torch.long), batch["attention_mask"]], 1)
    out = dict(input_ids=ids, attention_mask=am, qformer_input_ids=q.input_ids, qformer_attention_mask=q.attention_mask)
    if kind != "t5":
        out["labels"] = torch.cat([torch.full((b, slots), -100), batch["labels"]], 1)
    else:
        out.update(labels=batch["labels"], decoder_attention_mask=batch["decoder_attention_mask"])
    return out


def _collate(ours, kind):
    return Stage2TextCollator(ours.llm_tokenizer, ours.config.llm, encoder_decoder=kind == "t5",
                              qformer_tokenizer=ours.tokenizer, qformer_max_length=ours.config.instruction_tokens)


def test_config_of_a_transformers_directory(pair):
    kind, video, hf, ours, tok, qtok, *_ = pair
    cfg = ours.config
    assert cfg.instruction_aware and cfg.video == video and not cfg.stage1_heads
    assert cfg.qformer.text_input and not cfg.qformer.lm_head and ours.qformer.lm_head is None
    assert ours.tokenizer.get_vocab() == qtok.get_vocab()  # the qformer_tokenizer/ folder, as saved


def test_loss_and_logits_match_transformers(pair):
    kind, video, hf, ours, tok, qtok, token_id, _ = pair
    batch = _collate(ours, kind)(ANSWERS, prompts=INSTRUCTIONS)
    assert "qformer_input_ids" in batch
    px = _visual(video)
    ref_inputs = _hf_batch(kind, video, batch, token_id, qtok, INSTRUCTIONS)
    assert torch.equal(batch["qformer_input_ids"], ref_inputs["qformer_input_ids"])
    with torch.no_grad():
        out = Stage2Objective(ours)(pixel_values=px, **batch)
        ref = hf(pixel_values=px, **ref_inputs)
    assert abs(out.loss.item() - ref.loss.item()) < 1e-5, (out.loss, ref.loss)
    if kind != "t5":
        labels = ref_inputs["labels"]
        ref_logits = ref.logits[:, :-1][labels[:, 1:] != -100]
        assert out.logits.shape == ref_logits.shape
        assert (out.logits - ref_logits).abs().max() < 1e-5
    else:
        assert (out.logits - ref.logits).abs().max() < 1e-5
    # the instruction matters: another instruction, another loss
    other = _collate(ours, kind)(ANSWERS, prompts=["a", "b", "c"])
    with torch.no_grad():
        assert abs(Stage2Objective(ours)(pixel_values=px, **other).loss.item() - out.loss.item()) > 1e-4


@pytest.mark.parametrize("num_beams", [1, 3])
def test_generation_matches_transformers(pair, num_beams):
    kind, video, hf, ours, tok, qtok, token_id, _ = pair
    px = _visual(video, seed=1)
    prompt = "Question: what is the man riding? Answer:"
    slots = Q * (FRAMES if video else 1)
    ids = tok([prompt] * 3, return_tensors="pt").input_ids
    ids = torch.cat([torch.full((3, slots), token_id), ids], 1)
    q = qtok([prompt] * 3, return_tensors="pt")
    with torch.no_grad():
        ref = hf.generate(pixel_values=px, qformer_input_ids=q.input_ids, qformer_attention_mask=q.attention_mask,
                          input_ids=ids, attention_mask=torch.ones_like(ids), num_beams=num_beams, max_new_tokens=7,
                          min_new_tokens=0, pad_token_id=tok.pad_token_id, do_sample=False)
    if kind != "t5":
        ref = ref[:, ids.shape[1]:]
    ref_text = [t.strip() for t in tok.batch_decode(ref, skip_special_tokens=True)]
    visual = dict(videos=px) if video else dict(images=px)
    got = ours.generate(prompt=prompt, num_beams=num_beams, max_new_tokens=7, min_new_tokens=0, **visual)
    assert got == ref_text and any(got)
    # one prompt per input: each row reads its own instruction (as a batch of one each)
    prompts = [prompt, "describe the image", "what colour?"]
    each = ours.generate(prompt=prompts, num_beams=num_beams, max_new_tokens=5, **visual)
    one = [ours.generate(prompt=p, num_beams=num_beams, max_new_tokens=5,
                         **{k: v[i : i + 1] for k, v in visual.items()})[0] for i, p in enumerate(prompts)]
    assert each == one


def test_export_round_trip(pair, tmp_path):
    import transformers

    kind, video, hf, ours, tok, qtok, token_id, _ = pair
    ours.export_transformers(tmp_path / "export")
    family = "InstructBlipVideo" if video else "InstructBlip"
    assert (tmp_path / "export" / "qformer_tokenizer").is_dir()
    back_hf = getattr(transformers, f"{family}ForConditionalGeneration").from_pretrained(str(tmp_path / "export")).eval()
    back = Blip2.from_pretrained(tmp_path / "export", llm_dtype="float32").eval()
    assert back.config.video == video and back.config.instruction_aware
    batch = _collate(ours, kind)(ANSWERS, prompts=INSTRUCTIONS)
    px = _visual(video, seed=4)
    exported_token = back.llm_tokenizer.convert_tokens_to_ids("<video>" if video else "<image>")
    with torch.no_grad():
        a = Stage2Objective(ours)(pixel_values=px, **batch).loss
        b = Stage2Objective(back)(pixel_values=px, **batch).loss
        c = back_hf(pixel_values=px, **_hf_batch(kind, video, batch, exported_token, qtok, INSTRUCTIONS)).loss
    assert abs(a - b) < 1e-6 and abs(a - c) < 1e-5
    visual = dict(videos=px) if video else dict(images=px)
    assert ours.generate(prompt="a", num_beams=2, max_new_tokens=5, **visual) == \
        back.generate(prompt="a", num_beams=2, max_new_tokens=5, **visual)
    # and our own format keeps it an instruction-aware (video) model
    ours.save_pretrained(tmp_path / "m")
    again = Blip2.from_pretrained(tmp_path / "m", llm_dtype="float32").eval()
    assert again.config.instruction_aware and again.config.video == video
    with torch.no_grad():
        assert abs(Stage2Objective(again)(pixel_values=px, **batch).loss - a) < 1e-6


def test_stage2_trains_the_instruction_path(pair):
    """set_stage(2) on an instruction-aware model: the text-input parts that read the
    instruction train too; every trainable parameter gets a gradient, every frozen one none."""
    kind, video, hf, ours, *_ = pair
    import copy

    model = copy.deepcopy(ours).train()
    model.set_stage(2)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "qformer.embeddings.word_embeddings.weight" in trainable
    assert any(".ffn." in n for n in trainable) and "language_projection.weight" in trainable
    assert not any(n.startswith(("vision.", "llm.")) for n in trainable)
    batch = _collate(model, kind)(ANSWERS, prompts=INSTRUCTIONS)
    Stage2Objective(model)(pixel_values=_visual(video), **batch).loss.backward()
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, n
        else:
            assert p.grad is None, n


def test_video_clips_of_different_lengths_batch_like_alone(tmp_path):
    """Clips of 1, 3 and 2 frames in one batch generate what each generates alone; the
    video inputs' forms (5-D tensor, list of tensors, frame files, frame folder, video file) agree."""
    from PIL import Image

    hf, tok, qtok, _ = make_hf_instructblip(tmp_path / "m", "llama", video=True)
    model = Blip2.from_pretrained(tmp_path / "m", llm_dtype="float32").eval()
    clips = [pixels(1, 5, frames=1)[0], pixels(1, 6, frames=3)[0], pixels(1, 7, frames=2)[0]]
    prompts = ["describe the video", "what colour?", "Question: what is it? Answer:"]
    batched = model.generate(videos=clips, prompt=prompts, num_beams=2, max_new_tokens=6)
    alone = [model.generate(videos=[c], prompt=p, num_beams=2, max_new_tokens=6)[0] for c, p in zip(clips, prompts)]
    assert batched == alone and any(batched)

    # frames as files, as a folder, and as a video file: the same frames give the same text
    ramp = torch.linspace(0, 1, IMG)
    frames = []  # smooth, distinct frames (a lossy codec keeps them recognisable)
    for i in range(6):
        rgb = torch.stack([ramp[None, :].expand(IMG, IMG), ramp[:, None].expand(IMG, IMG),
                           torch.full((IMG, IMG), i / 5)], -1)
        frames.append(Image.fromarray((rgb * 255).round().to(torch.uint8).numpy()))
    folder = tmp_path / "frames"
    folder.mkdir()
    for i, f in enumerate(frames):
        f.save(folder / f"{i:03d}.png")
    model.config.num_frames = 3
    from qformer.video import preprocess_videos, sample_frame_indices

    assert sample_frame_indices(6, 3) == [1, 3, 5] and sample_frame_indices(2, 4) == [0, 0, 1, 1]
    picked = [folder / f"{i:03d}.png" for i in sample_frame_indices(6, 3)]
    from_files = model.generate(videos=picked, prompt="a", num_beams=1, max_new_tokens=4)
    from_folder = model.generate(videos=folder, prompt="a", num_beams=1, max_new_tokens=4)
    assert from_files == from_folder
    as_tensor = preprocess_videos(folder, model.vision.preprocess, 3)[0]
    assert as_tensor.shape == (3, 3, IMG, IMG)
    assert model.generate(videos=as_tensor[None], prompt="a", num_beams=1, max_new_tokens=4) == from_files

    av = pytest.importorskip("av")
    path = tmp_path / "clip.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=5)
        stream.width = stream.height = IMG
        stream.pix_fmt = "yuv420p"
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_image(f)):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    decoded = preprocess_videos(path, model.vision.preprocess, 3)[0]
    assert decoded.shape == (3, 3, IMG, IMG)
    every = model.vision.preprocess(frames)  # (6, 3, S, S)
    nearest = [int((every - f).abs().mean(dim=(1, 2, 3)).argmin()) for f in decoded]
    assert nearest == [1, 3, 5]  # the uniformly sampled frames, in order, through a lossy codec
    assert len(model.caption(videos=[path, folder], num_beams=1, max_new_tokens=3)) == 2


def test_bad_video_inputs_fail_clearly(tmp_path, pair):
    kind, video, hf, ours, *_ = pair
    from qformer.errors import ImageLoadError

    (tmp_path / "empty").mkdir()
    with pytest.raises(ImageLoadError, match="no image files"):
        ours.generate(videos=tmp_path / "empty", prompt="a")
    (tmp_path / "bad.mp4").write_bytes(b"not a video")
    with pytest.raises(ImageLoadError, match="bad.mp4"):
        ours.generate(videos=tmp_path / "bad.mp4", prompt="a")
    with pytest.raises(ValueError, match="exactly one of"):
        ours.generate(pixels(1), videos=pixels(1, frames=2), prompt="a")


def test_lavis_instruct_pth_loads(pair, tmp_path):
    """LAVIS's Blip2VicunaInstruct / Blip2T5Instruct layout (llm_proj / t5_proj, Q-Former with
    text input and no cls head; frozen ViT not in the file): written from a transformers model
    by the documented conversion (``ours_to_lavis(..., projection=...)``), loaded back with a
    config, same outputs."""
    from qformer import Blip2Config
    from qformer.persistence import ours_to_lavis
    from qformer.persistence.common import clean_llm_state_dict

    kind, video, hf, ours, tok, qtok, token_id, d = pair
    if video:
        pytest.skip("LAVIS has no InstructBlipVideo layout")
    proj, llm_prefix = ("t5_proj", "t5_model.") if kind == "t5" else ("llm_proj", "llm_model.")
    body = {k: v for k, v in ours.state_dict().items() if not k.startswith(("llm.", "vision.model."))}
    sd = ours_to_lavis(body, vision_prefix="vision.model.", projection=proj)
    assert not any(k.startswith("Qformer.cls.") for k in sd) and "Qformer.bert.embeddings.word_embeddings.weight" in sd
    sd.update({llm_prefix + k: v for k, v in clean_llm_state_dict(ours).items()})
    torch.save({"model": sd}, tmp_path / "instruct.pth")
    hf.vision_model.save_pretrained(str(tmp_path / "vit"))
    cfg = Blip2Config.from_dict(ours.config.to_dict())
    cfg.vision.pretrained = str(tmp_path / "vit")
    loaded, report = Blip2.from_pretrained(tmp_path / "instruct.pth", config=cfg, tokenizer=d / "qformer_tokenizer",
                                           llm_tokenizer=d, llm_dtype="float32", return_report=True)
    assert report.ok, str(report)
    batch = _collate(ours, kind)(ANSWERS, prompts=INSTRUCTIONS)
    px = pixels(seed=9)
    with torch.no_grad():
        a = Stage2Objective(ours)(pixel_values=px, **batch).loss
        b = Stage2Objective(loaded.eval())(pixel_values=px, **batch).loss
    assert abs(a - b) < 1e-6


def test_instruction_aware_model_from_our_blip2_stage2(tmp_path):
    """InstructBLIP starts from BLIP-2: a LAVIS-style stage-2 model (no Q-Former text parts) plus
    the stage-1 model it came from give an instruction-aware model with the stage-2 query path
    and projection, the stage-1 text parts, and the same (shared) LLM."""
    from transformers import OPTConfig

    from qformer import Blip2Config, QFormerConfig, VisionConfig
    from qformer.config import LLMConfig
    from qformer.errors import CheckpointError
    from qformer.persistence import instruction_aware_from
    from qformer.testing import randomize_

    qtok = write_bert_tokenizer(tmp_path / "bert")
    llm_tok = write_causal_tokenizer(tmp_path / "opt")
    vision = VisionConfig(backend="timm", name="vit_tiny_patch16_224", image_size=32, feature_layer=-1,
                          model_kwargs={"patch_size": 8, "embed_dim": 48, "depth": 1, "num_heads": 4})
    q = dict(vocab_size=len(qtok), hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128,
             max_position_embeddings=48, encoder_width=48, num_query_tokens=Q)
    s1 = Blip2(Blip2Config(vision=vision, qformer=QFormerConfig(**q), embed_dim=32), tokenizer=qtok)
    randomize_(s1, 1)
    s1.save_pretrained(tmp_path / "s1")
    opt = OPTConfig(vocab_size=len(llm_tok), hidden_size=48, num_hidden_layers=1, ffn_dim=96, num_attention_heads=4,
                    max_position_embeddings=96, word_embed_proj_dim=48, pad_token_id=llm_tok.pad_token_id,
                    bos_token_id=llm_tok.bos_token_id, eos_token_id=llm_tok.eos_token_id).to_dict()
    cfg2 = Blip2Config(vision=vision, qformer=QFormerConfig(**q, text_input=False), stage1_heads=False,
                       llm=LLMConfig(hf_config=opt, dtype="float32"))
    s2 = Blip2(cfg2, llm_tokenizer=llm_tok)
    randomize_(s2, 2)
    with pytest.raises(CheckpointError, match="stage-1 model"):
        instruction_aware_from(Blip2, s2)
    model, report = instruction_aware_from(Blip2, s2, stage1=tmp_path / "s1")
    assert report.ok and model.config.instruction_aware and model.llm is s2.llm
    sd, sd1, sd2 = model.state_dict(), s1.state_dict(), s2.state_dict()
    for k, v in sd.items():
        if k.startswith("llm."):
            continue
        source = sd1 if (k.startswith("qformer.embeddings.word") or k.startswith("qformer.embeddings.position")
                         or (k.startswith("qformer.layers.") and ".ffn." in k)) else sd2
        assert torch.equal(v, source[k]), k
    px = pixels(2, seed=3)
    a = model.eval().generate(px, ["what colour?", "describe it"], num_beams=1, max_new_tokens=4)
    assert len(a) == 2

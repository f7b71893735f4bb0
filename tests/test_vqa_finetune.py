"""BLIP-2's VQA fine-tuning (the instruction recipe with one template, weighted answers and the
tower unfrozen): the weighted multi-answer loss against a naive reference (gradients included),
the Q-Former reading the question, what trains, the data path (template, answer weights) and a
tiny end-to-end recipe run scored with VQAv2 accuracy."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import randomize_, write_bert_tokenizer, write_causal_tokenizer, write_seq2seq_tokenizer
from test_stage2 import _text_config

from qformer import Blip2, Blip2Config, QFormerConfig, VisionConfig
from qformer.adapters import load_adapter
from qformer.cli import build_parser, card_from_args
from qformer.config import ConfigError, LLMConfig
from qformer.data import Stage2Collator
from qformer.data.dataset import open_instruction_dataset
from qformer.data.sources.base import CaptionRecord
from qformer.data.samples import SampleProcessor
from qformer.data.transforms import CaptionCleaner
from qformer.recipe import check_tower_training
from qformer.stage2 import Stage2Objective, Stage2TextCollator

IMG, DEPTH = 32, 4  # 4 timm blocks, feature_layer -2: 3 kept
QUESTIONS = ["how many dogs are there?", "what colour is the car?", "is it raining?"]
ANSWERS = [[("two", 0.6), ("2", 0.3), ("three dogs", 0.1)], [("red", 1.0)], [("yes", 0.5), ("no", 0.5)]]
TEMPLATE = "Question: {} Answer:"


def vqa_model(tmp: Path, kind: str, seed: int = 0) -> Blip2:
    """A tiny instruction-aware BLIP-2 (EVA-style timm tower, OPT or T5), dropout off."""
    qtok = write_bert_tokenizer(tmp / "bert")
    ltok = (write_seq2seq_tokenizer if kind == "t5" else write_causal_tokenizer)(tmp / kind)
    vision = VisionConfig(backend="timm", name="eva_giant_patch14_clip_224", image_size=IMG, feature_layer=-2,
                          model_kwargs=dict(embed_dim=48, depth=DEPTH, num_heads=4, patch_size=8, mlp_ratio=2.0))
    cfg = Blip2Config(
        vision=vision,
        qformer=QFormerConfig(vocab_size=len(qtok), hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128,
                              max_position_embeddings=64, encoder_width=48, num_query_tokens=8, hidden_dropout=0.0,
                              attention_dropout=0.0, text_input=True, lm_head=False),
        stage1_heads=False, instruction_aware=True,
        llm=LLMConfig(hf_config=_text_config(kind, ltok, len(ltok) + 8).to_dict(), dtype="float32",
                      text_mode="prompt", max_txt_len=32),
    )
    torch.manual_seed(seed)
    m = Blip2(cfg, tokenizer=qtok, llm_tokenizer=ltok)
    randomize_(m, seed)
    return m


def collator(m: Blip2) -> Stage2TextCollator:
    return Stage2TextCollator(m.llm_tokenizer, m.config.llm, encoder_decoder=m.config.llm.hf_config.get(
        "model_type") == "t5", qformer_tokenizer=m.tokenizer, qformer_max_length=m.config.instruction_tokens)


def pixels(n=3, seed=0):
    return torch.randn(n, 3, IMG, IMG, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module", params=["opt", "t5"])
def model(request, tmp_path_factory):
    return request.param, vqa_model(tmp_path_factory.mktemp(request.param), request.param)


def _grads(m: Blip2) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}


# ---------------------------------------------------------------------------- the loss
def test_weighted_loss_matches_a_naive_reference(model):
    """loss = (1/B) sum_q sum_a w_qa * NLL(a | image_q, q), NLL summed over the answer's tokens,
    computed per (question, answer) one at a time, equals the batched loss; gradients too."""
    kind, m = model
    m.set_stage(2, vision_trainable_blocks=2)
    m.train()
    text = collator(m)
    prompts = [TEMPLATE.format(q) for q in QUESTIONS]
    px = pixels()
    batch = text.weighted(ANSWERS, prompts=prompts)
    assert batch["answer_rows"].tolist() == [0, 0, 0, 1, 2, 2]
    assert batch["qformer_input_ids"].shape[0] == 3 and batch["input_ids"].shape[0] == 6
    m.zero_grad(set_to_none=True)
    loss = Stage2Objective(m)(pixel_values=px, **batch).loss
    loss.backward()
    got = _grads(m)

    m.zero_grad(set_to_none=True)
    reference = torch.zeros(())
    for i, answers in enumerate(ANSWERS):
        for answer, weight in answers:
            one = text([answer], prompts=[prompts[i]])  # an ordinary one-row batch: mean NLL of its tokens
            n_tokens = int((one["labels"] != -100).sum())
            mean = Stage2Objective(m)(pixel_values=px[i:i + 1], **one).loss
            reference = reference + weight * mean * n_tokens / len(ANSWERS)
    reference.backward()
    want = _grads(m)
    assert loss.item() == pytest.approx(reference.item(), rel=1e-5)
    assert got.keys() == want.keys() and any(n.startswith("vision.") for n in got)
    for n in got:  # float32 sums over differently padded batches: tolerance relative to the gradient's scale
        scale = float(want[n].abs().max())
        torch.testing.assert_close(got[n], want[n], rtol=1e-3, atol=1e-6 + 1e-4 * scale, msg=lambda e, n=n: f"{n}: {e}")


def test_one_answer_at_weight_one_is_the_summed_nll(model):
    """A question with a single answer (weight 1) scores its answer's summed token NLL: the
    weighted loss of one row is the ordinary mean loss times its number of target tokens."""
    kind, m = model
    m.eval()
    text = collator(m)
    prompt = [TEMPLATE.format(QUESTIONS[1])]
    with torch.no_grad():
        w = Stage2Objective(m)(pixel_values=pixels(1), **text.weighted([[("red car", 1.0)]], prompts=prompt)).loss
        one = text(["red car"], prompts=prompt)
        mean = Stage2Objective(m)(pixel_values=pixels(1), **one).loss
    assert w.item() == pytest.approx(mean.item() * int((one["labels"] != -100).sum()), rel=1e-5)


def test_the_qformer_reads_the_question(model):
    """Soft prompts depend on the question (same image): changed question, changed prompts; the
    same question twice, the same prompts; and the question's word embeddings get gradient."""
    kind, m = model
    m.eval()
    text = collator(m)
    tokens = text.qformer_tokens(["what colour is the car?", "how many dogs are there?", "what colour is the car?"])
    px = pixels(1).expand(3, -1, -1, -1)
    with torch.no_grad():
        embeds = m.embed_image(px)
        soft = m.soft_prompts(embeds, instruction_ids=tokens["qformer_input_ids"],
                              instruction_mask=tokens["qformer_attention_mask"])  # (3, Q, H)
    assert (soft[0] - soft[1]).abs().max() > 1e-4
    torch.testing.assert_close(soft[0], soft[2])
    m.set_stage(2)
    m.train()
    m.zero_grad(set_to_none=True)
    batch = text.weighted(ANSWERS[:2], prompts=QUESTIONS[:2])
    Stage2Objective(m)(pixel_values=pixels(2), **batch).loss.backward()
    g = m.qformer.embeddings.word_embeddings.weight.grad
    used = batch["qformer_input_ids"][batch["qformer_attention_mask"].bool()].unique()  # not the padding
    assert g[used].abs().sum(-1).gt(0).all()  # every question token's embedding is trained


def test_what_trains_tower_blocks_qformer_projection_not_the_llm(model):
    """set_stage(2, vision_trainable_blocks=N): every trainable parameter gets a gradient from the
    weighted loss and every frozen one none; trainable are exactly the tower's last N blocks,
    the Q-Former (query path and the question's text parts), the queries and the projection."""
    kind, m = model
    m.set_stage(2, vision_trainable_blocks=2)
    m.train()
    m.zero_grad(set_to_none=True)
    text = collator(m)
    Stage2Objective(m)(pixel_values=pixels(), **text.weighted(ANSWERS, prompts=QUESTIONS)).loss.backward()
    prefix = "vision.model." + m.vision.block_prefix
    kept = m.vision.num_blocks
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    for n, p in m.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, n
        else:
            assert p.grad is None, n
    vision = {n for n in trainable if n.startswith("vision.")}
    assert vision and all(n.startswith(prefix) and int(n[len(prefix):].split(".")[0]) >= kept - 2 for n in vision)
    assert {n for n, _ in m.vision.named_parameters(prefix="vision")
            if n.startswith(prefix) and int(n[len(prefix):].split(".")[0]) >= kept - 2} == vision
    assert not any(n.startswith("llm.") for n in trainable) and not m.llm.training
    assert "qformer.embeddings.word_embeddings.weight" in trainable and "language_projection.weight" in trainable
    assert "query_tokens" in trainable or any("query" in n for n in trainable)


# ---------------------------------------------------------------------------- the data
def test_answer_weights_come_from_cleaned_human_answers():
    """Each distinct answer after cleaning, weighted by its share of the non-empty answers, the
    most frequent first; no answer left is a skipped sample."""
    proc = SampleProcessor(transform=_transform(), captions=CaptionCleaner())
    r = CaptionRecord(image=None, caption="two", image_id=1, source="s", key="k",
                      answers=("Two", "two", "2", "two.", "2", "three", "", "two", "2 ", "Two"))
    got = proc.answers_of(r)
    assert [a for a, _ in got] == ["two", "2", "three"]
    assert [w for _, w in got] == pytest.approx([5 / 9, 3 / 9, 1 / 9]) and math.isclose(sum(w for _, w in got), 1)
    from qformer.data.samples import SkipSample

    with pytest.raises(SkipSample):
        proc.answers_of(CaptionRecord(image=None, caption="x", image_id=1, source="s", key="k", answers=("", "  ")))


def _transform():
    from qformer.data.transforms import build_image_transform

    return build_image_transform(VisionConfig(backend="timm", name="x", image_size=IMG), train=False)


def write_vqa(folder: Path, n: int = 8, *, seed: int = 0) -> Path:
    """``n`` coloured-square images with a colour question each: 7 annotators say the colour,
    3 a wrong one (so the weighted targets are 0.7 / 0.3)."""
    from PIL import Image

    colours = {"red": (220, 40, 40), "blue": (40, 60, 220), "green": (40, 180, 60)}
    names = list(colours)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        c = names[(i + seed) % 3]
        Image.new("RGB", (IMG, IMG), colours[c]).save(folder / "images" / f"{i}.png")
        other = names[(i + seed + 1) % 3]
        rows.append({"question_id": i, "image": f"images/{i}.png", "question": "what colour is it?",
                     "answers": [c] * 7 + [other] * 3, "question_type": "colour", "answer_type": "other"})
    path = folder / "vqa.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_weighted_rows_through_the_data_pipeline(tmp_path, model):
    """A VQA file read with one template and weighted answers: the prompts are the template, the
    batch has one LLM row per distinct answer with the 0.7 / 0.3 weights and one Q-Former row per
    question; without those options, InstructBLIP's behaviour (one target) is unchanged."""
    kind, m = model
    path = write_vqa(tmp_path)
    ds = open_instruction_dataset([{"path": str(path), "task": "vqa"}], vision=m.config.vision, train=False,
                                  vqa_template=TEMPLATE, weighted_answers=True)
    items = [ds[i] for i in range(4)]
    assert all(s.prompt == TEMPLATE.format("what colour is it?") for s in items)
    assert all([w for _, w in s.answers] == pytest.approx([0.7, 0.3]) for s in items)
    batch = Stage2Collator(collator(m))(items)
    assert batch["answer_rows"].tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert batch["answer_weights"].tolist() == pytest.approx([0.7, 0.3] * 4)
    assert batch["qformer_input_ids"].shape[0] == 4 and batch["pixel_values"].shape[0] == 4
    with torch.no_grad():
        assert torch.isfinite(Stage2Objective(m.eval())(**{k: v for k, v in batch.items() if k != "data_stats"}).loss)
    plain = open_instruction_dataset([{"path": str(path), "task": "vqa"}], vision=m.config.vision, train=False)
    s = plain[0]
    assert s.answers is None and s.caption in ("red", "blue", "green")
    assert "answer_rows" not in Stage2Collator(collator(m))([plain[i] for i in range(2)])


def test_the_vqa_fine_tuning_cards():
    """The paper's values (BLIP-2, appendix: VQAv2 fine-tuning with ViT-g)."""
    for name, decay in (("eva-vit-g_opt-2.7b_vqa-ft", 0.95), ("eva-vit-g_flant5-xl_vqa-ft", 0.95)):
        card = load_adapter(name)
        t = card.train_config("instruct")
        assert (t.vision_trainable_blocks, t.lr, t.warmup_steps, t.weight_decay, t.beta2) == (-1, 1e-5, 1000, 0.05,
                                                                                           0.999), name
        assert t.vision_layer_decay == decay and t.batch_size * 16 == 128
        assert card.model["vision"]["image_size"] == 490 and card.model["vision"]["dtype"] == "float32"
        assert card.data.vqa_answers == "weighted" and card.data.vqa_template == TEMPLATE
        assert card.eval.instruct.num_beams == 5 and not card.data.cache_features
        check_tower_training(card, "instruct")
        text = " ".join(build_parser("instruct", "", card=card).format_help().split())
        assert "--vqa-answers {main,weighted}" in text and "(card: weighted)" in text
        assert "(card: Question: {} Answer:)" in text
    args = build_parser("instruct", "").parse_args(["--adapter", "eva-vit-g_opt-2.7b_vqa-ft", "--vqa-answers", "main",
                                                    "--vqa-template", "Q: {} A:"])
    card = card_from_args(args, "instruct")
    assert (card.data.vqa_answers, card.data.vqa_template) == ("main", "Q: {} A:")
    with pytest.raises(ConfigError, match="vqa_template needs a '{}'"):
        load_adapter("eva-vit-g_opt-2.7b_vqa-ft", ["data.vqa_template=no question here"])
    with pytest.raises(ConfigError, match="vqa_answers must be 'main' or 'weighted'"):
        load_adapter("eva-vit-g_opt-2.7b_vqa-ft", ["data.vqa_answers=all"])


# ---------------------------------------------------------------------------- the recipe
@pytest.mark.slow
def test_vqa_fine_tuning_recipe_end_to_end(tmp_path):
    """recipes/instruct.py as BLIP-2's VQA fine-tuning on the tiny local pairing: one template,
    weighted answers, the tower's last block unfrozen, a few steps; held-out VQAv2 accuracy is
    reported (and equals the per-question scores it writes); the last block trained, the first
    block and the LLM did not."""
    from recipe_fixtures import make_tiny_card
    from safetensors.torch import load_file
    from test_recipes import losses, run_recipe

    from qformer.tokenizer import load_qformer_tokenizer

    card_path = make_tiny_card(tmp_path / "tiny")
    card = load_adapter(card_path)
    torch.manual_seed(0)
    s1 = Blip2(card.blip2_config(stage=1), tokenizer=load_qformer_tokenizer(card.tokenizer))
    s1.save_pretrained(tmp_path / "s1")
    cfg2 = card.blip2_config(stage=2)
    cfg2.qformer.text_input, cfg2.stage1_heads = False, False  # a LAVIS-style stage-2 model
    s2 = Blip2(cfg2)
    s2.save_pretrained(tmp_path / "s2")
    train, val = write_vqa(tmp_path / "vqa_train", 24), write_vqa(tmp_path / "vqa_val", 9, seed=1)
    out = tmp_path / "vqa-ft"
    stdout = run_recipe("instruct", card_path, out, "--init-from", str(tmp_path / "s2"), "--stage1-from",
                        str(tmp_path / "s1"), "--train-data", str(train), "--eval-data", str(val), "--eval-size", "9",
                        "--vqa-template", TEMPLATE, "--vqa-answers", "weighted", "--vision-trainable-blocks", "1",
                        "--vision-layer-decay", "0.9", "--cache-features", "false", "--max-steps", "4",
                        "--eval-every", "4", "--save-every", "4")
    assert "trainable vision tower" in stdout and "trained on every answer, weighted" in stdout
    assert "held-out VQAv2 accuracy" in stdout
    logged = losses(out)
    assert sorted(logged) == [1, 2, 3, 4] and all(math.isfinite(v["loss"]) and v["loss"] > 0 for v in logged.values())
    result = json.loads((out / "results.json").read_text())["results"]["vqa"]
    rows = [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]
    assert len(rows) == 9 and all(r["prompt"] == TEMPLATE.format("what colour is it?") for r in rows)
    assert 0 <= result["vqa_accuracy"] <= 100 and "zero_shot/vqa_accuracy" in result
    assert result["vqa_accuracy"] == pytest.approx(100 * sum(r["vqa_accuracy"] for r in rows) / len(rows))
    trained = load_file(str(out / "model" / "model.safetensors"))
    start = load_file(str(tmp_path / "tiny" / "tower.safetensors"))
    tower = {k[len("vision.model."):]: v for k, v in trained.items() if k.startswith("vision.model.")}
    assert any(k.startswith("blocks.1.") for k in tower)
    assert all(not torch.equal(v, start[k]) for k, v in tower.items() if k.startswith("blocks.1.") and v.dim() > 1)
    assert all(torch.equal(v, start[k]) for k, v in tower.items() if not k.startswith("blocks.1."))
    model = Blip2.from_pretrained(out / "model")
    assert model.config.instruction_aware
    for (n, a), (_, b) in zip(model.llm.named_parameters(), s2.llm.named_parameters()):
        assert torch.equal(a, b), n  # the LLM stayed frozen


def test_instruction_aware_from_takes_the_fine_tuning_tower_settings(tmp_path):
    """instruction_aware_from(vision=...): a float32 tower from a bf16 stage-2 tower keeps its
    weights (cast); a new image size needs the tower from vision.pretrained and is refused when
    the stage-2 tower is not that (no pretrained name, or a trained tower)."""
    import dataclasses

    from qformer.errors import CheckpointError
    from qformer.persistence import instruction_aware_from

    s2 = vqa_model(tmp_path, "opt")
    cfg = Blip2Config.from_dict(s2.config.to_dict())
    cfg.instruction_aware, cfg.qformer.text_input = False, False
    cfg.vision.dtype = "bfloat16"
    stage2 = Blip2(cfg, llm_tokenizer=s2.llm_tokenizer, tokenizer=s2.tokenizer)
    randomize_(stage2, 3)
    stage1 = Blip2(Blip2Config.from_dict({**s2.config.to_dict(), "llm": None, "instruction_aware": False}),
                   tokenizer=s2.tokenizer)
    stage1.save_pretrained(tmp_path / "s1")
    tower = dataclasses.replace(stage2.config.vision, dtype="float32")
    model, report = instruction_aware_from(Blip2, stage2, stage1=tmp_path / "s1", vision=tower)
    assert report.ok and model.config.vision.dtype == "float32"
    for (n, a), (_, b) in zip(model.vision.named_parameters(), stage2.vision.named_parameters()):
        assert a.dtype == torch.float32 and torch.equal(a, b.float()), n
    with pytest.raises(CheckpointError, match="image_size 48 differs"):
        instruction_aware_from(Blip2, stage2, stage1=tmp_path / "s1", vision=dataclasses.replace(tower, image_size=48))

"""recipes/evaluate.py and the task library behind it (qformer.eval.tasks), on a tiny locally
built model (stage-1 heads and a tiny OPT, random weights) and tiny data: a toy-world export
with its questions, and a user-style imagefolder with a VQA file."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from recipe_fixtures import make_tiny_card, write_shapes_folder

from qformer import Blip2
from qformer.adapters import load_adapter
from qformer.config import VisionConfig
from qformer.eval.captioning import caption_metrics
from qformer.eval.tasks import (
    reference_column,
    TRAINING_CAPTION_METRICS,
    VQAFileError,
    evaluate_captioning,
    evaluate_vqa,
    load_vqa_questions,
    open_eval_set,
)
from qformer.tokenizer import load_qformer_tokenizer
from qformer.toy import ToyWorld, score_caption

REPO = Path(__file__).resolve().parents[1]
TOY_IMAGES = 5


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """A saved model that supports every task: an LLM and the stage-1 heads."""
    root = tmp_path_factory.mktemp("tiny_eval")
    card = load_adapter(make_tiny_card(root, train_size=2, eval_size=2))
    torch.manual_seed(0)
    model = Blip2(card.blip2_config(), tokenizer=load_qformer_tokenizer(card.tokenizer))
    model.save_pretrained(root / "model")
    return root / "model"


@pytest.fixture(scope="module")
def toy_export(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("toy_val")
    world = ToyWorld(seed=0)
    world.export("val", TOY_IMAGES, out)
    world.export_vqa("val", TOY_IMAGES, out)
    return out


def _env() -> dict[str, str]:
    return dict(os.environ, TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
                HF_DATASETS_OFFLINE="1", PYTHONPATH=str(REPO))


def run_evaluate(*args: str) -> str:
    cmd = [sys.executable, str(REPO / "recipes" / "evaluate.py"), "--no-progress", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=REPO, timeout=300)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc.stdout


def finite_numbers(metrics: dict) -> bool:
    return all(isinstance(v, (int, float)) and math.isfinite(v) for v in metrics.values())


# ---------------------------------------------------------------------------- the recipe end to end
def test_evaluate_recipe_on_a_toy_export(tiny_model: Path, toy_export: Path, tmp_path: Path) -> None:
    out = tmp_path / "eval"
    stdout = run_evaluate("--model", str(tiny_model), "--data", str(toy_export), "--output-dir", str(out),
                          "--num-beams", "2", "--max-new-tokens", "6", "--vqa-num-beams", "2", "--k", "4",
                          "--caption-metrics", "bleu,cider,rouge,spice")  # METEOR's JVM alone takes 7 s
    assert "tasks caption, vqa, retrieval" in stdout  # everything the model supports, by default
    for row in ("captioning  Bleu_4", "captioning  CIDEr", "captioning  toy_recall", "vqa         vqa_accuracy",
                "vqa         exact_match", "retrieval   i2t_r1", "sample captions:", "sample answers:"):
        assert row in stdout, row
    report = json.loads((out / "results.json").read_text())
    res = report["results"]
    assert {"Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "CIDEr", "ROUGE_L", "toy_recall", "toy_exact"} <= set(res["captioning"])
    # SPICE needs Java and Stanford CoreNLP on disk: either a number or a stated reason
    assert "SPICE" in res["captioning"] or "spice" in report["meta"]["captioning"]["skipped"]
    questions = (toy_export / "vqa.jsonl").read_text().splitlines()
    assert res["vqa"]["num_questions"] == len(questions)
    assert {"vqa_accuracy", "vqa_accuracy/yes/no", "exact_match", "exact_match/count"} <= set(res["vqa"])
    assert set(res["retrieval"]) >= {"i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "r_mean"}
    assert res["retrieval"]["t2i_r10"] == 100.0  # 5 images: every text's image is in its top 10
    assert all(finite_numbers(m) for m in res.values())
    assert report["meta"]["retrieval"]["k_i2t"] == 4 and report["settings"]["caption"]["generate"]["num_beams"] == 2
    assert "| vqa | exact_match |" in (out / "results.md").read_text()
    captions = [json.loads(line) for line in (out / "captions.jsonl").read_text().splitlines()]
    assert len(captions) == TOY_IMAGES and all(len(c["references"]) == 5 and "toy" in c for c in captions)
    answers = [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]
    assert [a["question_id"] for a in answers] == [json.loads(q)["question_id"] for q in questions]
    assert answers[0]["prompt"].startswith("Question: ") and answers[0]["prompt"].endswith(" Answer:")


def test_evaluate_recipe_on_an_image_folder(tiny_model: Path, tmp_path: Path) -> None:
    folder = write_shapes_folder(tmp_path / "shapes", 6, seed=3)
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    vqa = tmp_path / "questions.jsonl"  # VQAv2 annotation style: {"answer": ...} objects
    vqa.write_text("".join(json.dumps({"question_id": i, "image": str(folder / r["file_name"]),
                                       "question": "what colour is the shape?",
                                       "answers": [{"answer": r["text"].split()[1]}] * 10}) + "\n"
                           for i, r in enumerate(rows)))
    out = tmp_path / "eval"
    stdout = run_evaluate("--model", str(tiny_model), "--data", str(folder), "--vqa-data", str(vqa), "--output-dir",
                          str(out), "--task", "caption,vqa", "--task", "retrieval", "--caption-metrics", "bleu,cider,rouge",
                          "--num-beams", "1", "--max-new-tokens", "4", "--vqa-num-beams", "1", "--k", "3")
    assert "6 images, 6 reference captions" in stdout and "captioning  CIDEr" in stdout
    res = json.loads((out / "results.json").read_text())["results"]
    assert set(res) == {"captioning", "vqa", "retrieval"} and all(finite_numbers(m) for m in res.values())
    assert set(res["captioning"]) == {"Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "CIDEr", "ROUGE_L"}  # no toy_*
    assert res["vqa"]["num_questions"] == 6 and 0 <= res["vqa"]["vqa_accuracy"] <= 100
    assert res["retrieval"]["i2t_r10"] == res["retrieval"]["t2i_r10"] == 100.0
    assert len((out / "answers.jsonl").read_text().splitlines()) == 6


def test_tasks_follow_what_the_model_supports() -> None:
    spec = importlib.util.spec_from_file_location("evaluate_recipe", REPO / "recipes" / "evaluate.py")
    recipe = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = recipe  # its dataclasses look their module up
    try:
        spec.loader.exec_module(recipe)
    finally:
        del sys.modules[spec.name]
    stage1 = SimpleNamespace(config=SimpleNamespace(llm=None, stage1_heads=True), tokenizer=object())
    stage2 = SimpleNamespace(config=SimpleNamespace(llm=object(), stage1_heads=False), tokenizer=None)
    both = SimpleNamespace(config=SimpleNamespace(llm=object(), stage1_heads=True), tokenizer=object())
    assert set(recipe.unsupported(stage1)) == {"caption", "vqa"}
    assert set(recipe.unsupported(stage2)) == {"retrieval"} and "--keep-stage1-heads" in recipe.unsupported(stage2)["retrieval"]
    assert recipe.unsupported(both) == {}
    assert "no LLM" in recipe.unsupported(stage1)["caption"]


# ---------------------------------------------------------------------------- the task library
class Oracle:
    """Stands in for Blip2 where only the plumbing is under test: "sees" which image it got
    (pixel value = image index) and answers from a lookup table."""

    def __init__(self, captions: list[str], answers: dict[tuple[str, str], str]):
        self.captions, self.answers = captions, answers
        self.paths: list[str] = []
        self.vision = self
        self.llm = SimpleNamespace(config=SimpleNamespace(is_encoder_decoder=False))  # a causal LM, as far as prompts go

    def preprocess(self, paths: list[str]) -> torch.Tensor:
        index = []
        for p in paths:
            if p not in self.paths:
                self.paths.append(p)
            index.append(self.paths.index(p))
        return torch.tensor(index, dtype=torch.float32).view(-1, 1, 1, 1).expand(-1, 3, 2, 2)

    def generate(self, images=None, prompt=None, **options) -> list[str]:
        ids = [int(v) for v in images[:, 0, 0, 0]]
        if prompt is None:
            return [self.captions[i] for i in ids]
        return [self.answers[(self.paths[i], p)] for i, p in zip(ids, prompt)]


def test_captioning_and_vqa_score_what_the_model_says(toy_export: Path) -> None:
    vision = VisionConfig(backend="timm", name="vit_tiny_patch16_224", image_size=32)
    eval_set = open_eval_set(str(toy_export), vision=vision, max_images=None, caption_column="captions")
    assert len(eval_set) == TOY_IMAGES and all(len(r) == 5 for r in eval_set.references)
    assert "toy" in eval_set.scorer_references  # the toy plugin found scene attributes for every image
    marked = dataclasses.replace(eval_set, inputs=torch.arange(len(eval_set), dtype=torch.float32)
                                 .view(-1, 1, 1, 1).expand(-1, 3, 2, 2))
    perfect = Oracle([refs[2] for refs in eval_set.references], {})
    result = evaluate_captioning(perfect, marked, metrics=("bleu", "cider"), batch_size=2)
    assert result.metrics["Bleu_4"] == pytest.approx(1.0) and result.metrics["toy_exact"] == 1.0
    assert result.metrics["toy_recall"] == 1.0 and [r["toy"]["exact"] for r in result.rows()] == [1.0] * TOY_IMAGES
    shifted = Oracle([eval_set.references[(i + 1) % TOY_IMAGES][0] for i in range(TOY_IMAGES)], {})
    wrong = evaluate_captioning(shifted, marked, metrics=("bleu",), batch_size=3)
    assert wrong.metrics["toy_exact"] == 0.0 and wrong.metrics["Bleu_4"] < 0.9

    questions = load_vqa_questions(toy_export / "vqa.jsonl")
    canonical = {(q.image, f"Question: {q.question} Answer:"): json_answer for q, json_answer in
                 zip(questions, [json.loads(line)["answer"] for line in (toy_export / "vqa.jsonl").read_text().splitlines()])}
    right = evaluate_vqa(Oracle([], canonical), questions, batch_size=4)
    assert right.metrics["vqa_accuracy"] == 100.0 and right.metrics["exact_match"] == 100.0
    # the last human answer (a synonym or number word where the world has one) is still worth >= 90 %
    synonym = {(q.image, f"Question: {q.question} Answer:"): q.answers[-1] for q in questions}
    close = evaluate_vqa(Oracle([], synonym), questions, batch_size=4)
    assert 90.0 <= close.metrics["vqa_accuracy"] <= 100.0
    assert [r["question_id"] for r in close.rows()] == [q.question_id for q in questions]


def test_training_and_evaluate_share_one_caption_metric_definition(tmp_path: Path) -> None:
    """The stage-2 recipe's periodic evaluation (qformer.recipe.load_eval_set) and
    recipes/evaluate.py (open_eval_set with reference_column) score a caption against the same
    references -- every caption the data lists for the image -- so they print the same numbers."""
    from qformer.adapters import AdapterCard
    from qformer.recipe import load_eval_set

    folder = write_shapes_folder(tmp_path / "val", 6, seed=1, references=True)
    vision = VisionConfig(backend="timm", name="vit_tiny_patch16_224", image_size=32)
    card = AdapterCard.from_dict({"name": "t", "data": {"stage2": {"train": "x", "eval": str(folder)}}})
    training = load_eval_set(card, 2, vision=vision, max_images=6)
    evaluating = open_eval_set(str(folder), vision=vision, max_images=None, caption_column=reference_column(folder))
    assert training.references == evaluating.references and all(len(r) == 3 for r in training.references)
    model = Oracle(["a red circle"] * 6, {})

    def scores(eval_set):
        marked = dataclasses.replace(eval_set, inputs=torch.arange(len(eval_set), dtype=torch.float32)
                                     .view(-1, 1, 1, 1).expand(-1, 3, 2, 2))
        return dict(evaluate_captioning(model, marked, metrics=("bleu", "cider"), batch_size=4).metrics)

    assert scores(training) == scores(evaluating) and scores(training)["CIDEr"] > 0
    # One reference per image (the text column only) is another metric, which is why there is one rule.
    single = open_eval_set(str(folder), vision=vision, max_images=None, caption_column="text")
    assert scores(single) != scores(training)


def test_refactored_stage2_evaluation_matches_the_old_inline_code(tiny_model: Path, toy_export: Path,
                                                                  tmp_path: Path) -> None:
    """recipes/stage2.py's evaluation moved into evaluate_captioning: same captions, metrics
    and samples.txt as the code it replaced (reproduced here)."""
    assert TRAINING_CAPTION_METRICS == ("bleu", "cider", "rouge", "meteor")  # what stage 2 always reported
    model = Blip2.from_pretrained(tiny_model).eval()
    eval_set = open_eval_set(str(toy_export), vision=model.config.vision, max_images=4)
    options = {"num_beams": 2, "max_new_tokens": 5}
    metrics = ("bleu", "cider", "rouge")
    # --- the code stage 2 had inline
    mine = list(range(len(eval_set)))
    captions = dict(zip(mine, model.generate(**eval_set.generate_inputs(mine), **options)))
    scores = caption_metrics(captions, {i: eval_set.references[i] for i in mine}, metrics=metrics)
    old = {k: float(v) for k, v in scores.items()}
    per = [score_caption(captions[i], eval_set.scorer_references["toy"][i]) for i in mine]
    old.update({f"toy_{k}": sum(p[k] for p in per) / len(per) for k in per[0]})
    old_samples = "\n".join(f"{i}\tpred: {captions[i]}\ttrue: {' | '.join(eval_set.references[i])}" for i in mine) + "\n"
    # --- the library
    result = evaluate_captioning(model, eval_set, generate_options=options, metrics=metrics, batch_size=3)
    assert result.captions == captions and dict(result.metrics) == old and list(result.metrics) == list(old)
    assert result.write_samples(tmp_path / "samples.txt").read_text() == old_samples
    assert result.sample_lines(2) == "\n".join(f"{i:4d}  pred: {captions[i]}\n      true: {eval_set.references[i][0]}"
                                               for i in range(2))


def test_vqa_file_errors_name_the_file_line_and_field(tmp_path: Path) -> None:
    path = tmp_path / "q.jsonl"

    def write(*rows: dict) -> Path:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return path

    good = {"image": "a.png", "question": "what is it?", "answers": ["cat"] * 10}
    with pytest.raises(VQAFileError, match=r"q\.jsonl:2: no 'answers' field"):
        load_vqa_questions(write(good, {"image": "a.png", "question": "what?"}))
    with pytest.raises(VQAFileError, match=r"q\.jsonl:1: field 'question' is missing"):
        load_vqa_questions(write({"image": "a.png", "answers": ["x"]}))
    with pytest.raises(VQAFileError, match=r"q\.jsonl:1: no image path"):
        load_vqa_questions(write({"question": "q?", "answers": ["x"]}))
    with pytest.raises(VQAFileError, match=r"q\.jsonl:1: field 'answers' must be"):
        load_vqa_questions(write({**good, "answers": [""]}))
    with pytest.raises(VQAFileError, match="repeated"):
        load_vqa_questions(write({**good, "question_id": 1}, {**good, "question_id": 1}))
    path.write_text("{not json\n")
    with pytest.raises(VQAFileError, match=r"q\.jsonl:1: not valid JSON"):
        load_vqa_questions(path)
    # accepted forms: VQAv2 answer objects, a single answer (GQA), ids from the line number
    qs = load_vqa_questions(write({**good, "answers": [{"answer": "cat", "answer_confidence": "yes"}]},
                                  {"image_path": "b.png", "question": "colour?", "answer": "red"}))
    assert [q.answers for q in qs] == [("cat",), ("red",)] and [q.question_id for q in qs] == [1, 2]
    assert qs[1].image == str(tmp_path / "b.png")


def test_help_documents_every_option() -> None:
    out = subprocess.run([sys.executable, str(REPO / "recipes" / "evaluate.py"), "--help"], capture_output=True,
                         text=True, env=_env(), cwd=REPO, timeout=120).stdout
    for flag in ("--model", "--task", "--data", "--vqa-data", "--output-dir", "--max-images", "--max-questions",
                 "--caption-column", "--num-beams", "--max-new-tokens", "--caption-metrics", "--vqa-prompt",
                 "--vqa-num-beams", "--vqa-max-new-tokens", "--vqa-length-penalty", "--vqa-protocol", "--k",
                 "--combine", "--references", "--no-progress"):
        assert flag in out, flag
    assert "Question: {} Answer:" in out and "accelerate launch" in out

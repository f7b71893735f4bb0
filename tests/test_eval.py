"""qformer.eval: caption metrics (against pycocoevalcap's scorers, with and without Java), VQA
accuracy (the official normalisation and leave-one-out averaging, by hand), retrieval (ITC
top-k + ITM re-ranking with a fake scorer, a tiny random Blip2, and two gloo ranks), reports."""

from __future__ import annotations

import datetime
import json
import math
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import randomize_, write_bert_tokenizer

from qformer import Blip2, Blip2Config, QFormerConfig, VisionConfig
from qformer.eval import captioning, report, vqa
from qformer.eval import (
    caption_metrics,
    evaluate_retrieval,
    exact_match_accuracy,
    flatten_captions,
    normalize_answer,
    rerank_with_itm,
    retrieval_from_features,
    retrieval_metrics,
    vqa_accuracy,
    vqa_accuracy_simple,
    vqa_score,
)

HAS_JAVA = captioning.java_available()
needs_java = pytest.mark.skipif(not HAS_JAVA, reason="Java is not installed")

# ============================================================================ captioning
REFS = {
    "img1": ["A man riding a wave on top of a surfboard.", "A surfer rides a large wave in the ocean!"],
    "img2": ["Two dogs playing in the snow.", "A pair of dogs run through the snow, happily."],
    "img3": ["A red double-decker bus on a city street.", "A bus that's driving down the road (in London)."],
    "img4": ["A cat sleeping on a sofa", "The cat's asleep on the couch"],
}
PREDS = {
    "img1": "a man riding a wave on a surfboard",
    "img2": "two dogs play in the snow.",
    "img3": "A red bus driving down a street",
    "img4": "a dog sleeping on a bed",
}


def _scorers_directly(preds, refs):
    """pycocoevalcap's scorers called by hand on the fallback tokenisation."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    gts = {i: [captioning.python_ptb_tokenize(c) for c in refs[i]] for i in preds}
    res = {i: [captioning.python_ptb_tokenize(preds[i])] for i in preds}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider, _ = Cider().compute_score(gts, res)
    rouge, _ = Rouge().compute_score(gts, res)
    return {"Bleu_1": bleu[0], "Bleu_2": bleu[1], "Bleu_3": bleu[2], "Bleu_4": bleu[3], "CIDEr": cider, "ROUGE_L": rouge}


def test_fallback_tokenizer_by_hand():
    tok = captioning.python_ptb_tokenize
    assert tok("A man's dog, running (fast) in the park.") == "a man 's dog running -lrb- fast -rrb- in the park"
    assert tok('He said "hello" and didn\'t stop... OK?') == "he said hello and did n't stop ok"
    assert tok("The U.S. flag costs $1,000 at 3.5 p.m. -- wow!") == "the u.s. flag costs $ 1,000 at 3.5 p.m. wow"
    assert tok("a well-known cat; sitting: on a sofa/chair") == "a well-known cat sitting on a sofa/chair"
    assert tok("The dogs' toys\nare   here") == "the dogs toys are here"


def test_caption_metrics_equal_pycocoevalcap_scorers():
    got = caption_metrics(PREDS, REFS, metrics=("bleu", "cider", "rouge"), tokenizer="python")
    want = _scorers_directly(PREDS, REFS)
    assert set(got) == set(want)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, abs=1e-12), key
    assert got.tokenizer == "python" and got.skipped == {}
    # Sanity of the scale: partial matches, CIDEr-D between 0 and 10.
    assert 0.3 < got["Bleu_1"] < 1 and 0 < got["CIDEr"] < 10 and 0 < got["ROUGE_L"] < 1
    assert set(got.per_image["CIDEr"]) == set(PREDS)


def test_identical_predictions_give_bleu4_one_and_max_cider():
    refs = {
        1: ["a man riding a wave on top of a surfboard"],
        2: ["two dogs playing together in the white snow"],
        3: ["a red double decker bus parked on the street"],
    }
    preds = {i: r[0] for i, r in refs.items()}
    got = caption_metrics(preds, refs, metrics=("bleu", "cider", "rouge"), tokenizer="python")
    for n in range(1, 5):
        assert got[f"Bleu_{n}"] == pytest.approx(1.0, abs=1e-6)
    # CIDEr-D: mean over n of the clipped tf-idf cosine (1 for identical text) times 10.
    assert got["CIDEr"] == pytest.approx(10.0, abs=1e-6)
    assert got["ROUGE_L"] == pytest.approx(1.0, abs=1e-12)


def test_bleu1_by_hand():
    # Clipped unigram matches: the x2, cat, on, mat = 5 of 6; equal lengths -> no brevity penalty.
    got = caption_metrics({0: "the cat sat on the mat"}, {0: ["the cat is on the mat"]}, metrics=("bleu",), tokenizer="python")
    assert got["Bleu_1"] == pytest.approx(5 / 6, rel=1e-8)
    # Precision 1 but 2 words against 6: brevity penalty exp(1 - 6/2).
    got = caption_metrics({0: "the cat"}, {0: ["the cat is on the mat"]}, metrics=("bleu",), tokenizer="python")
    assert got["Bleu_1"] == pytest.approx(math.exp(-2), rel=1e-8)


def test_without_java_metrics_use_fallback_and_skip_meteor_spice(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("PATH", str(tmp_path))  # no java anywhere on PATH
    assert not captioning.java_available()
    got = caption_metrics(PREDS, REFS)  # every metric, tokenizer="auto"
    assert got.tokenizer == "python"
    assert set(got.skipped) == {"meteor", "spice"}
    assert all("Java" in why for why in got.skipped.values())
    assert "METEOR" not in got and "SPICE" not in got
    want = _scorers_directly(PREDS, REFS)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, abs=1e-12), key
    assert any("pure-Python" in n for n in got.notices)
    assert "Java not found" in caplog.text


def test_spice_never_downloads(monkeypatch):
    import pycocoevalcap.spice.get_stanford_models as gsm

    def no_download(*a, **k):
        raise AssertionError("SPICE tried to download the Stanford models")

    monkeypatch.setattr(gsm, "urlretrieve", no_download)
    if not captioning.spice_models_missing():
        pytest.skip("the CoreNLP models are installed here: SPICE would run (slowly) instead")
    got = caption_metrics(PREDS, REFS, metrics=("bleu", "spice"), tokenizer="python")
    assert "spice" in got.skipped and "Bleu_4" in got
    assert ("not on disk" in got.skipped["spice"]) == HAS_JAVA


def test_unknown_metric_and_missing_references_raise():
    with pytest.raises(ValueError, match="unknown caption metrics"):
        caption_metrics(PREDS, REFS, metrics=("bleu", "wer"))
    with pytest.raises(ValueError, match="no reference"):
        caption_metrics({"nope": "a cat"}, REFS, metrics=("bleu",))
    got = caption_metrics({"img1": PREDS["img1"], "img2": PREDS["img2"]}, REFS, metrics=("bleu",), tokenizer="python")
    assert any("no prediction" in n for n in got.notices)


CAPTION_CORPUS = [
    "A man's dog, running (fast) in the park.",
    'He said "hello" and didn\'t stop... ok?',
    "The U.S. flag at 3.5 p.m. costs $1,000 -- wow!",
    "a well-known black-and-white cat; sitting: on a sofa/chair & table",
    "I can't won't shouldn't they're we'll I'd you've it's cannot gonna",
    "Dogs' toys [red] {blue} `quoted' 'single' A/B test 1/2 cup",
    "Café naïve “curly” ‘quotes’ — em–dash … ellipsis",
    "A man is surfing.The wave is big",
    "a clock tower at 2:30 on the 10-15 street, #1 in town; 100% sure",
    "an elephant walking through a river with it's trunk up",
    "A street sign that reads 'Main St.'",
    "the no. 5 bus and mr. smith, e.g. a box i.e. a crate",
    "",
    "what's that?!",
    "A. Lincoln statue in the '80s",
]


@needs_java
def test_fallback_tokenizer_matches_the_ptb_jar():
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    captions = {i: [c] for i, c in enumerate(CAPTION_CORPUS)}
    jar, backend, notices = captioning.tokenize_captions(captions, tokenizer="ptb")
    assert backend == "ptb" and notices == []
    # Our Java path is pycocoevalcap's PTBTokenizer, output for output (it writes its
    # temporary file next to its jar, so only where site-packages is writable) ...
    if os.access(captioning._pycocoevalcap_dir() / "tokenizer", os.W_OK):
        theirs = PTBTokenizer().tokenize({i: [{"caption": c[0]}] for i, c in captions.items() if c[0]})
        for i, toks in theirs.items():
            assert jar[i] == toks, CAPTION_CORPUS[i]
    # ... and the pure-Python fallback reproduces it on these captions.
    for i, caption in enumerate(CAPTION_CORPUS):
        assert captioning.python_ptb_tokenize(caption) == jar[i][0], caption


@needs_java
@pytest.mark.slow
def test_meteor_runs_with_java():
    got = caption_metrics(PREDS, REFS, metrics=("meteor",))
    assert got.tokenizer == "ptb" and got.skipped == {}
    assert 0.1 < got["METEOR"] < 1.0  # partial matches


# ============================================================================ VQA
@pytest.mark.parametrize(
    "raw, want",
    [
        ("Two", "2"),
        ("a dog", "dog"),
        ("The Dog!", "dog"),
        ("dont", "don't"),  # the official contractions map restores apostrophes
        ("whats", "what's"),
        ("it's", "it's"),  # already a contraction: left alone (the apostrophe is not punctuation)
        ("yes.", "yes"),
        ("  yes\n", "yes"),
        ("1,000", "1000"),  # a digit-comma-digit: every punctuation mark is deleted
        ("red, blue", "red blue"),  # touching a space: deleted
        ("red,blue", "red blue"),  # otherwise: replaced by a space
        ("3.5", "3.5"),  # a period before a digit stays
        ("none", "0"),
        ("fire-truck", "fire truck"),
    ],
)
def test_official_answer_normalisation(raw, want):
    assert normalize_answer(raw) == want


def _answers(matches: int, right: str = "2", wrong: str = "3") -> list[str]:
    return [right] * matches + [wrong] * (10 - matches)


def test_vqa_accuracy_leave_one_out_by_hand():
    # m matching humans of 10. Leaving out one of the m matching answers leaves m-1 matches,
    # leaving out one of the 10-m others leaves m; the score is the mean over the 10 subsets.
    def by_hand(m):
        return (m * min(1, (m - 1) / 3) + (10 - m) * min(1, m / 3)) / 10

    assert by_hand(2) == pytest.approx((2 * (1 / 3) + 8 * (2 / 3)) / 10) == pytest.approx(0.6)
    for m, official in [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (7, 1.0), (10, 1.0)]:
        assert by_hand(m) == pytest.approx(official)
        assert vqa_accuracy("2", _answers(m)) == pytest.approx(official), m
    # Where the shortcut min(m/3, 1) agrees (0 and >= 4 matches) and where it does not (1-3).
    assert vqa_accuracy_simple("2", _answers(4)) == vqa_accuracy("2", _answers(4)) == 1.0
    assert vqa_accuracy_simple("2", _answers(0)) == vqa_accuracy("2", _answers(0)) == 0.0
    assert vqa_accuracy_simple("2", _answers(3)) == 1.0 and vqa_accuracy("2", _answers(3)) == pytest.approx(0.9)
    assert vqa_accuracy_simple("2", _answers(2)) == pytest.approx(2 / 3) and vqa_accuracy("2", _answers(2)) == pytest.approx(0.6)


def test_vqa_accuracy_normalises_and_the_unanimous_quirk():
    # Non-unanimous humans: both sides normalised, "Two." matches the three "2"s -> 0.9.
    assert vqa_accuracy("Two.", _answers(3)) == pytest.approx(0.9)
    assert vqa_accuracy("two", ["2", "two", "Two", "3", "3", "3", "3", "3", "3", "3"]) == pytest.approx(0.9)
    # Unanimous humans: the official script normalises nothing, so "Yes" != "yes" ...
    assert vqa_accuracy("Yes", ["yes"] * 10) == 0.0
    assert vqa_accuracy(" yes ", ["yes"] * 10) == 1.0  # (it does strip)
    # ... while LAVIS's copy always normalises the prediction.
    assert vqa_accuracy("Yes", ["yes"] * 10, protocol="lavis") == 1.0


def test_vqa_score_and_exact_match():
    preds = {1: "yes", 2: "2", 3: "blue"}
    answers = {1: ["yes"] * 10, 2: _answers(2), 3: ["red"] * 10}
    types = {1: "yes/no", 2: "number", 3: "other"}
    got = vqa_score(preds, answers, answer_types=types)
    assert got["accuracy"] == pytest.approx(100 * (1.0 + 0.6 + 0.0) / 3)
    assert got["accuracy/number"] == pytest.approx(60.0) and got["accuracy/yes/no"] == 100.0
    assert got["num_questions"] == 3
    # GQA-style single answers, normalised exact match.
    em = exact_match_accuracy(
        {"a": "Yes.", "b": "two", "c": "left", "d": "The table"},
        {"a": "yes", "b": "2", "c": "right", "d": ["table", "desk"]},
    )
    assert em["accuracy"] == pytest.approx(75.0)
    with pytest.raises(ValueError):
        vqa_score({9: "x"}, answers)


def test_vqa_prompts_and_decode_settings():
    assert vqa.VQA_PROMPT_OPT.format("what color is the bus?") == "Question: what color is the bus? Answer:"
    assert vqa.vqa_prompt("what color is the bus?", "t5") == "Question: what color is the bus? Short answer:"
    assert vqa.VQADecodeSettings().generate_kwargs() == dict(
        num_beams=5, max_new_tokens=10, min_new_tokens=1, length_penalty=-1.0, do_sample=False
    )


# ============================================================================ retrieval: metrics and re-ranking
def _scores_with_ranks(gt_cols: list[list[int]], ranks: list[int], n_cols: int) -> torch.Tensor:
    """Rows whose best ground truth sits at 0-based position ``ranks[q]``."""
    out = torch.empty(len(ranks), n_cols)
    for q, (gts, r) in enumerate(zip(gt_cols, ranks)):
        others = [c for c in range(n_cols) if c not in gts]
        order = others[:r] + list(gts) + others[r:]  # best first
        out[q, torch.tensor(order)] = torch.arange(n_cols, 0, -1, dtype=torch.float32)
    return out


def test_recall_at_k_by_hand_with_several_captions_per_image():
    captions = [[f"caption {i}.{j}" for j in range(2)] for i in range(12)]  # 12 images x 2 captions
    texts, txt2img, img2txt = flatten_captions(captions)
    assert len(texts) == 24 and txt2img[:4] == [0, 0, 1, 1] and img2txt[3] == [6, 7]
    i2t_ranks = [0, 0, 1, 3, 4, 5, 6, 9, 10, 11, 2, 8]  # rank of the better of the two captions
    t2i_ranks = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11] * 2
    s_i2t = _scores_with_ranks(img2txt, i2t_ranks, 24)
    s_t2i = _scores_with_ranks([[i] for i in txt2img], t2i_ranks, 12)
    got = retrieval_metrics(s_i2t, s_t2i, txt2img, img2txt)
    assert got["i2t_r1"] == pytest.approx(100 * 2 / 12)  # ranks 0, 0
    assert got["i2t_r5"] == pytest.approx(100 * 6 / 12)  # + 1, 3, 4, 2
    assert got["i2t_r10"] == pytest.approx(100 * 10 / 12)  # all but 10, 11
    assert got["t2i_r1"] == pytest.approx(100 / 12) and got["t2i_r5"] == pytest.approx(100 * 5 / 12)
    assert got["t2i_r10"] == pytest.approx(100 * 10 / 12)
    assert got["i2t_r_mean"] == pytest.approx((got["i2t_r1"] + got["i2t_r5"] + got["i2t_r10"]) / 3)
    assert got["r_mean"] == pytest.approx((got["i2t_r_mean"] + got["t2i_r_mean"]) / 2)
    assert got.ranks_i2t.tolist() == i2t_ranks
    # "any caption": the second caption of image 0 alone at the top is a hit too.
    s = s_i2t.clone()
    s[0] = 0
    s[0, 1] = 5.0
    assert retrieval_metrics(s, s_t2i, txt2img)["i2t_r1"] == pytest.approx(100 * 2 / 12)  # img2txt derived
    # Ties rank pessimistically: a ground truth tied with another item is not a hit at 1.
    s[0, 5] = 5.0
    assert retrieval_metrics(s, s_t2i, txt2img)["i2t_r1"] == pytest.approx(100 / 12)


class FakeItm:
    """An ITM scorer reading a table, recording every call."""

    def __init__(self, table: torch.Tensor):
        self.table = table
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __call__(self, image_index, text_index):
        self.calls.append((image_index.clone(), text_index.clone()))
        return self.table[image_index, text_index]

    @property
    def pairs(self) -> list[tuple[int, int]]:
        return [(int(i), int(t)) for ii, tt in self.calls for i, t in zip(ii, tt)]


def _feats_for(sim: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Features whose ITC similarity is exactly ``sim``: one query per image, one-hot texts."""
    return sim[:, None, :].clone(), torch.eye(sim.shape[1])


def test_itm_reranking_changes_the_order():
    # Image 0's ground truth (text 1) is second by ITC; the ITM head prefers it strongly.
    sim = torch.tensor([[0.9, 0.8, 0.1], [0.7, 0.3, 0.2], [0.1, 0.2, 0.6]])
    itm = torch.tensor([[-3.0, 4.0, 0.0], [0.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
    txt2img = [1, 0, 2]  # text 0 -> image 1, text 1 -> image 0, text 2 -> image 2
    img, txt = _feats_for(sim)
    itc = retrieval_from_features(img, txt, None, txt2img, combine="itc", return_scores=True)
    assert itc.ranks_i2t[0] == 1 and itc["i2t_r1"] == pytest.approx(100 * 2 / 3)
    assert torch.equal(itc.scores_i2t, sim) and itc.num_itm_pairs == 0
    both = retrieval_from_features(img, txt, FakeItm(itm), txt2img, k=2, return_scores=True)
    assert both.ranks_i2t[0] == 0 and both["i2t_r1"] == pytest.approx(100.0)
    assert both.scores_i2t[0, 1] == pytest.approx(4.0 + 0.8) and both.scores_i2t[0, 0] == pytest.approx(-3.0 + 0.9)
    assert both.scores_i2t[0, 2] == float("-inf")  # not among image 0's top 2
    assert both.itc_only == dict(itc) and itc.itc_only is None  # ITC-only recall from the same pass
    only_itm = retrieval_from_features(img, txt, FakeItm(itm), txt2img, k=2, combine="itm", return_scores=True)
    assert only_itm.scores_i2t[0, 1] == 4.0 and only_itm.scores_t2i[1, 0] == 4.0


def test_itm_scores_only_the_deduplicated_top_k_pairs_in_chunks():
    g = torch.Generator().manual_seed(0)
    ni, nt, k, chunk = 20, 40, 3, 7
    sim = torch.rand(ni, nt, generator=g)
    fake = FakeItm(torch.randn(ni, nt, generator=g))
    img, txt = _feats_for(sim)
    txt2img = [t // 2 for t in range(nt)]
    out = retrieval_from_features(img, txt, fake, txt2img, k=k, chunk_size=chunk, return_scores=True)
    pairs = fake.pairs
    expected = {(i, int(t)) for i in range(ni) for t in sim[i].topk(k).indices}
    expected |= {(int(i), t) for t in range(nt) for i in sim[:, t].topk(k).indices}
    assert len(pairs) == len(set(pairs)) == len(expected) == out.num_itm_pairs  # each pair once
    assert set(pairs) == expected
    assert len(pairs) <= ni * k + nt * k < ni * nt  # N*k, not N^2
    assert all(len(i) <= chunk for i, _ in fake.calls) and len(fake.calls) == -(-len(pairs) // chunk)
    assert pairs == sorted(pairs)  # image-major: a chunk reuses one image's K/V
    # The scores are ITM + ITC exactly where a pair is a candidate of that direction.
    for i in range(ni):
        for t in sim[i].topk(k).indices:
            assert out.scores_i2t[i, t] == pytest.approx(float(fake.table[i, t] + sim[i, t]))
    assert torch.isinf(out.scores_i2t).sum() == ni * (nt - k)
    assert torch.isinf(out.scores_t2i).sum() == nt * (ni - k)


def test_k_larger_than_the_candidates_is_clamped():
    g = torch.Generator().manual_seed(1)
    sim = torch.rand(4, 8, generator=g)
    table = torch.randn(4, 8, generator=g)
    fake = FakeItm(table)
    out = rerank_with_itm(sim, fake, k=1000, combine="itm")
    assert (out.k_i2t, out.k_t2i) == (8, 4)
    assert out.num_itm_pairs == 32 and len(fake.pairs) == 32  # every pair, once
    assert torch.equal(out.i2t, table) and torch.equal(out.t2i, table.t())


# ============================================================================ retrieval: a tiny Blip2
IMG = 32
CAPTIONS = [
    ["a red circle left of a blue square", "a red circle"],
    ["two dogs playing in the snow", "dogs in the snow"],
    ["a cat on a sofa", "a small black cat"],
    ["a man riding a bus", "a man on a big green bus"],
]


def _tiny_model(tokenizer) -> Blip2:
    config = Blip2Config(
        vision=VisionConfig(backend="timm", name="eva_giant_patch14_clip_224",
                            model_kwargs=dict(embed_dim=48, depth=2, num_heads=4, patch_size=8, mlp_ratio=2.0),
                            image_size=IMG, feature_layer=-2),
        qformer=QFormerConfig(vocab_size=len(tokenizer), hidden_size=64, num_layers=2, num_heads=4,
                              intermediate_size=128, max_position_embeddings=48, encoder_width=48, num_query_tokens=8),
        embed_dim=32,
        max_txt_len=16,
    )
    torch.manual_seed(0)
    model = Blip2(config, tokenizer=tokenizer)
    randomize_(model, 0)
    return model.eval()


def _pixels(n: int = 4) -> torch.Tensor:
    return torch.randn(n, 3, IMG, IMG, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("eval_tok")
    write_bert_tokenizer(d)
    return d


@pytest.fixture(scope="module")
def model(tok_dir) -> Blip2:
    from transformers import BertTokenizerFast

    return _tiny_model(BertTokenizerFast.from_pretrained(str(tok_dir)))


def test_blip2_end_to_end(model):
    texts, txt2img, img2txt = flatten_captions(CAPTIONS)
    pixels = _pixels()
    itc = evaluate_retrieval(model, pixels, texts, txt2img, img2txt, combine="itc", progress=False, return_scores=True)
    ref = model.similarity(pixels, texts)
    assert torch.allclose(itc.scores_i2t, ref, atol=1e-6)
    assert torch.equal(itc.scores_i2t.argsort(dim=1, descending=True), ref.argsort(dim=1, descending=True))
    assert torch.equal(itc.scores_t2i.argsort(dim=1, descending=True), ref.t().argsort(dim=1, descending=True))

    # ITM re-ranking through the Q-Former, from a DataLoader-like iterable of batches.
    batches = [{"pixel_values": pixels[:3]}, {"pixel_values": pixels[3:]}]
    res = evaluate_retrieval(model, batches, texts, txt2img, img2txt, k=3, chunk_size=5, progress=False, return_scores=True)
    assert set(res) == {f"{d}_r{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)} | {"i2t_r_mean", "t2i_r_mean", "r_mean"}
    assert (res.k_i2t, res.k_t2i) == (3, 3) and res.num_itm_pairs <= 4 * 3 + 8 * 3
    # A candidate's score is the ITM match logit of the pair plus its ITC similarity.
    with torch.no_grad():
        from qformer.inference import tokenize

        ids, mask = tokenize(model, texts)
        embeds = model.embed_image(pixels)
        for i in range(4):
            kv = model.image_kv(embeds[i : i + 1])
            for t in ref[i].topk(3).indices.tolist():
                logit = model.itm_logits(ids[t : t + 1], mask[t : t + 1], kv)[0, 1]
                assert res.scores_i2t[i, t] == pytest.approx(float(logit + ref[i, t]), abs=1e-5)
    # Chunking and K/V sharing do not change the numbers.
    one = evaluate_retrieval(model, pixels, texts, txt2img, img2txt, k=3, chunk_size=1, embeds_device="cpu",
                             progress=False, return_scores=True)
    assert torch.allclose(one.scores_i2t, res.scores_i2t, atol=1e-5)
    assert torch.allclose(one.scores_t2i, res.scores_t2i, atol=1e-5)
    assert dict(one) == pytest.approx(dict(res))


# ============================================================================ retrieval: two gloo ranks
WORLD = 2


def _synthetic():
    g = torch.Generator().manual_seed(3)
    return torch.rand(9, 19, generator=g), torch.randn(9, 19, generator=g)


def _rank_body(rank: int, store: str, tok_dir: str) -> dict:
    """What each rank runs; the process group gives rank / world_size to the eval functions."""
    from transformers import BertTokenizerFast

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=120))
    try:
        sim, table = _synthetic()
        fake = FakeItm(table)
        mats = rerank_with_itm(sim, fake, k=4, chunk_size=3)
        model = _tiny_model(BertTokenizerFast.from_pretrained(tok_dir))
        texts, txt2img, img2txt = flatten_captions(CAPTIONS)
        res = evaluate_retrieval(model, _pixels(), texts, txt2img, img2txt, k=3, chunk_size=4, progress=False, return_scores=True)
    finally:
        dist.destroy_process_group()
    return dict(i2t=mats.i2t, t2i=mats.t2i, pairs=torch.tensor(fake.pairs).view(-1, 2), metrics=dict(res),
                scores_i2t=res.scores_i2t, scores_t2i=res.scores_t2i)


def _rank_worker(rank: int, store: str, out: str, tok_dir: str) -> None:
    torch.set_num_threads(1)
    torch.save(_rank_body(rank, store, tok_dir), f"{out}/rank{rank}.pt")


def test_two_gloo_ranks_equal_one_process(tmp_path, tok_dir, model):
    # This process is rank 0 and spawns only rank 1: one fresh interpreter to start, not two.
    store, threads = str(tmp_path / "store"), torch.get_num_threads()
    child = mp.get_context("spawn").Process(target=_rank_worker, args=(1, store, str(tmp_path), str(tok_dir)))
    child.start()
    try:
        torch.set_num_threads(1)
        ranks = [_rank_body(0, store, str(tok_dir))]
    finally:
        torch.set_num_threads(threads)
        child.join(timeout=180)
        if child.is_alive():
            child.kill()
    assert child.exitcode == 0
    ranks.append(torch.load(tmp_path / "rank1.pt", weights_only=True))
    assert not dist.is_initialized()

    sim, table = _synthetic()
    fake = FakeItm(table)
    single = rerank_with_itm(sim, fake, k=4, chunk_size=3)
    for r in ranks:  # every rank ends with the complete matrices
        assert torch.equal(r["i2t"], single.i2t) and torch.equal(r["t2i"], single.t2i)
    # The ranks split the pairs: disjoint, together exactly the single process's pairs.
    split = [set(map(tuple, r["pairs"].tolist())) for r in ranks]
    assert split[0] and split[1] and not (split[0] & split[1])
    assert split[0] | split[1] == set(fake.pairs)
    assert len(ranks[0]["pairs"]) + len(ranks[1]["pairs"]) == len(fake.pairs)

    texts, txt2img, img2txt = flatten_captions(CAPTIONS)
    ref = evaluate_retrieval(model, _pixels(), texts, txt2img, img2txt, k=3, chunk_size=4, progress=False, return_scores=True)
    for r in ranks:
        assert torch.allclose(r["scores_i2t"], ref.scores_i2t, atol=1e-5)
        assert torch.allclose(r["scores_t2i"], ref.scores_t2i, atol=1e-5)
        assert r["metrics"] == pytest.approx(dict(ref))


# ============================================================================ reports
def test_write_results_json_and_markdown(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))  # no Java: METEOR/SPICE skipped, and the report says so
    caps = caption_metrics(PREDS, REFS)
    results = {"coco_caption": caps, "vqav2": vqa_score({1: "2"}, {1: _answers(2)}), "odd": {"nan": float("nan")}}
    paths = report.write_results(results, tmp_path / "out", extra={"checkpoint": "ckpt/step_100"})
    data = json.loads(paths["json"].read_text())  # strict JSON: no NaN
    assert data["results"]["vqav2"]["accuracy"] == pytest.approx(60.0)
    assert data["results"]["odd"]["nan"] is None and data["checkpoint"] == "ckpt/step_100"
    assert set(data["meta"]["coco_caption"]["skipped"]) == {"meteor", "spice"}
    assert data["results"]["coco_caption"]["CIDEr"] == pytest.approx(caps["CIDEr"])
    md = paths["markdown"].read_text()
    assert "| vqav2 | accuracy | 60.00 |" in md and "## Notes" in md and "meteor skipped" in md
    report.print_table({"vqav2": {"accuracy": 60.0, "num_questions": 1}})
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].split() == ["task", "metric", "value"] and printed[2].split() == ["vqav2", "accuracy", "60.00"]
    assert printed[3].split() == ["vqav2", "num_questions", "1"]

"""Image search (qformer.search, recipes/search.py): the index holds exactly the model's ITC
features, updates encode only what changed, faiss and the matrix product give the same top-k,
ITM re-ranking gives retrieval evaluation's scores, two gloo ranks build what one builds, and a
model built to tell colours finds the right images."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import REPO, randomize_

from qformer import Blip2, Blip2Config, QFormerConfig, VisionConfig
from qformer.errors import ConfigError
from qformer.eval.retrieval import evaluate_retrieval
from qformer.search import ImageIndex, ImageItem, build_index, update_index
from qformer.testing import captions, write_bert_tokenizer

sys.path.insert(0, str(REPO / "recipes"))
import search as search_recipe  # noqa: E402
from corner_model import COLORS, GRID, corner_model, save_scene  # noqa: E402

HAS_FAISS = importlib.util.find_spec("faiss") is not None  # the optional extra: qformer[search]


def tiny_model(tok_dir: Path, seed: int = 0) -> Blip2:
    tok = write_bert_tokenizer(tok_dir)
    cfg = Blip2Config(
        vision=VisionConfig(backend="timm", name="vit_tiny_patch16_224", image_size=32, feature_layer=-1,
                            model_kwargs=dict(embed_dim=48, depth=2, num_heads=4, patch_size=8, mlp_ratio=2.0)),
        qformer=QFormerConfig(vocab_size=len(tok), hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128,
                              max_position_embeddings=48, encoder_width=48, num_query_tokens=6),
        embed_dim=32, max_txt_len=16)
    torch.manual_seed(seed)
    model = Blip2(cfg, tokenizer=tok)
    randomize_(model, seed)
    return model.eval()


def write_images(folder: Path, n: int, seed: int = 0, start: int = 0) -> list[Path]:
    """``n`` random 40x36 RGB PNGs (another size than the tower's: the preprocessing resizes)."""
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(start, start + n):
        px = torch.randint(0, 256, (36, 40, 3), generator=g, dtype=torch.uint8).numpy()
        (folder / "sub").mkdir(exist_ok=True)
        path = folder / ("sub" if i % 3 == 0 else "") / f"img{i:03d}.png"
        Image.fromarray(px).save(path)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_model(tmp_path_factory.mktemp("tok"))


def reference_features(model: Blip2, paths: list[Path]) -> torch.Tensor:
    return model.image_features_of([str(p) for p in paths])  # (N, Q, E), the model's own API


# ---------------------------------------------------------------------------- build and update
def test_build_holds_the_models_features_and_updates_only_what_changed(model, tmp_path):
    paths = write_images(tmp_path / "photos", 7)
    (tmp_path / "photos" / "notes.txt").write_text("not an image")
    (tmp_path / "photos" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    index, stats = build_index(model, tmp_path / "photos", tmp_path / "index", batch_size=3)
    assert stats.total == 8 and stats.encoded == 7 and list(stats.skipped) == ["broken.png"]
    want = {p.relative_to(tmp_path / "photos").as_posix(): f for p, f in zip(paths, reference_features(model, paths))}
    assert sorted(index.keys) == sorted(want)
    for key, feats in zip(index.keys, index.features):
        assert torch.allclose(feats, want[key], atol=1e-5)
    loaded = ImageIndex.load(tmp_path / "index")
    assert loaded.keys == index.keys and torch.equal(loaded.features, index.features)

    # add two, change one, remove one: only three are encoded, the rest is reused as it was
    added = write_images(tmp_path / "photos", 2, seed=1, start=7)
    changed = paths[1]
    write_images(tmp_path / "other", 2, seed=2)[1].replace(changed)
    os.utime(changed, ns=(1, 1))  # a new stamp even on a coarse clock
    paths[4].unlink()
    calls = []
    import qformer.search as S

    real = S.encode_items
    S.encode_items = lambda m, items, **kw: calls.append([it.key for it in items]) or real(m, items, **kw)
    try:
        updated, stats = update_index(model, tmp_path / "photos", tmp_path / "index", batch_size=4)
    finally:
        S.encode_items = real
    rel = lambda p: p.relative_to(tmp_path / "photos").as_posix()  # noqa: E731
    assert sorted(calls[0]) == sorted([rel(p) for p in added] + [rel(changed), "broken.png"])
    assert (stats.encoded, stats.kept, stats.removed) == (3, 5, 1)
    fresh, _ = build_index(model, tmp_path / "photos", tmp_path / "fresh")
    assert updated.keys == fresh.keys and torch.allclose(updated.features, fresh.features, atol=1e-6)
    assert ImageIndex.load(tmp_path / "index").keys == fresh.keys

    # another model: the index refuses it, an update re-encodes everything
    other = tiny_model(tmp_path / "tok2", seed=1)
    with pytest.raises(ConfigError, match="another model"):
        updated.search(other, "a dog", rerank=0)
    rebuilt, stats = update_index(other, tmp_path / "photos", tmp_path / "index")
    assert stats.rebuilt and stats.encoded == 8 and stats.kept == 0
    assert len(rebuilt.search(other, "a dog", k=2, rerank=0)[0]) == 2
    with torch.no_grad():
        other.vision_proj.bias.add_(0.1)  # trained further in place: the features are stale
    with pytest.raises(ConfigError, match="another model"):
        rebuilt.search(other, "a dog", rerank=0)


def test_a_dataset_file_indexes_each_distinct_image_once(model, tmp_path):
    import json

    paths = write_images(tmp_path / "imgs", 4)
    rows = [{"image": str(p), "text": f"caption {j}"} for p in paths for j in range(2)]  # two captions each
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    index, stats = build_index(model, tmp_path / "data.jsonl", tmp_path / "index")
    assert stats.total == 4 and index.keys == [str(p) for p in paths]
    assert torch.allclose(index.features, reference_features(model, paths), atol=1e-5)


# ---------------------------------------------------------------------------- querying
def test_faiss_and_the_matrix_product_give_the_same_topk():
    pytest.importorskip("faiss")
    g = torch.Generator().manual_seed(0)
    feats = torch.nn.functional.normalize(torch.randn(500, 8, 16, generator=g), dim=-1)
    index = ImageIndex(feats, [ImageItem(f"k{i}", None, "") for i in range(500)], fingerprint="x")
    texts = torch.nn.functional.normalize(torch.randn(6, 16, generator=g), dim=-1)
    ref = torch.einsum("nqe,te->tnq", feats, texts).amax(-1)  # naive: max over queries
    ref_scores, ref_index = ref.sort(dim=1, descending=True)
    for k in (1, 7, 40):
        s_t, i_t = index.itc_topk(texts, k, backend="torch")
        s_f, i_f = index.itc_topk(texts, k, backend="faiss")
        assert torch.equal(i_t, ref_index[:, :k]) and torch.equal(i_f, ref_index[:, :k])
        assert torch.allclose(s_t, ref_scores[:, :k], atol=1e-6) and torch.allclose(s_f, ref_scores[:, :k], atol=1e-5)
    s, i = index.itc_topk(texts, 10, backend="faiss", faiss_factory="HNSW32")  # approximate: most of the top 10
    overlap = sum(len(set(a) & set(b)) for a, b in zip(i.tolist(), ref_index[:, :10].tolist())) / 60
    assert overlap > 0.8
    with pytest.raises(ConfigError, match="backend"):
        index.itc_topk(texts, 3, backend="annoy")


def test_itm_reranking_gives_retrieval_evaluations_scores(model, tmp_path):
    write_images(tmp_path / "photos", 9)
    index, _ = build_index(model, tmp_path / "photos", tmp_path / "index")
    texts = captions(9, words=(2, 9), seed=1)  # retrieval evaluation wants a text per image
    pixels = model.vision.preprocess([str(tmp_path / "photos" / k) for k in index.keys])
    ev = evaluate_retrieval(model, pixels, texts, list(range(9)), k=4, return_scores=True, progress=False)
    for backend in ("torch", "faiss") if HAS_FAISS else ("torch",):
        hits = index.search(model, texts, k=3, rerank=4, backend=backend)
        for t, row in enumerate(hits):
            want_scores, want = ev.scores_t2i[t].topk(3)
            assert [h.key for h in row] == [index.keys[i] for i in want.tolist()]
            assert [h.score for h in row] == pytest.approx(want_scores.tolist(), abs=1e-5)
            assert all(h.itm == pytest.approx(h.score - h.itc, abs=1e-6) for h in row)
    gone = tmp_path / "photos" / index.keys[int(ev.scores_t2i[0].argmax())]
    gone.unlink()  # the best image of text 0 disappears: it is left out of the re-ranking
    hits = index.search(model, texts[:1], k=3, rerank=4)[0]
    want = [index.keys[i] for i in ev.scores_t2i[0].topk(4).indices.tolist()[1:]]
    assert [h.key for h in hits] == want
    itc = index.search(model, texts, k=9, rerank=0)
    sim = model.similarity(pixels, texts).t()  # (T, N)
    for t, row in enumerate(itc):
        assert [h.score for h in row] == pytest.approx(sim[t].sort(descending=True).values.tolist(), abs=1e-5)


def test_a_colour_telling_model_finds_the_right_images(tmp_path):
    model = corner_model(write_bert_tokenizer(tmp_path / "tok"))
    folder = tmp_path / "scenes"
    folder.mkdir()
    for c, color in enumerate(COLORS):
        for cell in range(3):
            save_scene(folder / f"{color}_{cell}.png", color, cell, (cell + c) % GRID)
    index, _ = build_index(model, folder, tmp_path / "index")
    hits = index.search(model, ["a red square", "a blue square"], k=3, rerank=len(index))
    assert sorted(h.key for h in hits[0]) == ["red_0.png", "red_1.png", "red_2.png"]
    assert sorted(h.key for h in hits[1]) == ["blue_0.png", "blue_1.png", "blue_2.png"]


def test_search_recipe_builds_updates_and_answers(model, tmp_path, capsys):
    model.save_pretrained(tmp_path / "model")
    write_images(tmp_path / "photos", 5)
    common = ["--model", str(tmp_path / "model"), "--index", str(tmp_path / "index")]
    out = search_recipe.main(["build", *common, "--images", str(tmp_path / "photos"), "--no-progress",
                              "--num-workers", "0"])
    assert out["images"] == 5 and out["encoded"] == 5
    write_images(tmp_path / "photos", 1, seed=3, start=5)
    out = search_recipe.main(["build", *common, "--images", str(tmp_path / "photos"), "--no-progress"])
    assert (out["images"], out["encoded"], out["kept"]) == (6, 1, 5)
    res = search_recipe.main(["query", *common, "two cats", "a bus", "--k", "2", "--rerank", "3"])
    direct = ImageIndex.load(tmp_path / "index").search(Blip2.from_pretrained(tmp_path / "model").eval(),
                                                        ["two cats", "a bus"], k=2, rerank=3)
    assert [[h["key"] for h in r["hits"]] for r in res] == [[h.key for h in row] for row in direct]
    assert "two cats" in capsys.readouterr().out


# ---------------------------------------------------------------------------- two ranks
def _build_worker(rank: int, store: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    model = tiny_model(Path(out) / f"tok{rank}")
    index, stats = update_index(model, Path(out) / "photos", Path(out) / "index2", rank=rank, world_size=2,
                                batch_size=2)
    torch.save({"keys": index.keys, "features": index.features, "skipped": stats.skipped}, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_ranks_build_what_one_builds(model, tmp_path):
    write_images(tmp_path / "photos", 7)
    (tmp_path / "photos" / "broken.png").write_bytes(b"nope")
    one, _ = build_index(model, tmp_path / "photos", tmp_path / "index1")
    mp.spawn(_build_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got["keys"] == one.keys and list(got["skipped"]) == ["broken.png"]
        assert torch.allclose(got["features"], one.features, atol=1e-5)
    saved = ImageIndex.load(tmp_path / "index2")
    assert saved.keys == one.keys and torch.allclose(saved.features, one.features, atol=1e-5)


def test_split_preprocessing_gives_the_transforms_values() -> None:
    """The index build resizes to uint8 in the workers and normalizes whole batches in the main
    process: exactly the values of the one-image transform (RGB of any size, and 16-bit grey)."""
    import numpy as np
    from PIL import Image

    from qformer.images import ImagePreprocessor

    pp = ImagePreprocessor(image_size=32, mean=(0.48145466, 0.4578275, 0.40821073),
                           std=(0.26862954, 0.26130258, 0.27577711))
    rng = np.random.default_rng(0)
    rgb = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in ((32, 32), (50, 70), (20, 31))]
    resized = torch.stack([pp.resize(im) for im in rgb])
    assert resized.dtype == torch.uint8
    assert torch.equal(pp.normalize(resized), torch.stack([pp.transform(im) for im in rgb]))
    grey16 = Image.fromarray(rng.integers(0, 65535, (40, 40)).astype(np.uint16))
    assert torch.equal(pp.resize(grey16), pp.transform(grey16))

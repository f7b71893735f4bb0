"""The browser demo (qformer.demo): uploads are checked, each feature returns what the library's
own calls return (captions, answers, search hits, Grad-CAM), a missing model is reported, not a
crash; the real server (python -m qformer.demo) serves the page and the API on 127.0.0.1, refuses
what it should, and leaves nothing behind; headless Chromium drives the page end to end."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO
from demo_models import stage2_model, write_demo_models
from PIL import Image

from qformer import Blip2
from qformer.demo import DecodeOptions, Demo, DemoLimits, RequestRefused, read_upload
from qformer.demo.browser import chromium_path, visit
from qformer.eval.instruct import INSTRUCT_VQA_TEMPLATE
from qformer.search import ImageIndex


def png_bytes(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def from_data_url(url: str) -> bytes:
    return base64.b64decode(url.split(",", 1)[1])


@pytest.fixture(scope="module")
def paths(tmp_path_factory) -> dict[str, Path]:
    return write_demo_models(tmp_path_factory.mktemp("demo"))


@pytest.fixture(scope="module")
def demo(paths, tmp_path_factory) -> Demo:
    return Demo.load(model=paths["stage2"], stage1=paths["stage1"], instruct=paths["instruct"], images=paths["images"],
                     workdir=tmp_path_factory.mktemp("work"), progress=False)


def scene_image(paths, name: str) -> Image.Image:
    return Image.open(paths["images"] / name).convert("RGB")


# ---------------------------------------------------------------------------- uploads
def test_upload_accepts_images_and_decodes_the_same_pixels():
    g = np.random.default_rng(0)
    rgba = Image.fromarray(g.integers(0, 256, (20, 30, 4), dtype=np.uint8), "RGBA")
    rgb = Image.fromarray(g.integers(0, 256, (20, 30, 3), dtype=np.uint8))
    got = read_upload(png_bytes(rgb), DemoLimits())
    assert got.mode == "RGB" and got.size == (30, 20)
    assert np.array_equal(np.asarray(got), np.asarray(rgb))
    # Transparent pixels composited over white, as the training data reader does.
    got = np.asarray(read_upload(png_bytes(rgba), DemoLimits())).astype(float)
    a = np.asarray(rgba)[..., 3:] / 255.0
    want = np.asarray(rgba)[..., :3] * a + 255 * (1 - a)
    assert np.abs(got - want).max() <= 1.0
    assert read_upload(png_bytes(rgb, "JPEG"), DemoLimits()).size == (30, 20)


def test_upload_refusals_name_the_reason():
    img = Image.new("RGB", (64, 64), (10, 200, 30))
    good = png_bytes(img)
    cases = {
        b"": (400, "empty"),
        b"name,caption\nx.png,a cat\n": (415, "not an image"),
        b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n": (415, "not an image"),  # EPS: not allowed
        good[: len(good) // 2]: (415, "damaged or truncated"),
    }
    for data, (status, words) in cases.items():
        with pytest.raises(RequestRefused, match=words) as info:
            read_upload(data, DemoLimits())
        assert info.value.status == status
    with pytest.raises(RequestRefused, match="over the upload limit") as info:
        read_upload(good, DemoLimits(max_upload_bytes=len(good) - 1))
    assert info.value.status == 413
    with pytest.raises(RequestRefused, match="64x64 pixels, over the limit") as info:
        read_upload(good, DemoLimits(max_pixels=64 * 64 - 1))
    assert info.value.status == 400


def test_decode_options_are_checked():
    limits = DemoLimits()
    assert DecodeOptions().checked(limits).generate_kwargs() == dict(num_beams=5, max_new_tokens=30, num_captions=1)
    sampling = DecodeOptions(method="sampling", top_p=0.5, temperature=0.7, num_captions=3).checked(limits)
    assert sampling.generate_kwargs() == dict(do_sample=True, top_p=0.5, temperature=0.7, max_new_tokens=30,
                                              num_captions=3)
    for bad, words in [(dict(method="greedy"), "method"), (dict(num_beams=11), "num_beams"),
                       (dict(max_new_tokens=0), "max_new_tokens"), (dict(top_p=1.5), "top_p"),
                       (dict(num_beams=2, num_captions=3), "at most num_beams=2")]:
        with pytest.raises(RequestRefused, match=words):
            DecodeOptions(**bad).checked(limits)


# ---------------------------------------------------------------------------- features
def test_caption_and_answer_are_the_models_own(demo, paths):
    image = scene_image(paths, "red_1.png")
    captioner = Blip2.from_pretrained(paths["stage2"]).eval()
    out = demo.caption(image, DecodeOptions(num_beams=3, num_captions=2, max_new_tokens=8))
    assert out["captions"] == captioner.caption([image], num_beams=3, num_captions=2, max_new_tokens=8)
    torch.manual_seed(5)
    sampled = demo.caption(image, DecodeOptions(method="sampling", top_p=0.8, num_captions=3, max_new_tokens=6))
    torch.manual_seed(5)
    assert sampled["captions"] == captioner.caption([image], do_sample=True, top_p=0.8, num_captions=3,
                                                    max_new_tokens=6)
    # The instruction-tuned model answers, with InstructBLIP's prompt, reading the question in its Q-Former.
    instructor = Blip2.from_pretrained(paths["instruct"]).eval()
    got = demo.answer(image, "what colour is the square?")
    assert got["model"] == str(paths["instruct"]) and got["instruction_aware"]
    assert got["prompt"] == INSTRUCT_VQA_TEMPLATE.format("what colour is the square?")
    assert got["answer"] == instructor.answer([image], ["what colour is the square?"], template=INSTRUCT_VQA_TEMPLATE)[0]
    other = instructor.answer([image], ["how many squares are there?"], template=INSTRUCT_VQA_TEMPLATE)[0]
    assert demo.answer(image, "how many squares are there?")["answer"] == other
    with pytest.raises(RequestRefused, match="type a question"):
        demo.answer(image, "  ")


def test_search_finds_the_colour_with_thumbnails_and_the_index_scores(demo, paths):
    out = demo.search("a blue square", k=4)
    keys = [h["key"] for h in out["hits"]]
    assert sorted(keys[:3]) == ["blue_0.png", "blue_1.png", "blue_2.png"] and out["indexed_images"] == 15
    direct = ImageIndex.load(demo.index.directory).search(Blip2.from_pretrained(paths["stage1"]).eval(),
                                                          ["a blue square"], k=4, rerank=16)[0]
    assert keys == [h.key for h in direct]
    assert [h["score"] for h in out["hits"]] == pytest.approx([h.score for h in direct], abs=1e-5)
    assert [h["rank"] for h in out["hits"]] == [1, 2, 3, 4]
    thumb = Image.open(io.BytesIO(from_data_url(out["hits"][0]["thumbnail"])))
    assert thumb.format == "JPEG" and thumb.size == (160, 160)
    want = scene_image(paths, keys[0]).resize((160, 160), Image.Resampling.NEAREST)  # 32 px, enlarged crisply
    assert np.abs(np.asarray(thumb.convert("RGB"), dtype=float) - np.asarray(want)).mean() < 4  # JPEG's error
    with pytest.raises(RequestRefused, match="k must be between 1 and 24"):
        demo.search("a blue square", k=25)


def test_explain_gives_the_matchers_itm_and_finds_the_object(demo, paths):
    image = scene_image(paths, "green_2.png")  # green is colour 1: its object on cell (2, 3)
    matcher = Blip2.from_pretrained(paths["stage1"]).eval()
    out = demo.explain(image, "a green square")
    cam = out["gradcam"]
    assert cam["itm_score"] == pytest.approx(float(matcher.itm([image], ["a green square"])[0]), abs=1e-5)
    assert cam["peak_cell"] == [2, 3] and cam["words"] == ["a", "green", "square"]
    assert max(range(3), key=lambda i: cam["word_scores"][i]) == 1  # the colour word carries the match
    assert out["attention"]["layer"] == out["attention"]["layers"][-1] and out["attention"]["queries"] == 4
    for key in ("attention", "gradcam"):
        png = Image.open(io.BytesIO(from_data_url(out[key]["png"])))
        assert png.format == "PNG" and png.width > 200
    # Without a text, the caption model's own caption is explained.
    own = demo.explain(image)
    assert own["generated"] and own["text"] == demo.caption(image)["captions"][0]


def test_missing_models_are_reported_not_crashed(tmp_path):
    lonely = Demo(captioner=stage2_model(tmp_path))
    status = lonely.status()["features"]
    assert status["caption"]["available"] and status["answer"]["available"]
    assert "--stage1" in status["search"]["why"] and "--stage1" in status["explain"]["why"]
    for call in (lambda: lonely.search("a red square"), lambda: lonely.explain(Image.new("RGB", (8, 8)), "x")):
        with pytest.raises(RequestRefused, match="--stage1") as info:
            call()
        assert info.value.status == 503
    # Zero-shot VQA with the plain caption model: BLIP-2's prompt.
    got = lonely.answer(Image.new("RGB", (8, 8)), "what is it?")
    assert got["prompt"] == "Question: what is it? Answer:" and not got["instruction_aware"]


# ---------------------------------------------------------------------------- the real server
def _request(url: str, *, data: bytes | None = None, headers: dict | None = None) -> tuple[int, dict | str]:
    req = urllib.request.Request(url, data=data, headers=headers or {}, method="POST" if data is not None else "GET")
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            body, status = r.read().decode(), r.status
    except urllib.error.HTTPError as e:
        body, status = e.read().decode(), e.code
    try:
        return status, json.loads(body)
    except json.JSONDecodeError:
        return status, body


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


@pytest.fixture
def chromium() -> str:
    """Debian's Chromium, or a skip that says why (before any server is started for nothing)."""
    if not Path(chromium_path()).is_file():
        pytest.skip(f"no Chromium at {chromium_path()} (apt-get install chromium; .ci/run installs it)")
    pytest.importorskip("playwright", reason="Playwright's Python package (the test extra) is not installed")
    return chromium_path()


@pytest.fixture(scope="module")
def server(paths, tmp_path_factory):
    """``python -m qformer.demo`` on a free port, its TMPDIR a fresh folder; stopped with Ctrl+C."""
    tmpdir = tmp_path_factory.mktemp("server-tmp")
    before = _snapshot(paths["stage2"].parent)
    env = dict(os.environ, TMPDIR=str(tmpdir), PYTHONPATH=str(REPO), QFORMER_DEBUG="1")
    cmd = [sys.executable, "-m", "qformer.demo", "--model", str(paths["stage2"]), "--stage1", str(paths["stage1"]),
           "--images", str(paths["images"]), "--port", "0", "--max-upload-mb", "0.05", "--device", "cpu"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url, seen, deadline = None, [], time.time() + 180
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        seen.append(line)
        if line.startswith("qformer demo: http://"):
            url = line.split()[2]
            break
    if url is None:
        proc.kill()
        pytest.fail("the demo did not start:\n" + "".join(seen))
    info = {"url": url, "tmpdir": tmpdir, "proc": proc, "before": before}
    yield info
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)


@pytest.mark.slow
def test_server_serves_the_page_and_the_api_on_localhost(server, paths):
    assert server["url"].startswith("http://127.0.0.1:")
    status, page = _request(server["url"])
    assert status == 200 and 'id="caption-run"' in page
    status, info = _request(server["url"] + "api/status")
    assert status == 200 and info["indexed_images"] == 15 and info["limits"]["max_upload_bytes"] == int(0.05 * 2**20)
    assert all(f["available"] for f in info["features"].values())
    image = scene_image(paths, "red_0.png")
    status, out = _request(server["url"] + "api/caption?num_beams=2&max_new_tokens=5", data=png_bytes(image))
    assert status == 200
    assert out["captions"] == Blip2.from_pretrained(paths["stage2"]).eval().caption([image], num_beams=2,
                                                                                   max_new_tokens=5)
    status, out = _request(server["url"] + "api/search?text=a+yellow+square&k=3")
    assert status == 200 and sorted(h["key"] for h in out["hits"]) == ["yellow_0.png", "yellow_1.png", "yellow_2.png"]
    # The search index lives in the demo's own temporary folder, inside TMPDIR.
    (work,) = server["tmpdir"].iterdir()
    assert work.name.startswith("qformer-demo-") and (work / "index" / "index.json").is_file()


@pytest.mark.slow
def test_server_refuses_with_a_sentence(server):
    url = server["url"]
    status, out = _request(url + "api/caption", data=b"just some text, not a picture")
    assert status == 415 and "not an image" in out["error"]
    status, out = _request(url + "api/caption", data=b"\0" * 60_000)  # over --max-upload-mb 0.05
    assert status == 413 and "58.6 KB, over the upload limit of 51.2 KB (--max-upload-mb)" in out["error"]
    status, out = _request(url + "api/caption?num_beams=many", data=png_bytes(Image.new("RGB", (8, 8))))
    assert status == 400 and "num_beams must be a whole number" in out["error"]
    status, out = _request(url + "api/search?text=")
    assert status == 400 and "type a search text" in out["error"]
    # Only requests addressed to this machine by a local name (no DNS rebinding).
    status, _ = _request(url + "api/status", headers={"Host": "attacker.example"})
    assert status == 400
    status, page = _request(url)
    assert status == 200


@pytest.mark.slow
@pytest.mark.browser
def test_browser_uploads_captions_searches_and_screenshots(chromium, server, paths, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("these are not pixels")
    start = time.time()
    seen = visit(server["url"], image=paths["images"] / "white_1.png", search="a white square", explain=True,
                 question="what is it?", not_an_image=notes, screenshots=tmp_path / "shots", executable=chromium,
                 timeout_s=60)
    assert time.time() - start < 60
    assert "not an image" in seen.refusal
    captioner = Blip2.from_pretrained(paths["stage2"]).eval()
    image = scene_image(paths, "white_1.png")
    assert seen.captions == captioner.caption([image]) and not seen.caption_error
    assert seen.answer == captioner.answer([image], ["what is it?"])[0]  # zero-shot VQA: no --instruct
    assert len(seen.hits) == 8 and all(h["thumbnail"] for h in seen.hits)
    assert sorted(h["key"] for h in seen.hits[:3]) == ["white_0.png", "white_1.png", "white_2.png"]
    assert seen.explain_images_loaded and "ITM match" in seen.explain_meta
    for name in ("refused", "caption", "answer", "search", "explain"):
        shot = Image.open(tmp_path / "shots" / f"{name}.png")
        assert shot.width == 1240 and shot.height >= 820


@pytest.mark.slow
def test_server_stops_and_leaves_nothing_behind(server, paths):
    proc = server["proc"]
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=30) == 0
    assert list(server["tmpdir"].iterdir()) == []  # its temporary folder is gone, nothing else was written
    assert _snapshot(paths["stage2"].parent) == server["before"]  # models and images untouched

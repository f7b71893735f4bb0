"""What the browser demo does, without the web: uploads checked, then the library's own calls.

Every feature is one call of the user API (:class:`~qformer.blip2.Blip2`) or of the search index
(:mod:`qformer.search`); the pictures are :mod:`qformer.figures`' overlays rendered in memory.
The results are plain dicts (what the page shows), so they can be tested without a browser.

Which model serves what:

* **caption** -- the caption model (``--model``, a stage-2 model with an LLM);
* **ask** -- the instruction-tuned model (``--instruct``) with InstructBLIP's prompt when one is
  given, else the caption model as BLIP-2's zero-shot VQA (an instruction-aware ``--model`` reads
  the question in its Q-Former too);
* **search, Grad-CAM** -- a model with the ITC / ITM heads: ``--stage1``, else the caption model
  when it kept them (``stage1_heads``);
* **attention maps** -- the caption model's Q-Former (the queries that become the soft prompts).

A feature without its model is reported unavailable, with the reason, never a crash. Uploads
are read in memory: a size limit, PIL's verification, an image-format allow-list and a pixel
limit; anything else is refused with one clear sentence (:class:`RequestRefused`).
"""

from __future__ import annotations

import base64
import io
import threading
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError

from ..blip2 import Blip2
from ..errors import ConfigError, DataError, ImageLoadError, QFormerError
from ..eval.instruct import INSTRUCT_VQA_TEMPLATE
from ..figures import display_images, figure_png, gradcam_figure, query_maps_figure
from ..generation import vqa_template
from ..images import decode_image_bytes, load_image, to_rgb
from ..search import ImageIndex, update_index

#: What PIL may decode: the common photo formats (not EPS, PDF, ...: no external decoders).
ALLOWED_FORMATS = ("JPEG", "PNG", "GIF", "BMP", "WEBP", "TIFF")
FEATURES = ("caption", "answer", "search", "explain")


class RequestRefused(QFormerError, ValueError):
    """A request the demo will not serve: ``status`` is the HTTP status, the message says why."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(kw_only=True)
class DemoLimits:
    """What one request may ask for (the server's command line sets the upload size)."""

    max_upload_bytes: int = 10 * 2**20
    max_pixels: int = 40_000_000  # decoded size: a small file can still be a huge image
    max_text_chars: int = 300
    max_results: int = 24
    max_beams: int = 10
    max_new_tokens: int = 60
    max_captions: int = 5


@dataclass(kw_only=True)
class DecodeOptions:
    """How the LLM writes: beam search (LAVIS's default, beam 5) or nucleus sampling."""

    method: str = "beam"  # "beam" or "sampling"
    num_beams: int = 5
    top_p: float = 0.9
    temperature: float = 1.0
    max_new_tokens: int = 30
    num_captions: int = 1

    def checked(self, limits: DemoLimits) -> "DecodeOptions":
        """Itself, or :class:`RequestRefused` naming the first option out of range."""
        bounds = {"num_beams": (1, limits.max_beams), "max_new_tokens": (1, limits.max_new_tokens),
                  "num_captions": (1, limits.max_captions), "top_p": (0.01, 1.0), "temperature": (0.05, 5.0)}
        if self.method not in ("beam", "sampling"):
            raise RequestRefused(400, f"method must be 'beam' or 'sampling', got {self.method!r}")
        for name, (low, high) in bounds.items():
            value = getattr(self, name)
            if not low <= value <= high:
                raise RequestRefused(400, f"{name} must be between {low} and {high}, got {value}")
        if self.method == "beam" and self.num_captions > self.num_beams:
            raise RequestRefused(400, f"beam search returns at most num_beams={self.num_beams} captions, "
                                      f"asked for {self.num_captions}")
        return self

    def generate_kwargs(self) -> dict[str, Any]:
        if self.method == "sampling":
            return dict(do_sample=True, top_p=self.top_p, temperature=self.temperature,
                        max_new_tokens=self.max_new_tokens, num_captions=self.num_captions)
        return dict(num_beams=self.num_beams, max_new_tokens=self.max_new_tokens, num_captions=self.num_captions)


def size_text(n: float) -> str:
    """Bytes for people: "51.2 KB", "10.0 MB"."""
    return f"{n / 2**10:.1f} KB" if n < 2**20 else f"{n / 2**20:.1f} MB"


def read_upload(data: bytes, limits: DemoLimits) -> Image.Image:
    """The uploaded bytes as an RGB image, or :class:`RequestRefused`: empty, too large (413),
    not an image of an allowed format, corrupt, or more than ``max_pixels`` (415 / 400)."""
    if not data:
        raise RequestRefused(400, "the upload is empty: choose an image file")
    if len(data) > limits.max_upload_bytes:
        raise RequestRefused(413, f"the file is {size_text(len(data))}, over the upload limit of "
                                  f"{size_text(limits.max_upload_bytes)} (--max-upload-mb)")
    names = ", ".join(f.replace("WEBP", "WebP") for f in ALLOWED_FORMATS)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS) as probe:
                width, height = probe.size
                if width * height > limits.max_pixels:
                    raise RequestRefused(400, f"the image is {width}x{height} pixels, over the limit of "
                                              f"{limits.max_pixels:,} pixels")
                probe.verify()  # structure and checksums, before any pixel is decoded
            image = decode_image_bytes(data, where="the upload")
    except UnidentifiedImageError as exc:
        raise RequestRefused(415, f"this file is not an image the demo reads ({names})") from exc
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise RequestRefused(400, f"the image is too large to decode safely: {exc}") from exc
    except (ImageLoadError, OSError, SyntaxError, ValueError, EOFError) as exc:
        if isinstance(exc, RequestRefused):
            raise
        raise RequestRefused(415, f"the image file is damaged or truncated ({exc})") from exc
    try:
        return to_rgb(image)
    except ImageLoadError as exc:
        raise RequestRefused(415, str(exc)) from exc


def check_text(text: str, limits: DemoLimits, *, what: str) -> str:
    text = (text or "").strip()
    if not text:
        raise RequestRefused(400, f"type a {what} first")
    if len(text) > limits.max_text_chars:
        raise RequestRefused(400, f"the {what} has {len(text)} characters; the limit is {limits.max_text_chars}")
    return text


def data_url(png: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(png).decode("ascii")


def thumbnail(image: Image.Image, size: int = 160) -> str:
    """A JPEG data URL of ``image`` fitted in ``size`` pixels (small images are enlarged, crisply)."""
    scale = size / max(image.size)
    resample = Image.Resampling.NEAREST if scale > 1 else Image.Resampling.BICUBIC
    small = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), resample)
    buffer = io.BytesIO()
    small.convert("RGB").save(buffer, format="JPEG", quality=85)
    return data_url(buffer.getvalue(), "image/jpeg")


def has_stage1_heads(model: Blip2 | None) -> bool:
    return model is not None and model.config.stage1_heads and model.tokenizer is not None


class Demo:
    """The models, the search index and the limits the page's requests are served with.

    Model calls hold one lock: the models are shared by the server's threads, and Grad-CAM
    switches hooks on the Q-Former while it runs."""

    def __init__(self, *, captioner: Blip2 | None, matcher: Blip2 | None = None, instructor: Blip2 | None = None,
                 index: ImageIndex | None = None, names: dict[str, str] | None = None,
                 limits: DemoLimits | None = None, images_given: bool = False) -> None:
        self.captioner, self.matcher, self.instructor, self.index = captioner, matcher, instructor, index
        self.names = names or {}
        self.limits = limits or DemoLimits()
        self.images_given = images_given
        self._lock = threading.Lock()
        self._items = {item.key: item for item in index.items} if index is not None else {}

    # ---------------------------------------------------------------- loading
    @classmethod
    def load(cls, *, model: Path, workdir: Path, stage1: Path | None = None, instruct: Path | None = None,
             images: Any = None, device: str = "cpu", limits: DemoLimits | None = None,
             batch_size: int = 64, progress: bool = True) -> "Demo":
        """Load the models and index ``images`` (a folder, or any collection :func:`~qformer.search.
        collect_images` reads) into ``workdir/index``: the one place the demo writes."""
        names = {"caption": str(model)}
        captioner = _load(model, "--model", device)
        matcher = _load(stage1, "--stage1", device) if stage1 is not None else None
        if matcher is None and has_stage1_heads(captioner):
            matcher, names["stage1"] = captioner, str(model)
        elif matcher is not None:
            names["stage1"] = str(stage1)
        instructor = _load(instruct, "--instruct", device) if instruct is not None else None
        if instructor is not None:
            if instructor.config.llm is None:
                raise ConfigError(f"--instruct {instruct}: a model without an LLM cannot answer questions")
            names["instruct"] = str(instruct)
        index = None
        if images is not None and has_stage1_heads(matcher):
            index, stats = update_index(matcher, images, Path(workdir) / "index", batch_size=batch_size,
                                        progress=progress)
            if len(index) == 0:
                raise DataError(f"--images {images}: no readable image there"
                                + (f" ({len(stats.skipped)} unreadable)" if stats.skipped else ""))
        return cls(captioner=captioner, matcher=matcher, instructor=instructor, index=index, names=names,
                   limits=limits, images_given=images is not None)

    # ---------------------------------------------------------------- what is on offer
    def unavailable(self, feature: str) -> str | None:
        """Why ``feature`` cannot be served (a sentence for the page), or None when it can."""
        llm = self.captioner is not None and self.captioner.config.llm is not None
        if feature == "caption" and not llm:
            return "captions need a model with an LLM (a stage-2 model as --model)"
        if feature == "answer" and not llm and self.instructor is None:
            return "questions need a model with an LLM (a stage-2 --model or an --instruct model)"
        if feature == "search":
            if not has_stage1_heads(self.matcher):
                return "search needs the ITC / ITM heads: start the demo with --stage1 STAGE1_MODEL"
            if self.index is None:
                return "search needs a folder of images: start the demo with --images FOLDER"
        if feature == "explain" and not has_stage1_heads(self.matcher):
            return "Grad-CAM needs the ITM head: start the demo with --stage1 STAGE1_MODEL"
        return None

    def require(self, feature: str) -> None:
        why = self.unavailable(feature)
        if why is not None:
            raise RequestRefused(503, why)

    def status(self) -> dict[str, Any]:
        answerer = self._answerer()
        return {"features": {f: {"available": self.unavailable(f) is None, "why": self.unavailable(f)}
                             for f in FEATURES},
                "models": dict(self.names), "indexed_images": 0 if self.index is None else len(self.index),
                "instruction_aware": bool(answerer and answerer[0].config.instruction_aware),
                "limits": asdict(self.limits), "decode": asdict(DecodeOptions())}

    # ---------------------------------------------------------------- features
    def caption(self, image: Image.Image, options: DecodeOptions | None = None) -> dict[str, Any]:
        """The caption model's caption(s) of ``image`` with ``options``."""
        self.require("caption")
        options = (options or DecodeOptions()).checked(self.limits)
        start = time.perf_counter()
        with self._lock, torch.inference_mode():
            captions = self.captioner.caption([image], **options.generate_kwargs())
        return {"captions": captions, "model": self.names.get("caption", ""), "options": asdict(options),
                "seconds": time.perf_counter() - start}

    def _answerer(self) -> tuple[Blip2, str | None] | None:
        if self.instructor is not None:
            return self.instructor, INSTRUCT_VQA_TEMPLATE
        if self.captioner is not None and self.captioner.config.llm is not None:
            return self.captioner, INSTRUCT_VQA_TEMPLATE if self.captioner.config.instruction_aware else None
        return None

    def answer(self, image: Image.Image, question: str, options: DecodeOptions | None = None) -> dict[str, Any]:
        """The answer to ``question`` about ``image``: the instruction-tuned model with
        InstructBLIP's prompt when there is one, else BLIP-2's zero-shot VQA prompt."""
        self.require("answer")
        question = check_text(question, self.limits, what="question")
        model, template = self._answerer()
        options = options or DecodeOptions(max_new_tokens=10)
        kwargs = options.checked(self.limits).generate_kwargs()
        kwargs.pop("num_captions")
        start = time.perf_counter()
        with self._lock, torch.inference_mode():
            text = model.answer([image], [question], template=template, **kwargs)[0]
        return {"answer": text, "model": self.names.get("instruct" if model is self.instructor else "caption", ""),
                "instruction_aware": model.config.instruction_aware,
                "prompt": (template or vqa_template(model)).format(question),
                "seconds": time.perf_counter() - start}

    def search(self, text: str, *, k: int = 8, rerank: int = 16) -> dict[str, Any]:
        """The ``k`` images of the folder that best match ``text`` (ITC top ``rerank``, re-ranked
        by ITM + ITC), each with a thumbnail and its scores."""
        self.require("search")
        text = check_text(text, self.limits, what="search text")
        if not 1 <= k <= self.limits.max_results:
            raise RequestRefused(400, f"k must be between 1 and {self.limits.max_results}, got {k}")
        start = time.perf_counter()
        with self._lock:
            hits = self.index.search(self.matcher, [text], k=k, rerank=rerank)[0]
        out = []
        for rank, hit in enumerate(hits, 1):
            try:
                thumb = thumbnail(to_rgb(load_image(self._items[hit.key].ref)))
            except (OSError, ImageLoadError):  # removed since it was indexed: listed without a picture
                thumb = None
            out.append({"rank": rank, "key": hit.key, "score": hit.score, "itc": hit.itc, "itm": hit.itm,
                        "thumbnail": thumb})
        return {"text": text, "hits": out, "indexed_images": len(self.index), "seconds": time.perf_counter() - start}

    def explain(self, image: Image.Image, text: str = "", *, layer: int | None = None,
                words: bool = True) -> dict[str, Any]:
        """Where the queries look (the caption model's cross-attention at ``layer``, default the
        last) and the Grad-CAM of the ITM match of ``text`` (default: the model's own caption),
        with a map per word; both as PNG data URLs, with the numbers they show."""
        self.require("explain")
        generated = not (text or "").strip()
        if generated:
            self.require("caption")
            with self._lock, torch.inference_mode():
                text = self.captioner.caption([image])[0]
        text = check_text(text, self.limits, what="caption")
        start = time.perf_counter()
        looker = self.captioner or self.matcher
        with self._lock:
            pixels = looker.vision.preprocess([image])  # (1, 3, S, S)
            shown = display_images(pixels, looker.config.vision)[0]
            maps = looker.attention_maps(pixels)
            layer = maps.layers[-1] if layer is None else layer
            per_query = maps.layer(layer)[0]  # (Q, h, w)
            prefix = maps.prefix[0, maps.layers.index(layer)]  # (Q, P)
            m_pixels = self.matcher.vision.preprocess([image])
            cam = self.matcher.gradcam(m_pixels, [text], words=words)
            m_shown = display_images(m_pixels, self.matcher.config.vision)[0]
        attention_png = figure_png(query_maps_figure(shown, per_query, prefix=prefix,
                                                     title=f"each query's cross-attention, layer {layer}"))
        gradcam_png = figure_png(gradcam_figure(
            m_shown, cam.maps[0], text=text, score=float(cam.itm_score[0]), layer=cam.layer,
            words=cam.words[0] if words else None, word_maps=cam.word_maps[0] if words else None,
            word_scores=cam.word_scores[0] if words else None))
        peak = divmod(int(cam.maps[0].argmax()), cam.maps.shape[-1])
        return {"text": text, "generated": generated,
                "attention": {"png": data_url(attention_png), "layer": layer, "layers": maps.layers,
                              "grid": list(per_query.shape[-2:]), "queries": int(per_query.shape[0]),
                              "model": self.names.get("caption" if looker is self.captioner else "stage1")},
                "gradcam": {"png": data_url(gradcam_png), "layer": cam.layer, "itm_score": float(cam.itm_score[0]),
                            "itm_logit": float(cam.itm_logit[0]), "peak_cell": list(peak),
                            "words": cam.words[0] if words else [],
                            "word_scores": cam.word_scores[0].tolist() if words else [],
                            "model": self.names.get("stage1", "")},
                "seconds": time.perf_counter() - start}


def _load(path: Path, flag: str, device: str) -> Blip2:
    if not (Path(path) / "config.json").is_file():
        raise ConfigError(f"{flag} {path}: no model there (a directory with config.json)")
    return Blip2.from_pretrained(path).to(device).eval()


__all__ = ["ALLOWED_FORMATS", "DecodeOptions", "Demo", "DemoLimits", "RequestRefused", "check_text", "read_upload", "size_text",
           "thumbnail"]

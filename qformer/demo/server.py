"""The browser demo: a local web page over :class:`~qformer.demo.service.Demo`.

    python -m qformer.demo --model runs/toy/stage2/model --stage1 runs/toy/stage1/model --images FOLDER

FastAPI with one plain page (``page.html``: no framework, nothing loaded from elsewhere) and a
small JSON API the page calls:

    GET  /api/status                       what is available, the models, the limits
    POST /api/caption?method=beam&...      body: the image's bytes -> captions
    POST /api/answer?question=...          body: the image's bytes -> the answer
    GET  /api/search?text=...&k=8          -> ranked hits with thumbnails and scores
    POST /api/explain?text=...             body: the image's bytes -> attention maps, Grad-CAM

Safety defaults: it binds to 127.0.0.1 (``--host`` changes it, with a warning) and answers only
requests addressed to a local host name then; uploads are read in memory with a size limit
(``--max-upload-mb``, default 10) and checked by PIL; the page may load nothing from elsewhere
(Content-Security-Policy); the only files written are the search index, in the demo's own
``tempfile.mkdtemp`` folder, removed on exit.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import tempfile
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from ..adapters import resolve_value
from ..cli import run_main
from ..errors import ConfigError, QFormerError
from .service import DecodeOptions, Demo, DemoLimits, RequestRefused, read_upload, size_text

try:  # the optional extra: pip install 'qformer[demo]'
    import uvicorn
    from fastapi import FastAPI, Request
    from fastapi.responses import HTMLResponse, JSONResponse
    from starlette.concurrency import run_in_threadpool
    from starlette.middleware.trustedhost import TrustedHostMiddleware
except ImportError as _missing:  # pragma: no cover - depends on the environment
    FastAPI = None
    _MISSING = _missing
else:
    _MISSING = None

DESCRIPTION = """A local web page over a trained model: caption an uploaded image (beam search or sampling),
ask a question about it, search a folder of images by text, and see the Grad-CAM of a caption and
each query's cross-attention.

    python -m qformer.demo --model runs/toy/stage2/model --stage1 runs/toy/stage1/model \\
        --instruct runs/toy/instruct-s0/model --images toy

It listens on 127.0.0.1 only (--host changes that), takes uploads of at most --max-upload-mb that
PIL verifies as an image, and writes nothing but its search index, in a temporary folder removed
when it stops (Ctrl+C)."""
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
log = logging.getLogger("qformer.demo")
SECURITY_HEADERS = {
    # Everything the page shows comes from this server or is a data: URL made by it.
    "Content-Security-Policy": "default-src 'none'; script-src 'self' 'unsafe-inline'; "
                               "style-src 'self' 'unsafe-inline'; img-src 'self' data: blob:; connect-src 'self'; "
                               "base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


def require_web() -> None:
    if _MISSING is not None:
        raise ConfigError(f"the demo needs its web server: pip install 'qformer[demo]' ({_MISSING})")


def page_html() -> str:
    return resources.files("qformer.demo").joinpath("page.html").read_text(encoding="utf-8")


async def read_body(request: "Request", limit: int) -> bytes:
    """The request body, refused (413) as soon as it is known to pass ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestRefused(413, f"the file is {size_text(int(declared))}, over the upload limit of "
                                  f"{size_text(limit)} (--max-upload-mb)")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestRefused(413, f"the upload passes the upload limit of {size_text(limit)} (--max-upload-mb)")
        chunks.append(chunk)
    return b"".join(chunks)


def _int(request: "Request", name: str, default: int) -> int:
    raw = request.query_params.get(name)
    try:
        return default if raw in (None, "") else int(raw)
    except ValueError:
        raise RequestRefused(400, f"{name} must be a whole number, got {raw!r}") from None


def _float(request: "Request", name: str, default: float) -> float:
    raw = request.query_params.get(name)
    try:
        return default if raw in (None, "") else float(raw)
    except ValueError:
        raise RequestRefused(400, f"{name} must be a number, got {raw!r}") from None


def decode_options(request: "Request", *, max_new_tokens: int) -> DecodeOptions:
    d = DecodeOptions(max_new_tokens=max_new_tokens)
    return DecodeOptions(method=request.query_params.get("method") or d.method,
                         num_beams=_int(request, "num_beams", d.num_beams), top_p=_float(request, "top_p", d.top_p),
                         temperature=_float(request, "temperature", d.temperature),
                         max_new_tokens=_int(request, "max_new_tokens", d.max_new_tokens),
                         num_captions=_int(request, "num_captions", d.num_captions))


def create_app(demo: Demo, *, local_only: bool = True) -> "FastAPI":
    """The web app over ``demo``; ``local_only``: requests must name a local host (no DNS
    rebinding from a web page the browser has open elsewhere)."""
    require_web()
    app = FastAPI(title="qformer demo", docs_url=None, redoc_url=None, openapi_url=None)
    if local_only:
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=[*LOCAL_HOSTS, "[::1]"])
    page = page_html()

    @app.middleware("http")
    async def headers(request: Request, call_next):
        response = await call_next(request)
        response.headers.update(SECURITY_HEADERS)
        return response

    @app.exception_handler(RequestRefused)
    async def refused(request: Request, exc: RequestRefused):
        return JSONResponse({"error": str(exc)}, status_code=exc.status)

    @app.exception_handler(QFormerError)
    async def library_error(request: Request, exc: QFormerError):
        return JSONResponse({"error": str(exc)}, status_code=400)

    @app.exception_handler(Exception)
    async def crashed(request: Request, exc: Exception):  # the page gets a sentence, the terminal the traceback
        log.exception("request %s failed", request.url.path)
        return JSONResponse({"error": f"the demo failed on this request ({type(exc).__name__}); "
                                      "the terminal running it shows why"}, status_code=500)

    @app.get("/", response_class=HTMLResponse)
    async def index() -> str:
        return page

    @app.get("/api/status")
    async def status() -> dict[str, Any]:
        return demo.status()

    async def upload(request: Request):
        return read_upload(await read_body(request, demo.limits.max_upload_bytes), demo.limits)

    @app.post("/api/caption")
    async def caption(request: Request) -> dict[str, Any]:
        demo.require("caption")
        image = await upload(request)
        return await run_in_threadpool(demo.caption, image, decode_options(request, max_new_tokens=30))

    @app.post("/api/answer")
    async def answer(request: Request) -> dict[str, Any]:
        demo.require("answer")
        image = await upload(request)
        options = decode_options(request, max_new_tokens=10)
        return await run_in_threadpool(demo.answer, image, request.query_params.get("question", ""), options)

    @app.get("/api/search")
    async def search(request: Request) -> dict[str, Any]:
        return await run_in_threadpool(demo.search, request.query_params.get("text", ""), k=_int(request, "k", 8))

    @app.post("/api/explain")
    async def explain(request: Request) -> dict[str, Any]:
        demo.require("explain")
        image = await upload(request)
        return await run_in_threadpool(demo.explain, image, request.query_params.get("text", ""))

    return app


# ---------------------------------------------------------------------------- command line
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m qformer.demo", description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, required=True, help="the caption model (a stage-2 model directory)")
    p.add_argument("--stage1", type=Path, default=None,
                   help="a stage-1 model for search and Grad-CAM (default: --model, when it has the ITC / ITM heads)")
    p.add_argument("--instruct", type=Path, default=None,
                   help="an instruction-tuned model to answer questions (default: --model, BLIP-2's zero-shot VQA)")
    p.add_argument("--images", default=None,
                   help="a folder of images to search by text (indexed at start, in the demo's temporary folder); "
                        "'toy': the toy world's held-out images")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default: 127.0.0.1, this machine only; anything else exposes "
                        "the models to the network)")
    p.add_argument("--port", type=int, default=7860, help="port (default: 7860; 0: any free port)")
    p.add_argument("--max-upload-mb", type=float, default=10.0, help="largest image upload in MB (default: 10)")
    p.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda when available)")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass while indexing (default: 64)")
    p.add_argument("--debug", action="store_true", help="show the full traceback of an error (also QFORMER_DEBUG=1)")
    args = p.parse_args(argv)
    if args.max_upload_mb <= 0:
        p.error("--max-upload-mb must be positive")
    return args


def serve(args: argparse.Namespace) -> None:
    """Load, index, serve until interrupted; the temporary folder is removed however it ends."""
    require_web()
    local = args.host in LOCAL_HOSTS
    if not local:
        print(f"warning: --host {args.host} serves the demo to every machine that can reach this one; it has no "
              "login. Use the default 127.0.0.1 (with an SSH tunnel) unless that is what you want.", file=sys.stderr)
    workdir = Path(tempfile.mkdtemp(prefix="qformer-demo-"))
    try:
        images = None
        if args.images is not None:
            images = resolve_value("toy://data/val") if args.images == "toy" else Path(args.images).expanduser()
            if not Path(images).is_dir():
                raise FileNotFoundError(2, "--images: no such folder", str(images))
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        limits = DemoLimits(max_upload_bytes=int(args.max_upload_mb * 2**20))
        demo = Demo.load(model=args.model, stage1=args.stage1, instruct=args.instruct, images=images,
                         workdir=workdir, device=device, limits=limits, batch_size=args.batch_size)
        for feature, info in demo.status()["features"].items():
            if not info["available"]:
                print(f"note: {feature} is not available: {info['why']}", file=sys.stderr)
        app = create_app(demo, local_only=local)
        config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning", access_log=False)
        server = uvicorn.Server(config)
        _announce_when_up(server, args.host)
        try:
            server.run()
        except KeyboardInterrupt:  # uvicorn stops gracefully, then re-raises the Ctrl+C it caught
            pass
        print("qformer demo: stopped", flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _announce_when_up(server: "uvicorn.Server", host: str) -> None:
    """Print the page's address (with the real port when --port 0) once the socket listens."""
    startup = server.startup

    async def startup_then_print(sockets=None):
        await startup(sockets=sockets)
        for s in server.servers:
            for sock in s.sockets:
                port = sock.getsockname()[1]
                shown = f"[{host}]" if ":" in host else host
                print(f"qformer demo: http://{shown}:{port}/  (Ctrl+C stops it)", flush=True)
                return

    server.startup = startup_then_print


def main(argv: list[str] | None = None) -> None:
    serve(parse_args(argv))


if __name__ == "__main__":  # pragma: no cover
    run_main(main)


__all__ = ["create_app", "main", "parse_args", "read_body", "serve"]

"""Drive the demo's page in headless Chromium, as a person would: choose an image, caption it,
ask about it, search by text, explain a caption; screenshot each tab. The end-to-end test and
the README's screenshots both run this.

    python -m qformer.demo --model runs/toy/stage2/model --stage1 runs/toy/stage1/model --images toy &
    python -m qformer.demo.browser --url http://127.0.0.1:7860/ --image IMAGE --question "what colour is the square?" \\
        --search "a big red heart" --screenshots docs/images --prefix demo_

The browser is the system's Chromium (Debian: ``apt-get install chromium``), started by
Playwright's Python package (``pip install playwright``; its own browser download is never
used): ``--executable`` or ``QFORMER_CHROMIUM``, default ``/usr/bin/chromium``.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..cli import run_main
from ..errors import ConfigError

DEFAULT_CHROMIUM = "/usr/bin/chromium"
# A quiet browser: no sandbox (containers run as root), no GPU, nothing fetched in the background.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]


def chromium_path(executable: str | None = None) -> str:
    return executable or os.environ.get("QFORMER_CHROMIUM") or DEFAULT_CHROMIUM


@dataclass
class PageVisit:
    """What the page showed (read from the page itself, not from the API)."""

    captions: list[str] = field(default_factory=list)
    caption_error: str = ""
    answer: str = ""
    hits: list[dict[str, Any]] = field(default_factory=list)  # key, score text, whether the thumbnail loaded
    refusal: str = ""  # the page's message for a file that is not an image
    explain_meta: str = ""
    explain_images_loaded: bool = False
    unavailable: dict[str, str] = field(default_factory=dict)  # tab -> the page's reason
    screenshots: list[str] = field(default_factory=list)


def visit(url: str, *, image: Path, search: str | None = None, question: str | None = None, explain: bool = False,
          explain_text: str = "", not_an_image: Path | None = None, screenshots: Path | None = None,
          prefix: str = "", executable: str | None = None, timeout_s: float = 60.0, width: int = 1240,
          height: int = 820) -> PageVisit:
    """Open ``url`` and use every tab the arguments ask for (``explain_text``: the caption to
    explain, default the model's own); screenshots go to ``screenshots`` as ``PREFIXcaption.png``,
    ``PREFIXanswer.png``, ``PREFIXsearch.png``, ``PREFIXexplain.png`` (and ``PREFIXrefused.png``)."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as exc:
        raise ConfigError(f"driving the browser needs Playwright's Python package: pip install playwright ({exc})")
    exe = chromium_path(executable)
    if not Path(exe).is_file():
        raise FileNotFoundError(2, "no Chromium there (apt-get install chromium, or pass --executable)", exe)
    out = PageVisit()
    timeout = timeout_s * 1000
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            page.set_default_timeout(timeout)
            page.goto(url)
            page.wait_for_selector("body[data-ready='1']")
            for tab in ("caption", "answer", "search", "explain"):
                why = page.text_content(f"[data-why='{tab}']") or ""
                if why:
                    out.unavailable[tab] = why

            def shot(name: str) -> None:
                if screenshots is not None:
                    screenshots.mkdir(parents=True, exist_ok=True)
                    path = screenshots / f"{prefix}{name}.png"
                    page.screenshot(path=str(path), full_page=True)
                    out.screenshots.append(str(path))

            def tab(name: str) -> None:
                page.click(f"nav button[data-tab='{name}']")

            def run(button: str) -> None:  # click and wait until the request has come back
                page.click(f"#{button}")
                page.wait_for_selector(f"#{button}:enabled")

            if not_an_image is not None:
                page.set_input_files("#image", str(not_an_image))
                tab("caption")
                run("caption-run")
                out.refusal = page.text_content("#caption-error") or ""
                shot("refused")
            page.set_input_files("#image", str(image))
            page.wait_for_function("() => document.getElementById('preview').complete")
            if "caption" not in out.unavailable:
                tab("caption")
                run("caption-run")
                out.captions = page.locator("#captions li").all_text_contents()
                out.caption_error = page.text_content("#caption-error") or ""
                shot("caption")
            if question is not None and "answer" not in out.unavailable:
                tab("answer")
                page.fill("#question", question)
                run("answer-run")
                out.answer = page.text_content("#answer") or ""
                shot("answer")
            if search is not None and "search" not in out.unavailable:
                tab("search")
                page.fill("#search-text", search)
                run("search-run")
                page.wait_for_function("() => [...document.querySelectorAll('#hits img')].every(i => i.complete)")
                for card in page.locator("#hits .hit").all():
                    img = card.locator("img")
                    out.hits.append({"key": img.get_attribute("alt"), "score": card.locator(".score").text_content(),
                                     "thumbnail": img.evaluate("i => i.naturalWidth > 0")})
                shot("search")
            if explain and "explain" not in out.unavailable:
                tab("explain")
                page.fill("#explain-text", explain_text)
                run("explain-run")
                page.wait_for_function("() => ['gradcam', 'attention'].every(i => document.getElementById(i).complete)")
                out.explain_meta = page.text_content("#explain-meta") or page.text_content("#explain-error") or ""
                out.explain_images_loaded = all(page.eval_on_selector(f"#{i}", "i => i.naturalWidth > 0")
                                                 for i in ("gradcam", "attention"))
                shot("explain")
        finally:
            browser.close()
    return out


def main(argv: list[str] | None = None) -> PageVisit:
    p = argparse.ArgumentParser(prog="python -m qformer.demo.browser", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:7860/", help="the running demo (default: %(default)s)")
    p.add_argument("--image", type=Path, required=True, help="the image to upload")
    p.add_argument("--question", default=None, help="a question to ask in the Ask tab")
    p.add_argument("--search", default=None, help="a text to search for in the Search tab")
    p.add_argument("--explain-text", default="", help="the caption to explain (default: the model's own caption)")
    p.add_argument("--no-explain", action="store_true", help="skip the Explain tab")
    p.add_argument("--screenshots", type=Path, default=None, help="folder for one PNG per tab")
    p.add_argument("--prefix", default="", help="screenshot names: PREFIXcaption.png, PREFIXsearch.png, ...")
    p.add_argument("--executable", default=None, help=f"Chromium (default: $QFORMER_CHROMIUM or {DEFAULT_CHROMIUM})")
    p.add_argument("--debug", action="store_true", help="show the full traceback of an error (also QFORMER_DEBUG=1)")
    args = p.parse_args(argv)
    result = visit(args.url, image=args.image, search=args.search, question=args.question,
                   explain=not args.no_explain, explain_text=args.explain_text, screenshots=args.screenshots,
                   prefix=args.prefix, executable=args.executable)
    print(json.dumps(asdict(result), indent=1))
    return result


if __name__ == "__main__":  # pragma: no cover
    run_main(main)


__all__ = ["CHROMIUM_ARGS", "DEFAULT_CHROMIUM", "PageVisit", "chromium_path", "main", "visit"]

"""A browser demo of a trained model: caption an image, ask about it, search a folder by text, and
see where the queries look (attention maps, Grad-CAM).

    python -m qformer.demo --model runs/toy/stage2/model --stage1 runs/toy/stage1/model --images toy

* :mod:`qformer.demo.service` -- what each feature does, as plain calls (no web);
* :mod:`qformer.demo.server` -- the local FastAPI server, its page and its command line
  (``pip install 'qformer[demo]'``);
* :mod:`qformer.demo.browser` -- drives the page in headless Chromium (the end-to-end test and
  the README's screenshot).
"""

from .service import DecodeOptions, Demo, DemoLimits, RequestRefused, read_upload

__all__ = ["DecodeOptions", "Demo", "DemoLimits", "RequestRefused", "read_upload"]

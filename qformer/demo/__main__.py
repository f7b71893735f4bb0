"""``python -m qformer.demo``: serve the browser demo (see :mod:`qformer.demo.server`)."""

from ..cli import run_main
from .server import main

run_main(main)

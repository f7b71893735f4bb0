"""Packaging: a built wheel holds every module and the adapter cards, and a non-editable
install used from another directory imports qformer and resolves the cards."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_every_subpackage_is_listed_for_the_wheel():
    """pyproject lists the packages (the cards are mapped in from adapters/): a new subpackage
    must be added there, or a wheel would silently lack it."""
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "qformer").rglob("__init__.py")}
    assert found | {"qformer.cards"} == listed


@pytest.mark.slow
def test_wheel_ships_the_cards_and_works_from_elsewhere(tmp_path):
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(wheels),
                    str(REPO)], check=True, capture_output=True, timeout=300)
    (wheel,) = wheels.glob("qformer-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    cards = sorted(n for n in names if n.startswith("qformer/cards/") and n.endswith(".yaml"))
    assert cards == sorted(f"qformer/cards/{p.name}" for p in (REPO / "adapters").glob("*.yaml"))
    modules = {p.relative_to(REPO).as_posix() for p in (REPO / "qformer").rglob("*.py")}
    assert modules <= set(names)

    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    probe = ("import qformer, qformer.adapters as a; from qformer import Blip2; "
             "print(qformer.__file__); print(a.adapters_dir()); "
             "print(a.load_adapter('toy').name, a.load_adapter('eva-vit-g_opt-2.7b').model['llm']['path'])")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=elsewhere, timeout=300,
                         env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(target), "HOME": str(tmp_path)})
    assert out.returncode == 0, out.stderr[-2000:]
    module, cards_dir, loaded = out.stdout.splitlines()[-3:]
    assert module.startswith(str(target)) and cards_dir == str(target / "qformer" / "cards")
    assert re.fullmatch(r"toy facebook/opt-2\.7b", loaded)

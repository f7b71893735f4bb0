"""Stage-1 parity with the original LAVIS 1.0.2 code.

* always (when ../shared is present): against the committed oracle dump (seed 0,
  cross-attention every 2nd layer);
* opt-in (``-m oracle``, needs the oracle venv: ``QFORMER_LAVIS_PYTHON`` or ``.venv-lavis/``):
  a fresh oracle run with another seed and cross-attention every layer.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ORACLE_FIXTURE, REPO, SHARED, require_shared
from lavis_parity import stage1_parity

TOL = 2e-5


def _check(diffs: dict[str, float]) -> None:
    bad = {k: v for k, v in diffs.items() if not v <= TOL}
    assert not bad, f"parity with LAVIS broken: {bad}\nall: {diffs}"


@pytest.mark.parametrize("padding", ["max_length", "longest"])
def test_stage1_matches_lavis_fixture(padding):
    """Losses, features, similarities, ITM/LM logits and gradients on LAVIS's own weights,
    with LAVIS's max_length padding and with our default longest padding."""
    _check(stage1_parity(require_shared(ORACLE_FIXTURE), padding=padding))


def _oracle_python() -> Path | None:
    env = os.environ.get("QFORMER_LAVIS_PYTHON")
    for cand in ([Path(env)] if env else []) + [REPO / ".venv-lavis" / "bin" / "python"]:
        if cand.is_file():
            return cand
    return None


@pytest.mark.oracle
@pytest.mark.slow
@pytest.mark.parametrize("seed,freq", [(1, 1), (2, 2)])
def test_stage1_matches_fresh_lavis_oracle_run(tmp_path, seed, freq):
    python = _oracle_python()
    script = SHARED / "tools" / "lavis-oracle" / "lavis_oracle.py"
    if python is None or not script.is_file():
        pytest.skip("LAVIS oracle venv not found (bash ../shared/tools/lavis-oracle/install.sh .venv-lavis)")
    out = tmp_path / "oracle"
    subprocess.run(
        [str(python), str(script), "--out", str(out), "--seed", str(seed), "--cross-attention-freq", str(freq)],
        check=True, capture_output=True, cwd=tmp_path, timeout=600,
    )
    _check(stage1_parity(out))

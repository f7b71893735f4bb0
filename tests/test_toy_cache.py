"""Interrupted toy builds leave nothing behind (qformer.toy.cache, qformer.toy.backbones):
SIGTERM and Ctrl-C remove the temporary folder at once; after SIGKILL the next start does."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qformer.toy.cache import publish_dir, sigterm_exits

REPO = Path(__file__).resolve().parents[1]

# Pretraining that would run for hours: it is killed long before it ends.
ENDLESS_PRETRAINING = """
import dataclasses, sys
from qformer.toy.backbones import ToyPretrainBudget, ensure_toy_backbones
budget = dataclasses.replace(ToyPretrainBudget.tiny(), vision_steps=1_000_000)
ensure_toy_backbones(sys.argv[1], budget=budget, progress=False)
"""


def temps(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.name.startswith(".")]


def start_and_signal(root: Path, sig: int) -> tuple[subprocess.Popen, Path]:
    """Start pretraining into ``root`` in a child process, send ``sig`` once its temporary
    folder exists and training has begun; returns the finished child and that folder."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    child = subprocess.Popen([sys.executable, "-c", ENDLESS_PRETRAINING, str(root)], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while not temps(root.parent):
            assert child.poll() is None, child.communicate()[0].decode()[-2000:]
            assert time.monotonic() < deadline, "pretraining never created its temporary folder"
            time.sleep(0.05)
        tmp = temps(root.parent)[0]
        assert tmp.name.startswith(f".{root.name}.tmp-{child.pid}-")
        time.sleep(1.0)  # well into rendering its data or training (tiny data renders in moments)
        child.send_signal(sig)
        child.wait(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    return child, tmp


def test_sigterm_during_pretraining_removes_the_temporary_folder(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    child, _ = start_and_signal(root, signal.SIGTERM)
    assert child.returncode == 128 + signal.SIGTERM, child.stdout.read().decode()[-2000:]
    assert list(tmp_path.iterdir()) == []  # neither the cache nor its temporary folder


def test_after_sigkill_the_next_start_removes_the_stale_folder(tmp_path: Path) -> None:
    from qformer.toy.backbones import ToyPretrainBudget, ensure_toy_backbones

    root = tmp_path / "cache"
    child, tmp = start_and_signal(root, signal.SIGKILL)
    assert child.returncode == -signal.SIGKILL
    assert tmp.is_dir() and not root.exists()  # SIGKILL: nothing could clean up
    b = ensure_toy_backbones(root, budget=ToyPretrainBudget.tiny(), progress=False)
    assert b.root == root and (root / "manifest.json").is_file()
    assert temps(tmp_path) == []


def test_sigterm_exits_only_replaces_the_default_action() -> None:
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    with sigterm_exits():
        handler = signal.getsignal(signal.SIGTERM)
        assert callable(handler)
        with pytest.raises(SystemExit) as exit_info:
            handler(signal.SIGTERM, None)
        assert exit_info.value.code == 128 + signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # restored

    def own(signum, frame):  # a program's own handler is its business
        pass

    previous = signal.signal(signal.SIGTERM, own)
    try:
        with sigterm_exits():
            assert signal.getsignal(signal.SIGTERM) is own
        assert signal.getsignal(signal.SIGTERM) is own
    finally:
        signal.signal(signal.SIGTERM, previous)


def complete(folder: Path) -> bool:
    return (folder / "done").is_file()


def test_publish_dir_is_atomic_and_readable(tmp_path: Path) -> None:
    target = tmp_path / "thing"

    def build(tmp: Path) -> None:
        assert tmp.parent == tmp_path and not target.exists()
        (tmp / "sub").mkdir()
        (tmp / "sub" / "weights").write_bytes(b"w")
        os.chmod(tmp / "sub" / "weights", 0o600)  # as safetensors writes them
        (tmp / "done").write_text("yes")

    assert publish_dir(target, build, complete=complete)
    assert complete(target) and temps(tmp_path) == []
    umask = os.umask(0o022)
    os.umask(umask)
    assert (target / "sub" / "weights").stat().st_mode & 0o777 == 0o666 & ~umask
    assert target.stat().st_mode & 0o777 == 0o777 & ~umask

    def fail(tmp: Path) -> None:
        (tmp / "half").write_text("x")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        publish_dir(target, fail, complete=complete, replace=True)
    assert complete(target) and not (target / "half").exists() and temps(tmp_path) == []


def test_publish_dir_keeps_what_another_process_published_first(tmp_path: Path) -> None:
    target = tmp_path / "thing"

    def build(tmp: Path) -> None:
        (tmp / "done").write_text("ours")
        target.mkdir()  # meanwhile, another process publishes its own
        (target / "done").write_text("theirs")

    assert not publish_dir(target, build, complete=complete)
    assert (target / "done").read_text() == "theirs" and temps(tmp_path) == []

    def again(tmp: Path) -> None:
        (tmp / "done").write_text("forced")

    assert publish_dir(target, again, complete=complete, replace=True)  # replace: ours wins
    assert (target / "done").read_text() == "forced" and temps(tmp_path) == []

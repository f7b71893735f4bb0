"""Where the toy world keeps what it builds once (pretrained backbones, exported splits), and how a
folder is published there so that no reader, and no interrupted run, ever sees half of one.

A folder is built under a temporary name beside its final one and renamed into place when
complete (:func:`qformer.io.atomic_dir`). What can interrupt the build, and who cleans up:

* an exception, Ctrl-C (KeyboardInterrupt) or SIGTERM: the temporary folder is removed on the
  way out. SIGTERM would kill Python without unwinding, so while a folder is being built it
  is turned into ``SystemExit`` (only where SIGTERM still has its default action; see
  :func:`sigterm_exits`);
* SIGKILL, the OOM killer, a power cut: nothing runs, so the next build of the same folder
  first removes temporaries whose process is gone (:func:`qformer.io.remove_stale_temps`).
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType

from ..io import atomic_dir, cache_root, current_umask, remove_stale_temps

__all__ = ["default_cache_root", "publish_dir", "sigterm_exits"]


def default_cache_root() -> Path:
    """qformer's cache (:func:`qformer.io.cache_root`); toy backbones go in ``<root>/toy``."""
    return cache_root()


@contextlib.contextmanager
def sigterm_exits() -> Iterator[None]:
    """While active, SIGTERM raises ``SystemExit(128 + SIGTERM)`` (the exit status a shell
    reports for a SIGTERM death), so ``finally`` blocks and context managers run.

    Only in the main thread (Python delivers signals there) and only where SIGTERM still has
    its default action: a handler the program installed itself is left alone. The previous
    disposition is restored on exit.
    """
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        yield
        return

    def exit_on_sigterm(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, exit_on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _make_readable(folder: Path) -> None:
    """Give every file and folder under ``folder`` the permissions the umask gives new ones:
    some writers (safetensors) create private 0600 files, which would hide a shared cache's
    weights from its other users."""
    mask = current_umask()
    for parent, dirs, files in os.walk(folder):
        for d in dirs:
            os.chmod(os.path.join(parent, d), 0o777 & ~mask)
        for f in files:
            os.chmod(os.path.join(parent, f), 0o666 & ~mask)


class _Superseded(Exception):
    """Another process published the folder while we built ours."""


def publish_dir(
    target: str | os.PathLike, build: Callable[[Path], None], *, complete: Callable[[Path], bool],
    replace: bool = False,
) -> bool:
    """Build a folder with ``build(tmp)`` and publish it as ``target``, atomically.

    Leftovers of killed builds of ``target`` are removed first. If ``complete(target)`` holds
    once ours is built (another process published first) and ``replace`` is False, theirs is
    kept and ours discarded: readers already using it are not disturbed. Returns whether ours
    was published.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(target.parent, target.name)
    with sigterm_exits():
        try:
            with atomic_dir(target) as tmp:
                build(tmp)
                _make_readable(tmp)
                if not replace and complete(target):
                    raise _Superseded
        except _Superseded:
            return False
    return True

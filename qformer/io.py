"""Atomic writes: a reader, or a run killed half-way, never sees half a file or half a folder.

Every file and folder the library writes goes through here: written under a temporary name
beside the target, then renamed into place (``os.replace``, atomic on POSIX). The temporary
files ``tempfile`` creates are private (0600 / 0700); what is published gets the permissions
the user's umask gives any new file (usually 0644 / 0755), like a plain ``open(path, "w")``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import threading
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process umask (read by setting and restoring it, under a lock)."""
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def _publishable(path: str | os.PathLike, *, directory: bool) -> None:
    os.chmod(path, (0o777 if directory else 0o666) & ~current_umask())


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, fsync: bool = False) -> Path:
    """Write ``data`` to ``path`` atomically (temp file in the same folder, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=str(path.parent), prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        _publishable(tmp, directory=False)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str, *, fsync: bool = False) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"), fsync=fsync)


def atomic_write_json(path: str | os.PathLike, obj: Any, *, indent: int | None = 2, **dumps: Any) -> Path:
    """``json.dumps(obj)`` plus a newline, written atomically. NaN and infinities are refused
    (strict JSON has none): convert them first (see :func:`json_safe`)."""
    return atomic_write_text(path, json.dumps(obj, indent=indent, allow_nan=False, **dumps) + "\n")


def atomic_write_lines(path: str | os.PathLike, rows: Iterable[Mapping[str, Any]]) -> Path:
    """One JSON object per line (JSONL), written atomically."""
    return atomic_write_text(path, "".join(json.dumps(json_safe(r), default=str) + "\n" for r in rows))


def json_safe(value: Any) -> Any:
    """``value`` with every non-finite float replaced by None, recursively: strict JSON parsers
    reject the bare ``NaN`` / ``Infinity`` that Python's json module writes by default."""
    if isinstance(value, float):
        return value if value == value and value not in (float("inf"), float("-inf")) else None
    if isinstance(value, Mapping):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike) -> Iterator[Path]:
    """Build a folder under a temporary name beside ``target`` and swap it in on success.

    Yields the temporary folder to write into. On an exception it is removed and ``target``
    is left as it was; on success an existing ``target`` is replaced (moved aside, then
    deleted), so an interrupted save never leaves a half-written folder under the final name.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{os.getpid()}-", dir=target.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _publishable(tmp, directory=True)
    old = None
    if target.exists():
        old = target.parent / f".{target.name}.old-{os.getpid()}"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
    os.replace(tmp, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def remove_stale_temps(folder: str | os.PathLike, name: str) -> list[Path]:
    """Delete ``.NAME.tmp-PID-*`` / ``.NAME.old-PID*`` leftovers of :func:`atomic_dir` in
    ``folder`` whose process is gone (a run killed by SIGKILL cannot clean up after itself).
    Returns what was removed."""
    removed = []
    for kind in ("tmp", "old"):
        for path in Path(folder).glob(f".{name}.{kind}-*"):
            pid = path.name.rsplit(f".{kind}-", 1)[1].split("-", 1)[0]
            if pid.isdigit() and not pid_alive(int(pid)):
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
    return removed


def cache_root() -> Path:
    """Where qformer caches what it builds once (toy backbones, extracted LLMs):
    ``$QFORMER_CACHE`` if set, else ``~/.cache/qformer``."""
    env = os.environ.get("QFORMER_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "qformer"


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists (on this machine)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


__all__ = [
    "atomic_dir",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_lines",
    "atomic_write_text",
    "cache_root",
    "current_umask",
    "json_safe",
    "pid_alive",
    "remove_stale_temps",
]

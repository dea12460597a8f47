"""Files written so that nothing is lost: a temporary name beside the target, then a rename.

A reader sees the old file or the new one, never a partial one; a failed write raises a
:class:`~lightning_prune.core.errors.CheckpointError` and leaves the previous file. The temporary
name says who writes it (host and pid), so the next write to a directory removes what a killed
writer left there, and never a live writer's file.

>>> import os, tempfile, torch
>>> directory = tempfile.mkdtemp()
>>> atomic_save({"weights": torch.zeros(2)}, os.path.join(directory, "model.ckpt"))
>>> os.listdir(directory)
['model.ckpt']
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import socket
import time
from collections.abc import Callable
from typing import IO, Any

import torch

from lightning_prune.core.errors import CheckpointError

STALE_AFTER_S = 24 * 3600  # a temporary file of an unknown or remote writer is left alone this long

# .tmp-<host>-<pid>-<random>.part (this module's), .tmp-XXXXXXXX.part (tempfile.mkstemp's, before
# temporary_path existed) and .masked-<pid>.ckpt.part (the callback's masked checkpoint, before it)
_TEMPORARY = re.compile(r"\.tmp-(?P<host>.+)-(?P<pid>\d+)-(?P<token>[0-9a-f]{8,})\.part")
_OLD_TEMPORARY = re.compile(r"\.tmp-[a-z0-9_]{8}\.part|\.masked-\d+\.ckpt\.part")


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", socket.gethostname()) or "localhost"


def temporary_path(target: str | os.PathLike) -> str:
    """A fresh temporary file name beside ``target`` that names its writer: ``.tmp-<host>-<pid>-<random>.part``.

    Write there, then ``os.replace`` it onto ``target``. :func:`remove_stale_temporaries` reads the
    writer back to tell a killed writer's leftovers from a live writer's file.

    >>> name = os.path.basename(temporary_path("/checkpoints/pruned.ckpt"))
    >>> name.startswith(".tmp-") and name.endswith(".part") and f"-{os.getpid()}-" in name
    True
    """
    directory = os.path.dirname(os.path.abspath(os.fspath(target)))
    return os.path.join(directory, f".tmp-{_host()}-{os.getpid()}-{secrets.token_hex(8)}.part")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):  # another user's process (or an absurd number): keep
        return True
    return True


def remove_stale_temporaries(directory: str | os.PathLike) -> list[str]:
    """Remove the temporary files that killed writers left in ``directory``; return their paths.

    A ``.tmp-<host>-<pid>-<random>.part`` file (see :func:`temporary_path`) is removed when its
    writer ran on this host and is no longer alive. Files from other hosts, and files in the older
    name formats (``.tmp-XXXXXXXX.part`` from ``tempfile.mkstemp``, ``.masked-<pid>.ckpt.part``),
    whose writer cannot be checked, are removed once they are older than 24 hours (a temporary
    directory, a distributed checkpoint being written, the same way). A file whose
    writer is alive is never removed; nothing else in the directory is touched. Errors (a missing
    directory, a file another process removed first, no permission) are ignored: cleaning up
    never stops a write.
    """
    directory = os.fspath(directory)
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    host, now, removed = _host(), time.time(), []
    for name in names:
        match = _TEMPORARY.fullmatch(name)
        path = os.path.join(directory, name)
        try:
            if match is not None and match["host"] == host:
                stale = not _alive(int(match["pid"]))
            elif match is not None or _OLD_TEMPORARY.fullmatch(name):
                stale = now - os.stat(path).st_mtime > STALE_AFTER_S
            else:
                continue
            if stale:  # a file, or a directory (a distributed checkpoint's)
                remove_path(path)
                removed.append(path)
        except OSError:
            continue
    return removed


def remove_path(path: str | os.PathLike) -> None:
    """Remove a file, or a directory and everything in it (a distributed checkpoint); nothing if absent."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.remove(path)


def replace_path(temporary: str | os.PathLike, path: str | os.PathLike) -> None:
    """Rename ``temporary`` onto ``path``, each a file or a directory (a distributed checkpoint).

    ``os.replace`` alone for files; a directory in the way is first renamed aside (a temporary name,
    so a killed process leaves nothing that looks finished) and removed once the new one is in place.

    >>> import tempfile
    >>> directory = tempfile.mkdtemp()
    >>> target, new = os.path.join(directory, "masked.ckpt"), os.path.join(directory, "new")
    >>> os.makedirs(os.path.join(target, "old")); os.makedirs(os.path.join(new, "shards"))
    >>> replace_path(new, target); os.listdir(target), sorted(os.listdir(directory))
    (['shards'], ['masked.ckpt'])
    """
    if not (os.path.isdir(path) or (os.path.isdir(temporary) and os.path.lexists(path))):
        os.replace(temporary, path)
        return
    aside = temporary_path(path)
    os.replace(path, aside)
    os.replace(temporary, path)
    remove_path(aside)


def atomic_write(
    path: str | os.PathLike, write: Callable[[IO[bytes]], None], check: Callable[[str], Any] | None = None
) -> Any:
    """Write with ``write`` to a temporary file beside ``path``, run ``check`` on it, then rename it onto ``path``.

    Readers see the old file or the new one; a failed write or check removes the temporary file and
    leaves ``path`` as it was. Stale temporary files of killed writers in that directory are removed
    first (:func:`remove_stale_temporaries`). Returns what ``check`` returned."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as err:
        raise CheckpointError(f"Could not write '{path}': {err}. Pass a directory that can be created.") from err
    remove_stale_temporaries(directory)
    temporary = temporary_path(path)
    try:
        try:
            with open(temporary, "xb") as stream:
                write(stream)
                stream.flush()
                os.fsync(stream.fileno())
        except Exception as err:  # a full disk, a protobuf over 2 GB
            raise CheckpointError(f"Could not write '{path}': {err}. The previous file, if any, is unchanged.") from err
        result = check(temporary) if check is not None else None
        os.replace(temporary, path)
        return result
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` through :func:`atomic_write`: readers see the old file or the new one."""
    atomic_write(path, lambda stream: torch.save(obj, stream))

"""Atomic file replacement: readers see the old file or the complete new one, never a mixture.

:func:`atomic_write` hands its caller a temporary file beside the destination; once the caller is
done it is fsynced, renamed over the destination with ``os.replace`` (atomic within one file
system, hence the same folder) and the folder is fsynced so the rename itself survives a power
cut. Any failure — an exception, Ctrl-C — removes the temporary file and leaves the old
destination untouched. A process killed outright (SIGKILL, power loss) can leave its temporary
file behind; every one is named ``.<destination name>.<random>.tmp`` (:func:`temp_prefix` +
random + :data:`TEMP_SUFFIX`), so a later writer can find the leftovers of its own destination,
and the next :func:`atomic_write` to that destination removes them (:func:`remove_stale_temps`).
A writer holds an exclusive ``flock`` on its temporary file while it works, which the kernel
drops when the process dies however it dies: a temporary file nobody holds is a dead writer's,
and one that is held belongs to a live writer and is left alone.

Used by the GGUF converter (``mqa_gen.convert``), the chunked-model assembly
(``mqa_gen.registry``) and prompt-cache files (``mqa_gen.prompt_cache``).
"""

from __future__ import annotations

import os
import re
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

try:
    import fcntl
except ImportError:  # not POSIX: no locks, so leftovers are never removed (a live writer's could be)
    fcntl = None

#: The ending of every temporary file :func:`atomic_write` creates.
TEMP_SUFFIX = ".tmp"
#: What ``tempfile.mkstemp`` puts between the prefix and the suffix.
_RANDOM_PART = re.compile(r"[a-z0-9_]{8}")


def temp_prefix(path: str | os.PathLike[str]) -> str:
    """The name prefix of ``path``'s temporary files: ``"." + basename + "."`` (hidden on POSIX)."""
    return f".{os.path.basename(os.fspath(path))}."


@contextmanager
def atomic_write(path: str | os.PathLike[str], *, mode: int | None = None) -> Iterator[str]:
    """Yield the path of an empty temporary file that replaces ``path`` when the block succeeds.

    The caller writes the temporary file by name (opening and closing it itself; some writers,
    such as ``gguf.GGUFWriter``, take only a path). When the ``with`` block ends without an
    exception the file is fsynced, given permission bits ``mode`` (None keeps ``tempfile``'s
    owner-only 0o600), renamed over ``path`` and the folder fsynced (best effort: some file
    systems cannot fsync a folder).

    Args:
        path: the destination; its folder must exist.
        mode: permission bits for the finished file, e.g. ``0o644``; None leaves 0o600.

    Yields:
        The temporary file's path (a str), in ``path``'s folder.

    Raises:
        OSError: the temporary file cannot be created, synced or renamed; callers turn it into
            their own error. On this or any exception raised inside the block (re-raised as is),
            the temporary file is removed and ``path`` keeps its old content.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    remove_stale_temps(path)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=temp_prefix(path), suffix=TEMP_SUFFIX)
    try:
        if fcntl is not None:  # held until this block ends or the process dies: "in use"
            fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            yield tmp
            _fsync_file(tmp)
            if mode is not None:
                os.chmod(tmp, mode)
            os.replace(tmp, path)
        except BaseException:  # Ctrl-C too: never leave a half-written temporary behind
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
    finally:
        os.close(fd)
    _fsync_dir(folder)


def remove_stale_temps(path: str | os.PathLike[str]) -> list[str]:
    """Delete the temporary files that killed writers of ``path`` left behind (see the module
    docstring): each regular file in ``path``'s folder named :func:`temp_prefix` + 8 random
    characters + :data:`TEMP_SUFFIX` whose ``flock`` nobody holds. Files a live writer holds, and
    anything that cannot be opened or locked, are left alone. Does nothing without ``fcntl``.

    Returns:
        The paths removed.
    """
    if fcntl is None:
        return []
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    prefix = temp_prefix(path)
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    for name in names:
        if not (name.startswith(prefix) and name.endswith(TEMP_SUFFIX)
                and _RANDOM_PART.fullmatch(name[len(prefix):-len(TEMP_SUFFIX)])):
            continue
        full = os.path.join(folder, name)
        try:
            fd = os.open(full, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))
        except OSError:
            continue
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                continue
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # OSError: a live writer holds it
            os.unlink(full)
            removed.append(full)
        except OSError:
            continue
        finally:
            os.close(fd)
    return removed


def _fsync_file(path: str) -> None:
    """Flush a closed file's data to disk before it is renamed into place."""
    fd = os.open(path, os.O_RDWR)  # writable: fsync of a read-only descriptor fails on some systems
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(folder: str) -> None:
    """Make a rename in ``folder`` durable (best effort: some file systems cannot fsync a folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)

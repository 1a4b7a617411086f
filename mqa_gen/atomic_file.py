"""Atomic file replacement: readers see the old file or the complete new one, never a mixture.

:func:`atomic_write` hands its caller a temporary file beside the destination; once the caller is
done it is fsynced, renamed over the destination with ``os.replace`` (atomic within one file
system, hence the same folder) and the folder is fsynced so the rename itself survives a power
cut. Any failure — an exception, Ctrl-C — removes the temporary file and leaves the old
destination untouched. A process killed outright (SIGKILL, power loss) can leave its temporary
file behind; every one is named ``.<destination name>.<random>.tmp`` (:func:`temp_prefix` +
random + :data:`TEMP_SUFFIX`), so a later writer can find the leftovers of its own destination.

Used by the GGUF converter (``mqa_gen.convert``), the chunked-model assembly
(``mqa_gen.registry``) and prompt-cache files (``mqa_gen.prompt_cache``).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

#: The ending of every temporary file :func:`atomic_write` creates.
TEMP_SUFFIX = ".tmp"


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
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=temp_prefix(path), suffix=TEMP_SUFFIX)
    os.close(fd)
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
    _fsync_dir(folder)


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

"""Atomic file writes: a file appears whole under its final name, or not at all.

Everything vggfeat writes in one go (weights, checkpoints, caches, reports, plots) goes through
:func:`atomic_path`: the data is written to a hidden temporary file in the same folder, flushed to
disk, renamed over the final name, and the folder entry is flushed too, so a crash or a kill at any
moment leaves either the old file or the new one, never a truncated one.
"""

from __future__ import annotations

import errno
import glob
import hashlib
import json
import os
import stat
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Iterator

__all__ = ["atomic_path", "atomic_write", "write_bytes_atomic", "write_text_atomic",
           "write_json_atomic", "fsync_path", "leftovers", "sha256_file", "create_new"]


TEMP_SUFFIX = ".tmp"


def leftovers(folder: str | os.PathLike, name: str | None = None) -> list[Path]:
    """Temporary files that killed atomic writes left in ``folder``: those of the file ``name``,
    or of any file.  Only safe to delete while no other process is writing there."""
    pattern = "*" if name is None else glob.escape(name)
    return sorted(Path(folder).glob(f".{pattern}.*{TEMP_SUFFIX}"))


def sha256_file(path: str | os.PathLike) -> bytes:
    """SHA-256 of a regular file's content, read in 1 MiB blocks.

    Anything else (a FIFO, a device, a socket) raises ``OSError``: reading it could block
    forever or never end.  The file is opened without blocking and checked before any read.
    """
    digest = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    with open(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.digest()


def create_new(path: str | os.PathLike, mode: int = 0o644) -> int:
    """A file descriptor of a file created by this call: never an existing file, never through
    a symbolic link planted at ``path`` (``O_EXCL | O_NOFOLLOW``)."""
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0),
                   mode)


def new_file_mode() -> int:
    """The mode a file the user creates gets: 0666 less the process's umask.

    Read from /proc on Linux; elsewhere by setting the umask and restoring it at once.
    """
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def _publishable(tmp: Path) -> None:
    """Give the finished temporary the user's usual file mode (writers such as safetensors
    leave it 0600) and flush it, through a descriptor of the plain file itself (never a
    link)."""
    if not stat.S_ISREG(os.lstat(tmp).st_mode):
        raise OSError(errno.ELOOP, "the temporary file was replaced by a link or a folder "
                      "while being written; nothing was published", str(tmp))
    fd = os.open(tmp, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.ELOOP, "the temporary file was replaced while being written; "
                          "nothing was published", str(tmp))
        if hasattr(os, "fchmod"):
            os.fchmod(fd, new_file_mode())
        else:
            os.chmod(tmp, new_file_mode())
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a file's (or a folder's) data and metadata to disk.

    A file's failure (EIO, ENOSPC: the data may never reach the disk) is raised; a folder's is
    ignored, as some platforms and file systems cannot open or flush folders.
    """
    folder = os.path.isdir(path)
    try:
        fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if folder else 0))
    except OSError:
        if folder:
            return
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not folder:
            raise
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block succeeds, publish it as ``path``.

    For writers that take a file name (``h5py.File``, ``torch.save``, ``safetensors``,
    ``savefig``).  If the block raises, the temporary file is removed and ``path`` is untouched.
    The temporary name is hidden (``.name.<random>.tmp``) so folder globs never see it.  It is
    created here, new (``O_EXCL``, not through a link), before the writer opens it: a file or a
    symbolic link planted under that name makes the write fail rather than write elsewhere, and
    a temporary that is no longer a plain file when the block ends is not published.  The
    published file has the user's usual mode (0666 less the umask), whatever the writer gave it.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}{TEMP_SUFFIX}")
    os.close(create_new(tmp))
    try:
        yield tmp
        _publishable(tmp)
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink(missing_ok=True)
        except IsADirectoryError:
            pass
        raise
    fsync_path(path.parent)


@contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", *,
                 encoding: str | None = None, newline: str | None = None) -> Iterator[IO]:
    """Open a temporary file beside ``path`` for writing; publish it when the block succeeds.

    ``mode`` is ``"wb"`` or ``"w"``; text mode defaults to UTF-8.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write writes whole files: mode must be 'w' or 'wb', not {mode!r}")
    if mode == "w" and encoding is None:
        encoding = "utf-8"
    with atomic_path(path) as tmp:
        fd = os.open(tmp, os.O_WRONLY | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0))
        with open(fd, mode, encoding=encoding, newline=newline) as f:
            yield f


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_write(path, "wb") as f:
        f.write(data)
    return Path(path)


def write_text_atomic(path: str | os.PathLike, text: str, *, encoding: str = "utf-8") -> Path:
    with atomic_write(path, "w", encoding=encoding) as f:
        f.write(text)
    return Path(path)


def write_json_atomic(path: str | os.PathLike, data: Any, *, indent: int | None = 1,
                      sort_keys: bool = True) -> Path:
    return write_text_atomic(path, json.dumps(data, indent=indent, sort_keys=sort_keys) + "\n")

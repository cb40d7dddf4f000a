"""One writer per output: a lock file beside it that names its holder (PID and host).

The lock is an ``flock`` on ``OUT.lock``, so the kernel releases it when the holder dies, however
it dies: a lock file left behind by a dead process is simply taken over.  The file's content (PID,
host, start time) is only there to name the holder in the error a second writer gets.  Where the
file system has no ``flock`` (some network mounts), the PID is checked instead when the holder ran
on this host.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import stat
import time
from pathlib import Path

from ..errors import CacheError
from .store import io_error


def lock_path(target: Path) -> Path:
    """``TARGET.lock`` beside the real target: an output reached through a link to it (or to a
    folder above it) takes the same lock as by its own name."""
    real = Path(os.path.realpath(target))
    return real.with_name(real.name + ".lock")


class OutputLock:
    """Exclusive right to write ``target`` (and its ``.parts`` folder and temporary files).

    ``wait=False`` raises :class:`CacheError` at once when another process holds the lock;
    ``wait=True`` blocks until it is released (for caches shared by concurrent workers).
    Use as a context manager.
    """

    def __init__(self, target: str | os.PathLike, *, wait: bool = False) -> None:
        self.target = Path(target)
        self.path = lock_path(self.target)
        self.wait = wait
        self._fd: int | None = None

    def __enter__(self) -> OutputLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        while True:
            fd = self._open()
            try:
                holder = self._read(fd)
                if not self._flock(fd, holder):
                    ended = "has ended" in describe(holder)
                    raise CacheError(
                        f"{self.target} is being written by {describe(holder)} (lock file "
                        f"{self.path})" + ("" if ended else "; wait for it to finish, or stop "
                                           "it and run again"))
                # The holder may have unlinked the file between our open and our flock: then we
                # locked an orphan and must start over on the new file.
                if os.fstat(fd).st_ino != _inode(self.path):
                    os.close(fd)
                    continue
            except BaseException:
                os.close(fd)
                raise
            break
        self._fd = fd
        record = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(record).encode(), 0)
        except OSError as err:
            self.release()
            raise io_error(err, "write the lock file", self.path) from err

    def _open(self) -> int:
        """The lock file, created if need be; never opened through a symbolic link (anyone who
        can write in the folder could otherwise make this run overwrite the link's target)."""
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0)
                         | getattr(os, "O_NONBLOCK", 0), 0o644)
        except OSError as err:
            if err.errno == errno.ELOOP or self.path.is_symlink():
                raise CacheError(f"lock file {self.path} is a symbolic link (to "
                                 f"{os.readlink(self.path)}), which vggfeat never follows: "
                                 "remove it and run again") from err
            raise io_error(err, "create the lock file", self.path) from err
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise CacheError(f"lock file {self.path} is not a regular file: remove it and run "
                             "again")
        return fd

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)  # while still locked, so no one locks an orphan
        finally:
            os.close(self._fd)  # releases the flock
            self._fd = None

    def _flock(self, fd: int, holder: dict) -> bool:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if self.wait else fcntl.LOCK_NB))
            return True
        except BlockingIOError:
            return False
        except OSError as err:
            if err.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
        # No flock here: trust the recorded PID when it ran on this host.
        while holder and holder.get("host") == socket.gethostname() and _alive(holder.get("pid")):
            if not self.wait:
                return False
            time.sleep(1.0)
            holder = self._read(fd)
        return True

    @staticmethod
    def _read(fd: int) -> dict:
        try:
            return json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        except ValueError:
            return {}


def describe(holder: dict) -> str:
    if not holder:
        return "another process"
    said = (f"process {holder.get('pid')} on {holder.get('host')} (started "
            f"{holder.get('started', '?')})")
    if holder.get("host") == socket.gethostname() and not _alive(holder.get("pid")):
        # The lock is held by a file description its decoding workers share: after a kill,
        # they hold it until they notice, a few seconds.
        said += (", which has ended: a decoding worker it started still holds the lock for a "
                 "few seconds; run again shortly")
    return said


def _inode(path: Path) -> int | None:
    try:
        return path.stat().st_ino
    except FileNotFoundError:
        return None


def _alive(pid) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True

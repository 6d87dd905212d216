"""The store's pool of empty files, made ahead so that a start creates none.

A start takes its four files (the logs, the index, the record) from ``STATE/pool`` and links
them into ``jobs/`` under the job's names: a link and an unlink, a few microseconds, where
creating a file on ext4 can cost a quarter of a millisecond of CPU when many inodes were freed
recently (its allocator skips those). A record's replacement is written into a pool file and
exchanged with the record (:meth:`FilePool.swap_in`): the old record's inode, emptied, joins
the pool, so a churned job frees no inode. The store's writer thread refills the pool. It holds
no job's data and recovery does not read it; when it is empty a start creates its files itself.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import errno
import logging
import os
import stat
import threading
import uuid
from concurrent.futures import Executor
from pathlib import Path

log = logging.getLogger("jobworker.store")

POOL_SIZE = 32
"""Empty files the pool is refilled to (a start takes four)."""
POOL_LOW = 16
"""Below this many, a take asks the writer thread to refill the pool."""
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
_libc = ctypes.CDLL(None, use_errno=True)
_renameat2 = getattr(_libc, "renameat2", None)
if _renameat2 is not None:
    _renameat2.argtypes = [
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_uint,
    ]


def _exchange(a: str, b: Path) -> int:
    """``renameat2(a, b, RENAME_EXCHANGE)``: 0, or the errno."""
    if _renameat2 is None:
        return errno.ENOSYS
    if _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return 0
    return ctypes.get_errno()


class FilePool:
    """Empty 0600 files in ``directory``, taken by any thread, made by ``writer``'s."""

    def __init__(self, directory: Path, writer: Executor) -> None:
        self.directory = directory
        self._writer = writer
        self._spare: collections.deque[str] = collections.deque()
        self._lock = threading.Lock()
        self._refilling = False
        self._given_up = False
        self._can_exchange = True
        """False once the file system refused an exchange: replaced by rename from then on."""

    def adopt(self) -> None:
        """Take over what an earlier store left in the pool, emptied (a crash may have cut a
        refill short; nothing else ever writes there), then have it refilled."""
        try:
            names = os.listdir(self.directory)
        except OSError as e:
            log.warning("the file pool %s cannot be read: %s", self.directory, e)
            return
        for name in names:
            path = os.path.join(self.directory, name)
            try:
                if os.stat(path).st_nlink > 1:  # a job's file, not yet unlinked from the pool
                    raise OSError
                os.truncate(path, 0)
            except OSError:
                with contextlib.suppress(OSError):
                    os.unlink(path)
                continue
            self._spare.append(path)
        self._ask_refill()

    def _give_up(self, error: OSError, taken: str) -> None:
        log.warning("the file pool %s is not used: %s", self.directory, error)
        with self._lock:
            self._given_up = True
            spares = [taken, *self._spare]
            self._spare.clear()
        for path in spares:
            with contextlib.suppress(OSError):
                os.unlink(path)

    def _ask_refill(self) -> None:
        with self._lock:
            if self._given_up or self._refilling or len(self._spare) >= POOL_LOW:
                return
            self._refilling = True
        try:
            self._writer.submit(self._refill)
        except RuntimeError:  # shut down: no more starts either
            with self._lock:
                self._refilling = False

    def _refill(self) -> None:
        """The writer thread: make empty files until the pool holds :data:`POOL_SIZE`."""
        try:
            while len(self._spare) < POOL_SIZE and not self._given_up:
                path = os.path.join(self.directory, uuid.uuid4().hex)
                try:
                    # mknod, not open: no fd, so no snapshot of our fds ever sees a refill's.
                    os.mknod(path, stat.S_IFREG | 0o600)
                except OSError as e:
                    log.warning("the file pool %s cannot be refilled: %s", self.directory, e)
                    return
                self._spare.append(path)
        finally:
            with self._lock:
                self._refilling = False

    def take(self) -> str | None:
        """A pool file's path, out of the pool (:meth:`give_back` or :meth:`swap_in` it)."""
        try:
            spare = self._spare.popleft()
        except IndexError:
            spare = None
        self._ask_refill()
        return spare

    def give_back(self, path: str) -> None:
        """Empty ``path`` and put it back in the pool (gone: forgotten)."""
        try:
            os.truncate(path, 0)
        except OSError:
            return
        self._spare.append(path)

    def swap_in(self, spare: str, final: Path) -> None:
        """Atomically put the pool file ``spare`` at ``final``: exchanged with the file there,
        which becomes the pool file (emptied), or renamed if there is none (or the file
        system cannot exchange: then the old file is freed, as by ``os.replace``). Only a
        regular file is exchanged: anything else at ``final`` meets ``os.replace``'s errors."""
        try:
            regular = stat.S_ISREG(os.lstat(final).st_mode)
        except FileNotFoundError:
            regular = False
        if self._can_exchange and regular:
            err = _exchange(spare, final)
            if err == 0:
                self.give_back(spare)
                return
            if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                self._can_exchange = False
            elif err != errno.ENOENT:  # ENOENT: no file at final (or no spare: replace says)
                raise OSError(err, os.strerror(err))
        os.replace(spare, final)

    def open_new(self, path: Path) -> int:
        """``open(path, O_WRONLY|O_CREAT|O_EXCL|O_CLOEXEC, 0600)``, from the pool when it has
        a file: that file linked to ``path`` (failing as O_EXCL would if ``path`` exists, the
        file kept in the pool) and unlinked from the pool."""
        spare = self.take()
        if spare is not None:
            try:
                fd = os.open(spare, os.O_WRONLY | os.O_CLOEXEC)
            except OSError:
                fd = -1  # gone from the pool (removed by hand): create one instead
            if fd >= 0:
                try:
                    os.link(spare, path)
                except FileExistsError:
                    os.close(fd)
                    self._spare.appendleft(spare)
                    raise
                except OSError as e:
                    # No hard links here (EPERM, EOPNOTSUPP, ...): the pool cannot serve, so
                    # it is given up (its files removed) rather than refilled on every start.
                    os.close(fd)
                    self._give_up(e, spare)
                else:
                    with contextlib.suppress(OSError):
                        os.unlink(spare)
                    return fd
        return os.open(path, _CREATE, 0o600)

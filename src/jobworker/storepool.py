"""The store's pool of empty files, made ahead so that a start creates none.

A start takes its four files (the logs, the index, the record) from ``STATE/pool`` and links
them into ``jobs/`` under the job's names: a link and an unlink, a few microseconds, where
creating a file on ext4 can cost a quarter of a millisecond of CPU when many inodes were freed
recently (its allocator skips those). The store's writer thread refills the pool, off the
start's path. It holds no job's data and recovery does not read it; when it is empty (or
cannot be refilled) a start creates its files itself.

Pool files are only ever made here (``mknod``, 0600, in the store's 0700 directory) and never
reused once linked under a job's name: a job's file is never one another job had, whatever
else may hold it (a hard-link backup, an open fd). Nothing in the pool is followed if it is not
a regular file: a symlink there is removed, not opened, truncated or linked through.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import logging
import os
import stat
import threading
import time
import uuid
from concurrent.futures import Executor
from pathlib import Path

log = logging.getLogger("jobworker.store")

POOL_SIZE = 32
"""Empty files the pool is refilled to (a start takes four)."""
POOL_LOW = 16
"""Below this many, a take asks the writer thread to refill the pool."""
RETRY_AFTER = 10.0
"""Seconds before a refill that failed (a full disk) is tried again: one warning, not one per
start, and the writer thread is left to the records."""
_NO_LINKS = frozenset({errno.EPERM, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK})
"""link() errors that say the pool cannot serve this directory at all."""
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC


class FilePool:
    """Empty 0600 files in ``directory``, taken by any thread, made by ``writer``'s."""

    def __init__(self, directory: Path, writer: Executor) -> None:
        self.directory = directory
        self._writer = writer
        self._spare: collections.deque[str] = collections.deque()
        self._lock = threading.Lock()
        self._refilling = False
        self._given_up = False
        self._retry_at = 0.0
        """When a refill may be tried again after one failed (:data:`RETRY_AFTER`)."""

    def adopt(self) -> None:
        """Remove what an earlier store left in the pool, then have it refilled. None of it is
        reused: a crash may have left a file linked under a job's name too (written since)."""
        try:
            names = os.listdir(self.directory)
        except OSError as e:
            log.warning("the file pool %s cannot be read: %s", self.directory, e)
            return
        for name in names:
            try:
                os.unlink(os.path.join(self.directory, name))  # a symlink itself, not its target
            except OSError as e:
                log.warning("cannot remove %s from the file pool: %s", name, e.strerror)
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
            if time.monotonic() < self._retry_at:
                return  # the last refill failed: starts create their files meanwhile
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
                    if not self._retry_at:
                        log.warning("the file pool %s cannot be refilled: %s", self.directory, e)
                    self._retry_at = time.monotonic() + RETRY_AFTER
                    return
                if self._retry_at:
                    log.info("the file pool %s is refilled again", self.directory)
                    self._retry_at = 0.0
                with self._lock:
                    if self._given_up:  # meanwhile
                        os.unlink(path)
                        return
                    self._spare.append(path)
        finally:
            with self._lock:
                self._refilling = False

    def open_new(self, path: Path) -> int:
        """``open(path, O_WRONLY|O_CREAT|O_EXCL|O_CLOEXEC, 0600)``, from the pool when it has
        a file: that file linked to ``path`` (failing as O_EXCL would if ``path`` exists, the
        file kept in the pool) and unlinked from the pool."""
        try:
            spare = self._spare.popleft()
        except IndexError:
            spare = None
        self._ask_refill()
        if spare is not None:
            try:
                fd = os.open(spare, os.O_WRONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
            except OSError:
                fd = -1  # gone from the pool (removed by hand), or not ours: create one instead
                with contextlib.suppress(OSError):
                    os.unlink(spare)
            if fd >= 0:
                try:
                    os.link(spare, path, follow_symlinks=False)
                except FileExistsError:
                    os.close(fd)
                    self._spare.appendleft(spare)
                    raise
                except OSError as e:
                    os.close(fd)
                    if e.errno in _NO_LINKS:
                        # No hard links here: the pool cannot serve, so it is given up (its
                        # files removed) rather than refilled on every start.
                        self._give_up(e, spare)
                    else:  # ENOSPC, EIO...: this start's own create says what it is
                        self._spare.appendleft(spare)
                else:
                    with contextlib.suppress(OSError):
                        os.unlink(spare)
                        # Made when the pool was refilled: its times become the job's, as a
                        # file created now would have (recovery dates a record-less log by them).
                        os.utime(fd)
                    return fd
        return os.open(path, _CREATE, 0o600)

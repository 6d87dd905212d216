"""A start's host side: what it prepares before the spawn and undoes on failure, and what every
job starts with (the masked paths, the RLIMIT_NOFILE soft limit)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import resource
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from jobworker.cgroup import controllers
from jobworker.cgroup.tree import CgroupTree, open_procs
from jobworker.cgroup.watch import EventsWatcher
from jobworker.ending import EOF_TIMEOUT
from jobworker.errors import JobworkerError
from jobworker.output import make_pipe
from jobworker.runtime import kill_until_empty
from jobworker.spawn.lookup import resolve_command
from jobworker.spec import JobSpec
from jobworker.store import Store
from jobworker.terminal import open_pty

log = logging.getLogger("jobworker.manager")  # the records read as before the split

DEFAULT_NOFILE = 1024
"""A job's RLIMIT_NOFILE soft limit when ours before the raise is unknown (Linux's default)."""


@dataclass(frozen=True, slots=True)
class Prepared:
    path: str
    log_fd: int
    group: Path
    pipe_r: int
    pipe_w: int
    procs_fd: int
    stdin_r: int = -1
    """The read end of the job's stdin pipe, for the spawner (-1: /dev/null or a terminal)."""
    input_w: int = -1
    """What :class:`~jobworker.terminal.JobInput` writes: the stdin pipe's write end, or a
    duplicate of the pty's master (then ``pipe_r`` is the master and ``pipe_w`` the slave)."""

    def close_child_ends(self) -> None:
        """After the spawn: the spawner has its own copies of these."""
        for fd in (self.pipe_w, self.procs_fd, self.stdin_r):
            if fd >= 0:
                os.close(fd)


def prepare(
    store: Store,
    tree: CgroupTree,
    job_id: str,
    spec: JobSpec,
    env: dict[str, str],
    lookup: bool = False,
) -> Prepared:
    """Everything a start needs before the spawn; all of it undone on failure. With
    ``lookup`` the command and cwd are checked by the spawner's child instead."""
    path = spec.argv[0] if lookup else resolve_command(spec.argv[0], env["PATH"], spec.cwd)
    with contextlib.ExitStack() as undo:
        log_fd = store.create(job_id)
        undo.callback(store.discard, job_id)
        undo.callback(close_quietly, log_fd)
        group = tree.create(job_id)
        undo.callback(tree.try_remove, group)
        controllers.apply(group, spec.limits)
        # A terminal job's output comes from its pty's master; its slave is the job's stdio.
        pipe_r, pipe_w = make_pipe() if spec.terminal is None else open_pty(spec.terminal)
        undo.callback(close_quietly, pipe_r)
        undo.callback(close_quietly, pipe_w)
        stdin_r = input_w = -1
        if spec.terminal is not None:
            input_w = os.dup(pipe_r)
        elif spec.stdin:
            stdin_r, input_w = os.pipe2(os.O_CLOEXEC)
            undo.callback(close_quietly, stdin_r)
        undo.callback(close_quietly, input_w)
        procs_fd = open_procs(group)
        undo.pop_all()
    return Prepared(path, log_fd, group, pipe_r, pipe_w, procs_fd, stdin_r, input_w)


async def abandon_start(
    store: Store, tree: CgroupTree, watcher: EventsWatcher, job_id: str, prep: Prepared
) -> None:
    """Undo a start whose spawn failed. A process may already run in the group (the
    spawner can die between its spawn and its reply): no record knows it, so it is killed
    before the group is removed."""
    close_quietly(prep.log_fd)
    close_quietly(prep.pipe_r)
    if prep.input_w >= 0:
        close_quietly(prep.input_w)
    try:
        if tree.populated(prep.group):
            log.warning("job %s: start failed with a process in its group; killing it", job_id)
            async with asyncio.timeout(EOF_TIMEOUT):
                await kill_until_empty(tree, watcher, prep.group)
        await tree.remove(prep.group)
    except (JobworkerError, TimeoutError) as e:
        log.error("job %s: cgroup %s of a failed start not removed: %s", job_id, prep.group, e)
    finally:
        watcher.unwatch(prep.group)
        store.discard(job_id)


def close_quietly(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)


_nofile_before_raise: list[int] = []
"""This process's RLIMIT_NOFILE soft limit before the first :func:`raise_nofile_limit`."""


def raise_nofile_limit() -> int:
    """Each follower holds an fd on its job's log: allow as many as the hard limit does.

    Returns the soft limit this process had before the first raise: jobs get it back (a
    program that still uses select() breaks past 1024 fds), whichever manager starts them."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if not _nofile_before_raise:
        _nofile_before_raise.append(soft if soft != resource.RLIM_INFINITY else DEFAULT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return _nofile_before_raise[0]


def masked(state_dir: Path, hidden_paths: Sequence[Path]) -> tuple[str, ...]:
    """What every sandbox masks, as absolute paths with symlinks resolved (mount follows
    them anyway; resolved here, they name what the host sees at open time)."""
    return tuple(os.path.realpath(p) for p in (state_dir, *hidden_paths))

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
from jobworker.errors import HostError, JobworkerError
from jobworker.outlog import LogFiles
from jobworker.output import OutputPump, make_pipe
from jobworker.runtime import kill_until_empty
from jobworker.spawn.lookup import resolve_command
from jobworker.spec import Credentials, JobSpec, JobStatus
from jobworker.store import Store
from jobworker.terminal import open_pty

log = logging.getLogger("jobworker.manager")  # the records read as before the split

DEFAULT_NOFILE = 1024
"""A job's RLIMIT_NOFILE soft limit when ours before the raise is unknown (Linux's default)."""


@dataclass(frozen=True, slots=True)
class Prepared:
    path: str
    files: LogFiles
    group: Path
    stdout_r: int
    stdout_w: int
    stderr_r: int | None
    """``None`` when the job has one source only (stdout)."""
    stderr_w: int
    procs_fd: int
    stdin_r: int = -1
    """The read end of the job's stdin pipe, for the spawner (-1: /dev/null or a terminal)."""
    input_w: int = -1
    """What :class:`~jobworker.terminal.JobInput` writes: the stdin pipe's write end, or a
    duplicate of the pty's master (then ``stdout_r`` is the master, ``stdout_w`` and
    ``stderr_w`` the slave, and ``stderr_r`` ``None``)."""

    @property
    def output(self) -> tuple[LogFiles, int, int | None]:
        """What the pump takes: the files, the stdout and the stderr read ends."""
        return self.files, self.stdout_r, self.stderr_r

    def close_spawner_fds(self) -> None:
        """The fds the spawner got copies of (the job's ends of its pipes, cgroup.procs)."""
        os.close(self.stdout_w)
        if self.stderr_w != self.stdout_w:
            os.close(self.stderr_w)
        os.close(self.procs_fd)
        if self.stdin_r >= 0:
            os.close(self.stdin_r)


def lookup_in_child(spec: JobSpec, creds: Credentials) -> bool:
    """Whether the command lookup and the cwd check happen in the forked child, after the
    switch to the job's credentials (and inside its sandbox, whose /tmp and masks the host's
    view does not show), rather than here as the daemon: a job as another user must learn
    nothing its user could not learn itself (that a file exists in a directory it cannot
    search, say)."""
    return spec.sandbox is not None or creds.uid >= 0 or creds.gid >= 0


def prepare(
    store: Store,
    tree: CgroupTree,
    job_id: str,
    spec: JobSpec,
    env: dict[str, str],
    lookup: bool = False,
    record: JobStatus | None = None,
) -> Prepared:
    """Everything a start needs before the spawn; all of it undone on failure. With
    ``lookup`` the command and cwd are checked by the spawner's child instead.

    ``record``: the job's start record (state running, pid 0: not known yet), written last,
    here on the host-I/O thread rather than by the store's writer after the spawn: the start
    then waits for no second thread hop, nor behind the writer's batch of synced end records,
    and a crash after the spawn always finds the record. Not written is not fatal (logged):
    a job without a start record reads as lost at the next recovery, its output kept. On a
    failed start :func:`abandon_start` discards it with the logs."""
    path = spec.argv[0] if lookup else resolve_command(spec.argv[0], env["PATH"], spec.cwd)
    with contextlib.ExitStack() as undo:
        files = store.create(job_id)
        undo.callback(store.discard, job_id)
        undo.callback(files.close)
        group = tree.create(job_id)
        undo.callback(tree.try_remove, group)
        controllers.apply(group, spec.limits)
        stdin_r = input_w = -1
        if spec.terminal is None:
            pipes: list[int] = []
            for _stream in range(2):  # stdout, stderr
                r, w = make_pipe()
                undo.callback(close_quietly, r)
                undo.callback(close_quietly, w)
                pipes += (r, w)
            out_r, out_w, err_r, err_w = pipes
            if spec.stdin:
                stdin_r, input_w = os.pipe2(os.O_CLOEXEC)
                undo.callback(close_quietly, stdin_r)
        else:
            # A terminal job's output comes from its pty's master, captured as stdout; its
            # slave is the job's stdin, stdout and stderr.
            master, slave = open_pty(spec.terminal)
            undo.callback(close_quietly, master)
            undo.callback(close_quietly, slave)
            out_r, out_w, err_r, err_w = master, slave, None, slave
            input_w = os.dup(master)
        if input_w >= 0:
            undo.callback(close_quietly, input_w)
        procs_fd = open_procs(group)
        undo.pop_all()
    if record is not None:
        try:
            store.save(spec, record, new=True)
        except HostError:
            log.exception("job %s: record not written at start", job_id)
    return Prepared(path, files, group, out_r, out_w, err_r, err_w, procs_fd, stdin_r, input_w)


async def abandon_start(
    store: Store,
    tree: CgroupTree,
    watcher: EventsWatcher,
    job_id: str,
    prep: Prepared,
    pump: OutputPump,
) -> None:
    """Undo a start whose spawn failed. A process may already run in the group (the
    spawner can die between its spawn and its reply): no record knows it, so it is killed
    before the group is removed. The pump owns the logs and pipes: it closes them."""
    await pump.abandon()
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

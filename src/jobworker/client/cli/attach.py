"""Typing into jobs: ``worker run -i`` (stdin streamed to the job), ``worker run -t`` (a
terminal session) and ``worker attach ID`` (back into a terminal job).

A terminal session puts the local terminal in raw mode (:mod:`jobworker.client.tty`) and sends
each keystroke as typed, so Ctrl+C reaches the job as its terminal's interrupt; the job's
screen comes back through Logs (the session's bytes are its log). Ctrl+P Ctrl+Q detaches and
leaves the job running. A viewer, who may not type, watches: its keys other than the detach
keys are dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import click

from jobworker.client.cli.control import JOB_ID
from jobworker.client.cli.exits import CommandExit, Exit, finish, warn
from jobworker.client.cli.session import Session, follow_output, remote, wait_for_end
from jobworker.client.cli.settings import settings_of
from jobworker.errors import PermissionDenied
from jobworker.outread import Query
from jobworker.spec import JobStatus, TerminalSize

if TYPE_CHECKING:
    from jobworker.client.attaching import Attachment

# The terminal's modules (termios) are imported by the commands that type into a job, when
# they do: start and run import this module too (run -i and -t are here).


class Detached(Exception):
    """The detach keys were typed: the job runs on."""


def local_terminal_size() -> TerminalSize:
    """For ``run -t``: the size of the terminal on stdin; a usage error when stdin is none."""
    from jobworker.client.tty import is_terminal, size_of

    if not is_terminal(0):
        raise click.UsageError("-t needs a terminal on stdin (use -i to stream a pipe or file)")
    return size_of(0)


@contextlib.asynccontextmanager
async def feeding_stdin(session: Session, job_id: str, enabled: bool) -> AsyncIterator[None]:
    """``run -i``: copy our stdin to the job's, in the background, and close the job's at our
    EOF. Stops early when the job's stdin closes (it ended, or stopped reading for good)."""
    if not enabled:
        yield
        return
    attachment = await session.client.attach(job_id)
    task = asyncio.create_task(_copy_stdin(attachment, sys.stdin.fileno()))
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await attachment.close()


async def _copy_stdin(attachment: Attachment, fd: int) -> None:
    from jobworker.client.attaching import STDIN_CHUNK

    pollable = True
    while True:
        if pollable:
            try:
                await readable(fd)
            except OSError:  # a regular file (or /dev/null): its reads never wait
                pollable = False
        data = os.read(fd, STDIN_CHUNK)
        if not data:
            await attachment.close_stdin()
            return
        if not await attachment.write(data):
            return  # the job's stdin is closed: it will not read more


async def readable(fd: int) -> None:
    """Wait until ``fd`` can be read. The reader is removed before the caller reads and sends:
    with it left registered across a grpc write, the write was seen to wait in the channel
    until the next key came (grpc aio)."""
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()
    loop.add_reader(fd, _set_done, ready)
    try:
        await ready
    finally:
        loop.remove_reader(fd)


async def terminal_session(session: Session, job_id: str, offset: int, *, fd: int = 0) -> JobStatus:
    """Be the terminal of job ``job_id`` until it ends (its final status) or the detach keys
    (:class:`Detached`); its screen from byte ``offset`` of its output."""
    from jobworker.client.tty import RawTerminal, size_of

    attachment: Attachment | None
    try:
        attachment = await session.client.attach(job_id, window=size_of(fd))
    except PermissionDenied as e:
        warn(f"watching only ({e}); Ctrl+P Ctrl+Q leaves")
        attachment = None
    loop = asyncio.get_running_loop()
    resizes: set[asyncio.Task[None]] = set()

    def resized(size: TerminalSize) -> None:
        if attachment is not None:
            task = loop.create_task(attachment.resize(size))
            resizes.add(task)
            task.add_done_callback(resizes.discard)

    out = sys.stdout.buffer
    try:
        with RawTerminal(fd, resized) as term:
            screen = asyncio.create_task(
                follow_output(session, job_id, True, out, query=Query(offset=offset))
            )
            keys = asyncio.create_task(_send_keys(attachment, fd))
            ending: asyncio.Future[int] = term.ended
            tasks: set[asyncio.Future[Any]] = {screen, keys, ending}
            try:
                await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            finally:
                keys.cancel()
                ending.cancel()
                for pending in resizes:
                    pending.cancel()
                if not screen.done():
                    screen.cancel()
                await asyncio.gather(keys, ending, *resizes, return_exceptions=True)
                with contextlib.suppress(asyncio.CancelledError):
                    await screen  # its error, if it failed (a lost connection), is raised here
        if ending.done() and not ending.cancelled():
            sig = ending.result()
            raise CommandExit(
                128 + sig,
                f"{signal.Signals(sig).name}: left job {job_id} running (`worker attach {job_id}`)",
            )
        if keys.done() and not keys.cancelled():
            keys.result()  # a failure to send (the connection)
            raise Detached()  # the detach keys, or our terminal is gone
    finally:
        if attachment is not None:
            await attachment.close()
    return await wait_for_end(session, job_id)


def _set_done(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


async def _send_keys(attachment: Attachment | None, fd: int) -> None:
    """Read keystrokes as they come and send them; returns at the detach keys (or if our
    terminal is gone). One read at a time, sent before the next: typing is flow-controlled."""
    from jobworker.client.tty import DetachScanner

    scanner = DetachScanner()
    while True:
        await readable(fd)
        data = os.read(fd, 4096)
        if not data:
            return
        send = scanner.feed(data)
        if send and attachment is not None:
            await attachment.write(send)
        if scanner.detached:
            return


def detached_exit(job_id: str) -> CommandExit:
    return CommandExit(
        Exit.OK, f"detached from job {job_id}; it runs on (`worker attach {job_id}`)"
    )


@click.command()
@JOB_ID
@click.pass_context
def attach(ctx: click.Context, job_id: str) -> None:
    """Be the terminal of a job started with -t again: type into it, see its screen.

    Several clients may be attached at once and see the same bytes; the job's owner and
    admins type, viewers watch. Ctrl+P Ctrl+Q detaches (the job runs on). Exits with the
    job's exit code when it ends.
    """
    from jobworker.client.tty import is_terminal

    settings = settings_of(ctx)
    if not is_terminal(0):
        raise click.UsageError("attach needs a terminal on stdin")

    async def body(session: Session) -> JobStatus:
        status = await session.client.status(job_id)
        try:
            # From the screen's current end: what follows is what anyone sees next.
            return await terminal_session(session, job_id, status.output_bytes)
        except Detached:
            raise detached_exit(job_id) from None

    finish(remote(settings, body))

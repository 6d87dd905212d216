"""One command's connection to the daemon, renewed after a drop, and the calls that resume
across reconnections (following output, waiting)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from dataclasses import replace
from typing import TYPE_CHECKING, Any, BinaryIO, TypeVar

from jobworker.client.cli.exits import StdoutClosed, error_exit, warn
from jobworker.client.cli.settings import Settings
from jobworker.errors import ConfigError, JobworkerError, RemoteError, ShuttingDown
from jobworker.spec import JobStatus

if TYPE_CHECKING:
    # The output's modules are imported by the commands that read output, when they do.
    from jobworker.client.cli.stamps import Stamper
    from jobworker.outread import Query

T = TypeVar("T")


def run_sync(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def transient(e: JobworkerError) -> bool:
    """A failure that a new connection may cure (the daemon restarting, a dropped link)."""
    if isinstance(e, ShuttingDown):
        return True
    return isinstance(e, RemoteError) and e.code in {"CANCELLED", "UNKNOWN", "ABORTED"}


class Session:
    """The client of one command, replaced by a fresh one after a dropped connection (a new
    channel connects at once instead of after grpc's growing reconnect backoff)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.client = settings.connect()

    async def renew(self) -> None:
        old, self.client = self.client, self.settings.connect()
        await old.close()

    async def close(self) -> None:
        await self.client.close()

    async def retrying(
        self,
        what: Callable[[], str],
        attempt: Callable[[], Coroutine[Any, Any, T]],
        progress: Callable[[], int] = lambda: 0,
    ) -> T:
        """Run ``attempt`` again after a dropped connection until it succeeds or
        ``reconnect`` seconds pass without progress. Only for calls that are safe to repeat
        (wait; logs from an offset). ``progress`` tells whether an attempt got anywhere."""
        loop = asyncio.get_running_loop()
        deadline: float | None = None
        delay = 0.05
        seen = progress()
        while True:
            try:
                return await attempt()
            except JobworkerError as e:
                if not transient(e):
                    raise
                if progress() != seen:
                    seen, deadline, delay = progress(), None, 0.05
                if deadline is None:
                    deadline = loop.time() + self.settings.reconnect
                    warn(f"connection to workerd lost ({e}); reconnecting to {what()}")
                if loop.time() >= deadline:
                    raise ShuttingDown(
                        f"gave up reconnecting after {self.settings.reconnect:g}s: {e}"
                    ) from e
            await asyncio.sleep(delay)  # back off between attempts
            delay = min(delay * 2, 1.0)
            await self.renew()


async def follow_output(
    session: Session,
    job_id: str,
    follow: bool,
    out: BinaryIO,
    err: BinaryIO | None = None,
    *,
    query: Query | None = None,
    stamper: Stamper | None = None,
) -> int:
    """Copy one view of the job's output exactly (``query``: which one, from where; default:
    both streams from the start) — all of it to ``out``, or with ``err`` its stderr there —
    resuming after a dropped connection at the offset after the last byte received (in the
    same view; ``tail`` and ``since`` only apply until the first byte comes). ``stamper``
    prefixes lines with their times. Returns the offset after the last byte written."""
    from jobworker.outlog import Stream
    from jobworker.outread import Query

    q = replace(query or Query(), follow=follow, split=stamper is not None)
    offset = q.offset
    received = False

    async def attempt() -> None:
        nonlocal offset, received
        ask = replace(q, offset=offset) if received else q
        if received:
            ask = replace(ask, tail=None, since_us=None)
        async for c in session.client.chunks(job_id, ask):
            if received and c.offset != offset:
                raise RemoteError(
                    "DATA_LOSS", f"expected output at offset {offset}, got {c.offset}"
                )
            target = err if err is not None and c.stream is Stream.STDERR else out
            data = c.data if stamper is None else stamper.stamp(id(target), c.data, c.time_us)
            try:
                target.write(data)
                target.flush()
            except BrokenPipeError:
                raise StdoutClosed() from None
            received = True
            offset = c.offset + len(c.data)

    await session.retrying(
        lambda: f"job {job_id}'s output at byte {offset}", attempt, lambda: offset
    )
    return offset


async def wait_for_end(session: Session, job_id: str) -> JobStatus:
    return await session.retrying(
        lambda: f"wait for job {job_id}", lambda: session.client.wait(job_id)
    )


def remote(settings: Settings, body: Callable[[Session], Coroutine[Any, Any, T]]) -> T:
    """Run ``body`` with a client; the library's errors become exit codes here."""

    async def go() -> T:
        session = Session(settings)
        try:
            return await body(session)
        finally:
            await session.close()

    try:
        return run_sync(go())
    except JobworkerError as e:
        if isinstance(e, ShuttingDown):
            # Could not connect, or the daemon hung up: our own certificate may be the reason.
            try:
                settings.explain_failure()
            except ConfigError as bad:
                e = bad
        failure = error_exit(e, settings.addr)
    raise failure

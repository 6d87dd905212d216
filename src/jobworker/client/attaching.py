"""The client's end of Attach: typing into a job's stdin or terminal (see
:meth:`jobworker.client.Client.attach`)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

import grpc
from grpc import aio

from jobworker.api import convert
from jobworker.api.proto import pb
from jobworker.errors import JobworkerError, RemoteError
from jobworker.spec import TerminalSize

STDIN_CHUNK = 64 * 1024
"""Bytes per stdin request: large enough for throughput, small against the daemon's cap."""

Translate = Callable[[grpc.RpcError, str | None], JobworkerError]


class Attachment:
    """An open Attach call. :meth:`write` returns ``False`` once the job's stdin is closed
    (it ended, closed it, or a client ended the input); it waits while the job does not read
    (flow control reaches back here). Use as an async context manager, or :meth:`close`."""

    def __init__(
        self, call: aio.StreamStreamCall[Any, Any], job_id: str, translate: Translate
    ) -> None:
        self._call = call
        self.job_id = job_id
        self._translate = translate
        self.tty = False
        self.stdin_closed = asyncio.Event()
        self._reader: asyncio.Task[None] | None = None

    async def _open(self, window: TerminalSize | None) -> None:
        opened = pb.AttachOpen(id=self.job_id)
        if window is not None:
            opened.window.CopyFrom(convert.window_to_pb(window))
        try:
            await self._call.write(pb.AttachRequest(open=opened))
            first = await self._call.read()
        except grpc.RpcError as e:
            raise self._translate(e, self.job_id) from None
        if not isinstance(first, pb.AttachResponse) or first.WhichOneof("kind") != "attached":
            raise RemoteError("UNKNOWN", f"the daemon did not attach to job {self.job_id}")
        self.tty = first.attached.tty
        self._reader = asyncio.create_task(self._read_rest())

    async def _read_rest(self) -> None:
        with contextlib.suppress(grpc.RpcError, asyncio.CancelledError):
            while True:
                message = await self._call.read()
                # aio.EOF (not in the type stubs) once the daemon has ended the call.
                if not isinstance(message, pb.AttachResponse):
                    break
                if message.WhichOneof("kind") == "stdin_closed":
                    break
        self.stdin_closed.set()

    async def _send(self, request: pb.AttachRequest) -> bool:
        if self.stdin_closed.is_set() or self._call.done():
            return False
        try:
            await self._call.write(request)
        except grpc.RpcError as e:
            if self.stdin_closed.is_set():
                return False
            raise self._translate(e, self.job_id) from None
        except asyncio.InvalidStateError:  # the call ended (stdin closed) meanwhile
            return False
        return not self.stdin_closed.is_set()

    async def write(self, data: bytes) -> bool:
        """Send ``data`` to the job's stdin, in chunks; ``False`` once stdin is closed."""
        view = memoryview(data)
        for start in range(0, len(view), STDIN_CHUNK):
            if not await self._send(
                pb.AttachRequest(stdin=bytes(view[start : start + STDIN_CHUNK]))
            ):
                return False
        return not self.stdin_closed.is_set()

    async def resize(self, size: TerminalSize) -> None:
        """Tell a terminal job its new window size (the job gets SIGWINCH)."""
        await self._send(pb.AttachRequest(resize=convert.window_to_pb(size)))

    async def close_stdin(self) -> None:
        """End the job's stdin (its pipe's reader sees EOF; for every client). Nothing for a
        terminal: send its EOF character (Ctrl+D) instead."""
        if await self._send(pb.AttachRequest(close_stdin=True)) and not self.tty:
            await self.stdin_closed.wait()

    async def close(self) -> None:
        """Leave, keeping the job's stdin open for others. Returns once the daemon has taken
        every byte written (it ends the call after the last request)."""
        with contextlib.suppress(grpc.RpcError, asyncio.InvalidStateError):
            if not self._call.done():
                await self._call.done_writing()
        try:
            if self._reader is not None:
                await self._reader
        finally:
            self._call.cancel()

    async def __aenter__(self) -> Attachment:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

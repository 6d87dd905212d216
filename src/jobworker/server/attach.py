"""The Attach RPC: a client types into a job's stdin or terminal.

The first request opens (names the job); each later one carries stdin bytes, a window size, or
the end of stdin. The job's output is not on this stream: the client follows it with Logs,
like any job's (a terminal job's screen bytes are its log, so several clients watching, and a
later ``worker logs``, all see the same bytes).

Who may type: :data:`~jobworker.server.authz.Action.INPUT` (the right to start jobs, on a job
the caller may act on: its own, or any for an admin; another user's job is NOT_FOUND, a viewer
PERMISSION_DENIED), and for a terminal job a role the policy's ``[terminal]`` allows.

Flow control: the next request is read only once the previous one's bytes are in the job's
stdin (:meth:`~jobworker.terminal.JobInput.write`), so a job that never reads makes the daemon
hold one request at most, and HTTP/2 flow control blocks the client.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator
from typing import TYPE_CHECKING

from jobworker.api import convert
from jobworker.api.proto import pb
from jobworker.errors import InvalidArgument
from jobworker.server.authz import Action
from jobworker.server.grpc_server import _Malformed
from jobworker.terminal import JobInput

if TYPE_CHECKING:  # at run time grpc comes with the service, after jobworker.server.tls13
    from grpc import aio

    from jobworker.server.service import JobWorkerService

MAX_STDIN_CHUNK = 1 << 20
"""Most stdin bytes in one request (the CLI sends 64 KiB)."""


def _checked(request: object) -> pb.AttachRequest:
    if isinstance(request, _Malformed):
        raise InvalidArgument(request.error)
    assert isinstance(request, pb.AttachRequest)
    return request


async def serve(
    service: JobWorkerService,
    requests: AsyncIterator[object],
    context: aio.ServicerContext[object, object],
) -> AsyncGenerator[pb.AttachResponse]:
    async with service._rpc("Attach", context) as identity:
        stream = aiter(requests)
        first = await anext(stream, None)
        opened = None if first is None else _checked(first)
        if opened is None or opened.WhichOneof("kind") != "open":
            raise InvalidArgument("the first Attach request must be open, naming the job")
        job_id = opened.open.id
        service._job(identity, Action.INPUT, job_id)
        manager = service._mgr
        if manager.spec(job_id).terminal is not None:
            service.settings.terminal_for(identity, manager.spec(job_id).terminal)
        job_input = manager.input(job_id)
        with service._quotas.stream(identity.name, "Attach"):
            if opened.open.HasField("window"):
                job_input.resize(convert.window_from_pb(opened.open.window))
            yield pb.AttachResponse(attached=pb.AttachReady(tty=job_input.tty))
            async for raw in _until_closed(stream, job_input):
                request = _checked(raw)
                kind = request.WhichOneof("kind")
                if kind == "stdin":
                    if len(request.stdin) > MAX_STDIN_CHUNK:
                        raise InvalidArgument(
                            f"stdin requests carry at most {MAX_STDIN_CHUNK} bytes, "
                            f"got {len(request.stdin)}"
                        )
                    if not await job_input.write(request.stdin):
                        break
                elif kind == "resize":
                    job_input.resize(convert.window_from_pb(request.resize))
                elif kind == "close_stdin":
                    if not job_input.tty:  # a terminal's end of input is its EOF character
                        job_input.close()
                        break
                else:
                    raise InvalidArgument("open must be the first Attach request, and only it")
            else:
                if not job_input.closed:
                    return  # the client is done writing; the job's stdin stays open
            yield pb.AttachResponse(stdin_closed=True)


async def _until_closed(
    stream: AsyncIterator[object], job_input: JobInput
) -> AsyncIterator[object]:
    """The requests, until the client is done or the job's stdin closes (the job ended, or
    another client closed it): an idle client learns of it without writing first."""
    closed = asyncio.ensure_future(job_input.wait_closed())
    try:
        while not closed.done():
            request = asyncio.ensure_future(anext(stream, None))
            await asyncio.wait({request, closed}, return_when=asyncio.FIRST_COMPLETED)
            if not request.done():
                request.cancel()
                return
            item = request.result()
            if item is None:
                return
            yield item
    finally:
        closed.cancel()

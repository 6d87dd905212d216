"""A typed asyncio client for workerd (what the ``worker`` CLI uses).

::

    async with Client.from_pki("127.0.0.1:50051", Path("pki"), "alice") as c:
        status = await c.start(["sh", "-c", "echo hi"], limits=Limits(memory=64 << 20))
        async for offset, data in c.logs(status.id, follow=True):
            sys.stdout.buffer.write(data)
        final = await c.wait(status.id)

Methods return the library's own values (:class:`~jobworker.spec.JobStatus`) and raise the
library's errors, mapped back from status codes with the same table the service uses
(:mod:`jobworker.api.errors`): :class:`~jobworker.errors.JobNotFound`,
:class:`~jobworker.errors.PermissionDenied`, ... UNAVAILABLE (daemon down, unreachable or
shutting down) is :class:`~jobworker.errors.ShuttingDown`; a code outside the table is
:class:`~jobworker.errors.RemoteError`.
"""

from __future__ import annotations

import asyncio
import builtins
import sys
from collections.abc import AsyncGenerator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, BinaryIO

import grpc
from grpc import aio

from jobworker import tls
from jobworker.api import convert
from jobworker.api.errors import ERROR_TRAILER, error_for
from jobworker.api.proto import pb, pb_grpc
from jobworker.errors import JobworkerError, RemoteError
from jobworker.limits import Limits
from jobworker.outlog import Chunk, Stream
from jobworker.outread import Query
from jobworker.spec import JobStatus, Network, TerminalSize

if TYPE_CHECKING:
    # Imported by attach(), when a command types into a job.
    from jobworker.client.attaching import Attachment

DEFAULT_ADDRESS = "127.0.0.1:50051"
MAX_RESPONSE_BYTES = 256 * 1024 * 1024
"""A List of many jobs with long command lines can be large."""

CHANNEL_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.max_receive_message_length", MAX_RESPONSE_BYTES),
    # Notice a daemon that vanished during a long Logs/Wait call.
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
)


def _translate(e: grpc.RpcError, job_id: str | None = None) -> JobworkerError:
    if not isinstance(e, aio.AioRpcError):
        return error_for(grpc.StatusCode.UNKNOWN.name, str(e), job_id)
    trailer: tuple[tuple[str, str | bytes], ...] = tuple(e.trailing_metadata() or ())  # type: ignore[arg-type]
    names = [v for k, v in trailer if k == ERROR_TRAILER]
    name = names[0] if names and isinstance(names[0], str) else None
    return error_for(e.code().name, e.details() or "", job_id, name)


class Client:
    """A connection to one daemon. Use as an async context manager, or :meth:`close` it."""

    def __init__(
        self,
        address: str,
        material: tls.Material,
        *,
        server_name: str | None = None,
        timeout: float | None = None,
    ) -> None:
        """``server_name`` overrides the name checked against the server certificate (default:
        the host of ``address``). ``timeout`` bounds each call except :meth:`wait` and
        :meth:`logs`."""
        options: list[tuple[str, int | str]] = list(CHANNEL_OPTIONS)
        if server_name:
            options.append(("grpc.ssl_target_name_override", server_name))
        credentials = grpc.ssl_channel_credentials(material.ca, material.key, material.cert)
        self._channel = aio.secure_channel(address, credentials, options=options)
        self._stub = pb_grpc.JobWorkerStub(self._channel)
        self._timeout = timeout
        self._streams: set[aio.UnaryStreamCall[pb.LogsRequest, pb.LogsChunk]] = set()
        self._closed = False
        self.address = address

    @classmethod
    def from_files(
        cls, address: str, ca: Path, cert: Path, key: Path, *, check: bool = True, **kwargs: object
    ) -> Client:
        """Raises :class:`~jobworker.errors.InvalidArgument` naming a file that is missing,
        unreadable or not a usable client certificate/key. ``check=False`` only reads the
        files (see :func:`jobworker.tls.read_client`): for a short-lived process, which runs
        :func:`jobworker.tls.load_client` itself if the connection fails."""
        paths = tls.Paths(ca, cert, key)
        material = tls.load_client(paths) if check else tls.read_client(paths)
        return cls(address, material, **kwargs)  # type: ignore[arg-type]

    @classmethod
    def from_pki(cls, address: str, directory: Path, user: str, **kwargs: object) -> Client:
        """Use ``ca.pem``, ``USER.pem`` and ``USER-key.pem`` from a ``certs init`` directory."""
        paths = tls.Paths.from_pki(directory, user)
        return cls.from_files(address, paths.ca, paths.cert, paths.key, **kwargs)  # type: ignore[arg-type]

    async def close(self) -> None:
        """Cancel open :meth:`logs` streams (their iterators raise
        :class:`~jobworker.errors.RemoteError` ``CANCELLED``) and close the connection."""
        self._closed = True
        for call in list(self._streams):
            call.cancel()
        await self._channel.close(None)

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def start(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        limits: Limits | None = None,
        network: Network | None = None,
        sandbox: bool = True,
        timeout: float | None = None,
        stdin: bool = False,
        tty: TerminalSize | None = None,
    ) -> JobStatus:
        """Start a job owned by this client's identity; returns its first status.

        ``stdin``: the job reads a pipe, written with :meth:`attach` (else /dev/null).
        ``tty``: the job gets a pseudo-terminal of that size (implies ``stdin``).

        ``network``: the job's network in its sandbox (``None``: the daemon's default).
        ``sandbox=False`` runs it in the host's namespaces, which only admins may ask for.
        ``timeout``: seconds the job may run; at the deadline the daemon stops it with
        "deadline exceeded" in its reason (``None``: the daemon's maximum runtime, if any).
        """
        request = pb.StartRequest(
            argv=list(argv),
            env=dict(env or {}),
            cwd=cwd,
            limits=convert.limits_to_pb(limits or Limits()),
            network=convert.network_to_pb(network),
            no_sandbox=not sandbox,
            timeout_seconds=timeout,
            stdin=stdin or tty is not None,
            tty=tty is not None,
        )
        if tty is not None:
            request.window.CopyFrom(convert.window_to_pb(tty))
        try:
            response = await self._stub.Start(request, timeout=self._timeout)
        except grpc.RpcError as e:
            raise _translate(e) from None
        return convert.status_from_pb(response.status)

    async def attach(self, job_id: str, window: TerminalSize | None = None) -> Attachment:
        """Open a job's stdin (or terminal) for writing; ``window``: this side's terminal
        size, applied at once. Raises :class:`~jobworker.errors.StdinClosed` for a job
        without an open stdin. The job's output is read with :meth:`logs`."""
        from jobworker.client.attaching import Attachment

        call = self._stub.Attach()  # type: ignore[call-arg] # requests are written by the call
        attachment = Attachment(call, job_id, _translate)
        try:
            await attachment._open(window)
        except BaseException:
            await attachment.close()
            raise
        return attachment

    async def stop(self, job_id: str, grace: float | None = None) -> JobStatus:
        """Stop a job (SIGTERM, then SIGKILL after ``grace`` s); returns its final status."""
        request = pb.StopRequest(id=job_id, grace_seconds=grace)
        try:
            response = await self._stub.Stop(request)
        except grpc.RpcError as e:
            raise _translate(e, job_id) from None
        return convert.status_from_pb(response.status)

    async def remove(self, job_id: str) -> None:
        """Remove an ended job (its record and log); :class:`JobRunning` if it still runs."""
        try:
            await self._stub.Remove(pb.RemoveRequest(id=job_id), timeout=self._timeout)
        except grpc.RpcError as e:
            raise _translate(e, job_id) from None

    async def status(self, job_id: str) -> JobStatus:
        try:
            response = await self._stub.Status(pb.StatusRequest(id=job_id), timeout=self._timeout)
        except grpc.RpcError as e:
            raise _translate(e, job_id) from None
        return convert.status_from_pb(response.status)

    async def list(self, all: bool = False) -> list[JobStatus]:
        """This identity's jobs, or with ``all`` every job its role may see, oldest first:
        every page of them (see :meth:`list_page`)."""
        jobs: list[JobStatus] = []
        token = ""
        while True:
            page, token = await self.list_page(all=all, page_token=token)
            jobs.extend(page)
            if not token:
                return jobs

    async def list_page(
        self, *, all: bool = False, page_size: int = 0, page_token: str = ""
    ) -> tuple[builtins.list[JobStatus], str]:
        """One page of :meth:`list`: up to ``page_size`` jobs (0: the daemon's default, 500;
        it sends at most 1000) after where ``page_token`` left off (``""``: from the first),
        and the token for the next page, ``""`` after the last. A job started meanwhile comes
        at the end, so paging on lists every job that existed throughout exactly once."""
        request = pb.ListRequest(all=all, page_size=page_size, page_token=page_token)
        try:
            response = await self._stub.List(request, timeout=self._timeout)
        except grpc.RpcError as e:
            raise _translate(e) from None
        return [convert.status_from_pb(s) for s in response.jobs], response.next_page_token

    async def wait(self, job_id: str) -> JobStatus:
        """Block until the job has ended; returns its final status."""
        try:
            response = await self._stub.Wait(pb.WaitRequest(id=job_id))
        except grpc.RpcError as e:
            raise _translate(e, job_id) from None
        return convert.status_from_pb(response.status)

    async def logs(
        self, job_id: str, *, follow: bool = False, offset: int = 0
    ) -> AsyncGenerator[tuple[int, bytes], None]:
        """``(offset, data)`` batches of the job's output (stdout and stderr interleaved in the
        order the daemon received them) from ``offset``. With ``follow`` it ends once the job
        has ended and every byte was received. After a broken connection, call again with the
        offset after the last byte received: nothing is lost or repeated. Leaving the loop
        early cancels the stream on the daemon. :meth:`chunks` tells the streams apart."""
        async for chunk in self.chunks(job_id, Query(offset=offset, follow=follow)):
            yield chunk.offset, chunk.data

    async def chunks(self, job_id: str, query: Query) -> AsyncGenerator[Chunk, None]:
        """:class:`~jobworker.outlog.Chunk` s of one view of the job's output (both streams,
        or ``query.view`` alone), each with its stream and the time the daemon received it,
        from ``query.offset``, the last ``query.tail`` lines or ``query.since_us``. Resume in
        the same view with ``offset`` after the last byte received."""
        call = self._stub.Logs(convert.logs_request_to_pb(job_id, query))
        self._streams.add(call)
        try:
            async for msg in call:
                yield convert.chunk_from_pb(msg)
        except grpc.RpcError as e:
            raise _translate(e, job_id) from None
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if self._closed and not (task and task.cancelling()):
                raise RemoteError("CANCELLED", "the client was closed") from None
            raise
        finally:
            self._streams.discard(call)
            call.cancel()

    async def copy_output(
        self,
        job_id: str,
        *,
        follow: bool = False,
        offset: int = 0,
        stdout: BinaryIO | None = None,
        stderr: BinaryIO | None = None,
    ) -> int:
        """Write the job's stdout to ``stdout`` and its stderr to ``stderr`` (default: this
        process's), in the order received, from ``offset`` in the merged view; returns the
        offset after the last byte written (to resume from after a broken connection)."""
        out = stdout if stdout is not None else sys.stdout.buffer
        err = stderr if stderr is not None else sys.stderr.buffer
        async for chunk in self.chunks(job_id, Query(offset=offset, follow=follow)):
            f = err if chunk.stream is Stream.STDERR else out
            f.write(chunk.data)
            f.flush()
            offset = chunk.offset + len(chunk.data)
        return offset

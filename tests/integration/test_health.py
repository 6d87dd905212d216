"""The standard gRPC services next to jobworker.v1.JobWorker, behind the same mutual TLS:
grpc.health.v1.Health (SERVING while up, NOT_SERVING from the start of shutdown) and server
reflection."""

from __future__ import annotations

# isort: off
from jobworker.server import service
import grpc

# isort: on
import asyncio
from pathlib import Path

from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from jobworker.server.daemon import Daemon
from jobworker.spec import JobState
from tests.conftest import wait_for
from tests.integration import daemon_harness as harness

pki_dir, daemon, connect = harness.pki_dir, harness.daemon, harness.connect
Connect = harness.Connect
channel = harness.channel
forged_cert = harness.forged_cert

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def _channel(port: int, pki: Path, user: str) -> grpc.aio.Channel:
    return channel(
        port,
        (pki / "ca.pem").read_bytes(),
        (pki / f"{user}-key.pem").read_bytes(),
        (pki / f"{user}.pem").read_bytes(),
    )


async def _check(ch: grpc.aio.Channel, name: str = "") -> int:
    stub = health_pb2_grpc.HealthStub(ch)
    response = await stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=10)
    return int(response.status)


async def test_health_serving_for_any_role(daemon: Daemon, pki_dir: Path, tmp_path: Path) -> None:
    for user in ("root", "alice", "vera"):
        async with _channel(daemon.port, pki_dir, user) as ch:
            assert await _check(ch) == SERVING
            assert await _check(ch, service.SERVICE) == SERVING
    # A certificate of the CA without a role may ask too (JobWorker would refuse it).
    cert, key = forged_cert(pki_dir, tmp_path, "norole", "staff")
    ca = (pki_dir / "ca.pem").read_bytes()
    async with channel(daemon.port, ca, key.read_bytes(), cert.read_bytes()) as ch:
        assert await _check(ch) == SERVING


async def test_health_needs_a_client_certificate(daemon: Daemon, pki_dir: Path) -> None:
    async with channel(daemon.port, (pki_dir / "ca.pem").read_bytes(), None, None) as ch:
        try:
            await _check(ch)
        except grpc.aio.AioRpcError as e:
            assert e.code() is grpc.StatusCode.UNAVAILABLE
        else:
            raise AssertionError("health answered a client without a certificate")


async def test_not_serving_as_soon_as_shutdown_begins(
    daemon: Daemon, connect: Connect, pki_dir: Path
) -> None:
    """While close() waits out the grace of a job that ignores SIGTERM, Check answers
    NOT_SERVING and new JobWorker calls are UNAVAILABLE; then the server goes away."""
    alice = connect("alice")
    job = await alice.start(["sh", "-c", "trap '' TERM; echo ready; while :; do sleep 0.05; done"])
    await wait_for(
        lambda: daemon.manager.status(job.id).output_bytes > 0, what="the job to trap TERM"
    )
    async with _channel(daemon.port, pki_dir, "vera") as ch:
        assert await _check(ch) == SERVING
        closing = asyncio.create_task(daemon.close())
        try:
            deadline = asyncio.get_running_loop().time() + 10
            while await _check(ch) != NOT_SERVING:
                assert asyncio.get_running_loop().time() < deadline, "never NOT_SERVING"
            assert not closing.done(), "shutdown ended before NOT_SERVING was seen"
            assert await _check(ch, service.SERVICE) == NOT_SERVING
            try:
                await alice.status(job.id)
            except Exception as e:
                assert "shutting down" in str(e), e
            else:
                raise AssertionError("a JobWorker call was served during shutdown")
        finally:
            await closing
    assert daemon.manager.status(job.id).state is not JobState.RUNNING


async def test_reflection_lists_the_services(daemon: Daemon, pki_dir: Path) -> None:
    # The descriptor database is a blocking client: it gets a sync channel, in a thread.
    ca = (pki_dir / "ca.pem").read_bytes()
    creds = grpc.ssl_channel_credentials(
        ca, (pki_dir / "vera-key.pem").read_bytes(), (pki_dir / "vera.pem").read_bytes()
    )

    def services() -> tuple[list[str], list[str]]:
        with grpc.secure_channel(f"127.0.0.1:{daemon.port}", creds) as sync:
            db = ProtoReflectionDescriptorDatabase(sync)
            names = list(db.get_services())
            methods = [
                m.name for m in db.FindFileContainingSymbol(service.SERVICE).service[0].method
            ]
            return names, methods

    names, methods = await asyncio.to_thread(services)
    assert service.SERVICE in names
    assert service.HEALTH_SERVICE in names
    assert {"Start", "Stop", "Status", "List", "Logs", "Wait", "Remove"} <= set(methods)

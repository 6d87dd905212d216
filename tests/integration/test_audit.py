"""The audit log: one line per RPC at INFO on ``jobworker.audit`` with the peer, the identity
and role, the method, the job id, the status code and the duration, refused calls too."""

from __future__ import annotations

# isort: off
from jobworker.server import service
import grpc

# isort: on
import json
import logging
from pathlib import Path

import pytest

from jobworker.api.proto import pb, pb_grpc
from jobworker.client import Client
from jobworker.errors import JobNotFound, PermissionDenied
from jobworker.server.daemon import Daemon
from jobworker.server.logs import AUDIT_FIELDS, AUDIT_LOGGER
from tests.integration import daemon_harness as harness

pki_dir, daemon, connect = harness.pki_dir, harness.daemon, harness.connect
Connect = harness.Connect
channel = harness.channel
forged_cert = harness.forged_cert
start_workerd = harness.start_workerd

assert service  # imported first for its TLS setting


def _audits(caplog: pytest.LogCaptureFixture) -> list[dict[str, object]]:
    return [
        r.audit  # type: ignore[attr-defined]
        for r in caplog.records
        if r.name == AUDIT_LOGGER and r.levelno == logging.INFO
    ]


async def _unauthenticated_call(port: int, pki: Path, tmp_path: Path) -> None:
    """A Status call with a certificate of the CA that names no role."""
    cert, key = forged_cert(pki, tmp_path, "norole", "staff")
    ca = (pki / "ca.pem").read_bytes()
    async with channel(port, ca, key.read_bytes(), cert.read_bytes()) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await pb_grpc.JobWorkerStub(ch).Status(pb.StatusRequest(id="x"), timeout=10)
        assert e.value.code() is grpc.StatusCode.UNAUTHENTICATED


async def test_audit_lines_in_process(
    daemon: Daemon,
    connect: Connect,
    pki_dir: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger=AUDIT_LOGGER)
    job = await connect("alice").start(["true"])
    with pytest.raises(PermissionDenied):
        await connect("vera").stop(job.id)
    await _unauthenticated_call(daemon.port, pki_dir, tmp_path)

    audits = _audits(caplog)
    assert all(set(a) == set(AUDIT_FIELDS) for a in audits), audits
    start = [a for a in audits if a["method"] == "Start"]
    assert len(start) == 1, audits
    assert start[0] | {"peer": None, "duration_ms": None} == {
        "method": "Start",
        "code": "OK",
        "identity": "alice",
        "role": "user",
        "job": job.id,
        "peer": None,
        "duration_ms": None,
    }
    assert str(start[0]["peer"]).startswith("ipv4:127.0.0.1:")
    assert isinstance(start[0]["duration_ms"], float) and start[0]["duration_ms"] >= 0
    stop = [a for a in audits if a["method"] == "Stop"]
    assert [(a["code"], a["identity"], a["role"], a["job"]) for a in stop] == [
        ("PERMISSION_DENIED", "vera", "viewer", job.id)
    ]
    status = [a for a in audits if a["method"] == "Status"]
    assert [(a["code"], a["identity"], a["role"]) for a in status] == [
        ("UNAUTHENTICATED", "-", "-")
    ]
    # The text line carries the same fields as key=value, one line each.
    lines = [r.getMessage() for r in caplog.records if r.name == AUDIT_LOGGER]
    assert any(
        "method=Stop code=PERMISSION_DENIED" in line and f"job={job.id}" in line for line in lines
    ), lines
    assert all("\n" not in line for line in lines)


async def test_audit_escapes_the_job_id(
    daemon: Daemon, connect: Connect, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=AUDIT_LOGGER)
    with pytest.raises(JobNotFound):
        await connect("alice").status("evil\nmethod=Start code=OK")
    (line,) = [a for a in _audits(caplog) if a["method"] == "Status"]
    assert line["code"] == "NOT_FOUND"
    assert line["job"] == "evil\\nmethod=Start code=OK"


async def test_audit_json_from_workerd(tmp_path: Path, pki_dir: Path, cgroup_name: str) -> None:
    async with start_workerd(tmp_path, pki_dir, cgroup_name, "--log-format", "json") as w:
        alice = Client.from_pki(w.address, pki_dir, "alice")
        vera = Client.from_pki(w.address, pki_dir, "vera")
        try:
            job = await alice.start(["true"])
            with pytest.raises(PermissionDenied):
                await vera.stop(job.id)
            await _unauthenticated_call(w.port, pki_dir, tmp_path)
        finally:
            await alice.close()
            await vera.close()
        w.proc.terminate()
        assert await w.proc.wait() == 0
    records = []
    for line in w.log.read_text().splitlines():
        if line.startswith("{"):
            records.append(json.loads(line))
        else:
            # grpc's C core writes on stderr too (the TLS self-probe's refusal): never ours.
            assert "jobworker" not in line, line
    assert records and all({"time", "level", "logger", "message"} <= set(r) for r in records)
    audits = [r for r in records if r["logger"] == AUDIT_LOGGER]
    got = {(r["method"], r["code"], r["identity"], r["role"], r["job"]) for r in audits}
    assert got == {
        ("Start", "OK", "alice", "user", job.id),
        ("Stop", "PERMISSION_DENIED", "vera", "viewer", job.id),
        ("Status", "UNAUTHENTICATED", "-", "-", "-"),
    }, audits
    assert all(r["level"] == "INFO" and r["peer"].startswith("ipv4:127.0.0.1:") for r in audits)

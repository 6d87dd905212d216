"""Authorization over the wire: the whole role x own/other x RPC matrix as one parametrized
test, identities that cannot be spoofed with metadata, and certificates without a role.

The expected outcomes are written out here independently of
:data:`jobworker.server.authz.MATRIX`, so a wrong entry in the code's table fails this test."""

from __future__ import annotations

# isort: off
from tests.integration import daemon_harness as harness
import grpc

# isort: on
import logging
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from jobworker import JobSpec, JobState
from jobworker.api.proto import pb, pb_grpc
from jobworker.client import Client
from jobworker.client.pki import load_ca
from jobworker.errors import JobNotFound, JobworkerError, PermissionDenied, Unauthenticated
from jobworker.server.daemon import Daemon, serve
from tests.conftest import cgroup2_usable, wait_for

pki_dir, daemon, connect = harness.pki_dir, harness.daemon, harness.connect
Connect = harness.Connect

OK, HIDDEN, DENIED = "ok", "NOT_FOUND", "PERMISSION_DENIED"
CALLER = {"admin": "root", "user": "alice", "viewer": "vera"}
"""The pki fixture's identity for each role."""

EXPECTED: dict[str, dict[str, dict[str, str]]] = {
    #        whose job -> RPC -> outcome
    "admin": {
        "own": {"stop": OK, "status": OK, "logs": OK, "wait": OK, "list": OK, "attach": OK},
        "other": {"stop": OK, "status": OK, "logs": OK, "wait": OK, "list": OK, "attach": OK},
        "none": {"start": OK},
    },
    "user": {
        "own": {"stop": OK, "status": OK, "logs": OK, "wait": OK, "list": OK, "attach": OK},
        "other": {
            "stop": HIDDEN,
            "status": HIDDEN,
            "logs": HIDDEN,
            "wait": HIDDEN,
            "list": HIDDEN,
            "attach": HIDDEN,
        },
        "none": {"start": OK},
    },
    "viewer": {
        "own": {"stop": DENIED, "status": OK, "logs": OK, "wait": OK, "list": OK, "attach": DENIED},
        "other": {
            "stop": DENIED,
            "status": OK,
            "logs": OK,
            "wait": OK,
            "list": OK,
            "attach": DENIED,
        },
        "none": {"start": DENIED},
    },
}
CASES = [
    (role, whose, rpc, outcome)
    for role, by_owner in EXPECTED.items()
    for whose, by_rpc in by_owner.items()
    for rpc, outcome in by_rpc.items()
]


def outcome_of(e: JobworkerError | None) -> str:
    if e is None:
        return OK
    if isinstance(e, JobNotFound):
        return HIDDEN
    if isinstance(e, PermissionDenied):
        return DENIED
    raise e


@pytest.mark.parametrize(
    ("role", "whose", "rpc", "expected"), CASES, ids=["-".join(c) for c in CASES]
)
async def test_authorization_matrix(
    daemon: Daemon, connect: Connect, role: str, whose: str, rpc: str, expected: str
) -> None:
    caller = CALLER[role]
    client = connect(caller)
    # The job is made through the library so that every role, even viewer, can own one.
    owner = {"own": caller, "other": "bob", "none": "bob"}[whose]
    if rpc == "stop":
        # Still running when the stop is tried, so that "untouched" below means something.
        argv: tuple[str, ...] = ("sh", "-c", "echo output; exec sleep 1000")
        job = await daemon.manager.start(JobSpec(argv=argv, owner=owner))
        await wait_for(lambda: daemon.manager.status(job.id).output_bytes == 7, what="output")
    elif rpc == "attach":  # running, reading its stdin
        job = await daemon.manager.start(JobSpec(argv=("cat",), owner=owner, stdin=True))
    else:
        job = await daemon.manager.start(JobSpec(argv=("echo", "output"), owner=owner))
        await daemon.manager.wait(job.id)
    error: JobworkerError | None = None
    try:
        if rpc == "start":
            st = await client.start(["true"])
            assert st.owner == caller
        elif rpc == "stop":
            stopped = await client.stop(job.id)
            assert (stopped.id, stopped.state) == (job.id, JobState.STOPPED)
        elif rpc == "status":
            assert (await client.status(job.id)).owner == owner
        elif rpc == "logs":
            assert [c async for c in client.logs(job.id)] == [(0, b"output\n")]
        elif rpc == "wait":
            assert (await client.wait(job.id)).exit_code == 0
        elif rpc == "list":
            listed = [j.id for j in await client.list(all=True)]
            assert listed.count(job.id) == (1 if expected == OK else 0)
        elif rpc == "attach":
            async with await client.attach(job.id) as typing:
                assert await typing.write(b"typed\n")
                await typing.close_stdin()
            await daemon.manager.wait(job.id)
            assert b"".join([c async for c in daemon.manager.output(job.id)]) == b"typed\n"
        else:
            raise AssertionError(rpc)
    except (JobNotFound, PermissionDenied) as e:
        error = e
    if rpc == "list":
        return  # the assertion above is the outcome: listed or not
    assert outcome_of(error) == expected
    if expected == HIDDEN:
        # Exactly what a job that does not exist answers: its existence is not revealed.
        assert str(error) == str(JobNotFound(job.id))
    if expected == DENIED:
        action = "type into" if rpc == "attach" else rpc
        assert f"{caller} (role {role}) may not {action}" in str(error)
    if rpc == "attach" and expected != OK:  # nothing reached the job
        assert daemon.manager.status(job.id).output_bytes == 0
        await daemon.manager.stop(job.id, grace=0)
    if rpc == "stop" and expected != OK:
        untouched = daemon.manager.status(job.id)  # the forbidden stop did nothing
        assert (untouched.state, untouched.reason) == (JobState.RUNNING, "")
        assert (await daemon.manager.stop(job.id)).state is JobState.STOPPED


SPOOF = (
    ("x509_common_name", "alice"),
    ("x509_subject", "CN=alice,OU=admin,O=jobworker"),
    ("x-jobworker-identity", "alice"),
    ("x-jobworker-role", "admin"),
    ("owner", "alice"),
    ("role", "admin"),
    ("authorization", "Bearer admin"),
)


async def test_metadata_cannot_change_the_identity(
    daemon: Daemon, pki_dir: Path, tmp_path: Path
) -> None:
    job = await daemon.manager.start(
        JobSpec(
            argv=(
                "sh",
                "-c",
                'while [ ! -e "$1" ]; do sleep 0.01; done',
                "sh",
                str(tmp_path / "g"),
            ),
            owner="alice",
        )
    )
    ca, key, cert = ((pki_dir / n).read_bytes() for n in ("ca.pem", "bob-key.pem", "bob.pem"))
    ch = harness.channel(daemon.port, ca, key, cert)
    stub = pb_grpc.JobWorkerStub(ch)
    try:
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await stub.Stop(pb.StopRequest(id=job.id), metadata=SPOOF)
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await stub.Status(pb.StatusRequest(id=job.id), metadata=SPOOF)
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
        listed = await stub.List(pb.ListRequest(all=True), metadata=SPOOF)
        assert [j.id for j in listed.jobs] == []
        started = await stub.Start(pb.StartRequest(argv=["true"]), metadata=SPOOF)
        assert started.status.owner == "bob"
    finally:
        await ch.close(None)
    assert daemon.manager.status(job.id).state.value == "running"
    (tmp_path / "g").touch()
    await daemon.manager.wait(job.id)


def roleless_cert(pki: Path, out: Path) -> tuple[Path, Path]:
    """A certificate from the right CA, for clientAuth, but naming no role."""
    ca_cert, ca_key = load_ca(pki)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "nobody")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now.replace(year=now.year - 1))
        .not_valid_after(now.replace(year=now.year + 1))
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    cert_path, key_path = out / "nobody.pem", out / "nobody-key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


async def test_certificate_without_a_role_is_unauthenticated(
    daemon: Daemon, pki_dir: Path, tmp_path: Path
) -> None:
    cert, key = roleless_cert(pki_dir, tmp_path)
    async with Client.from_files(f"127.0.0.1:{daemon.port}", pki_dir / "ca.pem", cert, key) as c:
        with pytest.raises(Unauthenticated, match="must name exactly one role"):
            await c.list()
        with pytest.raises(Unauthenticated):
            await c.start(["true"])
    assert daemon.manager.list() == []


async def test_policy_file_gives_a_role(tmp_path: Path, pki_dir: Path, cgroup_name: str) -> None:
    if reason := cgroup2_usable():
        pytest.skip(reason)
    cert, key = roleless_cert(pki_dir, tmp_path)
    policy = tmp_path / "policy.toml"
    policy.write_text('[roles]\nnobody = "viewer"\nalice = "viewer"\n')
    d = await serve(
        harness.make_config(tmp_path / "state", pki_dir, cgroup_name, policy_file=policy)
    )
    try:
        address = f"127.0.0.1:{d.port}"
        async with Client.from_files(address, pki_dir / "ca.pem", cert, key) as nobody:
            assert await nobody.list(all=True) == []
        async with Client.from_pki(address, pki_dir, "alice") as alice:
            with pytest.raises(PermissionDenied, match=r"alice \(role viewer\) may not start"):
                await alice.start(["true"])
    finally:
        await d.close()


@pytest.mark.parametrize("name", ["admin", "viewer", "user", "server"])
async def test_certificate_named_like_a_role_is_unauthenticated(
    daemon: Daemon, pki_dir: Path, tmp_path: Path, name: str
) -> None:
    """A CN "admin" with OU user, from the daemon's own CA: its name would read as a role in
    the policy file, so it is no identity at all."""
    cert, key = harness.forged_cert(pki_dir, tmp_path, name, "user")
    async with Client.from_files(f"127.0.0.1:{daemon.port}", pki_dir / "ca.pem", cert, key) as c:
        with pytest.raises(Unauthenticated, match=f"common name '{name}' is a reserved name"):
            await c.start(["true"])
        with pytest.raises(Unauthenticated):
            await c.list()
    assert daemon.manager.list() == []
    # the control: the same kind of certificate with another name is an identity
    ok_cert, ok_key = harness.forged_cert(pki_dir, tmp_path / "ok", f"{name}1", "user")
    address = f"127.0.0.1:{daemon.port}"
    async with Client.from_files(address, pki_dir / "ca.pem", ok_cert, ok_key) as c:
        assert (await c.start(["true"])).owner == f"{name}1"


async def test_a_common_name_cannot_forge_log_lines(
    daemon: Daemon, pki_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    forged = "mallory\nINFO jobworker.server.service: job x started by root"
    cert, key = harness.forged_cert(pki_dir, tmp_path, forged, "user")
    address = f"127.0.0.1:{daemon.port}"
    with caplog.at_level(logging.DEBUG):
        async with Client.from_files(address, pki_dir / "ca.pem", cert, key) as c:
            st = await c.start(["echo", "two\nlines"])
    assert st.owner == forged  # the identity itself is kept as it is
    started = [r.getMessage() for r in caplog.records if f"job {st.id} started" in r.getMessage()]
    assert started == [
        f"job {st.id} started by mallory\\nINFO "
        "jobworker.server.service: job x started by root: ['echo', 'two\\nlines']"
    ]
    assert all("\n" not in r.getMessage() for r in caplog.records if r.name.startswith("jobworker"))

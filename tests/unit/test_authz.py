"""authz: identity from the verified certificate, the matrix, the policy file."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from jobworker.client.pki import init_pki, load_ca, make_ca
from jobworker.errors import InvalidArgument, JobNotFound, PermissionDenied, Unauthenticated
from jobworker.identity import Role
from jobworker.server.authz import (
    MATRIX,
    Action,
    Decision,
    Identity,
    Policy,
    authorize,
    identity_from_auth_context,
    identity_from_certificate,
    visible,
)

NOW = datetime.now(UTC)


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    init_pki(d, [("alice", "user")])
    return d


def custom_cert(
    ca: Path,
    attrs: list[tuple[x509.ObjectIdentifier, str]],
    eku: list[x509.ObjectIdentifier] | None = None,
) -> bytes:
    """A certificate with an arbitrary subject, as another CA might issue."""
    ca_cert, ca_key = load_ca(ca)
    _, key = make_ca(NOW)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(oid, v) for oid, v in attrs]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW)
        .not_valid_after(NOW.replace(year=NOW.year + 1))
    )
    if eku is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage(eku), critical=False)
    return builder.sign(ca_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def test_matrix_covers_every_role_and_action() -> None:
    assert set(MATRIX) == set(itertools.product(Role, Action))


def test_start_does_not_depend_on_a_job() -> None:
    for role in Role:
        own, other = MATRIX[role, Action.START]
        assert own == other


def test_admin_may_do_everything() -> None:
    assert all(MATRIX[Role.ADMIN, a] == (Decision.ALLOW, Decision.ALLOW) for a in Action)


def test_authorize_hidden_job_is_not_found() -> None:
    alice = Identity("alice", Role.USER)
    authorize(alice, Action.STOP, "j1", "alice")
    with pytest.raises(JobNotFound) as e:
        authorize(alice, Action.STOP, "j1", "bob")
    assert e.value.job_id == "j1"
    assert str(e.value) == str(JobNotFound("j1"))


def test_authorize_denied_names_who_and_what() -> None:
    viewer = Identity("vic", Role.VIEWER)
    with pytest.raises(PermissionDenied, match=r"vic \(role viewer\) may not stop job j1"):
        authorize(viewer, Action.STOP, "j1", "bob")
    with pytest.raises(PermissionDenied, match="may not start jobs"):
        authorize(viewer, Action.START)


def test_visible() -> None:
    assert visible(Identity("alice", Role.USER), "alice")
    assert not visible(Identity("alice", Role.USER), "bob")
    assert visible(Identity("vic", Role.VIEWER), "bob")
    assert visible(Identity("root", Role.ADMIN), "bob")


def test_identity_from_pki_certificate(ca: Path) -> None:
    pem = (ca / "alice.pem").read_bytes()
    assert identity_from_certificate(pem) == Identity("alice", Role.USER)


def test_policy_overrides_certificate_role(ca: Path, tmp_path: Path) -> None:
    policy_file = tmp_path / "policy.toml"
    policy_file.write_text('[roles]\nalice = "viewer"\nbob = "admin"\n')
    policy = Policy.load(policy_file)
    pem = (ca / "alice.pem").read_bytes()
    assert identity_from_certificate(pem, policy) == Identity("alice", Role.VIEWER)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[roles]\nalice = "root"\n', "role 'root' for 'alice'"),
        ("roles = 3\n", r"\[roles\] must be a table"),
        ("[roles\n", "policy file"),
    ],
)
def test_bad_policy_file(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "policy.toml"
    path.write_text(text)
    with pytest.raises(InvalidArgument, match=message):
        Policy.load(path)


@pytest.mark.parametrize(
    ("attrs", "eku", "message"),
    [
        ([(NameOID.ORGANIZATIONAL_UNIT_NAME, "user")], None, "exactly one common name"),
        ([(NameOID.COMMON_NAME, "x")], None, "exactly one role"),
        (
            [
                (NameOID.COMMON_NAME, "x"),
                (NameOID.ORGANIZATIONAL_UNIT_NAME, "user"),
                (NameOID.ORGANIZATIONAL_UNIT_NAME, "admin"),
            ],
            None,
            "exactly one role",
        ),
        (
            [(NameOID.COMMON_NAME, "x"), (NameOID.ORGANIZATIONAL_UNIT_NAME, "admin")],
            [ExtendedKeyUsageOID.SERVER_AUTH],
            "not for client authentication",
        ),
    ],
)
def test_unusable_certificates(
    ca: Path,
    attrs: list[tuple[x509.ObjectIdentifier, str]],
    eku: list[x509.ObjectIdentifier] | None,
    message: str,
) -> None:
    with pytest.raises(Unauthenticated, match=message):
        identity_from_certificate(custom_cert(ca, attrs, eku))


def test_other_units_are_ignored(ca: Path) -> None:
    pem = custom_cert(
        ca,
        [
            (NameOID.COMMON_NAME, "x"),
            (NameOID.ORGANIZATIONAL_UNIT_NAME, "engineering"),
            (NameOID.ORGANIZATIONAL_UNIT_NAME, "viewer"),
        ],
        [ExtendedKeyUsageOID.CLIENT_AUTH],
    )
    assert identity_from_certificate(pem) == Identity("x", Role.VIEWER)


def test_auth_context(ca: Path) -> None:
    pem = (ca / "alice.pem").read_bytes()
    ctx = {
        "transport_security_type": [b"ssl"],
        "x509_common_name": [b"mallory"],
        "x509_pem_cert": [pem],
    }
    assert identity_from_auth_context(ctx) == Identity("alice", Role.USER)
    with pytest.raises(Unauthenticated, match="not TLS"):
        identity_from_auth_context({"transport_security_type": [b"insecure"]})
    with pytest.raises(Unauthenticated, match="no verified client certificate"):
        identity_from_auth_context({"transport_security_type": [b"ssl"]})

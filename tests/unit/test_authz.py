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
from jobworker.identity import RESERVED_NAMES, Role
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
        ('[roles]\nadmin = "viewer"\n', "'admin' is a reserved name"),
        ('[run-as.roles]\nadmin = "root"\n', "unknown entry 'run-as'"),
        ('[run_as.roles]\nops = "root"\n', r"\[run_as.roles\] 'ops' is not a role"),
        ('[run_as.roles]\nadmin = ""\n', r"\[run_as.roles\] admin: the account must be"),
        ('[run_as.identities]\nalice = " "\n', "alice: the account must be a non-empty"),
        ("[run_as.identities]\nalice = 0\n", "alice: the account must be a non-empty"),
        (
            '[run_as.identities]\nadmin = "root"\n',
            r"'admin' is a reserved name.*goes in \[run_as.roles\]",
        ),
        ('run_as = "root"\n', "must hold the tables"),
        ('[run_as]\nroles = "x"\n', "flat"),
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


def test_run_as_tables_keep_names_and_roles_apart(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    path.write_text(
        '[roles]\nbob = "admin"\n'
        '[run_as.roles]\nadmin = "root"\nuser = "nobody"\n'
        '[run_as.identities]\nalice = "alice:staff"\nuser1 = "daemon"\n'
    )
    policy = Policy.load(path)
    assert policy.account_for(Identity("alice", Role.USER)) == "alice:staff"
    assert policy.account_for(Identity("alice", Role.ADMIN)) == "alice:staff"  # name first
    assert policy.account_for(Identity("bob", Role.ADMIN)) == "root"
    assert policy.account_for(Identity("carol", Role.USER)) == "nobody"
    assert policy.account_for(Identity("vera", Role.VIEWER)) is None  # the daemon decides
    assert policy.accounts() == {"root", "nobody", "alice:staff", "daemon"}


def test_flat_run_as_is_refused_with_its_rewrite(tmp_path: Path) -> None:
    """The old form mixed identities and roles in one table, so an identity named like a role
    was granted that role's account."""
    path = tmp_path / "policy.toml"
    path.write_text('[run_as]\nadmin = "root"\nalice = "alice:staff"\n')
    with pytest.raises(InvalidArgument) as e:
        Policy.load(path)
    message = str(e.value)
    assert "\n" not in message
    assert "[run_as.roles] admin = 'root'" in message
    assert "[run_as.identities] alice = 'alice:staff'" in message


def test_reserved_names_are_the_roles_ca_and_server() -> None:
    assert {"admin", "user", "viewer", "ca", "server"} == RESERVED_NAMES


@pytest.mark.parametrize("name", ["admin", "user", "viewer", "ca", "server", "Admin", "USER"])
def test_a_reserved_common_name_is_not_an_identity(ca: Path, name: str) -> None:
    pem = custom_cert(
        ca,
        [(NameOID.COMMON_NAME, name), (NameOID.ORGANIZATIONAL_UNIT_NAME, "user")],
        [ExtendedKeyUsageOID.CLIENT_AUTH],
    )
    with pytest.raises(Unauthenticated, match="reserved name"):
        identity_from_certificate(pem)
    # ... not even when a policy file names it
    with pytest.raises(Unauthenticated, match="reserved name"):
        identity_from_certificate(pem, Policy({name: Role.VIEWER}))


def test_policy_network_table(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    path.write_text('[network]\nhost = ["admin"]\n')
    assert Policy.load(path).host_network_roles == frozenset({Role.ADMIN})
    path.write_text("[roles]\n")
    assert Policy.load(path).host_network_roles is None
    for bad in ('[network]\nhost = ["root"]\n', '[network]\nhost = "admin"\n', "[network]\nx=1\n"):
        path.write_text(bad)
        with pytest.raises(InvalidArgument, match=r"\[network\]"):
            Policy.load(path)

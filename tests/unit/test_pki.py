"""pki: what `worker certs init` writes."""

from __future__ import annotations

import ipaddress
import os
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from jobworker.client.pki import (
    DEFAULT_USERS,
    CertPair,
    PkiError,
    init_pki,
    issue_client,
    load_ca,
    parse_user,
    write_pair,
)
from jobworker.identity import RESERVED_NAMES, Role
from jobworker.server.authz import identity_from_certificate

NOW = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)


def load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def eku(cert: x509.Certificate) -> list[x509.ObjectIdentifier]:
    return list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)


def test_defaults_make_ca_server_and_three_users(tmp_path: Path) -> None:
    pki = init_pki(tmp_path / "pki")
    names = sorted(p.name for p in (tmp_path / "pki").iterdir())
    assert names == sorted(
        f"{stem}{suffix}"
        for stem in ("ca", "server", "ops", "alice", "vera")
        for suffix in (".pem", "-key.pem")
    )
    roles = {n: identity_from_certificate(p.cert.read_bytes()).role for n, p in pki.users.items()}
    assert roles == {
        "ops": Role.ADMIN,
        "alice": Role.USER,
        "vera": Role.VIEWER,
    }


def test_keys_are_private_and_p256(tmp_path: Path) -> None:
    pki = init_pki(tmp_path, [("bob", "user")])
    for pair in (pki.ca, pki.server, pki.users["bob"]):
        assert stat.S_IMODE(pair.key.stat().st_mode) == 0o600
        key = load(pair.cert).public_key()
        assert isinstance(key, ec.EllipticCurvePublicKey)
        assert isinstance(key.curve, ec.SECP256R1)
    assert stat.S_IMODE(tmp_path.stat().st_mode) == 0o700


def test_server_certificate(tmp_path: Path) -> None:
    pki = init_pki(tmp_path, server_names=["worker1.example", "10.0.0.7"])
    cert = load(pki.server.cert)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost", "worker1.example"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
        ipaddress.ip_address("10.0.0.7"),
    ]
    assert eku(cert) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    cert.verify_directly_issued_by(load(pki.ca.cert))


def test_client_certificate_carries_name_role_and_client_auth(tmp_path: Path) -> None:
    pki = init_pki(tmp_path, [("bob", "viewer")], now=NOW)
    cert = load(pki.users["bob"].cert)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "bob"
    assert cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)[0].value == (
        "viewer"
    )
    assert eku(cert) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert cert.not_valid_before_utc < NOW < cert.not_valid_after_utc
    cert.verify_directly_issued_by(load(pki.ca.cert))


def test_injected_clock_makes_expired_certificates(tmp_path: Path) -> None:
    init_pki(tmp_path, [("a", "admin")])
    ca_cert, ca_key = load_ca(tmp_path)
    past = datetime.now(UTC) - timedelta(days=30)
    cert, key = issue_client(ca_cert, ca_key, "old", Role.USER, now=past, days=1)
    write_pair(tmp_path, "old", cert, key)
    assert load(tmp_path / "old.pem").not_valid_after_utc < datetime.now(UTC)


def test_rerun_reuses_the_ca_and_adds_users(tmp_path: Path) -> None:
    first = init_pki(tmp_path)
    ca_before = first.ca.cert.read_bytes()
    server_before = first.server.cert.read_bytes()
    second = init_pki(tmp_path, [("carol", "user")])
    assert second.ca.cert.read_bytes() == ca_before
    assert second.server.cert.read_bytes() == server_before
    assert list(second.users) == ["carol"]
    load(second.users["carol"].cert).verify_directly_issued_by(load(first.ca.cert))


def test_refuses_to_overwrite_without_force(tmp_path: Path) -> None:
    init_pki(tmp_path, [("bob", "user")])
    before = (tmp_path / "bob.pem").read_bytes()
    with pytest.raises(PkiError, match=r"bob\.pem already exists"):
        init_pki(tmp_path, [("bob", "admin")])
    assert (tmp_path / "bob.pem").read_bytes() == before
    forced = init_pki(tmp_path, [("bob", "admin")], force=True)
    assert identity_from_certificate(forced.users["bob"].cert.read_bytes()).role is Role.ADMIN


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("bob", "NAME:ROLE"),
        ("bob:root", "unknown role 'root'"),
        (":user", "user name ''"),
        ("../x:user", "user name"),
        ("ca:admin", "'ca' is reserved"),
        ("server:admin", "'server' is reserved"),
        ("admin:admin", "'admin' is reserved"),
        ("user:user", "'user' is reserved"),
        ("viewer:viewer", "'viewer' is reserved"),
        ("Viewer:user", "'Viewer' is reserved"),
    ],
)
def test_parse_user_rejects(text: str, message: str) -> None:
    with pytest.raises(PkiError, match=message):
        parse_user(text)


def test_parse_user() -> None:
    assert parse_user("bob:viewer") == ("bob", Role.VIEWER)


def test_invalid_request_writes_nothing(tmp_path: Path) -> None:
    with pytest.raises(PkiError):
        init_pki(tmp_path / "d", [("ok", "user"), ("bad", "root")])
    assert not (tmp_path / "d").exists()
    with pytest.raises(PkiError, match="more than once"):
        init_pki(tmp_path / "d", [("a", "user"), ("a", "admin")])
    assert not (tmp_path / "d").exists()


def test_certpair_paths(tmp_path: Path) -> None:
    pki = init_pki(tmp_path, [("bob", "user")])
    assert pki.users["bob"] == CertPair(tmp_path / "bob.pem", tmp_path / "bob-key.pem")


def test_default_users_are_not_reserved_names() -> None:
    assert [n for n, _ in DEFAULT_USERS] == ["ops", "alice", "vera"]
    assert not {n for n, _ in DEFAULT_USERS} & RESERVED_NAMES


def test_reserved_name_writes_nothing(tmp_path: Path) -> None:
    with pytest.raises(PkiError, match="'admin' is reserved"):
        init_pki(tmp_path / "d", [("admin", "admin")])
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize("left", ["ca.pem", "ca-key.pem"])
def test_half_a_ca_is_not_replaced(tmp_path: Path, left: str) -> None:
    """A directory whose CA key was moved offline (the README says to) must not silently get a
    new CA: every certificate already given out would stop working, and users added then would
    belong to another CA."""
    init_pki(tmp_path, [("bob", "user")])
    other = "ca-key.pem" if left == "ca.pem" else "ca.pem"
    before = (tmp_path / left).read_bytes()
    # What a user's ~/.config/jobworker/pki holds: ca.pem and their own pair, no server files.
    for name in (other, "server.pem", "server-key.pem"):
        (tmp_path / name).unlink()
    with pytest.raises(PkiError, match=f"has {left} but no {other}"):
        init_pki(tmp_path, [("carol", "user")])
    assert (tmp_path / left).read_bytes() == before
    assert not (tmp_path / other).exists() and not (tmp_path / "carol.pem").exists()
    forced = init_pki(tmp_path, [("carol", "user")], force=True)  # starting over is explicit
    assert forced.ca.key.exists() and (tmp_path / left).read_bytes() != before


@pytest.mark.parametrize("stem", ["carol-key", "carol", "ca-key", "server-key"])
def test_a_dangling_symlink_is_never_followed(tmp_path: Path, stem: str) -> None:
    directory = tmp_path / "pki"
    directory.mkdir(mode=0o700)
    outside = tmp_path / "outside" / "stolen.pem"
    outside.parent.mkdir()
    (directory / f"{stem}.pem").symlink_to(outside)
    # ca-key.pem alone: refused as half a CA, before it could be written through
    with pytest.raises(PkiError, match=f"{stem}.pem already exists|has ca-key.pem but no"):
        init_pki(directory, [("carol", "user")])
    assert not outside.exists()
    init_pki(directory, [("carol", "user")], force=True)  # replaces the link, not its target
    assert not outside.exists()
    assert not (directory / f"{stem}.pem").is_symlink()
    assert stat.S_IMODE((directory / "carol-key.pem").stat().st_mode) == 0o600


def test_a_symlink_planted_after_the_checks_is_not_followed(tmp_path: Path) -> None:
    """The write itself refuses a link (O_EXCL|O_NOFOLLOW), not only the check before it."""
    init_pki(tmp_path, [("bob", "user")])
    ca_cert, ca_key = load_ca(tmp_path)
    outside = tmp_path.parent / f"{tmp_path.name}-outside.pem"
    (tmp_path / "late-key.pem").symlink_to(outside)
    with pytest.raises(PkiError, match=r"late-key\.pem already exists"):
        write_pair(tmp_path, "late", *issue_client(ca_cert, ca_key, "late", Role.USER))
    assert not outside.exists()


@pytest.mark.parametrize("mode", [0o770, 0o702, 0o777, 0o1777])
def test_a_directory_others_can_write_is_refused(tmp_path: Path, mode: int) -> None:
    directory = tmp_path / "pki"
    directory.mkdir()
    directory.chmod(mode)
    with pytest.raises(PkiError, match="writable by its group or others"):
        init_pki(directory, [("bob", "user")])
    assert list(directory.iterdir()) == []
    assert stat.S_IMODE(directory.stat().st_mode) == mode


def test_a_directory_of_another_user_is_refused(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to give the directory away")
    directory = tmp_path / "pki"
    directory.mkdir(mode=0o700)
    os.chown(directory, 65534, 65534)
    with pytest.raises(PkiError, match="belongs to uid 65534, not to you"):
        init_pki(directory, [("bob", "user")])
    assert list(directory.iterdir()) == []


def test_leaf_certificates_last_90_days_and_the_ca_ten_years(tmp_path: Path) -> None:
    pki = init_pki(tmp_path / "pki", [("bob", "user")], now=NOW)
    lifetimes = {
        stem: load(pair.cert).not_valid_after_utc - NOW
        for stem, pair in (("ca", pki.ca), ("server", pki.server), ("bob", pki.users["bob"]))
    }
    assert lifetimes == {
        "ca": timedelta(days=3650),
        "server": timedelta(days=90),
        "bob": timedelta(days=90),
    }

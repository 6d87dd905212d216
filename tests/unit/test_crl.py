"""CRLs: what `worker certs revoke` writes, what `worker certs renew` re-issues, and how the
daemon's :class:`Revocations` reads a CRL (refusing one its CA did not sign)."""

from __future__ import annotations

import os
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from jobworker.client.cli.certs import certs
from jobworker.client.cli.exits import CommandExit, Exit
from jobworker.client.pki import PkiError, init_pki, load_ca, renew, revoke
from jobworker.errors import InvalidArgument, Unauthenticated
from jobworker.identity import Role
from jobworker.server.authz import Revocations, identity_from_certificate, revocation_key

NOW = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)


@pytest.fixture
def pki(tmp_path: Path) -> Path:
    init_pki(tmp_path / "pki", [("alice", "user"), ("bob", "user"), ("vera", "viewer")], now=NOW)
    return tmp_path / "pki"


def crl_of(pki: Path) -> x509.CertificateRevocationList:
    return x509.load_pem_x509_crl((pki / "crl.pem").read_bytes())


def serial(path: Path) -> int:
    return x509.load_pem_x509_certificate(path.read_bytes()).serial_number


def test_revoke_writes_a_ca_signed_crl_and_keeps_earlier_serials(pki: Path) -> None:
    first = revoke(pki, "alice", now=NOW)
    assert (first.serial, first.already, first.count) == (serial(pki / "alice.pem"), False, 1)
    second = revoke(pki, "bob", now=NOW + timedelta(days=1))
    crl = crl_of(pki)
    ca_cert, _ = load_ca(pki)
    public = ca_cert.public_key()
    assert crl.is_signature_valid(public)  # type: ignore[arg-type]
    assert crl.issuer == ca_cert.subject
    assert {e.serial_number for e in crl} == {first.serial, second.serial}
    assert crl.next_update_utc == NOW + timedelta(days=31) == second.next_update
    assert crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number == 2
    assert stat.S_IMODE(os.stat(pki / "crl.pem").st_mode) == 0o644
    again = revoke(pki, "alice", now=NOW + timedelta(days=2))
    assert (again.already, again.count) == (True, 2)
    assert len(list(crl_of(pki))) == 2


def test_revoke_refuses_unknown_names_and_a_foreign_crl(pki: Path, tmp_path: Path) -> None:
    with pytest.raises(PkiError, match="does not exist"):
        revoke(pki, "nobody")
    with pytest.raises(PkiError, match="reserved"):
        revoke(pki, "ca")
    other = tmp_path / "other"
    init_pki(other, [("alice", "user")])
    revoke(other, "alice")
    (pki / "crl.pem").write_bytes((other / "crl.pem").read_bytes())
    with pytest.raises(PkiError, match="not signed by this directory's CA"):
        revoke(pki, "bob")


def test_revocations_refuse_listed_certificates_only(pki: Path) -> None:
    revoke(pki, "alice", now=NOW)
    ca = (pki / "ca.pem").read_bytes()
    revocations = Revocations.load(pki / "crl.pem", ca)
    alice, bob = ((pki / f"{n}.pem").read_bytes() for n in ("alice", "bob"))
    with pytest.raises(Unauthenticated, match="certificate revoked: alice's certificate"):
        revocations.check(revocation_key(alice), "alice")
    revocations.check(revocation_key(bob), "bob")
    assert revocations.next_update == NOW + timedelta(days=30)
    assert not revocations.stale(NOW + timedelta(days=29))
    assert revocations.stale(NOW + timedelta(days=31))
    der = crl_of(pki).public_bytes(serialization.Encoding.DER)
    (pki / "crl.der").write_bytes(der)
    assert Revocations.load(pki / "crl.der", ca).revoked == revocations.revoked


def test_revocations_refuse_a_crl_of_another_ca(pki: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    init_pki(other, [("alice", "user")])
    revoke(other, "alice")
    with pytest.raises(InvalidArgument, match="not signed by the daemon's CA"):
        Revocations.load(other / "crl.pem", (pki / "ca.pem").read_bytes())
    with pytest.raises(InvalidArgument, match="cannot read the CRL"):
        Revocations.load(tmp_path / "missing.pem", (pki / "ca.pem").read_bytes())
    (tmp_path / "junk.pem").write_text("-----BEGIN X509 CRL-----\nnope\n")
    with pytest.raises(InvalidArgument, match="is not a CRL"):
        Revocations.load(tmp_path / "junk.pem", (pki / "ca.pem").read_bytes())


def test_renew_keeps_name_and_role_with_a_new_key_and_serial(pki: Path) -> None:
    old_cert, old_key = (pki / "vera.pem").read_bytes(), (pki / "vera-key.pem").read_bytes()
    later = NOW + timedelta(days=80)
    pair = renew(pki, "vera", now=later)
    new = x509.load_pem_x509_certificate(pair.cert.read_bytes())
    assert identity_from_certificate(pair.cert.read_bytes()).role is Role.VIEWER
    assert new.serial_number != x509.load_pem_x509_certificate(old_cert).serial_number
    assert pair.key.read_bytes() != old_key
    assert new.not_valid_after_utc == later + timedelta(days=90)
    assert stat.S_IMODE(os.stat(pair.key).st_mode) == 0o600
    assert not [p.name for p in pki.iterdir() if p.name.startswith(".")], "no temporary left"


def test_renew_server_keeps_its_names(pki: Path) -> None:
    def names(path: Path) -> set[str]:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        return {str(n.value) for n in san}

    before = names(pki / "server.pem")
    renew(pki, "server")
    assert names(pki / "server.pem") == before == {"localhost", "127.0.0.1", "::1"}


def test_cli_revoke_and_renew(pki: Path) -> None:
    runner = CliRunner()
    out = runner.invoke(certs, ["revoke", "alice", "--dir", str(pki)])
    assert out.exit_code == 0, out.output
    assert f"alice (serial {serial(pki / 'alice.pem'):#x}) revoked" in out.output
    assert "SIGHUP" in out.output
    out = runner.invoke(certs, ["renew", "alice", "--dir", str(pki)])
    assert out.exit_code == 0, out.output
    assert "renewed" in out.output
    out = runner.invoke(certs, ["revoke", "nobody", "--dir", str(pki)])
    assert isinstance(out.exception, CommandExit)
    assert out.exception.code == Exit.CONFIG
    assert "nobody.pem does not exist" in out.exception.message

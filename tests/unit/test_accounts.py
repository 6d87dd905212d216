"""accounts: per-identity uids from the daemon's range, named accounts, the identities file."""

from __future__ import annotations

import grp
import json
import logging
import os
import pwd
import stat
from pathlib import Path

import pytest

from jobworker.errors import HostError, InvalidArgument, ResourceExhausted
from jobworker.server.accounts import (
    DEFAULT_UID_RANGE,
    IDENTITIES_FILE,
    Accounts,
    IdentityUids,
    UidRange,
    printable,
    subordinate_ranges,
)
from jobworker.spec import Credentials

NONE: tuple[Path, ...] = ()
"""No subordinate id files: the host's own must not change what these tests allocate."""


def free_range(size: int, start: int = 3_000_000) -> UidRange:
    """``size`` consecutive ids no user or group of this host has."""
    first = start
    while True:
        ids = range(first, first + size)
        if not any(_held(i) for i in ids):
            return UidRange(first, first + size - 1)
        first += size


def _held(uid: int) -> bool:
    try:
        pwd.getpwuid(uid)
    except KeyError:
        try:
            grp.getgrgid(uid)
        except KeyError:
            return False
    return True


def test_default_range_avoids_every_account_range() -> None:
    r = DEFAULT_UID_RANGE
    assert (r.first, r.last) == (524288, 589823)
    assert len(r) == 65536
    # system < 1000, regular users, nobody 65534, systemd's dynamic users 61184-65519
    assert r.first > 65535
    assert not any(_held(u) for u in (r.first, r.last))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("5", "FIRST-LAST"),
        ("a-b", "FIRST-LAST"),
        ("-5", "FIRST-LAST"),
        ("10-5", "1 <= FIRST <= LAST"),
        ("0-10", "1 <= FIRST"),
        ("65000-70000", "65534, 65535"),
        (f"1000-{2**31}", "LAST <="),
    ],
)
def test_bad_uid_ranges(text: str, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        UidRange.parse(text)


def test_uid_range_parse() -> None:
    assert UidRange.parse("524288-589823") == DEFAULT_UID_RANGE
    assert str(DEFAULT_UID_RANGE) == "524288-589823"


def test_each_identity_gets_its_own_uid_recorded_before_use(tmp_path: Path) -> None:
    r = free_range(8)
    uids = IdentityUids.open(tmp_path, r, NONE)
    alice = uids.credentials("alice")
    bob = uids.credentials("bob")
    assert alice == Credentials(uid=r.first, gid=r.first, groups=())
    assert bob == Credentials(uid=r.first + 1, gid=r.first + 1, groups=())
    assert uids.credentials("alice") == alice
    path = tmp_path / IDENTITIES_FILE
    assert json.loads(path.read_text()) == {
        "version": 1,
        "identities": {"alice": r.first, "bob": r.first + 1},
    }
    st = path.stat()
    assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == os.geteuid()
    assert sorted(p.name for p in tmp_path.iterdir()) == [IDENTITIES_FILE]  # no temp file left


def test_uids_are_stable_across_a_reopen_and_never_shared(tmp_path: Path) -> None:
    r = free_range(8)
    first = IdentityUids.open(tmp_path, r, NONE)
    given = {n: first.uid_for(n) for n in ("alice", "bob", "carol")}
    again = IdentityUids.open(tmp_path, r, NONE)
    assert {n: again.uid_for(n) for n in ("carol", "alice", "bob")} == given
    dave = again.uid_for("dave")
    assert dave not in given.values() and dave in r
    assert len(set(given.values()) | {dave}) == 4


def test_uids_held_by_the_account_database_or_subordinate_ranges_are_skipped(
    tmp_path: Path,
) -> None:
    # Root's uid 0 and nobody's gid are in the account database: a range over them (made
    # without the UidRange checks, which refuse 0 and 65534) must skip them.
    nobody = pwd.getpwnam("nobody").pw_uid
    r = object.__new__(UidRange)
    object.__setattr__(r, "first", nobody - 1)
    object.__setattr__(r, "last", nobody + 1)
    sub = tmp_path / "subuid"
    sub.write_text(f"someone:{nobody - 1}:1\n# comment\nbroken line\n")
    state = tmp_path / "state"
    state.mkdir()
    uids = IdentityUids.open(state, r, [sub, tmp_path / "no-such-subgid"])
    first = uids.uid_for("alice")
    expected = nobody + 1
    if _held(expected):
        pytest.skip(f"this host has an account or group with id {expected}")
    assert first == expected  # nobody - 1 is subordinate, nobody is nobody
    with pytest.raises(ResourceExhausted, match="no free uid left"):
        uids.uid_for("bob")
    assert uids.get("bob") is None
    assert json.loads((state / IDENTITIES_FILE).read_text())["identities"] == {"alice": first}


def test_subordinate_ranges(tmp_path: Path) -> None:
    f = tmp_path / "subuid"
    f.write_text("alice:100000:65536\nbob:165536:0\n1000:200000:10\n")
    assert subordinate_ranges([f]) == [(100000, 165535), (200000, 200009)]


def test_a_recorded_uid_now_held_by_an_account_stops_the_start(tmp_path: Path) -> None:
    nobody = pwd.getpwnam("nobody").pw_uid
    (tmp_path / IDENTITIES_FILE).write_text(
        json.dumps({"version": 1, "identities": {"alice\n": nobody}})
    )
    (tmp_path / IDENTITIES_FILE).chmod(0o600)
    with pytest.raises(HostError, match=r"'alice\\n' has uid \d+, which user 'nobody'"):
        IdentityUids.open(tmp_path, free_range(4), NONE)


@pytest.mark.parametrize(
    "content",
    [
        "not json",
        "[]",
        '{"version": 2, "identities": {}}',
        '{"version": 1, "identities": {"a": "1"}}',
        '{"version": 1, "identities": {"a": true}}',
        '{"version": 1, "identities": {"a": 0}}',
        '{"version": 1, "identities": {"a": 3000001, "b": 3000001}}',
    ],
)
def test_a_bad_identities_file_stops_the_start(tmp_path: Path, content: str) -> None:
    path = tmp_path / IDENTITIES_FILE
    path.write_text(content)
    path.chmod(0o600)
    with pytest.raises(HostError, match=IDENTITIES_FILE):
        IdentityUids.open(tmp_path, free_range(4), NONE)


def test_the_identities_file_must_be_the_daemons_alone(tmp_path: Path) -> None:
    path = tmp_path / IDENTITIES_FILE
    path.write_text('{"version": 1, "identities": {}}')
    path.chmod(0o666)
    with pytest.raises(HostError, match="writable by it alone"):
        IdentityUids.open(tmp_path, free_range(4), NONE)
    path.unlink()
    path.symlink_to(tmp_path / "elsewhere.json")
    with pytest.raises(HostError, match="symbolic link"):
        IdentityUids.open(tmp_path, free_range(4), NONE)


def test_an_unwritable_state_dir_allocates_nothing(tmp_path: Path) -> None:
    uids = IdentityUids.open(tmp_path / "missing", free_range(4), NONE)
    with pytest.raises(HostError, match="cannot record identity uids"):
        uids.uid_for("alice")
    assert uids.get("alice") is None and len(uids) == 0


def test_named_account_or_own_uid(tmp_path: Path) -> None:
    r = free_range(4)
    accounts = Accounts(IdentityUids.open(tmp_path, r, NONE), euid=0)
    root = accounts.for_identity("alice", "root")
    assert (root.uid, root.gid) == (0, 0)
    assert accounts.for_identity("alice", None) == Credentials(r.first, r.first, ())
    with pytest.raises(HostError, match="per-identity uids are off"):
        Accounts(euid=0).for_identity("alice", None)


@pytest.mark.parametrize(
    ("account", "message"),
    [
        ("", "must be USER or USER:GROUP"),
        ("root:", "must be USER or USER:GROUP"),
        (":root", "must be USER or USER:GROUP"),
        ("no-such-user-xyz", "no such user"),
        ("root:no-such-group-xyz", "no such group"),
    ],
)
def test_bad_account_names(account: str, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        Accounts(euid=0).credentials(account)


def test_printable_escapes_what_could_forge_a_log_line(caplog: pytest.LogCaptureFixture) -> None:
    forged = "mallory\n2030-01-01 00:00:00 INFO jobworker: job x started by root\r\x1b[2K\\"
    text = printable(forged)
    assert "\n" not in text and "\r" not in text and "\x1b" not in text
    assert text.isascii() and text.isprintable()
    assert printable("alice") == "alice"
    assert printable("é") == "\\xe9"
    with caplog.at_level(logging.INFO):
        logging.getLogger("t").info("by %s", text)
    assert len(caplog.text.splitlines()) == 1

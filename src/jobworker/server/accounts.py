"""Which Unix account a job runs as.

Every identity gets a uid of its own (gid = uid, no supplementary groups), allocated once from a
range the daemon owns (:class:`UidRange`, ``workerd --uid-range``) and recorded in the state
directory (:class:`IdentityUids`, ``identities.json``) so it is the same after a restart and
never shared by two identities. An account by name (``user`` or ``user:group``, read from the
passwd and group databases through :class:`Accounts`) replaces that uid only where the
configuration names one: the policy file, or ``workerd --job-user``. Jobs never run as root, or
as ``nobody``, unless named.
"""

from __future__ import annotations

import contextlib
import errno
import grp
import json
import logging
import os
import pwd
import stat
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from jobworker.errors import HostError, InvalidArgument, ResourceExhausted
from jobworker.spec import Credentials

log = logging.getLogger(__name__)

IDENTITIES_FILE: Final = "identities.json"
"""In the state directory: identity -> uid."""
_FORMAT_VERSION: Final = 1
MAX_ID: Final = 2**31 - 1
"""Highest uid a range may reach: above it some tools take ids for negative numbers."""
_FORBIDDEN_IDS: Final = {0, 65534, 65535}
"""root, nobody, and (uid_t)-1 on 16-bit interfaces."""
SUBORDINATE_FILES: Final = (Path("/etc/subuid"), Path("/etc/subgid"))
"""Ranges given to users for their own user namespaces (rootless containers): a job whose uid
falls in one could act on that user's container files."""


def printable(name: str) -> str:
    """``name`` for a log line: control characters, backslashes and non-ASCII escaped, so a
    certificate's common name cannot end a line and forge another one."""
    return name.encode("unicode_escape").decode("ascii")


@dataclass(frozen=True, slots=True)
class UidRange:
    """The uids (gid = uid) the daemon hands out to identities, ``first`` to ``last``
    inclusive."""

    first: int
    last: int

    def __post_init__(self) -> None:
        if not 1 <= self.first <= self.last <= MAX_ID:
            raise InvalidArgument(
                f"uid range {self}: must be FIRST-LAST with 1 <= FIRST <= LAST <= {MAX_ID}"
            )
        inside = sorted(i for i in _FORBIDDEN_IDS if self.first <= i <= self.last)
        if inside:
            raise InvalidArgument(
                f"uid range {self} contains {', '.join(map(str, inside))} (root, nobody or the "
                "16-bit -1); choose a range without them"
            )

    @classmethod
    def parse(cls, text: str) -> UidRange:
        """``FIRST-LAST``, e.g. ``524288-589823``. Raises :class:`InvalidArgument`."""
        first, sep, last = text.strip().partition("-")
        if not sep or not first.isdigit() or not last.isdigit():
            raise InvalidArgument(f"uid range {text!r}: must be FIRST-LAST, e.g. 524288-589823")
        return cls(int(first), int(last))

    def __contains__(self, uid: object) -> bool:
        return isinstance(uid, int) and self.first <= uid <= self.last

    def __len__(self) -> int:
        return self.last - self.first + 1

    def __str__(self) -> str:
        return f"{self.first}-{self.last}"


DEFAULT_UID_RANGE: Final = UidRange(524288, 589823)
"""0x80000-0x8FFFF, 65536 ids: above every account range of a Linux host (system < 1000,
regular 1000-60000, systemd-homed 60001-60513, systemd's dynamic users 61184-65519, nobody
65534) and, being above 65535, outside anything 16-bit. It is the first block of systemd's
range for container uids; ``/etc/subuid``/``/etc/subgid`` entries in it are skipped, and a host
that gives it to containers (``systemd-nspawn --private-users``) should pick another range.
See docs/daemon.md."""


def _owner_of(uid: int) -> str | None:
    """The account or group that already holds ``uid`` as its uid or gid, if any."""
    with contextlib.suppress(KeyError):
        return f"user {pwd.getpwuid(uid).pw_name!r}"
    with contextlib.suppress(KeyError):
        return f"group {grp.getgrgid(uid).gr_name!r}"
    return None


def subordinate_ranges(files: Iterable[Path] = SUBORDINATE_FILES) -> list[tuple[int, int]]:
    """``(first, last)`` of every ``NAME:START:COUNT`` line in the subuid/subgid files that
    exist; unreadable or malformed lines are skipped."""
    ranges: list[tuple[int, int]] = []
    for path in files:
        try:
            text = path.read_text()
        except FileNotFoundError:
            continue
        except OSError as e:
            raise HostError(f"cannot read {path}: {e}") from e
        for line in text.splitlines():
            parts = line.strip().split(":")
            if len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit() and int(parts[2]):
                start = int(parts[1])
                ranges.append((start, start + int(parts[2]) - 1))
    return ranges


class IdentityUids:
    """identity -> uid, allocated from a :class:`UidRange` and kept in ``identities.json``.

    The file is written (a new file, fsync'd, renamed over the old one, then the directory
    fsync'd) before a new uid is returned, so no job ever runs as a uid the file does not
    record. A uid is never given to two identities and never reused. Candidates that the passwd
    or group database already holds, or that lie in a subordinate id range, are skipped.

    Use from one thread (the daemon's event loop).
    """

    def __init__(
        self,
        path: Path,
        uid_range: UidRange,
        mapping: Mapping[str, int],
        taken: Iterable[tuple[int, int]] = (),
    ) -> None:
        self.path = path
        self.range = uid_range
        self._uids = dict(mapping)
        self._used = set(self._uids.values())
        self._taken = sorted(taken)
        self._next = uid_range.first

    @classmethod
    def open(
        cls,
        state_dir: Path,
        uid_range: UidRange,
        subordinate: Iterable[Path] = SUBORDINATE_FILES,
    ) -> IdentityUids:
        """Read ``STATE/identities.json`` (none yet: no identity has a uid).

        Raises :class:`HostError` when it cannot be read, is not a regular file of this user
        that only it may write, or does not parse; or when a recorded uid is now held by an
        account or group of the host (the identity's jobs would act as it).
        """
        path = state_dir / IDENTITIES_FILE
        mapping = _read(path)
        for name, uid in sorted(mapping.items()):
            owner = _owner_of(uid)
            if owner is not None:
                raise HostError(
                    f"{path}: identity '{printable(name)}' has uid {uid}, which {owner} now "
                    "holds in the host's account database; its jobs would run as that "
                    "account. Remove that account (or the entry, giving the identity a new uid)"
                )
        store = cls(path, uid_range, mapping, subordinate_ranges(subordinate))
        if mapping:
            log.info(
                "%d identities have uids (%s); new ones get uids from %s",
                len(mapping),
                path,
                uid_range,
            )
        return store

    def __len__(self) -> int:
        return len(self._uids)

    def get(self, name: str) -> int | None:
        return self._uids.get(name)

    def uid_for(self, name: str) -> int:
        """The identity's uid, allocated and recorded on first use.

        Raises :class:`ResourceExhausted` when the range has no free uid left, and
        :class:`HostError` when the file cannot be written (nothing is allocated then).
        """
        uid = self._uids.get(name)
        if uid is not None:
            return uid
        uid = self._allocate()
        updated = {**self._uids, name: uid}
        _write(self.path, updated)
        self._uids = updated
        self._used.add(uid)
        self._next = uid + 1
        log.info("identity %s: new uid %d (recorded in %s)", printable(name), uid, self.path)
        return uid

    def credentials(self, name: str) -> Credentials:
        uid = self.uid_for(name)
        return Credentials(uid=uid, gid=uid, groups=())

    def _candidates(self) -> Iterator[int]:
        uid = self._next
        while uid <= self.range.last:
            for first, last in self._taken:
                if first <= uid <= last:
                    uid = last + 1
                    break
            else:
                if uid not in self._used:
                    yield uid
                uid += 1

    def _allocate(self) -> int:
        for uid in self._candidates():
            if uid > self.range.last:
                break
            owner = _owner_of(uid)
            if owner is None:
                return uid
            log.info("uid %d of the range %s is skipped: %s holds it", uid, self.range, owner)
        raise ResourceExhausted(
            f"no free uid left in the range {self.range} for a new identity; widen "
            "--uid-range (the uids given so far are kept)"
        )


def _read(path: Path) -> dict[str, int]:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return {}
    except OSError as e:
        why = "it is a symbolic link" if e.errno == errno.ELOOP else str(e)
        raise HostError(f"cannot read {path}: {why}") from e
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise HostError(f"{path} is not a regular file")
        if st.st_uid != os.geteuid() or st.st_mode & 0o022:
            raise HostError(
                f"{path} must belong to the daemon's user (uid {os.geteuid()}) and be writable "
                f"by it alone; it is uid {st.st_uid}, mode {stat.S_IMODE(st.st_mode):04o}"
            )
        raw = f.read()
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise HostError(f"{path} is not valid JSON: {e}") from e
    identities = data.get("identities") if isinstance(data, dict) else None
    if (
        not isinstance(data, dict)
        or data.get("version") != _FORMAT_VERSION
        or not isinstance(identities, dict)
        or not all(
            isinstance(n, str) and n and type(u) is int and 0 < u <= MAX_ID
            for n, u in identities.items()
        )
    ):
        raise HostError(
            f'{path}: expected {{"version": {_FORMAT_VERSION}, "identities": {{NAME: UID, ...}}}}'
        )
    if len(set(identities.values())) != len(identities):
        raise HostError(f"{path}: a uid is given to more than one identity")
    return dict(identities)


def _write(path: Path, mapping: Mapping[str, int]) -> None:
    """Replace ``path`` atomically and durably with ``mapping``."""
    data = json.dumps(
        {"version": _FORMAT_VERSION, "identities": dict(sorted(mapping.items()))}, indent=1
    ).encode()
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)  # left by a crash between create and rename
        fd = os.open(
            tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
        )
        try:
            os.fchmod(fd, 0o600)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise HostError(f"cannot record identity uids in {path}: {e}") from e


@dataclass
class Accounts:
    """Credentials for a job: a named account (``user`` or ``user:group``, resolved once per
    name), else the identity's own uid from ``uids``."""

    uids: IdentityUids | None = None
    """Per-identity uids; ``None``: an identity without a named account is refused."""
    euid: int = field(default_factory=os.geteuid)
    _cache: dict[str, Credentials] = field(default_factory=dict)

    def for_identity(self, name: str, account: str | None) -> Credentials:
        """The credentials of identity ``name``'s jobs: ``account`` when the configuration
        names one, else the identity's own uid.

        Raises :class:`InvalidArgument` (see :meth:`credentials`), :class:`ResourceExhausted`
        or :class:`HostError` (see :meth:`IdentityUids.uid_for`), or :class:`HostError` when
        there is neither an account nor per-identity uids.
        """
        if account is not None:
            return self.credentials(account)
        if self.uids is None:
            raise HostError(
                f"no account for identity '{printable(name)}': the configuration names none "
                "and per-identity uids are off"
            )
        return self.uids.credentials(name)

    def credentials(self, account: str) -> Credentials:
        """Raises :class:`InvalidArgument` for an empty or unknown user or group, or when this
        process cannot switch to the account (it is not root)."""
        cached = self._cache.get(account)
        if cached is not None:
            return cached
        user, sep, group = account.partition(":")
        if not user or (sep and not group):
            raise InvalidArgument(f"job account {account!r}: must be USER or USER:GROUP")
        try:
            pw = pwd.getpwnam(user)
        except KeyError:
            raise InvalidArgument(f"job account {account!r}: no such user") from None
        gid = pw.pw_gid
        if group:
            try:
                gid = grp.getgrnam(group).gr_gid
            except KeyError:
                raise InvalidArgument(f"job account {account!r}: no such group") from None
        if self.euid != 0:
            if pw.pw_uid != self.euid:
                raise InvalidArgument(
                    f"job account {account!r}: the daemon is not root, so jobs can only run "
                    "as the daemon's own user"
                )
            creds = Credentials()
        else:
            groups = tuple(os.getgrouplist(user, gid)) if not group else (gid,)
            creds = Credentials(uid=pw.pw_uid, gid=gid, groups=groups)
        self._cache[account] = creds
        return creds

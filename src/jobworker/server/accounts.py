"""Which Unix account a job runs as: names from the daemon's configuration to credentials.

Jobs do not run as root unless the configuration says so by name. The account database is read
through :class:`Accounts`, which tests may replace.
"""

from __future__ import annotations

import grp
import os
import pwd
from dataclasses import dataclass, field

from jobworker.errors import InvalidArgument
from jobworker.spec import Credentials

DEFAULT_JOB_ACCOUNT = "nobody"


@dataclass
class Accounts:
    """Resolves ``user`` or ``user:group`` to credentials, once per name."""

    euid: int = field(default_factory=os.geteuid)
    _cache: dict[str, Credentials] = field(default_factory=dict)

    def credentials(self, account: str) -> Credentials:
        """Raises :class:`InvalidArgument` for an unknown user or group, or when this process
        cannot switch to the account (it is not root)."""
        cached = self._cache.get(account)
        if cached is not None:
            return cached
        user, _, group = account.partition(":")
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

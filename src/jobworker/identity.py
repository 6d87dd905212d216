"""Values that the client and the server share about who a caller is: roles and names."""

from __future__ import annotations

import enum
from typing import Final


class Role(enum.StrEnum):
    """What a certificate's holder may do (the daemon's permission matrix is keyed by it)."""

    ADMIN = "admin"
    USER = "user"
    VIEWER = "viewer"


RESERVED_NAMES: Final = frozenset({*Role, "ca", "server"})
"""Names no identity may have (compared case-insensitively): the roles, so that a name can
never be read as a role in the policy file or a log, and the PKI's own file stems."""


def is_reserved(name: str) -> bool:
    return name.casefold() in RESERVED_NAMES

"""Values that the client and the server share about who a caller is: roles and names."""

from __future__ import annotations

import enum


class Role(enum.StrEnum):
    """What a certificate's holder may do (the daemon's permission matrix is keyed by it)."""

    ADMIN = "admin"
    USER = "user"
    VIEWER = "viewer"

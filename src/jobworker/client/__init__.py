"""What runs on the caller's side: the typed gRPC client (:class:`Client`), the offline PKI
(:mod:`~jobworker.client.pki`) and the ``worker`` CLI (:mod:`~jobworker.client.cli`).

:class:`Client` (and with it grpc) is imported on first use, so the CLI's commands that never
reach the daemon do not pay for it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from jobworker.client.client import CHANNEL_OPTIONS, Client

__all__ = ["CHANNEL_OPTIONS", "Client"]


def __getattr__(name: str) -> Any:
    if name not in __all__:
        raise AttributeError(f"module 'jobworker.client' has no attribute {name!r}")
    from jobworker.client import client

    value = getattr(client, name)
    globals()[name] = value
    return value

"""What runs on the caller's side: the typed gRPC client (:class:`Client`), the offline PKI
(:mod:`~jobworker.client.pki`) and the ``worker`` CLI (:mod:`~jobworker.client.cli`)."""

from __future__ import annotations

from jobworker.client.client import CHANNEL_OPTIONS, Client

__all__ = ["CHANNEL_OPTIONS", "Client"]

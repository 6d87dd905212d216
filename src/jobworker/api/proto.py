"""The generated code of the current API version, the one way the rest of jobworker imports it:
``pb`` (messages) and ``pb_grpc`` (the service stub and servicer)."""

from __future__ import annotations

from jobworker.api.v1 import jobworker_pb2 as pb
from jobworker.api.v1 import jobworker_pb2_grpc as pb_grpc

__all__ = ["pb", "pb_grpc"]

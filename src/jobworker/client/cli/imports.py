"""Importing without the cyclic garbage collector: a one-shot command imports a few hundred
modules (click, grpc, protobuf and ours), whose objects trip a collection every few hundred
allocations, each a walk over everything allocated so far; none of them is garbage."""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """Suspend automatic collection for the block (as it was after: a caller that had turned
    it off keeps it off)."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()

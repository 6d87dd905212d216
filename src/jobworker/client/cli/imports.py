"""Importing without the cyclic garbage collector: a one-shot command imports a few hundred
modules (click, grpc, protobuf and ours), whose objects trip a collection every few hundred
allocations, each a walk over everything allocated so far; none of them is garbage."""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator


@contextlib.contextmanager
def collector_paused(*, freeze: bool = False) -> Iterator[None]:
    """Suspend automatic collection for the block (as it was after: a caller that had turned
    it off keeps it off). ``freeze``: then move every object alive to the permanent generation
    (:func:`gc.freeze`), for a block that imported modules for the first time: their objects
    live as long as the process, and the first collection after the block would otherwise
    walk all of them (a few ms for the ~40 000 of grpc, protobuf, click and ours)."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if freeze:
            gc.freeze()
        if was:
            gc.enable()

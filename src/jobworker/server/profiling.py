"""What the debug endpoint shows of the process: thread and task stacks, a sampling CPU
profiler of every thread, and the tracemalloc heap view."""

from __future__ import annotations

import asyncio
import collections
import io
import sys
import threading
import time
import traceback
import tracemalloc
from types import FrameType

SAMPLE_INTERVAL = 0.005


def thread_stacks() -> str:
    names = {t.ident: t.name for t in threading.enumerate()}
    out = io.StringIO()
    for ident, frame in sys._current_frames().items():
        out.write(f"--- thread {names.get(ident, '?')} ({ident})\n")
        out.write("".join(traceback.format_stack(frame)))
    return out.getvalue()


async def task_stacks() -> str:
    """Every asyncio task of the running loop with its stack (call on the loop).

    Not ``Task.print_stack``: it fails on frames without a line number (Cython coroutines)."""
    out = io.StringIO()
    for task in sorted(asyncio.all_tasks(), key=lambda t: t.get_name()):
        out.write(f"--- task {task.get_name()}: {task.get_coro()!r}\n")
        for frame in task.get_stack():
            code = frame.f_code
            out.write(f'  File "{code.co_filename}", line {frame.f_lineno}, in {code.co_name}\n')
    return out.getvalue()


def _frame_key(frame: FrameType) -> str:
    code = frame.f_code
    return f"{code.co_qualname} ({code.co_filename}:{code.co_firstlineno})"


def profile(
    seconds: float, interval: float = SAMPLE_INTERVAL, stop: threading.Event | None = None
) -> str:
    """Sample every other thread's stack for ``seconds`` (less if ``stop`` is set); see
    ``/debug/profile`` in :mod:`jobworker.server.debug`."""
    stop = stop or threading.Event()
    me = threading.get_ident()
    folded: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    total: collections.Counter[str] = collections.Counter()
    samples = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not stop.is_set():
        for ident, frame in sys._current_frames().items():
            if ident == me:
                continue
            stack: list[str] = []
            f: FrameType | None = frame
            while f is not None:
                stack.append(_frame_key(f))
                f = f.f_back
            if not stack:
                continue
            samples += 1
            own[stack[0]] += 1
            for key in set(stack):
                total[key] += 1
            folded[";".join(reversed(stack))] += 1
        stop.wait(interval)
    out = io.StringIO()
    out.write(f"# {samples} thread samples over {seconds:g}s every {interval * 1000:g} ms\n")
    out.write("# top functions: self samples, total samples, function\n")
    for key, n in own.most_common(40):
        out.write(f"{n:8d} {total[key]:8d}  {key}\n")
    out.write("# folded stacks (flamegraph.pl / speedscope input)\n")
    for stack_text, n in folded.most_common():
        out.write(f"{stack_text} {n}\n")
    return out.getvalue()


def heap(limit: int = 25) -> str:
    if not tracemalloc.is_tracing():
        tracemalloc.start(16)
        return (
            "tracemalloc was off and is now tracing (it slows allocations down); request this "
            "page again for the top allocation sites, and /debug/heap?stop=1 to stop tracing.\n"
        )
    snapshot = tracemalloc.take_snapshot().filter_traces(
        [tracemalloc.Filter(False, tracemalloc.__file__)]
    )
    stats = snapshot.statistics("lineno")
    current, peak = tracemalloc.get_traced_memory()
    out = io.StringIO()
    out.write(f"# traced now {current} bytes, peak {peak} bytes; top {limit} sites by size\n")
    for site in stats[:limit]:
        out.write(f"{site.size:12d} B {site.count:8d} blocks  {site.traceback[0]}\n")
    return out.getvalue()

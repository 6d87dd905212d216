"""``BENCH_PROFILE=DIR``: sample the daemon with py-spy (``pip install py-spy``) during each
section, keep the folded stacks in ``DIR/SECTION.folded`` and print where the samples fall.

The summary counts samples in three ways: the leaf frame (where the CPU was), every function of
jobworker on the stack (inclusive), and idle samples (py-spy's ``--idle`` is off, so an idle loop
has no samples: the share of samples tells how busy the daemon's threads were).
"""

from __future__ import annotations

import collections
import os
import shutil
import signal
import subprocess
from pathlib import Path

from bench.common import BIN

RATE = 250
STOP_TIMEOUT = 30.0


class Sampler:
    """py-spy recording one process until :meth:`stop`."""

    def __init__(self, pid: int, out: Path) -> None:
        exe = shutil.which("py-spy", path=f"{BIN}:{os.environ.get('PATH', '')}")
        if exe is None:
            raise SystemExit("bench: BENCH_PROFILE needs py-spy (pip install py-spy)")
        self.out = out
        self._proc = subprocess.Popen(
            [
                exe,
                "record",
                "--pid",
                str(pid),
                "--rate",
                str(RATE),
                "--format",
                "raw",
                "--threads",
                "--output",
                str(out),
                "--nonblocking",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def stop(self) -> str:
        """Stop recording; a text summary of the profile."""
        self._proc.send_signal(signal.SIGINT)
        try:
            self._proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        if not self.out.exists():
            return f"(no profile written to {self.out})"
        return summarize(self.out.read_text())


def _func(frame: str) -> str:
    """``name (file.py)`` from py-spy's ``name (path/file.py:line)``."""
    name, _, where = frame.partition(" (")
    if not where:
        return name
    return f"{name} ({where.rsplit(':', 1)[0].rsplit('/', 1)[-1]})"


def summarize(folded: str, top: int = 15) -> str:
    leaf: collections.Counter[str] = collections.Counter()
    ours: collections.Counter[str] = collections.Counter()
    threads: collections.Counter[str] = collections.Counter()
    total = 0
    for line in folded.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = stack.split(";")
        total += n
        threads[frames[0]] += n
        leaf[_func(frames[-1])] += n
        for key in {_func(f) for f in frames if "jobworker/" in f}:
            ours[key] += n
    out = [f"{total} samples at {RATE} Hz"]
    out.append("by thread: " + ", ".join(f"{t} {n}" for t, n in threads.most_common(6)))
    out.append("leaf frames (self):")
    out += [f"  {n / total:6.1%}  {k}" for k, n in leaf.most_common(top)] if total else []
    out.append("jobworker functions (inclusive):")
    out += [f"  {n / total:6.1%}  {k}" for k, n in ours.most_common(top)] if total else []
    return "\n".join(out)

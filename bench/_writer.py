"""The benchmark's job program (standard library only; run as ``python -I -S _writer.py``).

    ticks N INTERVAL_MS GO_FILE      "ready", wait for GO_FILE, then N lines "SEQ MONOTONIC_NS"
    bytes N GO_FILE REPORT_FILE      "ready", wait for GO_FILE ("-": don't), then N bytes of a
                                     pattern as fast as possible; the nanoseconds the writes took,
                                     wall and CPU, go to REPORT_FILE ("-": nowhere)
    idle SECONDS                     "ready", then sleep

The ``ready`` line lets the benchmark attach its followers before the measured output starts.
The byte pattern is a pseudo-random 1 MiB block rotated by a different amount for every MiB, so a
lost, repeated or reordered chunk changes the sha256 of what a follower received.
"""

from __future__ import annotations

import os
import random
import sys
import time

BLOCK = 1 << 20
GO_TIMEOUT = 60.0


def pattern_block() -> bytes:
    block = random.Random(6).randbytes(BLOCK)
    return block + block


def chunks(total: int) -> list[tuple[int, int]]:
    """(rotation, length) of each write: ``doubled[rotation:rotation + length]``."""
    out = []
    i = 0
    while total > 0:
        n = min(BLOCK, total)
        out.append(((i * 4099) % BLOCK, n))
        total -= n
        i += 1
    return out


def write_all(fd: int, data: memoryview) -> None:
    while data:
        n = os.write(fd, data)
        data = data[n:]


def wait_go(path: str) -> None:
    if path == "-":
        return
    deadline = time.monotonic() + GO_TIMEOUT
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            sys.exit(f"no go file after {GO_TIMEOUT}s")
        time.sleep(0.0005)


def main() -> None:
    mode = sys.argv[1]
    os.write(1, b"ready\n")
    if mode == "ticks":
        count, interval, go = int(sys.argv[2]), float(sys.argv[3]) / 1e3, sys.argv[4]
        wait_go(go)
        for seq in range(count):
            os.write(1, b"%d %d\n" % (seq, time.monotonic_ns()))
            time.sleep(interval)
    elif mode == "bytes":
        total, go, report = int(sys.argv[2]), sys.argv[3], sys.argv[4]
        doubled = memoryview(pattern_block())
        plan = chunks(total)
        wait_go(go)
        t0 = time.monotonic_ns()
        cpu0 = time.process_time_ns()
        for rotation, length in plan:
            write_all(1, doubled[rotation : rotation + length])
        elapsed = time.monotonic_ns() - t0
        cpu = time.process_time_ns() - cpu0
        if report != "-":
            with open(report, "w") as f:
                f.write(f"{elapsed} {cpu}")
    elif mode == "idle":
        time.sleep(float(sys.argv[2]))
    else:
        sys.exit("unknown mode " + mode)


if __name__ == "__main__":
    main()

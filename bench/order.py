"""What exact cross-stream order would cost: a job's output captured through the pipes the
daemon uses (1 MiB deep), beside the only pipes that keep every write's order against the other
stream whatever the reader's delay — packet-mode (``O_DIRECT``) pipes one page deep, where each
write waits until the reader has taken the one before (docs/DESIGN.md, "Order").

No daemon: the same minimal reader for both (edge-triggered epoll, ``splice`` into a file), so
the ratio is the pipes' alone. ``dd`` writes 64 KiB blocks, as ``cat`` does.
"""

from __future__ import annotations

import fcntl
import os
import select
import subprocess
import tempfile
import time
from collections.abc import Callable

from bench.common import Settings, median

MIB = 1 << 20
DEEP = MIB
"""As the daemon's pipes (jobworker.output.PIPE_SIZE)."""
ONE_PAGE = 4096
BLOCK = 64 * 1024


def capture(total: int, packet: bool, size: int, directory: str) -> tuple[float, int]:
    """MiB/s and reader wake-ups for ``total`` bytes from ``dd`` through one pipe."""
    r, w = os.pipe2(os.O_CLOEXEC | (os.O_DIRECT if packet else 0))
    fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, size)
    with tempfile.TemporaryFile(dir=directory) as sink:
        writer = subprocess.Popen(
            ["dd", "if=/dev/zero", f"bs={BLOCK}", f"count={total // BLOCK}", "status=none"],
            stdout=w,
        )
        os.close(w)
        os.set_blocking(r, False)
        poller = select.epoll()
        poller.register(r, select.EPOLLIN | select.EPOLLET)
        moved = wakes = 0
        t0 = time.perf_counter()
        try:
            while True:
                poller.poll()
                wakes += 1
                try:
                    while n := os.splice(r, sink.fileno(), MIB):
                        moved += n
                except BlockingIOError:
                    continue
                break  # end of file
            elapsed = time.perf_counter() - t0
        finally:
            poller.close()
            os.close(r)
            writer.wait()
    if moved != total or writer.returncode != 0:
        raise SystemExit(f"bench: order probe moved {moved} of {total} bytes")
    return total / MIB / elapsed, wakes


async def run(settings: Settings, log: Callable[[str], None]) -> dict[str, float]:
    total = (64 if settings.quick else 256) * MIB
    deep, one = [], []
    wakes = 0
    for _ in range(3):  # interleaved: the machine is noisy
        deep.append(capture(total, False, DEEP, "/var/tmp")[0])
        mib_s, wakes = capture(total, True, ONE_PAGE, "/var/tmp")
        one.append(mib_s)
    out = {
        "pipe_capture_deep_mib_s": median(deep),
        "pipe_capture_one_packet_mib_s": median(one),
    }
    out["pipe_capture_one_packet_ratio"] = (
        out["pipe_capture_one_packet_mib_s"] / out["pipe_capture_deep_mib_s"]
    )
    log(
        f"order: capture through 1 MiB pipes {out['pipe_capture_deep_mib_s']:.0f} MiB/s; "
        f"through one-packet pipes (exact cross-stream order) "
        f"{out['pipe_capture_one_packet_mib_s']:.0f} MiB/s ({wakes} reader wake-ups for "
        f"{total // MIB} MiB)"
    )
    return out

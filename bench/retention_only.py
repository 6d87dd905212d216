"""The retention section alone, in a daemon of its own under its own cgroup name, so it can run
while another benchmark holds ``jobworker-bench``: ``python -m bench.retention_only``."""

from __future__ import annotations

import asyncio
import json
import tempfile
import time
from pathlib import Path

from bench import retention
from bench.common import Settings


def _log(line: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {line}", flush=True)


async def _main() -> None:
    with tempfile.TemporaryDirectory(prefix="jobworker-bench-", dir="/var/tmp") as tmp:
        figures = await retention.run(Settings.from_env(), Path(tmp) / "retention", _log)
    print(json.dumps(figures, indent=1))


if __name__ == "__main__":
    asyncio.run(_main())

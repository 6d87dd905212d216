"""The client sets no process-wide TLS state, and still speaks to the TLS-1.3-only daemon."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

from jobworker.server.daemon import Daemon
from tests.integration import daemon_harness as harness

pki_dir, daemon = harness.pki_dir, harness.daemon

CLIENT = """
import asyncio, os, sys
from pathlib import Path
from jobworker.client import Client
assert "GRPC_SSL_CIPHER_SUITES" not in os.environ, "the client set the cipher list"
async def main():
    async with Client.from_pki(sys.argv[1], Path(sys.argv[2]), "alice") as c:
        job = await c.start(["true"])
        print((await c.wait(job.id)).exit_code)
asyncio.run(main())
"""


async def test_a_client_without_the_cipher_setting_gets_through(
    daemon: Daemon, pki_dir: Path
) -> None:
    """The daemon refuses TLS 1.2 (test_service_tls proves it), so a call that succeeds from a
    process whose grpc kept its default cipher list negotiated TLS 1.3."""
    env = {k: v for k, v in os.environ.items() if k != "GRPC_SSL_CIPHER_SUITES"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        CLIENT,
        f"127.0.0.1:{daemon.port}",
        str(pki_dir),
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(60):
        out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    assert out.decode().strip() == "0"

"""The attack matrix through a real daemon in its default configuration: per-identity
accounts, every job sandboxed, the debug endpoint on its 0600 Unix socket (put where any job
can see the path, so only its permissions keep them out). Every row must fail."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from jobworker.server.daemon import Daemon, serve
from tests.attack import matrix
from tests.conftest import cgroup2_usable
from tests.integration import daemon_harness as harness

pki_dir = harness.pki_dir


@pytest.fixture
def public() -> Iterator[Path]:
    with matrix.public_dir() as d:
        yield d


@pytest.fixture
async def product(
    tmp_path: Path, pki_dir: Path, cgroup_name: str, public: Path
) -> AsyncIterator[Daemon]:
    if reason := cgroup2_usable():
        pytest.skip(reason)
    config = harness.make_config(
        tmp_path / "state",
        pki_dir,
        cgroup_name,
        job_account=None,  # the product's default: each identity a uid of its own
        debug_socket=public / "debug.sock",
    )
    daemon = await serve(config)
    try:
        yield daemon
    finally:
        await daemon.close()


async def test_bob_cannot_touch_alice_or_the_daemon(
    product: Daemon,
    pki_dir: Path,
    tmp_path: Path,
    public: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    result = await matrix.run_matrix(product, pki_dir, tmp_path / "state", public)
    with capsys.disabled():
        print("\n\n" + matrix.report(result))
    matrix.check(result)

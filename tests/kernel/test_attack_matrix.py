"""The attack matrix (tests/attack) on a pure cgroup v2 kernel, with limits on every job: the
sandbox, the accounts and the cgroup permissions hold where the limits are real too."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from jobworker import Limits
from jobworker.client.pki import init_pki
from jobworker.server.daemon import Config, Daemon, serve
from jobworker.tls import Paths
from tests.attack import matrix

pytestmark = pytest.mark.kernel

LIMITS = Limits(cpu=1.0, memory=256 << 20, pids=64)


@pytest.fixture
def public() -> Iterator[Path]:
    with matrix.public_dir() as d:
        yield d


@pytest.fixture
async def product(
    tmp_path: Path, delegated: Path, no_leftovers: None, public: Path
) -> AsyncIterator[tuple[Daemon, Path]]:
    pki = tmp_path / "pki"
    init_pki(pki, [("ops", "admin"), ("alice", "user"), ("bob", "user")])
    config = Config(
        tls=Paths.from_pki(pki, "server"),
        listen="127.0.0.1:0",
        state_dir=tmp_path / "state",
        cgroup_root=delegated,
        cgroup_name=f"jobworker-k-{uuid.uuid4().hex[:8]}",
        stop_grace=1.0,
        debug_socket=public / "debug.sock",
        default_limits=LIMITS,
    )
    daemon = await serve(config)
    try:
        yield daemon, pki
    finally:
        await daemon.close()


async def test_the_attack_matrix_with_limits(
    product: tuple[Daemon, Path],
    tmp_path: Path,
    public: Path,
    figure: dict[str, str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    daemon, pki = product
    result = await matrix.run_matrix(daemon, pki, tmp_path / "state", public, limits=LIMITS)
    with capsys.disabled():
        print("\n\n" + matrix.report(result))
    matrix.check(result)
    figure["attack matrix"] = f"{len(result)} attacks, all refused, with {LIMITS}"

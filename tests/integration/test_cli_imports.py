"""What ``worker status ID`` imports: the hot path of every one-shot command must not pay for
the modules of other commands (their own modules, the fleet's etcd client, the terminal, shell
completion) nor for cryptography (issue 15: the CLI's start-up time is mostly imports)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
from pathlib import Path

import pytest

from jobworker.client import Client
from jobworker.server.daemon import Daemon
from tests.integration import daemon_harness as harness

pki_dir, daemon, connect = harness.pki_dir, harness.daemon, harness.connect
Connect = harness.Connect

PROBE = """
import json, sys
from jobworker.client.cli import cli
try:
    cli.main(sys.argv[2:], prog_name="worker")
except SystemExit as e:
    code = e.code
with open(sys.argv[1], "w") as f:
    json.dump({"code": code, "modules": sorted(sys.modules)}, f)
"""

NOT_ON_THE_HOT_PATH = (
    "cryptography",  # certificates are read by grpc's C core; only `certs` parses them
    "aetcd",  # the fleet's etcd client: fleet commands only
    "jobworker.api.etcd",
    "jobworker.api.fleet",  # fleet ids (HOST/ID) and etcd's endpoints
    "jobworker.client.fleet",
    "click.shell_completion",  # completing, or printing the completion script
    "jobworker.client.tty",  # run -t and attach
    "jobworker.client.attaching",
    "jobworker.client.issuing",  # certs
    "jobworker.client.pki",
    "getpass",  # the login name is looked up only without --user (the probe gives one)
    # The other commands' modules: each is imported when its command runs (app.COMMANDS).
    "jobworker.client.cli.jobs",  # start and run: their options, limits parsing
    "jobworker.client.cli.fleet_run",
    "jobworker.client.cli.fleet",
    "jobworker.client.cli.attach",
    "jobworker.client.cli.certs",
    "jobworker.client.cli.completion",
    "jobworker.client.cli.stamps",  # logs --timestamps, --since
    # The daemon's pump (threads, select): the client needs Query from outread, not this.
    "jobworker.output",
)


def _loaded(modules: list[str], name: str) -> bool:
    return any(m == name or m.startswith(name + ".") for m in modules)


async def status_through(
    daemon: Daemon, connect: Connect, pki_dir: Path, probe: str, *probe_args: str
) -> bytes:
    """Run ``worker status ID`` of an ended job of alice's through ``probe`` (a ``-c`` script
    that takes ``probe_args``, then runs the CLI with the rest); its stderr, once it has
    printed the status."""
    client: Client = connect("alice")
    job = await client.start(["true"])
    await client.wait(job.id)
    env = {k: v for k, v in os.environ.items() if not k.startswith("WORKER_")}
    args = ("--addr", f"127.0.0.1:{daemon.port}", "--pki", str(pki_dir), "--user", "alice")
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        probe,
        *probe_args,
        *args,
        "status",
        job.id,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    out, err = await proc.communicate()
    assert proc.returncode == 0, err
    assert f"id:       {job.id}" in out.decode(), out
    return err


async def test_status_imports_nothing_it_does_not_use(
    daemon: Daemon, connect: Connect, pki_dir: Path, tmp_path: Path
) -> None:
    report = tmp_path / "modules.json"
    err = await status_through(daemon, connect, pki_dir, PROBE, str(report))
    result = json.loads(report.read_text())
    assert result["code"] == 0, err
    modules: list[str] = result["modules"]
    assert "jobworker.client.client" in modules  # the probe did reach the daemon
    loaded = [name for name in NOT_ON_THE_HOT_PATH if _loaded(modules, name)]
    assert loaded == [], f"`worker status` imported {loaded}"


@pytest.mark.parametrize("module", NOT_ON_THE_HOT_PATH)
def test_the_names_are_real_modules(module: str) -> None:
    """A misspelt name above would make the check pass vacuously."""
    import importlib.util

    assert importlib.util.find_spec(module) is not None


GC_PROBE = """
import gc, sys
collect = gc.collect
def counting(*args, **kwargs):
    sys.stderr.write("gc.collect\\n")
    return collect(*args, **kwargs)
gc.collect = counting
from jobworker.client.cli import main
sys.argv[0] = "worker"
main()
"""


async def test_the_console_script_leaves_without_collecting_garbage(
    daemon: Daemon, connect: Connect, pki_dir: Path
) -> None:
    """It ends the process without the interpreter's shutdown, so a full collection of all it
    imported (what in-process callers of ``cli.main`` get) would be time thrown away."""
    err = await status_through(daemon, connect, pki_dir, GC_PROBE)
    assert b"gc.collect" not in err


COLLECTIONS_PROBE = """
import contextlib, gc, importlib, sys, typing
started = []
gc.callbacks.append(lambda phase, info: started.append(1) if phase == "start" else None)
from jobworker.client.cli import cli
try:
    cli.main(sys.argv[1:], prog_name="worker")
except SystemExit as e:
    code = e.code
sys.stderr.write(f"collections {len(started) - 1}\\n")  # the last is cli.main's own
sys.stderr.write(f"frozen {gc.get_freeze_count()}\\n")
"""


async def test_status_imports_without_collecting_garbage(
    daemon: Daemon, connect: Connect, pki_dir: Path
) -> None:
    """The imports of a one-shot command (the CLI's, then grpc's) make no garbage worth a
    collection: the collector waits. Measured before: 53 automatic collections during the
    CLI's imports alone; now a few (the RPC's own allocations may trip one)."""
    err = await status_through(daemon, connect, pki_dir, COLLECTIONS_PROBE)
    found = re.search(rb"^collections (\d+)$", err, re.MULTILINE)
    assert found is not None, err
    collections = int(found.group(1))
    assert collections <= 5, err
    # What the imports made lives as long as the process: moved out of the collector's way
    # (gc.freeze) rather than walked by the first collection after them.
    frozen = re.search(rb"^frozen (\d+)$", err, re.MULTILINE)
    assert frozen is not None, err
    assert int(frozen.group(1)) > 10_000, err


async def test_a_process_that_already_has_the_client_freezes_nothing(
    daemon: Daemon, pki_dir: Path
) -> None:
    """Only the first import of the client freezes: a long-lived process (this one imported
    the client long ago) keeps its garbage collectable when a command connects."""
    import gc

    from jobworker.client.cli.settings import Settings

    assert "jobworker.client.client" in sys.modules
    before = gc.get_freeze_count()
    settings = Settings(addr=f"127.0.0.1:{daemon.port}", pki=pki_dir, user="alice")
    client = settings.connect()
    await client.close()
    assert gc.get_freeze_count() == before

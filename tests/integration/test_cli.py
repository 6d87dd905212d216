"""The ``worker`` CLI through its real entry point against an in-process daemon with real
certificates.

Most tests drive the click group with ``CliRunner`` in a worker thread (the command runs its own
``asyncio.run`` there while the daemon serves on the test's loop). Tests that need a real
process — a pipe to ``head``, Ctrl+C, streaming observed while it happens — run the installed
``worker`` console script as a subprocess.
"""

from __future__ import annotations

import asyncio
import errno
import gc
import json
import os
import random
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator, Mapping
from datetime import datetime
from pathlib import Path
from typing import Protocol

import pytest
from click.testing import CliRunner, Result

from jobworker.client.cli import Exit, cli
from jobworker.client.pki import init_pki
from jobworker.server.daemon import Config, Daemon, serve
from jobworker.spec import JobState, Network, Sandbox
from jobworker.tls import Paths, load_client
from tests.conftest import cgroup2_usable, wait_for
from tests.integration import daemon_harness as harness

pki_dir, daemon, connect = harness.pki_dir, harness.daemon, harness.connect
Connect = harness.Connect

WORKER = Path(sys.executable).parent / "worker"
"""The console script installed by `pip install -e .` (what a user runs)."""

CLEAN_ENV: dict[str, str | None] = {
    name: None
    for name in (
        "WORKER_ADDR",
        "WORKER_PKI",
        "WORKER_USER",
        "WORKER_CA",
        "WORKER_CERT",
        "WORKER_KEY",
        "WORKER_TIMEOUT",
        "WORKER_RECONNECT",
        "_WORKER_COMPLETE",
    )
}


@pytest.fixture(autouse=True)
def collect_grpc_garbage() -> Iterator[None]:
    """Free this test's grpc objects now (a failed call leaves reference cycles). Left to a
    later collection, the last of them going away stops grpc's poller thread in the middle of
    some other test, whose thread count then changes under it."""
    yield
    gc.collect()


def worker_env(port: int, pki: Path, user: str | None = "alice") -> dict[str, str | None]:
    env = dict(CLEAN_ENV)
    env.update(WORKER_ADDR=f"127.0.0.1:{port}", WORKER_PKI=str(pki), WORKER_USER=user)
    return env


async def invoke(
    args: list[str], env: Mapping[str, str | None], runner_env: Mapping[str, str | None] = {}
) -> Result:
    """Run ``worker ARGS`` in a thread (it calls asyncio.run) with ``env`` as its environment."""
    runner = CliRunner(env={**env, **runner_env}, catch_exceptions=False)
    result = await asyncio.to_thread(runner.invoke, cli, args, prog_name="worker")
    assert isinstance(result.exception, SystemExit | None), result.exception
    return result


@pytest.fixture
def env(daemon: Daemon, pki_dir: Path, tmp_path: Path) -> Env:
    e = worker_env(daemon.port, pki_dir)
    e["XDG_CONFIG_HOME"] = str(tmp_path / "xdg")  # no stray default PKI
    return e


Env = dict[str, str | None]


class Worker(Protocol):
    async def __call__(self, *args: str, user: str | None = None, **env: str | None) -> Result: ...


@pytest.fixture
def W(env: Env) -> Worker:
    """``await W("status", id, user="bob")`` runs ``worker status ID`` as bob -> click Result;
    other keywords set (or with None, unset) environment variables."""

    async def run(*args: str, user: str | None = None, **extra: str | None) -> Result:
        overrides: dict[str, str | None] = dict(extra)
        if user is not None:
            overrides["WORKER_USER"] = user
        return await invoke(list(args), env, overrides)

    return run


def subprocess_env(env: Mapping[str, str | None]) -> dict[str, str]:
    out = {k: v for k, v in os.environ.items() if k not in env}
    out.update({k: v for k, v in env.items() if v is not None})
    return out


def one_error_line(result: Result, starts: str = "worker: ") -> str:
    """The error output must be exactly one line, no traceback."""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(starts), result.stderr
    return lines[0]


def job_id_of(result: Result) -> str:
    assert result.exit_code == 0, result.stderr
    out = result.stdout
    assert out.endswith("\n") and out.count("\n") == 1, f"start must print only the id: {out!r}"
    return out.strip()


# -- happy paths ------------------------------------------------------------------------------


async def test_start_prints_only_the_id_and_wait_passes_the_exit_code_through(
    W: Worker, connect: Connect
) -> None:
    job = job_id_of(
        await W("start", "--", "sh", "-c", "echo out; sleep 0.01; echo err >&2; exit 7")
    )
    status = await connect("alice").status(job)
    assert status.owner == "alice"

    waited = await W("wait", job)
    assert (waited.exit_code, waited.stdout, waited.stderr) == (7, "", "")
    as_json = await W("wait", "--json", job)
    assert as_json.exit_code == 7
    assert json.loads(as_json.stdout)["exit_code"] == 7

    logs = await W("logs", job)
    assert (logs.exit_code, logs.stdout_bytes) == (0, b"out\nerr\n")


async def test_wait_and_run_exit_with_128_plus_the_signal(W: Worker) -> None:
    job = job_id_of(await W("start", "--", "sh", "-c", "kill -KILL $$"))
    assert (await W("wait", job)).exit_code == 128 + signal.SIGKILL
    ran = await W("run", "--", "sh", "-c", "echo before; kill -TERM $$")
    assert (ran.exit_code, ran.stdout_bytes) == (128 + signal.SIGTERM, b"before\n")


async def test_run_streams_output_and_exits_with_the_jobs_code(W: Worker) -> None:
    ok = await W("run", "--", "sh", "-c", "printf out; printf err >&2")
    assert (ok.exit_code, ok.stdout_bytes, ok.stderr) == (0, b"out", "err")
    failed = await W("run", "--", "sh", "-c", "echo partial; exit 42")
    assert (failed.exit_code, failed.stdout_bytes) == (42, b"partial\n")


async def test_run_passes_env_cwd_and_the_commands_own_options(W: Worker, tmp_path: Path) -> None:
    result = await W(
        "run",
        "-e",
        "GREETING=hello",
        "--cwd",
        str(tmp_path),
        "--",
        "sh",
        "-c",
        'echo "$GREETING"; pwd',
    )
    assert (result.exit_code, result.stdout) == (0, f"hello\n{tmp_path}\n")
    # Without `--`, everything after the command's first word is the command's.
    result = await W("run", "printf", "%s|", "-n", "--memory", "x")
    assert (result.exit_code, result.stdout) == (0, "-n|--memory|x|")


async def test_logs_are_byte_exact_for_binary_output(W: Worker, tmp_path: Path) -> None:
    rng = random.Random(5)
    data = bytes(range(256)) * 64 + b"\r\n\0" + rng.randbytes(3 * 1024 * 1024 + 17)
    source = tmp_path / "blob"
    source.write_bytes(data)
    job = job_id_of(await W("start", "--", "cat", str(source)))
    assert (await W("wait", job)).exit_code == 0
    for args in (
        ("logs", job),
        ("logs", "-f", job),
        ("-f", "logs", job),
        ("logs", "--follow", job),
    ):
        result = await W(*args)
        assert result.exit_code == 0, (args, result.stderr)
        assert result.stdout_bytes == data, args


async def test_status_text_and_json_shape(W: Worker) -> None:
    job = job_id_of(await W("start", "--", "sh", "-c", "echo hi; exit 3"))
    await W("wait", job)

    text = await W("status", job)
    assert text.exit_code == 0
    fields = dict(line.split(":", 1) for line in text.stdout.splitlines())
    assert fields["id"].strip() == job
    assert fields["state"].strip() == "exited, exit code 3"
    assert fields["owner"].strip() == "alice"
    assert fields["command"].strip() == "sh -c 'echo hi; exit 3'"

    result = await W("status", "--json", job)
    assert result.exit_code == 0
    s = json.loads(result.stdout)
    assert set(s) == {
        "id", "state", "pid", "exit_code", "signal", "oom_killed", "reason", "owner", "argv",
        "started_at", "ended_at", "output_bytes", "limits", "usage",
    }  # fmt: skip
    assert (s["id"], s["state"], s["exit_code"], s["signal"]) == (job, "exited", 3, None)
    assert (s["owner"], s["argv"], s["oom_killed"]) == (
        "alice",
        ["sh", "-c", "echo hi; exit 3"],
        False,
    )
    assert s["output_bytes"] == 3 and isinstance(s["pid"], int)
    assert datetime.fromisoformat(s["ended_at"]) >= datetime.fromisoformat(s["started_at"])
    assert s["limits"] == {"cpu": None, "cpu_weight": None, "memory": None, "io": [], "pids": None}
    assert set(s["usage"]) >= {"cpu_user_usec", "cpu_system_usec", "memory_current", "pids_current"}


async def test_list_shows_the_callers_jobs_and_all_for_admins_and_viewers(W: Worker) -> None:
    mine = job_id_of(await W("start", "--", "true"))
    bobs = job_id_of(await W("start", "--", "true", user="bob"))

    def ids(result: Result) -> set[str]:
        assert result.exit_code == 0, result.stderr
        jobs = json.loads(result.stdout)
        assert isinstance(jobs, list)
        return {j["id"] for j in jobs}

    assert ids(await W("list", "--json")) == {mine}
    assert ids(await W("list", "--all", "--json")) == {mine}  # a user never sees others' jobs
    assert ids(await W("list", "--all", "--json", user="root")) == {mine, bobs}
    assert ids(await W("list", "-a", "--json", user="vera")) == {mine, bobs}
    assert ids(await W("list", "--json", user="root")) == set()

    table = await W("list", "--all", user="root")
    header, *rows = table.stdout.splitlines()
    assert header.split() == ["ID", "STATE", "EXIT", "OWNER", "STARTED", "COMMAND"]
    assert sorted(r.split()[0] for r in rows) == sorted([mine, bobs])
    empty = await W("list", user="vera")
    assert (empty.exit_code, empty.stdout) == (0, "")
    assert "no jobs" in empty.stderr


async def test_stop_reports_how_the_job_ended(W: Worker, connect: Connect) -> None:
    job = job_id_of(await W("start", "--", "sleep", "1000"))
    result = await W("stop", job)
    assert result.exit_code == 0, result.stderr
    assert result.stdout == f"{job} stopped (stopped by alice), killed by SIGTERM\n"
    assert (await connect("alice").status(job)).state is JobState.STOPPED
    again = await W("stop", "--json", job)
    assert json.loads(again.stdout)["state"] == "stopped"
    assert (await W("wait", job)).exit_code == 128 + signal.SIGTERM


async def test_logs_follow_streams_while_the_job_runs(env: Env, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    os.mkfifo(gate)
    start = await invoke(
        ["start", "--", "sh", "-c", f"printf first; cat {gate}; printf second"], env
    )
    job = job_id_of(start)
    proc = await asyncio.create_subprocess_exec(
        WORKER, "logs", "-f", job, stdout=asyncio.subprocess.PIPE, env=subprocess_env(env)
    )
    assert proc.stdout is not None
    assert await proc.stdout.readexactly(5) == b"first"  # streamed before the job ended
    await open_gate(gate)
    assert await proc.stdout.read() == b"second"
    assert await proc.wait() == 0


async def open_gate(fifo: Path) -> None:
    """Let a job blocked in `cat FIFO` go on (its open for reading must be under way)."""

    def try_open() -> bool:
        try:
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        except OSError as e:
            if e.errno == errno.ENXIO:  # no reader yet
                return False
            raise
        return True

    await wait_for(try_open, what=f"a reader on {fifo}")


# -- configuration ----------------------------------------------------------------------------


async def test_environment_variables_configure_the_connection(
    daemon: Daemon, pki_dir: Path, tmp_path: Path, connect: Connect
) -> None:
    port = daemon.port
    base = {**CLEAN_ENV, "XDG_CONFIG_HOME": str(tmp_path / "xdg")}
    # WORKER_PKI + WORKER_USER
    by_pki = await invoke(
        ["start", "--", "true"],
        {
            **base,
            "WORKER_ADDR": f"127.0.0.1:{port}",
            "WORKER_PKI": str(pki_dir),
            "WORKER_USER": "bob",
        },
    )
    assert (await connect("root").status(job_id_of(by_pki))).owner == "bob"
    # WORKER_CA/CERT/KEY, no PKI directory
    explicit = {
        **base,
        "WORKER_ADDR": f"127.0.0.1:{port}",
        "WORKER_CA": str(pki_dir / "ca.pem"),
        "WORKER_CERT": str(pki_dir / "alice.pem"),
        "WORKER_KEY": str(pki_dir / "alice-key.pem"),
    }
    by_files = await invoke(["start", "--", "true"], explicit)
    assert (await connect("root").status(job_id_of(by_files))).owner == "alice"
    # Flags win over the environment.
    flags = await invoke(
        ["--pki", str(pki_dir), "--user", "bob", "start", "--", "true"],
        {
            **base,
            "WORKER_ADDR": f"127.0.0.1:{port}",
            "WORKER_PKI": "/nonexistent",
            "WORKER_USER": "alice",
        },
    )
    assert (await connect("root").status(job_id_of(flags))).owner == "bob"
    # The default PKI location, and the only user in it picked without WORKER_USER.
    default_pki = tmp_path / "xdg" / "jobworker" / "pki"
    default_pki.mkdir(parents=True)
    for name in ("ca.pem", "bob.pem", "bob-key.pem"):
        (default_pki / name).write_bytes((pki_dir / name).read_bytes())
    by_default = await invoke(["start", "--", "true"], {**base, "WORKER_ADDR": f"127.0.0.1:{port}"})
    assert (await connect("root").status(job_id_of(by_default))).owner == "bob"
    # The console script sees the same variables.
    as_bob = {**base, "WORKER_ADDR": f"127.0.0.1:{port}", "WORKER_PKI": str(pki_dir)}
    as_bob["WORKER_USER"] = "bob"
    proc = await asyncio.create_subprocess_exec(
        WORKER, "list", "--json", stdout=asyncio.subprocess.PIPE, env=subprocess_env(as_bob)
    )
    out, _ = await proc.communicate()
    assert proc.returncode == 0
    assert {j["owner"] for j in json.loads(out)} == {"bob"}


async def test_certs_init_writes_a_usable_pki(tmp_path: Path) -> None:
    directory = tmp_path / "pki"
    made = await invoke(
        [
            "certs",
            "init",
            "--dir",
            str(directory),
            "--user",
            "ops:admin",
            "--server-name",
            "w1.example",
        ],
        CLEAN_ENV,
    )
    assert made.exit_code == 0, made.stderr
    for stem in ("ca", "server", "ops"):
        assert (directory / f"{stem}-key.pem").stat().st_mode & 0o777 == 0o600
    load_client(Paths.from_pki(directory, "ops"))  # a valid client certificate and key
    added = await invoke(
        ["certs", "init", "--dir", str(directory), "--user", "dev:user"], CLEAN_ENV
    )
    assert added.exit_code == 0 and (directory / "dev.pem").exists()

    again = await invoke(
        ["certs", "init", "--dir", str(directory), "--user", "ops:admin"], CLEAN_ENV
    )
    assert again.exit_code == Exit.CONFIG
    assert "already exists" in one_error_line(again)
    bad = await invoke(["certs", "init", "--dir", str(directory), "--user", "ops"], CLEAN_ENV)
    assert bad.exit_code == Exit.USAGE
    assert "NAME:ROLE" in bad.stderr


async def test_shell_completion(W: Worker) -> None:
    for shell in ("bash", "zsh", "fish"):
        script = await W("completion", shell)
        assert script.exit_code == 0 and "_WORKER_COMPLETE" in script.stdout
    job = job_id_of(await W("start", "--", "true"))
    commands = await W(_WORKER_COMPLETE="bash_complete", COMP_WORDS="worker st", COMP_CWORD="1")
    assert {line.split(",")[1] for line in commands.stdout.splitlines()} == {
        "start",
        "status",
        "stop",
    }
    ids = await W(_WORKER_COMPLETE="bash_complete", COMP_WORDS="worker status ", COMP_CWORD="2")
    assert f"plain,{job}" in ids.stdout.splitlines()


async def test_help_lists_every_command_though_each_is_imported_when_used(W: Worker) -> None:
    """The root group names its commands (app.COMMANDS) and imports one when it runs; the
    help and the group's own listing must still show all of them, with their help lines."""
    from jobworker.client.cli.app import COMMANDS

    expected = {
        "attach",
        "certs",
        "completion",
        "hosts",
        "list",
        "logs",
        "rm",
        "run",
        "start",
        "status",
        "stop",
        "wait",
    }
    assert set(COMMANDS) == expected
    result = await W("--help")
    assert result.exit_code == 0, result.stderr
    listed = result.stdout.partition("Commands:")[2].partition("Exit codes:")[0]
    names = {line.split()[0] for line in listed.splitlines() if line.strip()}
    assert names == expected, result.stdout
    ctx = cli.make_context("worker", ["--help"], resilient_parsing=True)
    for name in sorted(expected):
        command = cli.get_command(ctx, name)
        assert command is not None and command.name == name, name
        assert command.get_short_help_str(), name
    # a subcommand of a lazily imported group, defined apart from the fleet's module
    certs = await W("certs", "--help")
    assert {"host", "init", "renew", "revoke"} <= set(certs.stdout.split()), certs.stdout
    # the fleet's additions to the job commands are there whichever way they are reached
    for verb in ("start", "run"):
        assert "--on SELECTOR" in (await W(verb, "--help")).stdout, verb
    assert "With --fleet" in (await W("list", "--help")).stdout


# -- errors: one line on stderr, a distinct exit code ---------------------------------------


async def test_error_not_found_and_hidden_jobs(W: Worker) -> None:
    missing = await W("status", "no-such-job")
    assert missing.exit_code == Exit.NOT_FOUND
    assert one_error_line(missing) == "worker: no job with id 'no-such-job'"
    bobs = job_id_of(await W("start", "--", "true", user="bob"))
    for command in ("status", "logs", "wait", "stop"):
        hidden = await W(command, bobs)  # alice may not know bob's job exists
        assert hidden.exit_code == Exit.NOT_FOUND, command
        assert bobs in one_error_line(hidden)


async def test_unusable_client_files_get_one_line_naming_the_file(
    daemon: Daemon, pki_dir: Path, tmp_path: Path
) -> None:
    # The CLI only reads its files before connecting (parsing them would import cryptography);
    # when the daemon turns it away it parses them to say why.
    ca, cert, key = pki_dir / "ca.pem", pki_dir / "alice.pem", pki_dir / "alice-key.pem"
    not_pem = tmp_path / "not-pem.pem"
    not_pem.write_text("hello\n")
    garbled = tmp_path / "garbled-key.pem"
    garbled.write_text("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
    cases = [
        ((ca, not_pem, key), f"{not_pem} is not a PEM-encoded client certificate"),
        ((ca, cert, garbled), f"{garbled} is not an unencrypted PEM private key"),
        ((ca, cert, pki_dir / "bob-key.pem"), f"{pki_dir / 'bob-key.pem'} is not the key of"),
        ((ca, pki_dir / "server.pem", pki_dir / "server-key.pem"), "is not a client certificate"),
    ]
    for (c, crt, k), expected in cases:
        files = {"WORKER_CA": str(c), "WORKER_CERT": str(crt), "WORKER_KEY": str(k)}
        result = await invoke(
            ["status", "some-job"],
            {**CLEAN_ENV, "WORKER_ADDR": f"127.0.0.1:{daemon.port}", **files},
        )
        assert result.exit_code == Exit.CONFIG, (expected, result.stderr)
        assert expected in one_error_line(result)


def test_the_cli_does_not_import_cryptography_or_the_library_to_reach_the_daemon() -> None:
    """Nor etcd's client unless a fleet command runs (aetcd took ~100 ms of every command)."""
    probe = (
        "import sys; from jobworker.client.cli import main; "
        "from jobworker.client.cli.settings import Settings; from jobworker.client import Client; "
        "print(' '.join(m for m in sys.modules if m.split('.')[0] in ('cryptography', 'aetcd') "
        "or m in ('jobworker.manager', 'jobworker.cgroup', 'jobworker.spawn', "
        "'jobworker.api.etcd', 'jobworker.client.fleet')))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


async def test_error_permission_denied(W: Worker) -> None:
    result = await W("start", "--", "true", user="vera")
    assert result.exit_code == Exit.PERMISSION
    assert one_error_line(result).startswith("worker: permission denied: vera (role viewer)")
    job = job_id_of(await W("start", "--", "sleep", "1000"))
    refused = await W("stop", job, user="vera")
    assert refused.exit_code == Exit.PERMISSION
    one_error_line(refused)
    assert (await W("stop", job)).exit_code == 0


async def test_sandbox_options(W: Worker, daemon: Daemon) -> None:
    refused = await W("run", "--no-sandbox", "--", "true")
    assert refused.exit_code == Exit.PERMISSION
    assert "only admins may" in one_error_line(refused)
    both = await W("run", "--no-sandbox", "--network", "none", "--", "true", user="root")
    assert both.exit_code == Exit.USAGE
    assert "--network applies to the sandbox" in one_error_line(both)
    job = job_id_of(await W("start", "--network", "none", "--", "true"))
    assert daemon.manager.spec(job).sandbox == Sandbox(Network.NONE)
    job = job_id_of(await W("start", "--no-sandbox", "--", "true", user="root"))
    assert daemon.manager.spec(job).sandbox is None


async def test_error_invalid_requests(W: Worker, tmp_path: Path) -> None:
    missing = await W("run", "--", str(tmp_path / "no-such-program"))
    assert missing.exit_code == Exit.INVALID
    assert "command not found" in one_error_line(missing)
    bad_cwd = await W("start", "--cwd", str(tmp_path / "nowhere"), "--", "true")
    assert bad_cwd.exit_code == Exit.INVALID
    one_error_line(bad_cwd)


async def test_error_limit_the_host_cannot_enforce(W: Worker, daemon: Daemon) -> None:
    wanted = {"memory": "--memory=64M", "pids": "--pids=10", "cpu": "--cpu=0.5"}
    missing = [flag for c, flag in wanted.items() if c not in daemon.manager.available_controllers]
    if not missing:
        pytest.skip("this host offers every controller: no limit is refused")
    result = await W("start", missing[0], "--", "true")
    assert result.exit_code == Exit.LIMIT_UNAVAILABLE
    assert "controller" in one_error_line(result)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["start", "--memory", "12Q", "--", "true"], "invalid limit: memory"),
        (["start", "--io-read-bps", "/dev/sda", "--", "true"], "DEV=VALUE"),
        (["start", "--env", "=x", "--", "true"], "no variable name"),
        (["start"], "Missing argument"),
        (["status"], "Missing argument 'ID'"),
        (["-f", "status", "x"], "applies to `logs` only"),
        # fleet ids are routed by each command (control.route), without --fleet refused
        (["status", "host-a/x"], "the fleet job id host-a/x needs --fleet"),
        (["rm", "host-a/y", "x"], "the fleet job id host-a/y needs --fleet"),
        (["stop", "a b/x"], "is not a fleet job id"),
        (["list", "--bogus"], "No such option"),
        (["nonsense"], "No such command"),
    ],
)
async def test_error_usage(W: Worker, args: list[str], message: str) -> None:
    """One line, as the README promises, naming the help to read; not click's usage block."""
    result = await W(*args)
    assert result.exit_code == Exit.USAGE
    line = one_error_line(result)
    assert message in line
    assert "--help" in line


async def test_error_daemon_unavailable(W: Worker) -> None:
    with socket.socket() as s:  # bound, not listening: connections are refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        result = await W("list", WORKER_ADDR=f"127.0.0.1:{port}")
    assert result.exit_code == Exit.UNAVAILABLE
    assert one_error_line(result).startswith(f"worker: cannot reach workerd at 127.0.0.1:{port}")


@pytest.mark.parametrize("addr", ["nonsense", "no-such-host.invalid:50051"])
async def test_error_address_that_does_not_resolve(env: Env, addr: str) -> None:
    # A real process: grpc's C core writes to fd 2 directly, which CliRunner would not see.
    proc = await asyncio.create_subprocess_exec(
        WORKER, "--addr", addr, "list", stderr=asyncio.subprocess.PIPE, env=subprocess_env(env)
    )
    _, stderr = await proc.communicate()
    assert proc.returncode == Exit.UNAVAILABLE
    [line] = stderr.decode().splitlines()
    host = addr.rpartition(":")[0] or addr
    assert (
        line
        == f"worker: cannot reach workerd at {addr}: the host name {host!r} could not be resolved"
    )


async def test_error_certificate_from_another_ca_is_refused(env: Env, tmp_path: Path) -> None:
    init_pki(tmp_path / "other", [("alice", "user")])
    # A real process: grpc's C core writes to fd 2 directly, which CliRunner would not see.
    proc = await asyncio.create_subprocess_exec(
        WORKER, "--pki", str(tmp_path / "other"), "list",
        stderr=asyncio.subprocess.PIPE, env=subprocess_env(env),
    )  # fmt: skip
    _, stderr = await proc.communicate()
    assert proc.returncode == Exit.UNAVAILABLE
    [line] = stderr.decode().splitlines()
    assert line.startswith("worker: cannot reach workerd") and "TLS handshake failed" in line


async def test_error_local_configuration(W: Worker, tmp_path: Path, pki_dir: Path) -> None:
    nobody = await W("list", user="nobody")
    assert nobody.exit_code == Exit.CONFIG
    assert "nobody.pem" in one_error_line(nobody)
    no_pki = await W("list", WORKER_PKI=None, WORKER_USER=None)
    assert no_pki.exit_code == Exit.CONFIG
    assert "no client certificate configured" in one_error_line(no_pki)
    # getpass.getuser() reads LOGNAME first; the harness PKI has a certificate for root.
    which = await W("list", WORKER_USER=None, LOGNAME="nobody")
    assert which.exit_code == Exit.CONFIG
    assert "give --user" in one_error_line(which)
    swapped = await W(
        "list", WORKER_CERT=str(pki_dir / "alice.pem"), WORKER_KEY=str(pki_dir / "bob-key.pem")
    )
    assert swapped.exit_code == Exit.CONFIG
    one_error_line(swapped)


# -- real processes: pipes, signals, dropped connections --------------------------------------


async def test_logs_into_head_ends_quietly(env: Env, tmp_path: Path, connect: Connect) -> None:
    data = random.Random(7).randbytes(8 * 1024 * 1024)
    (tmp_path / "blob").write_bytes(data)
    done = job_id_of(await invoke(["start", "--", "cat", str(tmp_path / "blob")], env))
    await connect("alice").wait(done)
    ticking = job_id_of(
        await invoke(["start", "--", "sh", "-c", "while :; do echo tick; sleep 0.01; done"], env)
    )
    try:
        for args, expected in (
            (["logs", done], data[:1000]),
            (["logs", "-f", ticking], b"tick\n" * 20),
        ):
            worker_rc, stderr, head_out = await pipe_into_head(args, env, len(expected))
            assert head_out == expected, args
            assert stderr == b"", args  # no BrokenPipeError traceback, no message
            assert worker_rc == Exit.STDOUT_CLOSED, args
        assert (await connect("alice").status(ticking)).state is JobState.RUNNING
    finally:
        await connect("alice").stop(ticking)


async def test_run_into_head_ends_quietly_and_stops_the_job(env: Env, connect: Connect) -> None:
    args = ["run", "--", "sh", "-c", "i=0; while :; do i=$((i+1)); echo $i; done"]  # endless
    worker_rc, stderr, head_out = await pipe_into_head(args, env, 8)
    assert (head_out, stderr, worker_rc) == (b"1\n2\n3\n4\n", b"", Exit.STDOUT_CLOSED)
    [job] = await connect("alice").list()
    final = await connect("alice").wait(job.id)  # stopped, as SIGPIPE would end `seq | head`
    assert (final.state, final.signal) == (JobState.STOPPED, signal.SIGTERM)


async def pipe_into_head(
    args: list[str], env: Mapping[str, str | None], n: int
) -> tuple[int, bytes, bytes]:
    read_end, write_end = os.pipe()
    try:
        worker = await asyncio.create_subprocess_exec(
            WORKER, *args, stdout=write_end, stderr=asyncio.subprocess.PIPE, env=subprocess_env(env)
        )
        head = await asyncio.create_subprocess_exec(
            "head", "-c", str(n), stdin=read_end, stdout=asyncio.subprocess.PIPE
        )
    finally:
        os.close(read_end)
        os.close(write_end)
    head_out, _ = await head.communicate()
    _, stderr = await worker.communicate()
    assert worker.returncode is not None
    return worker.returncode, stderr, head_out


async def test_run_ctrl_c_stops_the_job(env: Env, connect: Connect) -> None:
    proc = await asyncio.create_subprocess_exec(
        WORKER, "run", "--", "sh", "-c", "echo ready; exec sleep 1000",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=subprocess_env(env),
    )  # fmt: skip
    assert proc.stdout is not None and proc.stderr is not None
    assert await proc.stdout.readline() == b"ready\n"
    proc.send_signal(signal.SIGINT)
    _, stderr = await proc.communicate()
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert b"stopping job" in stderr and b"Traceback" not in stderr
    [job] = await connect("alice").list()
    assert job.state is JobState.STOPPED


@pytest.fixture
async def patient_daemon(tmp_path: Path, pki_dir: Path, cgroup_name: str) -> AsyncIterator[Daemon]:
    """A daemon whose stop grace is long enough for a second Ctrl+C to come inside it, and
    short enough for the test to see the stop escalate on its own."""
    reason = cgroup2_usable()
    if reason:
        pytest.skip(reason)
    d = await serve(
        Config(
            tls=Paths.from_pki(pki_dir, "server"),
            listen="127.0.0.1:0",
            state_dir=tmp_path / "state",
            cgroup_name=cgroup_name,
            stop_grace=3.0,
        )
    )
    parent = d.manager.cgroup_parent
    try:
        yield d
    finally:
        await d.close()
    assert not parent.exists(), f"cgroup {parent} left behind"


async def test_run_second_ctrl_c_detaches(patient_daemon: Daemon, pki_dir: Path) -> None:
    env = worker_env(patient_daemon.port, pki_dir)
    proc = await asyncio.create_subprocess_exec(
        WORKER, "run", "--", "sh", "-c", "trap '' TERM; echo ready; while :; do sleep 1; done",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=subprocess_env(env),
    )  # fmt: skip
    assert proc.stdout is not None and proc.stderr is not None
    assert await proc.stdout.readline() == b"ready\n"
    proc.send_signal(signal.SIGINT)
    first = await proc.stderr.readline()
    assert b"press Ctrl+C again to detach" in first

    def stop_in_flight() -> bool:
        value = patient_daemon.metrics.registry.get_sample_value(
            "jobworker_rpcs_in_flight", {"method": "Stop"}
        )
        return bool(value)

    # The message is printed as the Stop is sent: wait until the daemon is serving it.
    await wait_for(stop_in_flight, what="the daemon to receive the Stop")
    proc.send_signal(signal.SIGINT)  # the job ignores SIGTERM: the stop is still in its grace
    _, rest = await proc.communicate()
    assert proc.returncode == Exit.INTERRUPTED
    assert b"detached from job" in rest and b"Traceback" not in rest
    [job] = patient_daemon.manager.list()
    assert job.state is JobState.RUNNING
    # "it is being stopped" is true: the daemon's stop goes on without the client, to SIGKILL.
    async with asyncio.timeout(20):
        final = await patient_daemon.manager.wait(job.id)
    assert final.state is JobState.STOPPED and final.signal == signal.SIGKILL, final


class DroppingProxy:
    """A TCP relay to the daemon whose connections the test can cut (a network failure)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.accepted = 0
        self._writers: list[asyncio.StreamWriter] = []
        self._handlers: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        self.accepted += 1
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
            self._writers += [writer, up_writer]
            await asyncio.gather(
                self._pipe(reader, up_writer), self._pipe(up_reader, writer), return_exceptions=True
            )
        finally:
            writer.close()
            self._handlers.discard(task)

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        finally:
            writer.close()

    def drop(self) -> None:
        """Reset every open connection, both sides."""
        for w in self._writers:
            w.transport.abort()
        self._writers.clear()

    async def close(self) -> None:
        assert self._server is not None
        self._server.close()
        self.drop()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        await self._server.wait_closed()


@pytest.fixture
async def proxy(daemon: Daemon) -> AsyncIterator[DroppingProxy]:
    p = DroppingProxy(daemon.port)
    await p.start()
    try:
        yield p
    finally:
        await p.close()


async def test_run_reconnects_and_resumes_after_the_connection_drops(
    env: Env, proxy: DroppingProxy, tmp_path: Path
) -> None:
    gate = tmp_path / "gate"
    os.mkfifo(gate)
    first = bytes(range(256)) * 100
    second = random.Random(3).randbytes(300_000)
    (tmp_path / "first").write_bytes(first)
    (tmp_path / "second").write_bytes(second)
    script = f"cat {tmp_path / 'first'}; cat {gate}; cat {tmp_path / 'second'}; exit 9"
    proc = await asyncio.create_subprocess_exec(
        WORKER, "--addr", f"127.0.0.1:{proxy.port}", "run", "--", "sh", "-c", script,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=subprocess_env(env),
    )  # fmt: skip
    assert proc.stdout is not None
    assert await proc.stdout.readexactly(len(first)) == first
    connections = proxy.accepted
    proxy.drop()
    await open_gate(gate)
    rest, stderr = await proc.communicate()
    assert rest == second  # nothing lost, nothing repeated
    assert proc.returncode == 9, stderr
    assert b"reconnecting" in stderr and b"Traceback" not in stderr
    assert proxy.accepted > connections


async def test_gives_up_when_the_connection_does_not_come_back(
    env: Env, proxy: DroppingProxy, connect: Connect
) -> None:
    job = job_id_of(await invoke(["start", "--", "sh", "-c", "echo up; exec sleep 1000"], env))
    proc = await asyncio.create_subprocess_exec(
        WORKER, "--addr", f"127.0.0.1:{proxy.port}", "--reconnect", "0", "logs", "-f", job,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=subprocess_env(env),
    )  # fmt: skip
    assert proc.stdout is not None
    assert await proc.stdout.readline() == b"up\n"
    await proxy.close()
    _, stderr = await proc.communicate()
    assert proc.returncode == Exit.UNAVAILABLE
    assert b"gave up reconnecting" in stderr.splitlines()[-1]
    await connect("alice").stop(job)

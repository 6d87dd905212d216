"""``worker run -t`` and ``worker attach`` in a real terminal: tmux, driven by ``send-keys`` and
read by ``capture-pane`` (polled until the expected text is there, with a deadline).

Every test types in an outer ``sh`` whose ``stty -a`` is saved before the client starts and
after it ends: the client must leave the terminal as it found it, whichever way it ends (the
job's exit, a detach, SIGTERM to the client, the daemon killed)."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from jobworker.client import Client
from jobworker.server.daemon import Daemon
from tests.conftest import wait_for
from tests.integration import daemon_harness as harness

pki_dir, daemon = harness.pki_dir, harness.daemon

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux")

BIN = Path(sys.executable).parent
DEADLINE = 20.0


class Tmux:
    """One tmux server of our own (its own socket), one window running ``sh``."""

    def __init__(self, directory: Path, env: dict[str, str]) -> None:
        self.dir = directory
        self.socket = directory / "tmux.sock"
        self.env = env
        self.shell = ""

    async def run(self, *args: str) -> str:
        proc = await asyncio.create_subprocess_exec(
            "tmux", "-S", str(self.socket), *args,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await proc.communicate()
        assert proc.returncode == 0, err.decode()
        return out.decode()

    async def start(self) -> None:
        rc = self.dir / "env.sh"
        rc.write_text("".join(f"export {k}='{v}'\n" for k, v in self.env.items()))
        self.shell = f"env -i sh -c '. {rc}; exec sh'"
        await self.run("new-session", "-d", "-x", "100", "-y", "30", self.shell)

    async def keys(self, *keys: str) -> None:
        await self.run("send-keys", *keys)

    async def line(self, text: str) -> None:
        await self.keys("-l", text)
        await self.keys("Enter")

    async def screen(self) -> str:
        return await self.run("capture-pane", "-p", "-J", "-S", "-200")

    async def wait_screen(self, pattern: str, what: str = "") -> re.Match[str]:
        """Poll the pane until ``pattern`` (a regex) matches it; fail after the deadline."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + DEADLINE
        while True:
            text = await self.screen()
            found = re.search(pattern, text, re.MULTILINE)
            if found:
                return found
            if loop.time() > deadline:
                pytest.fail(f"no {what or pattern!r} on the screen after {DEADLINE}s:\n{text}")
            await asyncio.sleep(0.02)

    async def close(self) -> None:
        if self.socket.exists():
            await self.run("kill-server")


MakeTmux = Callable[[dict[str, str]], Tmux]


@pytest.fixture
async def tmux(tmp_path: Path) -> AsyncIterator[MakeTmux]:
    made: list[Tmux] = []

    def make(env: dict[str, str]) -> Tmux:
        t = Tmux(tmp_path, env)
        made.append(t)
        return t

    yield make
    for t in made:
        await t.close()


def shell_env(port: int, pki: Path, user: str = "alice", **extra: str) -> dict[str, str]:
    return {
        "PATH": f"{BIN}:/usr/local/bin:/usr/bin:/bin",
        "HOME": "/root",
        "TERM": "xterm",
        "PS1": "outer$ ",
        "WORKER_ADDR": f"127.0.0.1:{port}",
        "WORKER_PKI": str(pki),
        "WORKER_USER": user,
        **extra,
    }


def modes(path: Path) -> str:
    """``stty -a`` without the window size (tmux's resize-window changes that legitimately)."""
    return re.sub(r"rows \d+; columns \d+;", "", path.read_text())


async def session(t: Tmux, command: str) -> tuple[Path, Path]:
    """Run ``command`` in the outer shell between two ``stty -a`` snapshots."""
    before, after = t.dir / "stty.before", t.dir / "stty.after"
    await t.line(f"stty -a > {before}; {command}; echo exit=$?; stty -a > {after}")
    return before, after


async def ended_sane(t: Tmux, before: Path, after: Path) -> str:
    """Wait for the client to end, and check the terminal's modes are as before."""
    found = await t.wait_screen(r"^exit=(\d+)", "the client's end")
    await wait_for(lambda: after.exists() and after.stat().st_size > 0, what="stty -a after")
    assert modes(after) == modes(before)
    return found.group(1)


async def test_a_shell_in_a_terminal(tmux: MakeTmux, daemon: Daemon, pki_dir: Path) -> None:
    t: Tmux = tmux(shell_env(daemon.port, pki_dir))
    await t.start()
    await t.wait_screen(r"^outer\$", "the outer prompt")
    before, after = await session(t, "worker run -t -- sh")
    await t.wait_screen(r"^# $", "the job's prompt")
    await t.line("echo $((6*7))")
    await t.wait_screen(r"^42$")
    await t.line("tty")
    await t.wait_screen(r"^/dev/pts/\d+$", "a /dev/pts/ path")
    await t.run("resize-window", "-x", "120", "-y", "40")
    await t.line("stty size")
    await t.wait_screen(r"^40 120$", "the new size")
    # Ctrl+C interrupts the sleep inside the shell, not the session.
    await t.line("sleep 100; echo not-interrupted")
    await t.wait_screen(r"# sleep 100; echo not-interrupted\n")
    await t.keys("C-c")
    await t.line("echo still-here")
    await t.wait_screen(r"^still-here$")
    assert "not-interrupted\n" not in (await t.screen()).replace("echo not-interrupted", "")
    await t.line("exit 3")
    assert await ended_sane(t, before, after) == "3"


async def test_detach_then_attach_the_same_shell(
    tmux: MakeTmux, daemon: Daemon, pki_dir: Path
) -> None:
    t: Tmux = tmux(shell_env(daemon.port, pki_dir))
    await t.start()
    await t.wait_screen(r"^outer\$")
    before, after = await session(t, "worker run -t -- sh")
    await t.wait_screen(r"^# $")
    await t.line("MARK=shell-$$")
    await t.line("echo $MARK")
    mark = (await t.wait_screen(r"^(shell-\d+)$")).group(1)
    await t.keys("C-p", "C-q")
    found = await t.wait_screen(r"detached from job ([0-9a-f-]{36})", "the detach")
    job_id = found.group(1)
    assert await ended_sane(t, before, after) == "0"
    async with Client.from_pki(f"127.0.0.1:{daemon.port}", pki_dir, "alice") as alice:
        assert (await alice.status(job_id)).state.value == "running"
    (before2, after2) = (t.dir / "stty.before2", t.dir / "stty.after2")
    await t.line("clear")
    await t.line(f"stty -a > {before2}; worker attach {job_id}; echo code=$?; stty -a > {after2}")
    await t.line("echo again-$MARK")
    await t.wait_screen(rf"^again-{mark}$", "the same shell's variable")
    await t.line("exit 5")
    await t.wait_screen(r"^code=5$", "the job's exit code from attach")
    await wait_for(lambda: after2.exists() and after2.stat().st_size > 0, what="stty after")
    assert modes(after2) == modes(before2)


async def test_sigterm_to_the_client_restores_the_terminal(
    tmux: MakeTmux, daemon: Daemon, pki_dir: Path
) -> None:
    t: Tmux = tmux(shell_env(daemon.port, pki_dir))
    await t.start()
    await t.wait_screen(r"^outer\$")
    pidfile = t.dir / "client.pid"
    before, after = await session(t, f"sh -c 'echo $$ > {pidfile}; exec worker run -t -- sh'")
    await t.wait_screen(r"^# $")
    os.kill(int(pidfile.read_text()), signal.SIGTERM)
    assert await ended_sane(t, before, after) == str(128 + signal.SIGTERM)
    await t.wait_screen(r"SIGTERM: left job [0-9a-f-]{36} running")


async def test_a_lost_daemon_restores_the_terminal(
    tmux: MakeTmux, tmp_path: Path, pki_dir: Path, cgroup_name: str
) -> None:
    async with harness.start_workerd(tmp_path, pki_dir, cgroup_name) as workerd:
        env = shell_env(workerd.port, pki_dir, WORKER_RECONNECT="1")
        t: Tmux = tmux(env)
        await t.start()
        await t.wait_screen(r"^outer\$")
        before, after = await session(t, "worker run -t -- sh")
        await t.wait_screen(r"^# $")
        await t.line("echo $((6*7))")
        await t.wait_screen(r"^42$")
        workerd.proc.kill()
        await workerd.proc.wait()
        code = await ended_sane(t, before, after)
        assert code == "69", await t.screen()  # Exit.UNAVAILABLE


async def test_two_clients_see_the_same_screen(
    tmux: MakeTmux, daemon: Daemon, pki_dir: Path
) -> None:
    """The owner and an admin attached at once: what either types shows in both panes."""
    t: Tmux = tmux(shell_env(daemon.port, pki_dir))
    await t.start()
    await t.wait_screen(r"^outer\$")
    await t.line("worker run -t -- sh")
    await t.wait_screen(r"^# $")
    await t.keys("C-p", "C-q")
    job_id = (await t.wait_screen(r"detached from job ([0-9a-f-]{36})")).group(1)
    await t.line(f"worker attach {job_id}")
    await t.run("split-window", "-v", t.shell)
    await t.run("send-keys", "-l", f"WORKER_USER=root worker attach {job_id}")
    await t.run("send-keys", "Enter")
    top, bottom = "0.0", "0.1"

    async def pane(target: str) -> str:
        return await t.run("capture-pane", "-p", "-J", "-t", target)

    async def both(pattern: str) -> None:
        await wait_for_async(lambda: _matches(pane(top), pattern), f"{pattern} on top")
        await wait_for_async(lambda: _matches(pane(bottom), pattern), f"{pattern} below")

    await wait_for(lambda: _attached(daemon) >= 2, what="two attached clients")
    await t.run("send-keys", "-t", bottom, "-l", "echo from-admin-$((40+2))")
    await t.run("send-keys", "-t", bottom, "Enter")
    await both(r"^from-admin-42$")
    await t.run("send-keys", "-t", top, "-l", "echo from-owner-$((50+5))")
    await t.run("send-keys", "-t", top, "Enter")
    await both(r"^from-owner-55$")
    await t.run("send-keys", "-t", top, "-l", "exit")
    await t.run("send-keys", "-t", top, "Enter")
    await t.run("kill-pane", "-t", bottom)


async def _matches(text: Awaitable[str], pattern: str) -> bool:
    return re.search(pattern, await text, re.MULTILINE) is not None


def _attached(daemon: Daemon) -> float:
    """How many Attach calls are open (the daemon's in-flight gauge counts them)."""
    return daemon.metrics.in_flight.labels("Attach")._value.get()  # type: ignore[no-any-return]


async def wait_for_async(check: Callable[[], Awaitable[bool]], what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + DEADLINE
    while not await check():
        if loop.time() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


async def test_a_viewer_attached_watches_and_cannot_type(
    tmux: MakeTmux, daemon: Daemon, pki_dir: Path
) -> None:
    t: Tmux = tmux(shell_env(daemon.port, pki_dir))
    await t.start()
    await t.wait_screen(r"^outer\$")
    await t.line("worker run -t -- sh")
    await t.wait_screen(r"^# $")
    await t.keys("C-p", "C-q")
    job_id = (await t.wait_screen(r"detached from job ([0-9a-f-]{36})")).group(1)
    await t.line(f"worker attach {job_id}")
    await t.run("split-window", "-v", t.shell)
    top, bottom = "0.0", "0.1"
    await t.run("send-keys", "-t", bottom, "-l", f"WORKER_USER=vera worker attach {job_id}")
    await t.run("send-keys", "-t", bottom, "Enter")

    async def pane(target: str) -> str:
        return await t.run("capture-pane", "-p", "-J", "-t", target)

    await wait_for_async(lambda: _matches(pane(bottom), r"watching only"), "the viewer's notice")
    await t.run("send-keys", "-t", bottom, "-l", "echo viewer-$((1+1))")
    await t.run("send-keys", "-t", bottom, "Enter")
    await t.run("send-keys", "-t", top, "-l", "echo owner-$((2+3))")
    await t.run("send-keys", "-t", top, "Enter")
    # The viewer sees the owner's output, typed after its own keys...
    await wait_for_async(lambda: _matches(pane(bottom), r"^owner-5$"), "owner's output below")
    # ...and its own keys reached nothing: neither the job's log nor any screen.
    async with Client.from_pki(f"127.0.0.1:{daemon.port}", pki_dir, "alice") as alice:
        log = b"".join([d async for _, d in alice.logs(job_id)])
    assert b"owner-5" in log
    assert b"viewer" not in log
    await t.run("send-keys", "-t", top, "-l", "exit")
    await t.run("send-keys", "-t", top, "Enter")
    await wait_for_async(lambda: _matches(pane(bottom), r"^outer\$ $"), "the viewer's client end")

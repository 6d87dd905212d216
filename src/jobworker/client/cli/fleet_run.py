"""``start --on SELECTOR`` (placement on one host) and ``run --on all|SELECTOR`` (on every
matching host at once, output prefixed by host as pdsh does, a summary at the end), added to
the commands of :mod:`.jobs` from the outside: without ``--on`` they are unchanged. The root
group imports start and run from here (:data:`.app.COMMANDS`), so they always have it."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import signal
import sys
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, BinaryIO

import click

from jobworker.client.cli import jobs
from jobworker.client.cli.exits import CommandExit, Exit, StdoutClosed, error_exit, warn
from jobworker.client.cli.fleet import fleet_remote, need_fleet, table
from jobworker.client.cli.render import outcome
from jobworker.client.cli.session import Session, follow_output, wait_for_end
from jobworker.client.cli.settings import Settings, settings_of
from jobworker.errors import InvalidArgument, JobworkerError
from jobworker.spec import JobState, JobStatus

if TYPE_CHECKING:
    from jobworker.api.fleet import Selector
    from jobworker.client.fleet import Fleet, Host

ON_HELP = (
    "Run on the fleet (needs --fleet): any, all, or a label selector such as zone=a,gpu "
    "(KEY=VALUE, KEY, !KEY; all must hold)."
)
WATCH_INTERVAL = 0.5
"""Seconds between looks at etcd for hosts that left the fleet during a run."""


def _selector(on: str) -> Selector:
    from jobworker.api.fleet import Selector

    try:
        return Selector.parse(on)
    except InvalidArgument as e:
        raise click.BadParameter(str(e).removeprefix("--on: "), param_hint="--on") from e


def _job_args(kw: dict[str, Any]) -> tuple[tuple[str, ...], dict[str, Any]]:
    options = dict(kw)
    command, env, cwd = options.pop("command"), options.pop("env"), options.pop("cwd")
    limits, variables, place = jobs._limits(options), jobs._env(env), jobs._placement(options)
    return command, {"env": variables, "cwd": cwd, "limits": limits, **place}


def _start_with_on() -> None:
    command = jobs.start
    original = command.callback
    assert original is not None
    command.params.insert(0, click.Option(["--on"], metavar="SELECTOR", help=ON_HELP))
    command.help = (command.help or "") + (
        "\n\nWith --on SELECTOR (and --fleet): on the least-loaded matching host, a slot "
        "reserved in etcd first; prints the fleet id HOST/ID, which status, logs, wait, stop "
        "and rm take."
    )

    def callback(on: str | None, **kw: Any) -> Any:
        if on is None:
            return original(**kw)
        settings = settings_of(click.get_current_context())
        need_fleet(settings, "--on")
        selector = _selector(on)
        argv, options = _job_args(kw)
        placed = fleet_remote(settings, lambda f: f.start(selector, argv, **options))
        click.echo(placed.fleet_id)
        return None

    command.callback = callback


class Prefixed:
    """A host's output to stdout, line by line, each line led by ``HOST: ``."""

    def __init__(self, out: BinaryIO, prefix: bytes | None) -> None:
        self.out, self.prefix, self.partial = out, prefix, b""

    def write(self, data: bytes) -> int:
        try:
            if self.prefix is None:
                self.out.write(data)
            else:
                *lines, self.partial = (self.partial + data).split(b"\n")
                for line in lines:
                    self.out.write(self.prefix + line + b"\n")
        except BrokenPipeError:
            raise StdoutClosed() from None
        return len(data)

    def flush(self) -> None:
        try:
            self.out.flush()
        except BrokenPipeError:
            raise StdoutClosed() from None

    def close(self) -> None:
        if self.partial and self.prefix is not None:
            self.write(b"\n")
        self.flush()


@dataclasses.dataclass
class Outcome:
    host: str
    code: int | None = None
    text: str = "not started"
    job: str = ""


def _code(final: JobStatus) -> int:
    if final.state is JobState.LOST:
        return int(Exit.JOB_LOST)
    if final.exit_code is not None:
        return final.exit_code
    return 128 + (final.signal or 0)


async def fan_out(
    fleet: Fleet,
    settings: Settings,
    selector: Selector,
    argv: tuple[str, ...],
    options: dict[str, Any],
    prefix: bool,
    out: BinaryIO,
) -> list[Outcome]:
    found = await fleet.hosts(selector)
    if not found:
        raise CommandExit(Exit.NOT_FOUND, "no registered host matches --on")
    results = {h.name: Outcome(h.name) for h in found}
    sessions: dict[str, Session] = {}
    tasks: dict[str, asyncio.Task[None]] = {}
    leases = {h.name: h.record.lease for h in found}

    async def one(h: Host) -> None:
        result = results[h.name]
        if h.problem:
            result.code, result.text = int(Exit.UNAVAILABLE), f"unreachable: {h.problem}"
            return
        session = sessions[h.name] = Session(
            dataclasses.replace(settings, addr=h.record.advertise, server_name=h.name)
        )
        writer = Prefixed(out, f"{h.name}: ".encode() if prefix else None)
        try:
            status = await session.client.start(argv, **options)
            result.job, result.text = status.id, "running"
            await follow_output(session, status.id, True, writer)  # type: ignore[arg-type]
            final = await wait_for_end(session, status.id)
            result.code, result.text = _code(final), outcome(final)
        except JobworkerError as e:
            failure = error_exit(e, h.record.advertise)
            lost = bool(result.job)
            result.code = int(Exit.JOB_LOST if lost else failure.code)
            result.text = ("lost: " if lost else "not started: ") + (failure.message or str(e))
        finally:
            writer.close()

    async def watch() -> None:
        """A host that leaves the fleet (its lease expired: it died) is lost, not waited for."""
        while True:
            await asyncio.sleep(WATCH_INTERVAL)  # a poll of etcd, not a wait for a result
            with contextlib.suppress(JobworkerError):
                alive = {r.name: r.lease for r in await fleet.records()}
                for name, task in tasks.items():
                    if not task.done() and alive.get(name) != leases[name]:
                        task.cancel()
                        r = results[name]
                        r.code, r.text = int(Exit.JOB_LOST), "lost: the host left the fleet"

    stopping: list[asyncio.Task[Any]] = []

    async def stop_all() -> None:
        async def stop(name: str) -> None:
            with contextlib.suppress(JobworkerError):
                await sessions[name].client.stop(results[name].job)

        await asyncio.gather(*(stop(n) for n in sessions if results[n].job))

    main = asyncio.current_task()
    count = 0

    def on_sigint() -> None:
        nonlocal count
        count += 1
        if count == 1:
            warn(f"stopping the job on {len(sessions)} host(s) (press Ctrl+C again to detach)")
            stopping.append(asyncio.get_running_loop().create_task(stop_all()))
        elif main is not None:
            main.cancel()

    installed = threading.current_thread() is threading.main_thread()
    loop = asyncio.get_running_loop()
    if installed:
        loop.add_signal_handler(signal.SIGINT, on_sigint)
    watcher = loop.create_task(watch())
    try:
        for h in found:
            tasks[h.name] = loop.create_task(one(h))
        await asyncio.gather(*tasks.values(), return_exceptions=True)
        for t in tasks.values():
            if not t.cancelled() and isinstance(t.exception(), StdoutClosed):
                await stop_all()
                raise StdoutClosed()
    except asyncio.CancelledError:
        if count >= 2:
            raise CommandExit(Exit.INTERRUPTED, "detached; the jobs are being stopped") from None
        raise
    finally:
        if installed:
            loop.remove_signal_handler(signal.SIGINT)
        watcher.cancel()
        for t in (*tasks.values(), *stopping):
            t.cancel()
        await asyncio.gather(watcher, *tasks.values(), *stopping, return_exceptions=True)
        for s in sessions.values():
            await s.close()
    return sorted(results.values(), key=lambda r: r.host)


def _run_with_on() -> None:
    command = jobs.run
    original = command.callback
    assert original is not None
    command.params.insert(0, click.Option(["--on"], metavar="SELECTOR", help=ON_HELP))
    command.params.insert(
        1,
        click.Option(
            ["--no-prefix"], is_flag=True, help="With --on: raw output, no 'HOST: ' on lines."
        ),
    )
    command.help = (command.help or "") + (
        "\n\nWith --on all|SELECTOR (and --fleet): on every matching host at once, each output "
        "line led by 'HOST: ', then a summary of each host's exit code on stderr; exits with "
        "the largest of them (71 for a host lost on the way). Ctrl+C stops every job."
    )

    def callback(on: str | None, no_prefix: bool, **kw: Any) -> Any:
        if on is None:
            if no_prefix:
                raise click.UsageError("--no-prefix goes with --on")
            return original(**kw)
        settings = settings_of(click.get_current_context())
        need_fleet(settings, "--on")
        selector = _selector(on)
        argv, options = _job_args(kw)
        out = sys.stdout.buffer

        async def body(fleet: Fleet) -> list[Outcome]:
            return await fan_out(fleet, settings, selector, argv, options, not no_prefix, out)

        summarize(fleet_remote(settings, body), warn)
        return None

    command.callback = callback


def summarize(results: list[Outcome], say: Callable[[str], None]) -> None:
    """The summary table on stderr; exits with the largest of the hosts' codes."""
    rows = [(r.host, "-" if r.code is None else str(r.code), r.text) for r in results]
    click.echo(table(("HOST", "EXIT", "OUTCOME"), rows), err=True)
    failed = [r for r in results if r.code != 0]
    if failed:
        say(
            f"failed on {len(failed)} of {len(results)} host(s): "
            + ", ".join(f"{r.host} ({r.text})" for r in failed)
        )
        raise CommandExit(max((r.code or 1) for r in failed) or 1)


_start_with_on()
_run_with_on()
start, run = jobs.start, jobs.run
"""The commands as the root group runs them (:data:`.app.COMMANDS`): with --on."""

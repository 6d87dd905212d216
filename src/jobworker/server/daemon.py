"""``workerd``: the jobworker daemon.

The entry point is a library function, :func:`serve`, so tests (and embedders) run a real daemon
in-process; :func:`main` is the command line around it. Shutdown (SIGTERM/SIGINT, or
:meth:`Daemon.close`): stop accepting RPCs, stop the running jobs (so their followers' streams
and waits end cleanly with the final bytes and status), give in-flight RPCs a moment to finish,
remove the cgroups. Logs and records stay in the state directory for the next start.

Reload (SIGHUP, or :meth:`Daemon.reload`) re-reads the CRL, the policy file and the server
certificate, key and CA, and applies them all or (when one is bad) none; running jobs, streams
and connections stay. Everything else (listen address, state dir, cgroups, limits, job account,
uid range, network defaults, the debug endpoint) is read once, at start.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TypeVar

import click

from jobworker.cgroup import controllers
from jobworker.cgroup.devices import resolve_limits
from jobworker.errors import InvalidArgument, JobworkerError, LimitUnavailable
from jobworker.identity import Role
from jobworker.limits import Limits
from jobworker.manager import DEFAULT_STOP_GRACE, JobManager
from jobworker.retention import DEFAULT_SWEEP_INTERVAL, Retention
from jobworker.server import config as config_file
from jobworker.server import logs, service
from jobworker.server.accounts import DEFAULT_UID_RANGE, Accounts, IdentityUids, UidRange
from jobworker.server.authz import Policy, Revocations
from jobworker.server.debug import DebugServer, Metrics
from jobworker.server.policy import effective_limits
from jobworker.server.quotas import Quotas
from jobworker.spec import JobState, Network
from jobworker.tls import Material, Paths, load_server
from jobworker.units import parse_duration, parse_size

log = logging.getLogger("jobworker.server.daemon")
T = TypeVar("T")

DEFAULT_LISTEN = "127.0.0.1:50051"
DEFAULT_STATE_DIR = Path("/var/lib/jobworker")
DEFAULT_RETAIN_FOR = "7d"
DEFAULT_RETAIN_JOBS = 10_000
DEFAULT_MAX_LOG_BYTES = "1G"
"""A job's output cap: far below a typical disk's free space, so one job cannot fill it,
and far above what a job's log is normally read for."""
DEFAULT_MAX_LOG_BYTES_PER_USER = "10G"
OFF = "off"
RPC_DRAIN_SECONDS = 5.0
"""After the jobs have stopped, how long in-flight RPCs (a Logs stream sending its last bytes)
may run before they are cancelled."""


@dataclass(frozen=True, slots=True)
class Config:
    tls: Paths
    crl: Path | None = None
    """X.509 CRL of revoked client certificates, signed by the CA; ``None``: ``crl.pem`` next
    to the server certificate, whenever it exists (at start and at each reload)."""
    listen: str = DEFAULT_LISTEN
    state_dir: Path = DEFAULT_STATE_DIR
    cgroup_root: Path | None = None
    """The delegated cgroup to work in; default: the daemon's own."""
    cgroup_name: str = "jobworker"
    stop_grace: float = DEFAULT_STOP_GRACE
    retain_for: timedelta | None = field(
        default_factory=lambda: timedelta(seconds=parse_duration(DEFAULT_RETAIN_FOR))
    )
    """Ended jobs older than this are removed (record and log); ``None``: no age limit."""
    retain_jobs: int | None = DEFAULT_RETAIN_JOBS
    """At most this many ended jobs are kept, the oldest removed first; ``None``: no limit."""
    max_log_bytes: int | None = field(default_factory=lambda: parse_size(DEFAULT_MAX_LOG_BYTES))
    """A job whose output goes past this is stopped, the reason in its status."""
    max_log_bytes_per_user: int | None = field(
        default_factory=lambda: parse_size(DEFAULT_MAX_LOG_BYTES_PER_USER)
    )
    """The logs of one identity's ended jobs keep at most this many bytes (oldest removed)."""
    retention_sweep: float = DEFAULT_SWEEP_INTERVAL
    """Seconds between sweeps for jobs past ``retain_for``."""
    clock: Callable[[], datetime] | None = None
    """What ages are measured against (default: the wall clock; tests pass one they move)."""
    default_limits: Limits = field(default_factory=Limits)
    max_limits: Limits = field(default_factory=Limits)
    max_running_per_user: int | None = None
    """Running jobs an identity may have at once; ``None`` = no quota."""
    max_streams_per_user: int | None = None
    """Logs and Wait calls an identity may have open at once; ``None`` = no quota."""
    max_starts_per_second_per_user: float | None = None
    """Starts per second per identity (a token bucket, bursts of up to max(1, rate))."""
    quota_clock: Callable[[], float] | None = None
    """The start buckets' clock (seconds, monotonic); ``None``: time.monotonic. For tests."""
    policy_file: Path | None = None
    max_runtime: float | None = None
    """Seconds a job may run at most, and the deadline of a job that asks for none; the
    policy's ``[runtime]`` entry for a role replaces it for that role. ``None``: no cap."""
    job_account: str | None = None
    """Unix account (``user[:group]``) for every identity the policy does not map, instead of
    its own uid (``None``, the default: each identity gets a uid from ``uid_range``). A daemon
    that is not root can only run jobs as itself, so it must name its own user here."""
    uid_range: UidRange = DEFAULT_UID_RANGE
    """Where identities' own uids come from (gid = uid); recorded in STATE/identities.json."""
    debug_socket: Path | None = None
    """Unix socket (mode 0600, the daemon's user only) for /metrics and /debug/*; ``None`` =
    off. ``STATE_DIR/debug.sock`` is a good place: the state dir is the daemon's alone."""
    debug_address: str | None = None
    """``HOST:PORT`` on loopback for the same over HTTPS with mutual TLS (the daemon's CA and
    server certificate; admin client certificates only); ``None`` = off."""
    default_network: Network = Network.HOST
    """The network of a sandboxed job that does not ask for one."""
    host_network_roles: frozenset[Role] = frozenset(Role)
    """Roles whose jobs may use the host's network."""


def _secrets(config: Config) -> list[Path]:
    """What sandboxed jobs must not see besides the state dir (the manager hides that): the
    daemon's key and certificate, a ``certs init`` directory's CA key, the policy file."""
    paths = [config.tls.key, config.tls.cert]
    ca_key = config.tls.key.parent / "ca-key.pem"
    if ca_key.exists():
        paths.append(ca_key)
    if config.policy_file is not None:
        paths.append(config.policy_file)
    return paths


def _crl_path(config: Config) -> Path | None:
    if config.crl is not None:
        return config.crl
    default = config.tls.cert.parent / "crl.pem"
    return default if default.exists() else None


def _revocations(config: Config, material: Material) -> Revocations:
    """The CRL of ``config`` (none: nothing revoked). Raises :class:`InvalidArgument`."""
    path = _crl_path(config)
    if path is None:
        return Revocations()
    revocations = Revocations.load(path, material.ca)
    log.info("revocation list %s: %d revoked certificate(s)", path, len(revocations.revoked))
    if revocations.stale(datetime.now(UTC)):
        log.warning(
            "revocation list %s is past its next update (%s): still applied; write a fresh one "
            "(worker certs revoke re-signs it) and send SIGHUP",
            path,
            revocations.next_update,
        )
    return revocations


def _policy(config: Config) -> Policy | None:
    if config.policy_file is None:
        return None
    try:
        return Policy.load(config.policy_file)
    except OSError as e:
        raise InvalidArgument(
            f"cannot read the policy file {config.policy_file}: {e.strerror}"
        ) from e


class Daemon:
    """A running daemon; get one from :func:`serve`."""

    def __init__(
        self,
        manager: JobManager,
        server: service.RunningServer,
        debug: DebugServer | None,
        metrics: Metrics,
        stop_grace: float,
        *,
        config: Config | None = None,
        servicer: service.JobWorkerService | None = None,
    ) -> None:
        self._config = config
        self._servicer = servicer
        self.manager = manager
        self.metrics = metrics
        self._stop_grace = stop_grace
        self._server = server
        self._debug = debug
        self._closed: asyncio.Future[None] | None = None

    @property
    def port(self) -> int:
        """The gRPC port (useful with a listen address of port 0)."""
        return self._server.port

    @property
    def debug(self) -> DebugServer | None:
        return self._debug

    @property
    def debug_port(self) -> int | None:
        """The debug endpoint's HTTPS port (``None`` when not served over TCP)."""
        return self._debug.tcp_port if self._debug else None

    @property
    def debug_socket(self) -> Path | None:
        return self._debug.socket_path if self._debug else None

    def reload(self) -> None:
        """Re-read the CRL, the policy file and the server certificate, key and CA (SIGHUP).

        All are read and checked before any is applied: on an error nothing changes and
        :class:`InvalidArgument` says which file is wrong. Then the next RPC is checked against
        the new CRL and policy, on every connection, open ones too, and the next TLS handshake
        gets the new certificate. Running jobs, Logs streams and Waits are not touched; nothing
        else in :class:`Config` is re-read (see the module docstring).
        """
        config, servicer = self._config, self._servicer
        if config is None or servicer is None or self._server.certificates is None:
            raise InvalidArgument("this daemon was not started by serve(): nothing to reload")
        material = load_server(config.tls)
        revocations = _revocations(config, material)
        policy = _policy(config)
        for account in sorted(policy.accounts() if policy else set()):
            servicer.settings.accounts.credentials(account)
        settings = replace(
            servicer.settings,
            policy=policy,
            host_network_roles=(
                policy.host_network_roles
                if policy is not None and policy.host_network_roles is not None
                else config.host_network_roles
            ),
        )
        changed = self._server.certificates.replace(material)
        servicer.reconfigure(settings, revocations)
        log.info(
            "reloaded: certificate %s (%s), policy %s, revocation list %s (%d revoked)",
            config.tls.cert,
            "new, for new connections" if changed else "unchanged",
            config.policy_file or "none",
            revocations.path or "none",
            len(revocations.revoked),
        )

    async def close(self) -> None:
        """Graceful shutdown; see the module docstring. Idempotent, and safe to call from
        several tasks (later callers wait for the first)."""
        if self._closed is not None:
            await asyncio.shield(self._closed)
            return
        self._closed = asyncio.get_running_loop().create_future()
        try:
            log.info("shutting down")
            # First health NOT_SERVING (load balancers and probes see it while the jobs stop)
            # and new JobWorker calls refused (UNAVAILABLE); in-flight calls go on: the jobs
            # end, so follow streams and waits finish on their own, then the server stops,
            # giving them a moment to send their last bytes.
            await self._server.begin_shutdown()
            try:
                await self.manager.close()
            finally:
                await self._server.server.stop(RPC_DRAIN_SECONDS)
                if self._debug is not None:
                    await asyncio.to_thread(self._debug.close)
            log.info("stopped")
        finally:
            self._closed.set_result(None)


async def serve(config: Config) -> Daemon:
    """Start a daemon: open the manager (recovering records of a previous run), listen with
    mutual TLS, start the debug endpoint if asked.

    Raises :class:`~jobworker.errors.InvalidArgument` for bad configuration (certificates,
    policy, limits above their caps, debug address), :class:`~jobworker.errors.LimitUnavailable`
    for default limits the host cannot enforce, :class:`~jobworker.errors.HostError` when
    the host refuses (cgroups, state dir, the listen address). Nothing is left running on error.
    """
    material = load_server(config.tls)
    revocations = _revocations(config, material)
    policy = Policy.load(config.policy_file) if config.policy_file else None
    defaults = resolve_limits(config.default_limits)
    caps = resolve_limits(config.max_limits)
    effective_limits(defaults, Limits(), caps)  # the defaults must respect the caps
    if config.max_runtime is not None:
        parse_duration(config.max_runtime, "max_runtime")  # positive and finite
    settings = service.Settings(
        policy,
        defaults,
        caps,
        config.job_account,
        accounts=_accounts(config),
        default_network=config.default_network,
        max_runtime=config.max_runtime,
        host_network_roles=(
            policy.host_network_roles
            if policy is not None and policy.host_network_roles is not None
            else config.host_network_roles
        ),
    )
    # Every account the configuration names must exist (fail now, not at the first Start).
    named = {config.job_account} if config.job_account is not None else set()
    for account in sorted(named | (policy.accounts() if policy else set())):
        settings.accounts.credentials(account)
    quotas = Quotas(
        config.max_running_per_user,
        config.max_streams_per_user,
        config.max_starts_per_second_per_user,
        clock=config.quota_clock or time.monotonic,
    )
    metrics = Metrics()
    loop = asyncio.get_running_loop()
    async with contextlib.AsyncExitStack() as undo:
        manager = await JobManager.open(
            config.state_dir,
            cgroup_root=config.cgroup_root,
            cgroup_name=config.cgroup_name,
            stop_grace=config.stop_grace,
            hidden_paths=_secrets(config),
            max_log_bytes=config.max_log_bytes,
            retention=Retention(
                max_age=config.retain_for,
                max_jobs=config.retain_jobs,
                max_log_bytes_per_owner=config.max_log_bytes_per_user,
                sweep_interval=config.retention_sweep,
            ),
            clock=config.clock or _wall_clock,
            on_removed=metrics.job_removed,
        )
        undo.push_async_callback(manager.close)
        # Both are applied to jobs (a cap is also the limit of a job that asks for nothing):
        # one the host cannot enforce would make every Start fail, so refuse to start instead.
        for what, limits in (("default limits", defaults), ("limit caps (--max-*)", caps)):
            try:
                controllers.check(limits, manager.available_controllers)
            except LimitUnavailable as e:
                raise LimitUnavailable(
                    f"the {what} cannot be enforced on this host, so the daemon will not "
                    f"start (drop them or run on a host that delegates the controller): {e}"
                ) from e

        async def list_states() -> list[JobState]:
            return [s.state for s in manager.list()]

        debug: DebugServer | None = None
        if config.debug_socket is not None or config.debug_address is not None:
            debug = endpoint = DebugServer(metrics, loop, policy)
            metrics.observe_jobs(lambda: endpoint.on_loop(list_states))
            undo.callback(endpoint.close)
            if config.debug_socket is not None:
                endpoint.start_unix(config.debug_socket)
                log.info(
                    "debug endpoint on unix socket %s (metrics, debug/stacks, debug/profile, "
                    "debug/heap)",
                    endpoint.socket_path,
                )
            if config.debug_address is not None:
                endpoint.start_tcp(config.debug_address, material)
                log.info(
                    "debug endpoint on %s (HTTPS, admin client certificates only; metrics, "
                    "debug/stacks, debug/profile, debug/heap)",
                    endpoint.url,
                )
        servicer = service.JobWorkerService(
            manager, settings, metrics, revocations=revocations, quotas=quotas
        )
        server = await service.start_server(servicer, material, config.listen)
        undo.pop_all()
    daemon = Daemon(
        manager, server, debug, metrics, config.stop_grace, config=config, servicer=servicer
    )
    log.info("listening on %s (port %d)", config.listen, server.port)
    return daemon


def _wall_clock() -> datetime:
    return datetime.now(UTC)


def _accounts(config: Config) -> Accounts:
    """The account resolver for ``config``: per-identity uids unless ``job_account`` replaces
    them. Raises :class:`InvalidArgument` for an empty ``job_account``, or per-identity uids
    asked of a daemon that is not root; :class:`HostError` for an unusable identities file."""
    if config.job_account is not None and not config.job_account.strip():
        raise InvalidArgument(
            "--job-user is empty: name an account (USER[:GROUP]) for every identity the policy "
            "does not map, or leave it out to give each identity a uid of its own"
        )
    if config.job_account is not None:
        log.info(
            "jobs of identities the policy does not map run as %r (--job-user)", config.job_account
        )
        return Accounts()
    if os.geteuid() != 0:
        raise InvalidArgument(
            "per-identity uids need a root daemon; give --job-user with the daemon's own user "
            "to run every job as it"
        )
    uids = IdentityUids.open(config.state_dir, config.uid_range)
    log.info(
        "jobs of identities the policy does not map run as uids of their own from %s",
        config.uid_range,
    )
    return Accounts(uids)


def _reload(daemon: Daemon) -> None:
    """SIGHUP: reload; a bad file is logged and the daemon goes on as it was."""
    log.info("SIGHUP: reloading the revocation list, the policy and the server certificate")
    try:
        daemon.reload()
    except (JobworkerError, OSError) as e:
        log.error("reload failed, nothing changed: %s", e)


async def run(config: Config) -> None:
    """Serve until SIGTERM or SIGINT, then shut down gracefully; reload on SIGHUP."""
    daemon = await serve(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, _reload, daemon)
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
        await daemon.close()


# -- command line -----------------------------------------------------------------------------


def _limits(
    cpu: str | None, weight: str | None, memory: str | None, io: Sequence[str], pids: str | None
) -> Limits:
    return Limits.parse(cpu=cpu, cpu_weight=weight, memory=memory, io=io, pids=pids)


def _off(text: str, parse: Callable[[str], T]) -> T | None:
    """``parse(text)``, or ``None`` for ``off`` (no limit)."""
    return None if text.strip().lower() == OFF else parse(text)


def _retain_jobs(text: str) -> int:
    if not text.strip().isdigit() or int(text) < 1:
        raise InvalidArgument(
            f"--retain-jobs: {text!r} is not a whole number of jobs from 1 up; use e.g. 10000, "
            "or off for no limit"
        )
    return int(text)


def _env(name: str) -> str:
    return f"WORKERD_{name}"


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option(
    "--listen", default=DEFAULT_LISTEN, envvar=_env("LISTEN"), help="HOST:PORT to serve gRPC on."
)
@click.option(
    "--pki",
    type=click.Path(file_okay=False, path_type=Path),
    envvar=_env("PKI"),
    help="A `worker certs init` directory: uses ca.pem, server.pem and server-key.pem.",
)
@click.option(
    "--ca",
    type=click.Path(dir_okay=False, path_type=Path),
    envvar=_env("CA"),
    help="CA certificate that client certificates must chain to.",
)
@click.option(
    "--cert",
    type=click.Path(dir_okay=False, path_type=Path),
    envvar=_env("CERT"),
    help="Server certificate (ECDSA, serverAuth).",
)
@click.option(
    "--key",
    type=click.Path(dir_okay=False, path_type=Path),
    envvar=_env("KEY"),
    help="Server private key.",
)
@click.option(
    "--crl",
    type=click.Path(dir_okay=False, path_type=Path),
    envvar=_env("CRL"),
    help="X.509 CRL (PEM or DER, signed by the CA) of revoked client certificates; re-read on "
    "SIGHUP, like --policy and the server certificate.  [default: crl.pem next to the server "
    "certificate, when it exists]",
)
@click.option(
    "--state-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=DEFAULT_STATE_DIR,
    envvar=_env("STATE_DIR"),
    help="Job records and logs.",
)
@click.option(
    "--cgroup-root",
    type=click.Path(file_okay=False, path_type=Path),
    envvar=_env("CGROUP_ROOT"),
    help="Delegated cgroup v2 directory to work in  [default: the daemon's own cgroup]",
)
@click.option(
    "--cgroup-name",
    default="jobworker",
    envvar=_env("CGROUP_NAME"),
    help="Name of the daemon's group under the cgroup root.",
)
@click.option(
    "--stop-grace",
    type=click.FloatRange(0, 3600),
    default=DEFAULT_STOP_GRACE,
    envvar=_env("STOP_GRACE"),
    help="Seconds between SIGTERM and SIGKILL when stopping a job.",
)
@click.option(
    "--retain-for",
    default=DEFAULT_RETAIN_FOR,
    envvar=_env("RETAIN_FOR"),
    metavar="DURATION",
    help="Ended jobs older than this are removed, record and log (30s, 10m, 12h, 7d; off).",
)
@click.option(
    "--retain-jobs",
    default=str(DEFAULT_RETAIN_JOBS),
    envvar=_env("RETAIN_JOBS"),
    metavar="N",
    help="Most ended jobs kept; past it the oldest are removed (off: no limit).",
)
@click.option(
    "--max-log-bytes",
    default=DEFAULT_MAX_LOG_BYTES,
    envvar=_env("MAX_LOG_BYTES"),
    metavar="SIZE",
    help="A job whose output goes past this is stopped, with the reason (e.g. 512M; off).",
)
@click.option(
    "--max-log-bytes-per-user",
    default=DEFAULT_MAX_LOG_BYTES_PER_USER,
    envvar=_env("MAX_LOG_BYTES_PER_USER"),
    metavar="SIZE",
    help="Most log bytes one identity's ended jobs keep; past it its oldest are removed (off).",
)
@click.option(
    "--policy",
    "policy_file",
    type=click.Path(dir_okay=False, path_type=Path),
    envvar=_env("POLICY"),
    help='TOML file: [roles] NAME = "ROLE" overrides certificate roles; [run_as.identities] '
    'NAME = "user[:group]" and [run_as.roles] ROLE = "user[:group]" pick the Unix account '
    "an identity's jobs run as.",
)
@click.option(
    "--max-runtime",
    envvar=_env("MAX_RUNTIME"),
    metavar="DURATION",
    help="Longest a job may run (e.g. 30s, 10m, 1.5h): a job asking for more is refused, one "
    'asking for none gets it as its deadline. The policy\'s [runtime] ROLE = "DURATION" '
    "replaces it for a role.  [default: no cap]",
)
@click.option(
    "--job-user",
    envvar=_env("JOB_USER"),
    help="Unix account (user[:group]) for the jobs of every identity the policy does not map, "
    "instead of a uid of its own. Jobs run as root only if this or the policy says root.  "
    "[default: each identity its own uid from --uid-range]",
)
@click.option(
    "--uid-range",
    default=str(DEFAULT_UID_RANGE),
    envvar=_env("UID_RANGE"),
    metavar="FIRST-LAST",
    help="uids (gid = uid) the daemon gives identities, one each, recorded in "
    "STATE/identities.json; no account of the host may be in it (those uids are skipped).",
)
@click.option(
    "--default-cpu", envvar=_env("DEFAULT_CPU"), help="CPU cores for jobs that ask for none."
)
@click.option(
    "--default-cpu-weight",
    envvar=_env("DEFAULT_CPU_WEIGHT"),
    help="cpu.weight for jobs that ask for none.",
)
@click.option(
    "--default-memory",
    envvar=_env("DEFAULT_MEMORY"),
    help="Memory (e.g. 512M) for jobs that ask for none.",
)
@click.option(
    "--default-io",
    multiple=True,
    envvar=_env("DEFAULT_IO"),
    help="DEV=RATE or DEV=KEY=VALUE,... for jobs that ask for none; repeatable.",
)
@click.option(
    "--default-pids", envvar=_env("DEFAULT_PIDS"), help="Task limit for jobs that ask for none."
)
@click.option("--max-cpu", envvar=_env("MAX_CPU"), help="Most CPU cores a job may ask for.")
@click.option(
    "--max-cpu-weight", envvar=_env("MAX_CPU_WEIGHT"), help="Highest cpu.weight a job may ask for."
)
@click.option("--max-memory", envvar=_env("MAX_MEMORY"), help="Most memory a job may ask for.")
@click.option(
    "--max-io",
    multiple=True,
    envvar=_env("MAX_IO"),
    help="Highest io rates a job may ask for, per device; repeatable.",
)
@click.option("--max-pids", envvar=_env("MAX_PIDS"), help="Most tasks a job may ask for.")
@click.option(
    "--max-running-per-user",
    type=click.IntRange(min=1),
    envvar=_env("MAX_RUNNING_PER_USER"),
    help="Most jobs one identity may have running at once (more: RESOURCE_EXHAUSTED).  "
    "[default: no quota]",
)
@click.option(
    "--max-streams-per-user",
    type=click.IntRange(min=1),
    envvar=_env("MAX_STREAMS_PER_USER"),
    help="Most Logs/Wait calls one identity may have open at once.  [default: no quota]",
)
@click.option(
    "--max-starts-per-second-per-user",
    type=click.FloatRange(min=0, min_open=True),
    envvar=_env("MAX_STARTS_PER_SECOND_PER_USER"),
    help="Starts per second one identity may make (bursts of up to max(1, R)).  "
    "[default: no quota]",
)
@click.option(
    "--debug-socket",
    type=click.Path(dir_okay=False, path_type=Path),
    envvar=_env("DEBUG_SOCKET"),
    help="Unix socket (mode 0600) for /metrics and /debug/* (off by default), e.g. "
    "STATE_DIR/debug.sock; curl --unix-socket PATH http://localhost/metrics.",
)
@click.option(
    "--debug-addr",
    envvar=_env("DEBUG_ADDR"),
    help="Loopback HOST:PORT serving the same over HTTPS with mutual TLS, admin client "
    "certificates only (off by default), e.g. 127.0.0.1:6060.",
)
@click.option(
    "--default-network",
    type=click.Choice([n.value for n in Network]),
    default=Network.HOST.value,
    envvar=_env("DEFAULT_NETWORK"),
    help="Network of a job that asks for none: the host's, or none (only loopback, its own).",
)
@click.option(
    "--config",
    type=click.Path(dir_okay=False, path_type=Path),
    envvar=_env("CONFIG"),
    is_eager=True,
    expose_value=False,
    callback=config_file.callback,
    help="TOML file with any of these options as keys: the long name without dashes, e.g. "
    'max-memory = "8G", default-io = ["/dev/sda=10M"]. Flags win over WORKERD_* variables, '
    "which win over the file.",
)
@click.option(
    "--print-config",
    is_flag=True,
    help="Print every setting with where it came from (flag, env, file, default), and exit.",
)
@click.option(
    "--log-format",
    type=click.Choice(logs.FORMATS),
    default="text",
    envvar=_env("LOG_FORMAT"),
    help="text, or json: one object per line (audit lines with their fields as keys).",
)
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"]),
    default="info",
    envvar=_env("LOG_LEVEL"),
)
def main(
    listen: str,
    pki: Path | None,
    ca: Path | None,
    cert: Path | None,
    key: Path | None,
    crl: Path | None,
    state_dir: Path,
    cgroup_root: Path | None,
    cgroup_name: str,
    stop_grace: float,
    retain_for: str,
    retain_jobs: str,
    max_log_bytes: str,
    max_log_bytes_per_user: str,
    policy_file: Path | None,
    max_runtime: str | None,
    job_user: str | None,
    uid_range: str,
    default_cpu: str | None,
    default_cpu_weight: str | None,
    default_memory: str | None,
    default_io: tuple[str, ...],
    default_pids: str | None,
    max_cpu: str | None,
    max_cpu_weight: str | None,
    max_memory: str | None,
    max_io: tuple[str, ...],
    max_pids: str | None,
    max_running_per_user: int | None,
    max_streams_per_user: int | None,
    max_starts_per_second_per_user: float | None,
    debug_socket: Path | None,
    debug_addr: str | None,
    default_network: str,
    print_config: bool,
    log_format: str,
    log_level: str,
) -> None:
    """Serve jobworker over gRPC with mutual TLS 1.3.

    Needs root (or a delegated cgroup v2 subtree) to create cgroups. Every option can also be
    given in the environment as WORKERD_<OPTION>, e.g. WORKERD_LISTEN=127.0.0.1:50051.
    """
    if print_config:
        click.echo("\n".join(config_file.describe(click.get_current_context())))
        return
    logs.setup(log_level, log_format)
    if pki is None and not (ca and cert and key):
        raise click.UsageError("give --pki DIR, or all of --ca, --cert and --key")
    paths = Paths.from_pki(pki, "server") if pki else Paths(ca, cert, key)  # type: ignore[arg-type]
    paths = Paths(ca or paths.ca, cert or paths.cert, key or paths.key)
    try:
        config = Config(
            tls=paths,
            crl=crl,
            listen=listen,
            state_dir=state_dir,
            cgroup_root=cgroup_root,
            cgroup_name=cgroup_name,
            stop_grace=stop_grace,
            retain_for=_off(
                retain_for, lambda v: timedelta(seconds=parse_duration(v, "--retain-for"))
            ),
            retain_jobs=_off(retain_jobs, _retain_jobs),
            max_log_bytes=_off(max_log_bytes, lambda v: parse_size(v, "--max-log-bytes")),
            max_log_bytes_per_user=_off(
                max_log_bytes_per_user, lambda v: parse_size(v, "--max-log-bytes-per-user")
            ),
            default_limits=_limits(
                default_cpu, default_cpu_weight, default_memory, default_io, default_pids
            ),
            max_limits=_limits(max_cpu, max_cpu_weight, max_memory, max_io, max_pids),
            max_running_per_user=max_running_per_user,
            max_streams_per_user=max_streams_per_user,
            max_starts_per_second_per_user=max_starts_per_second_per_user,
            policy_file=policy_file,
            max_runtime=(
                None if max_runtime is None else parse_duration(max_runtime, "--max-runtime")
            ),
            job_account=job_user,
            uid_range=UidRange.parse(uid_range),
            debug_socket=debug_socket,
            debug_address=debug_addr,
            default_network=Network(default_network),
        )
        asyncio.run(run(config))
        # A failed RPC leaves reference cycles (error -> traceback -> frames -> call) holding
        # grpc objects; left to the interpreter's exit they make grpc's shutdown take ~2 s
        # (measured: an idle daemon that had answered one NOT_FOUND took 2.2 s to exit).
        gc.collect()
    except JobworkerError as e:
        click.echo(f"workerd: {e}", err=True)
        sys.exit(1)
    except OSError as e:
        click.echo(f"workerd: {e}", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()

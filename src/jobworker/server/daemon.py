"""``workerd``: the jobworker daemon.

The entry point is a library function, :func:`serve`, so tests (and embedders) run a real daemon
in-process; :func:`main` (in :mod:`jobworker.server.cli`, re-exported here) is the command
line around it, and :class:`Config` (in :mod:`jobworker.server.daemon_config`, also re-exported)
its settings. Shutdown (SIGTERM/SIGINT, or :meth:`Daemon.close`): stop accepting RPCs, stop the
running jobs (so their followers' streams and waits end cleanly with the final bytes and status),
give in-flight RPCs a moment to finish, remove the cgroups. Logs and records stay in the state
directory for the next start.

Reload (SIGHUP, or :meth:`Daemon.reload`) re-reads the CRL, the policy file and the server
certificate, key and CA, and applies them all or (when one is bad) none; running jobs, streams
and connections stay. Everything else (listen address, state dir, cgroups, limits, job account,
uid range, network defaults, the debug endpoint) is read once, at start.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

from jobworker.cgroup import controllers
from jobworker.cgroup.devices import resolve_limits
from jobworker.errors import InvalidArgument, JobworkerError, LimitUnavailable
from jobworker.limits import Limits
from jobworker.manager import JobManager
from jobworker.retention import Retention
from jobworker.server import service
from jobworker.server.accounts import Accounts, IdentityUids
from jobworker.server.authz import Policy, Revocations
from jobworker.server.cli import main
from jobworker.server.daemon_config import Config
from jobworker.server.debug import DebugServer, Metrics
from jobworker.server.fleet import Registrar, check_identity
from jobworker.server.policy import effective_limits
from jobworker.server.quotas import Quotas
from jobworker.spec import JobState
from jobworker.tls import Material, load_server
from jobworker.units import parse_duration

__all__ = ["RPC_DRAIN_SECONDS", "Config", "Daemon", "main", "run", "serve"]

log = logging.getLogger("jobworker.server.daemon")

RPC_DRAIN_SECONDS = 5.0
"""After the jobs have stopped, how long in-flight RPCs (a Logs stream sending its last bytes)
may run before they are cancelled."""


def _secrets(config: Config) -> list[Path]:
    """What sandboxed jobs must not see besides the state dir (the manager hides that): the
    daemon's key and certificate, a ``certs init`` directory's CA key, the policy file."""
    paths = [config.tls.key, config.tls.cert]
    # A CA key next to the server key, or in the PKI of a `certs host` directory (PKI/hosts/NAME).
    for ca_key in (
        config.tls.key.parent / "ca-key.pem",
        config.tls.key.parent.parent.parent / "ca-key.pem",
    ):
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
        self.fleet: Registrar | None = None
        """This host's fleet registration (``--fleet``), else ``None``."""

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
        if self._debug is not None:
            self._debug.reconfigure(policy, revocations)
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
            if self.fleet is not None:  # first leave the fleet: no new placements here
                await self.fleet.close()
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
    if config.fleet is not None:
        check_identity(config.fleet, material.cert)
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
            debug = endpoint = DebugServer(metrics, loop, policy, revocations)
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
    if config.fleet is not None:
        daemon.fleet = Registrar(config.fleet, manager, server.port)
        daemon.fleet.start()
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


if __name__ == "__main__":
    main()

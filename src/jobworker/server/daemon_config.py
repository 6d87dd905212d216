"""The daemon's settings: :class:`Config` (what :func:`~jobworker.server.daemon.serve` takes)
and the defaults it shares with the command line."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

from jobworker.identity import Role
from jobworker.limits import Limits
from jobworker.manager import DEFAULT_STOP_GRACE
from jobworker.retention import DEFAULT_SWEEP_INTERVAL
from jobworker.server.accounts import DEFAULT_UID_RANGE, UidRange
from jobworker.server.fleet import FleetConfig
from jobworker.spec import Network
from jobworker.tls import Paths
from jobworker.units import parse_duration, parse_size

DEFAULT_LISTEN = "127.0.0.1:50051"
DEFAULT_STATE_DIR = Path("/var/lib/jobworker")
DEFAULT_RETAIN_FOR = "7d"
DEFAULT_RETAIN_JOBS = 10_000
DEFAULT_MAX_LOG_BYTES = "1G"
"""A job's output cap: far below a typical disk's free space, so one job cannot fill it,
and far above what a job's log is normally read for."""
DEFAULT_MAX_LOG_BYTES_PER_USER = "10G"


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
    fleet: FleetConfig | None = None
    """Register in a fleet's etcd (``--fleet``; docs/fleet.md); ``None``: a lone host."""

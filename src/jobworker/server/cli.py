"""``workerd``'s command line: the click command :func:`main`, its options, and their parsing into a
:class:`~jobworker.server.daemon_config.Config` for :func:`jobworker.server.daemon.run`."""

from __future__ import annotations

import asyncio
import gc
import sys
from collections.abc import Callable, Sequence
from datetime import timedelta
from pathlib import Path
from typing import TypeVar

import click

from jobworker.errors import InvalidArgument, JobworkerError
from jobworker.limits import Limits
from jobworker.manager import DEFAULT_STOP_GRACE
from jobworker.server import config as config_file
from jobworker.server import heap, logs
from jobworker.server.accounts import DEFAULT_UID_RANGE, UidRange
from jobworker.server.daemon_config import (
    DEFAULT_LISTEN,
    DEFAULT_MAX_LOG_BYTES,
    DEFAULT_MAX_LOG_BYTES_PER_USER,
    DEFAULT_RETAIN_FOR,
    DEFAULT_RETAIN_JOBS,
    DEFAULT_STATE_DIR,
    Config,
)
from jobworker.server.fleet import fleet_config, fleet_options
from jobworker.spec import Network
from jobworker.tls import Paths
from jobworker.units import parse_duration, parse_size

T = TypeVar("T")

OFF = "off"


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
@fleet_options
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
    **fleet: object,
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
    # Here, not at the top: the daemon module re-exports main, and tests replace daemon.run.
    from jobworker.server import daemon

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
            fleet=fleet_config(**fleet),  # type: ignore[arg-type]
        )
        heap.map_large_blocks()  # before the first job: see jobworker.server.heap
        asyncio.run(daemon.run(config))
        logs.shutdown()  # what the daemon logged, before anything else is written
        # A failed RPC leaves reference cycles (error -> traceback -> frames -> call) holding
        # grpc objects; left to the interpreter's exit they make grpc's shutdown take ~2 s
        # (measured: an idle daemon that had answered one NOT_FOUND took 2.2 s to exit).
        gc.collect()
    except JobworkerError as e:
        logs.shutdown()
        click.echo(f"workerd: {e}", err=True)
        sys.exit(1)
    except OSError as e:
        logs.shutdown()
        click.echo(f"workerd: {e}", err=True)
        sys.exit(1)

"""``make bench``: every benchmark against one real ``workerd`` subprocess over mutual TLS on
loopback, each figure beside a baseline measured in the same run.

    sudo .venv/bin/python -m bench              # the full run (a few minutes)
    BENCH_QUICK=1 .venv/bin/python -m bench     # reduced sizes (under a minute)
    BENCH_ONLY=latency,start ...                # some sections only
    BENCH_PLOT_DIR=DIR ...                      # where the PNGs go (full run default: docs/)
    BENCH_PROFILE=DIR ...                       # py-spy the daemon in each section (see profile)
    BENCH_CGROUP=NAME ...                       # the daemon's cgroup (default jobworker-bench)
    BENCH_READ_CHUNK=N, BENCH_MMAP_THRESHOLD=N  # experiments (bench.common._workerd_command)

Prints progress on stderr, then a table, then ONE line of JSON with every figure.
"""

from __future__ import annotations

# isort: off
from jobworker.server import tls13  # noqa: F401 - first: it must precede grpc
import grpc

# isort: on
import asyncio
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from bench import (
    fanout,
    keystroke,
    latency,
    memory,
    order,
    paging,
    plot,
    profile,
    retention,
    scale,
    start,
    throughput,
)
from bench.common import ROOT, Settings, Workerd

SECTIONS = (
    "latency",
    "keystroke",
    "throughput",
    "fanout",
    "memory",
    "start",
    "scale",
    "paging",
    "order",
    "retention",
)
OWN_DAEMON = ("retention",)
"""Sections that run a daemon of their own (with other options), after the shared one stops;
``paging`` starts a second daemon of its own beside it (100 000 recovered records)."""

# (key, goal text, goal check, baseline key, label)
GOALS: tuple[tuple[str, str, Callable[[float], bool] | None, str | None, str], ...] = (
    (
        "follow_p50_ms",
        "<= 0.2 ms",
        lambda v: v <= 0.2,
        "pipe_baseline_p50_ms",
        "follow latency p50",
    ),
    ("follow_p99_ms", "<= 1 ms", lambda v: v <= 1.0, "pipe_baseline_p99_ms", "follow latency p99"),
    ("follow_max_ms", "", None, "pipe_baseline_max_ms", "follow latency max"),
    ("follow_cli_p50_ms", "", None, "pipe_baseline_p50_ms", "worker logs -f latency p50"),
    ("follow_cli_p99_ms", "", None, "pipe_baseline_p99_ms", "worker logs -f latency p99"),
    (
        "keystroke_p50_ms",
        "",
        None,
        "local_pty_p50_ms",
        "keystroke echo (run -t) p50",
    ),
    (
        "keystroke_p99_ms",
        "<= 2 ms",
        lambda v: v <= 2.0,
        "local_pty_p99_ms",
        "keystroke echo (run -t) p99",
    ),
    ("throughput_mib_s", ">= 60% of TLS", None, "tls_baseline_mib_s", "1 follower, MiB/s"),
    ("throughput_ratio_vs_tls", ">= 0.60", lambda v: v >= 0.6, None, "  ratio to TLS socket"),
    ("throughput_mib_s", "", None, "grpc_bare_64k_mib_s", "  vs bare grpc, 64 KiB msgs"),
    ("grpc_bare_1m_mib_s", "", None, "grpc_bare_64k_mib_s", "bare grpc 1 MiB vs 64 KiB"),
    (
        "grpc_bare_1m_cold_mib_s",
        "",
        None,
        "grpc_bare_1m_mib_s",
        "bare grpc 1 MiB distinct vs same",
    ),
    (
        "throughput_ratio_vs_bare_grpc_1m",
        ">= 0.8",
        lambda v: v >= 0.8,
        None,
        "  follower / bare grpc 1 MiB",
    ),
    ("job_write_log_mib_s", "", None, "job_write_file_mib_s", "job writes its log, MiB/s"),
    (
        "throughput_cpu_bound_mib_s",
        "",
        None,
        "grpc_bare_1m_mib_s",
        "  follow's CPU bound vs bare 1 MiB",
    ),
    (
        "throughput_daemon_cpu_s_per_gib",
        "",
        None,
        "grpc_bare_1m_server_cpu_s_per_gib",
        "  daemon CPU s/GiB vs bare server",
    ),
    (
        "throughput_client_cpu_s_per_gib",
        "",
        None,
        "grpc_bare_1m_client_cpu_s_per_gib",
        "  client CPU s/GiB vs bare client",
    ),
    ("throughput_job_cpu_s_per_gib", "", None, None, "  job CPU s/GiB written"),
    ("grpc_bare_64k_cpu_s_per_gib", "", None, None, "  bare grpc 124 KiB CPU s/GiB"),
    ("grpc_bare_1m_cpu_s_per_gib", "", None, None, "  bare grpc 1 MiB CPU s/GiB"),
    ("grpc_bare_1m_cold_cpu_s_per_gib", "", None, None, "  ... distinct messages"),
    ("fanout_1_aggregate_mib_s", "", None, None, "fan-out 1: aggregate MiB/s"),
    ("fanout_10_aggregate_mib_s", "", None, None, "fan-out 10: aggregate MiB/s"),
    ("fanout_10_per_follower_mib_s", "", None, None, "fan-out 10: per follower MiB/s"),
    ("fanout_100_aggregate_mib_s", "", None, None, "fan-out 100: aggregate MiB/s"),
    ("fanout_100_per_follower_mib_s", "", None, None, "fan-out 100: per follower MiB/s"),
    ("fanout_1_cpu_s_per_gib", "", None, None, "fan-out 1: daemon CPU s/GiB"),
    ("fanout_10_cpu_s_per_gib", "", None, None, "fan-out 10: daemon CPU s/GiB"),
    ("fanout_100_cpu_s_per_gib", "", None, None, "fan-out 100: daemon CPU s/GiB"),
    (
        "follower_rss_kib",
        "<= 16 KiB",
        lambda v: v <= 16.0,
        "bare_grpc_stream_rss_kib",
        "RSS per idle follower",
    ),
    ("start_p50_ms", "<= 3 ms", lambda v: v <= 3.0, "fork_exec_p50_ms", "Start RPC p50 ms"),
    ("start_p99_ms", "", None, "fork_exec_p99_ms", "Start RPC p99 ms"),
    (
        "sandbox_start_added_p50_ms",
        "<= 2 ms",
        lambda v: v <= 2.0,
        "start_unsandboxed_p50_ms",
        "sandbox's added Start p50 ms",
    ),
    (
        "sandbox_init_pss_kib",
        "<= 1024 KiB",
        lambda v: v <= 1024.0,
        None,
        "sandbox init PSS per job, KiB",
    ),
    ("start_server_mean_ms", "<= 3 ms", lambda v: v <= 3.0, None, "Start in daemon, mean ms"),
    (
        "start_library_p50_ms",
        "<= 3 ms",
        lambda v: v <= 3.0,
        "start_library_fork_exec_p50_ms",
        "JobManager.start p50 ms",
    ),
    (
        "cli_start_wall_p50_ms",
        "",
        None,
        "python_pass_wall_p50_ms",
        "worker start -- true, ms",
    ),
    (
        "cli_status_p50_ms",
        "<= 150 ms",
        lambda v: v <= 150.0,
        "python_import_grpc_p50_ms",
        "worker status ID, ms",
    ),
    (
        "cli_status_ratio_vs_import_grpc",
        "<= 1.5",
        lambda v: v <= 1.5,
        None,
        "  worker status / import grpc",
    ),
    ("status_p99_ms_1000_jobs", "<= 10 ms", lambda v: v <= 10.0, None, "Status p99, N running"),
    ("list_p99_ms_1000_jobs", "<= 10 ms", lambda v: v <= 10.0, None, "List p99, N running"),
    ("churn_jobs_per_s", ">= 400/s", lambda v: v >= 400.0, None, "churn, jobs/s"),
    (
        retention.key(retention.FULL_JOBS),
        "<= 2048 KiB",
        lambda v: v <= 2048.0,
        None,
        "RSS growth, 100k churned jobs",
    ),
    (retention.key(retention.QUICK_JOBS), "", None, None, "RSS growth, 5k churned jobs"),
    (
        "list_page_p99_ms",
        "<= 10 ms",
        lambda v: v <= 10.0,
        "list_page_rpc_p99_ms",
        "List p99, a 500-job page",
    ),
    ("list_page_retained_jobs", "", None, None, "  of this many retained jobs"),
    (
        "pipe_capture_one_packet_mib_s",
        "",
        None,
        "pipe_capture_deep_mib_s",
        "capture, one-packet pipes MiB/s",
    ),
)


BENCH_TMP = "/var/tmp"


def log(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def machine() -> dict[str, Any]:
    cpu = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem_kib = int(Path("/proc/meminfo").read_text().split()[1])
    fs = subprocess.run(
        ["df", "--output=fstype", BENCH_TMP],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.split()[-1:]
    return {
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "mem_gib": round(mem_kib / (1 << 20), 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
        "state_fs": fs[0] if fs else "?",
    }


def derived(figures: Mapping[str, Any]) -> dict[str, float]:
    """Ratios between figures of different sections of the same run."""
    out: dict[str, float] = {}
    if figures.get("throughput_mib_s") and figures.get("grpc_bare_1m_mib_s"):
        out["throughput_ratio_vs_bare_grpc_1m"] = (
            figures["throughput_mib_s"] / figures["grpc_bare_1m_mib_s"]
        )
    return out


def table(figures: Mapping[str, Any]) -> str:
    rows = [("figure", "goal", "measured", "baseline", "ratio", "")]
    for key, goal, check, base, label in GOALS:
        if key not in figures:
            continue
        value = float(figures[key])
        baseline = float(figures[base]) if base and base in figures else None
        verdict = "" if check is None else ("met" if check(value) else "MISSED")
        rows.append(
            (
                label,
                goal,
                f"{value:.3f}" if value < 100 else f"{value:.0f}",
                ""
                if baseline is None
                else (f"{baseline:.3f}" if baseline < 100 else f"{baseline:.0f}"),
                "" if not baseline else f"{value / baseline:.2f}",
                verdict,
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(line.rstrip() for line in lines)


async def main() -> int:
    if os.geteuid() != 0:
        print("bench: needs root (workerd creates a cgroup per job)", file=sys.stderr)
        return 2
    settings = Settings.from_env()
    only = {s for s in os.environ.get("BENCH_ONLY", "").split(",") if s}
    unknown = only - set(SECTIONS)
    if unknown:
        print(f"bench: unknown BENCH_ONLY sections {sorted(unknown)}; pick from {SECTIONS}")
        return 2
    wanted = [s for s in SECTIONS if not only or s in only]
    figures: dict[str, Any] = {"quick": settings.quick, **machine()}
    latency_samples: dict[str, list[float]] = {}
    fanout_rows: list[dict[str, float]] = []
    began = time.monotonic()
    log(f"bench: {'quick' if settings.quick else 'full'} run of {', '.join(wanted)}")
    # Not /tmp: the daemon's jobs are sandboxed, with a private /tmp, and read their gate files
    # from here.
    with tempfile.TemporaryDirectory(prefix="jobworker-bench-", dir=BENCH_TMP) as tmp:
        daemon = Workerd(Path(tmp))
        log(f"workerd pid {daemon.pid} on {daemon.addr}, cgroup {daemon.cgroup_parent}")
        try:
            profile_dir = os.environ.get("BENCH_PROFILE")
            for section in wanted:
                if section in OWN_DAEMON:
                    continue
                t0 = time.monotonic()
                sampler = None
                if profile_dir:
                    Path(profile_dir).mkdir(parents=True, exist_ok=True)
                    sampler = profile.Sampler(daemon.pid, Path(profile_dir) / f"{section}.folded")
                if section == "latency":
                    found, latency_samples = await latency.run(settings, daemon, log)
                    figures.update(found)
                elif section == "keystroke":
                    figures.update(await keystroke.run(settings, daemon, log))
                elif section == "throughput":
                    figures.update(await throughput.run(settings, daemon, log))
                elif section == "fanout":
                    found, fanout_rows = await fanout.run(settings, daemon, log)
                    figures.update(found)
                elif section == "memory":
                    figures.update(await memory.run(settings, daemon, log))
                elif section == "start":
                    figures.update(await start.run(settings, daemon, log))
                elif section == "scale":
                    figures.update(await scale.run(settings, daemon, log))
                elif section == "paging":
                    figures.update(await paging.run(settings, log))
                elif section == "order":
                    figures.update(await order.run(settings, log))
                figures[f"seconds_{section}"] = round(time.monotonic() - t0, 1)
                if sampler is not None:
                    log(f"profile of workerd during {section}:\n{sampler.stop()}")
            sample = daemon.sample()
            figures["daemon_cpu_s_total"] = sample.cpu_s
            figures["daemon_rss_kib_end"] = float(sample.rss_kib)
        finally:
            daemon.stop()
        log(f"workerd stopped (SIGTERM); {daemon.cgroup_parent} is gone")
        if "retention" in wanted:
            t0 = time.monotonic()
            figures.update(await retention.run(settings, Path(tmp) / "retention", log))
            figures["seconds_retention"] = round(time.monotonic() - t0, 1)
    plot_dir = os.environ.get("BENCH_PLOT_DIR") or ("" if settings.quick else str(ROOT / "docs"))
    if plot_dir:
        for path in plot.draw(Path(plot_dir), latency_samples, fanout_rows, figures):
            log(f"wrote {path}")
    figures.update(derived(figures))
    figures["elapsed_s"] = round(time.monotonic() - began, 1)
    print(table(figures))
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in figures.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))

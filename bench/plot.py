"""The plots in docs/BENCHMARKS.md, drawn from a run's figures (matplotlib, headless)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path


def draw(
    directory: Path,
    latency: Mapping[str, Sequence[float]],
    fanout: Sequence[Mapping[str, float]],
    figures: Mapping[str, object],
) -> list[Path]:
    """Write bench-latency.png and bench-throughput.png to ``directory``; returns the paths
    (none when matplotlib is not installed: ``pip install -e '.[bench]'``)."""
    try:
        # The bench extra; lint runs without it.
        import matplotlib  # type: ignore[import-not-found, unused-ignore]

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # type: ignore[import-not-found, unused-ignore]
    except ImportError:
        return []
    written: list[Path] = []
    if latency:
        fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
        labels = {
            "pipe": "baseline: read straight from a pipe",
            "client": "Client.logs(follow=True) over mTLS",
            "cli": "worker logs -f | reader",
        }
        for name in ("pipe", "client", "cli"):
            values = sorted(latency.get(name, ()))
            if not values:
                continue
            n = len(values)
            ax.plot(values, [(i + 1) / n for i in range(n)], label=f"{labels[name]} (n={n})")
        ax.set_xscale("log")
        ax.set_xlabel("latency from write to arrival (ms, log scale)")
        ax.set_ylabel("fraction of lines")
        ax.axvline(1.0, color="grey", linestyle=":", linewidth=1)
        ax.axvline(5.0, color="grey", linestyle="--", linewidth=1)
        ax.set_title("Follow latency (CDF); goals: p50 <= 1 ms (dotted), p99 <= 5 ms (dashed)")
        ax.title.set_fontsize(9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
        fig.tight_layout()
        path = directory / "bench-latency.png"
        fig.savefig(path)
        plt.close(fig)
        written.append(path)
    if fanout:
        fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
        ks = [int(r["followers"]) for r in fanout]
        x = list(range(len(ks)))
        agg = [r["aggregate_mib_s"] for r in fanout]
        per = [r["per_follower_mib_s"] for r in fanout]
        ax.bar([i - 0.2 for i in x], agg, width=0.4, label="aggregate")
        ax.bar([i + 0.2 for i in x], per, width=0.4, label="per follower (median)")
        tls = figures.get("tls_baseline_mib_s")
        if isinstance(tls, float):
            ax.axhline(
                tls, color="red", linestyle="--", linewidth=1, label="TLS 1.3 socket baseline"
            )
        ax.set_xticks(x, [str(k) for k in ks])
        ax.set_xlabel("concurrent followers of one job")
        ax.set_ylabel("MiB/s")
        ax.set_title("Fan-out throughput over mTLS on loopback (median of repetitions)")
        ax.title.set_fontsize(9)
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = directory / "bench-throughput.png"
        fig.savefig(path)
        plt.close(fig)
        written.append(path)
    return written
